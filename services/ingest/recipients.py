"""Recipient profiles (issue 10): a tenant's users with an address per channel, language, time
zone, opt-outs, quiet hours and attributes (``/api/v1/recipients``). A send to
``{"user_id": ...}`` reads the profile here and carries a snapshot of it on the request
(``RequestV1.recipient``): routers never query PostgreSQL for one."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson

from shared.db import DB_UNAVAILABLE
from shared.errors import ErrorCode, HeraldError
from shared.events import RecipientProfile

COLUMNS = "user_id, addresses, locale, timezone, opt_outs, quiet_hours, attributes, created_at, updated_at"


def profile_of(row: asyncpg.Record | dict[str, Any]) -> RecipientProfile:
    return RecipientProfile(
        user_id=row["user_id"],
        addresses=row["addresses"] or {},
        locale=row["locale"],
        timezone=row["timezone"],
        opt_outs=row["opt_outs"] or {},
        quiet_hours=row["quiet_hours"],
        attributes=row["attributes"] or {},
    )


async def load_profile(pool: asyncpg.Pool, tenant_id: str, user_id: str, timeout_s: float) -> RecipientProfile | None:
    """The tenant's profile of ``user_id`` (None: no such user); 503 / 5001 when PostgreSQL does
    not answer within ``timeout_s`` (nothing is accepted then)."""
    try:
        row = await asyncio.wait_for(
            pool.fetchrow(
                f"SELECT {COLUMNS} FROM recipients WHERE tenant_id = $1 AND user_id = $2", tenant_id, user_id
            ),  # fmt: skip
            timeout_s,
        )
    except (TimeoutError, *DB_UNAVAILABLE) as exc:
        raise HeraldError(
            ErrorCode.SERVICE_UNAVAILABLE,
            "database unavailable: the recipient's profile could not be read; try again",
            http_status=503,
        ) from exc
    return None if row is None else profile_of(row)


def without_profiles(value: Any) -> Any:
    """``value`` (decoded JSON) with every recipient profile in it, the ``recipient`` object a
    request to a user carries, cut down to ``{"user_id": ...}``; everything else kept. A profile
    is ``config``-scope contact data (every channel's address, attributes); requests are copied
    into places ``read`` keys see (the 'scheduled' event of a message held for quiet hours, dead
    letters), and those answers go through this. A ``recipient`` that is a string (a record's or
    an event's recipient address) stays."""
    if isinstance(value, dict):
        return {
            k: {"user_id": v.get("user_id")} if k == "recipient" and isinstance(v, dict) else without_profiles(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [without_profiles(v) for v in value]
    return value


def text_without_profiles(text: str | None) -> str | None:
    """:func:`without_profiles` of JSON text (a dead letter's payload): the text unchanged when it
    holds no profile or is not JSON (Herald only ever writes profiles into valid JSON)."""
    if not text or '"recipient"' not in text:
        return text
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    redacted = without_profiles(value)
    return text if redacted == value else orjson.dumps(redacted).decode()
