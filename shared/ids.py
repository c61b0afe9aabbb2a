"""Identifiers: ``msg_<yyyymmdd>_<random>`` message ids (seed 004) and request ids."""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime

_MESSAGE_ID = re.compile(r"^msg_\d{8}_[0-9a-z]{6,40}$")
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(value: int, n: int) -> str:
    chars = []
    for _ in range(n):
        value, digit = divmod(value, 36)
        chars.append(_ALPHABET[digit])
    return "".join(chars)


def _random(n: int) -> str:
    """n base-36 characters from one call to the OS's CSPRNG (one call per character cost
    ~7% of ingest's CPU)."""
    return _base36(int.from_bytes(secrets.token_bytes(n), "big"), n)  # 8n bits, more than n*log2(36)


def derived_message_id(day: str, seed: str) -> str:
    """``msg_<day>_<16 base-36 characters of SHA-256(seed)>``: the same seed gives the same id
    (a record routed again, a digest opened again after a crash)."""
    return f"msg_{day}_{_base36(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:16], 'big'), 16)}"


def new_message_id(now: datetime | None = None) -> str:
    """A fresh message id; 16 base-36 characters make collisions negligible (~82 bits)."""
    day = (now or datetime.now(UTC)).strftime("%Y%m%d")
    return f"msg_{day}_{_random(16)}"


def new_attachment_id(now: datetime | None = None) -> str:
    """``att_<yyyymmdd>_<random>`` (seed 004 §3.4.4)."""
    day = (now or datetime.now(UTC)).strftime("%Y%m%d")
    return f"att_{day}_{_random(16)}"


def new_batch_id(now: datetime | None = None) -> str:
    """``bat_<yyyymmdd>_<random>``: one batch send (issue 8)."""
    day = (now or datetime.now(UTC)).strftime("%Y%m%d")
    return f"bat_{day}_{_random(16)}"


def is_message_id(value: str) -> bool:
    return bool(_MESSAGE_ID.match(value))


def new_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


def new_traceparent() -> str:
    """A W3C traceparent for a request that arrived without one."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
