"""JSON logs with the request id of the work in hand, and masking of personal data and secrets.

Seed 004 §3.2.4: one JSON object per line (timestamp, level, request_id, service, module,
message, context); e-mail addresses shown as ``u***@example.com``, phone numbers with the
middle hidden, tokens cut to their first 8 characters, passwords never written.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
traceparent_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("traceparent", default=None)

_EMAIL = re.compile(r"(?<![\w.+-])([\w.+-])[\w.+-]*@([\w-]+(?:\.[\w-]+)+)")
_PHONE = re.compile(r"(?<![\w])(\+?\d{1,3}[- ]?)?(\d{3})\d{4}(\d{4})(?!\d)")
_BEARER = re.compile(r"(?i)(bearer\s+)([A-Za-z0-9._~+/=-]{8})[A-Za-z0-9._~+/=-]*")
# The rest of a token may hold base64's + / = (a whsec_ secret is base64 of random bytes).
_TOKEN = re.compile(r"\b((?:whsec|noti|sk|pk|xox[bpa])_[A-Za-z0-9]{0,4})[A-Za-z0-9_.+/=-]{4,}")
# Credentials in URLs' query strings (?access_token=…, &sign=…, ?key=…).
_URL_SECRET = re.compile(r"(?i)([?&](?:access_token|token|key|sign|sig|secret|signature|password|apikey)=)[^&\s\"']+")
_SECRET_KEYS = re.compile(r"(?i)password|passwd|secret|token|api_key|authorization|credential")
# A recipient that is neither an email address nor a phone number may be a device token or a
# push key (push, Bark, PushDeer): as good as a credential for notifying that device.
_RECIPIENT_KEYS = frozenset({"recipient", "to"})
_OPAQUE = re.compile(r"[A-Za-z0-9_:.\-]{20,}")


def mask_email(address: str) -> str:
    """``user@example.com`` -> ``u***@example.com``."""
    return _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", address)


def mask_text(text: str) -> str:
    """Mask every e-mail address, phone number and token found in free text."""
    text = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    text = _URL_SECRET.sub(lambda m: f"{m.group(1)}***", text)
    text = _TOKEN.sub(lambda m: f"{m.group(1)}***", text)
    text = _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", text)
    text = _PHONE.sub(lambda m: f"{m.group(1) or ''}{m.group(2)}****{m.group(3)}", text)
    return text


def mask_value(key: str, value: Any) -> Any:
    """Mask a context value; values under secret-looking keys keep only 8 characters."""
    if _SECRET_KEYS.search(key):
        if value is None:
            return None
        s = str(value)
        return "***" if "password" in key.lower() or len(s) <= 8 else s[:8] + "***"
    if isinstance(value, str):
        if key in _RECIPIENT_KEYS and _OPAQUE.fullmatch(value):
            return value[:6] + "***"
        return mask_text(value)
    if isinstance(value, dict):
        return {k: mask_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_value(key, v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per record, masked, carrying the current request id."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
            "service": self.service,
            "module": record.module,
            "message": mask_text(record.getMessage()),
        }
        traceparent = traceparent_var.get()
        if traceparent:
            entry["traceparent"] = traceparent
        context = getattr(record, "context", None)
        if context:
            entry["context"] = {k: mask_value(k, v) for k, v in context.items()}
        if record.exc_info:
            entry["exc"] = mask_text(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.msg = mask_text(record.getMessage())
        record.args = None
        rid = request_id_var.get()
        base = super().format(record)
        context = getattr(record, "context", None)
        if context:
            base += " " + orjson.dumps({k: mask_value(k, v) for k, v in context.items()}, default=str).decode()
        return f"{base} [{rid}]" if rid else base


def setup_logging(service: str, level: str = "INFO", json_logs: bool = True) -> None:
    """Route every logger (ours and the libraries') through one masked handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(_PlainFormatter(f"%(asctime)s {service} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request's URL at INFO: providers' URLs carry their credentials (bot
    # tokens, webhook keys, access tokens), so its lines are kept to warnings.
    for noisy in ("aiokafka", "kafka", "faust", "mode", "aiohttp.access", "uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def log_event(logger: logging.Logger, level: int, message: str, **context: Any) -> None:
    """Log ``message`` with structured, masked context (seed 004's ``context`` object)."""
    logger.log(level, message, extra={"context": context}, stacklevel=2)
