"""Seed 004's error-code table (§3.6), defined once, with each code's HTTP status. Herald adds
1007 (rate limited) and 1008 (monthly quota exhausted), both 429, 1009 (the message's state
does not allow it, e.g. cancelling one already dispatched), 409, and 2010-2013 for channels
other than email (delivery failed, no provider configured, credentials refused, recipient
refused): the seed has no code for them.

Exception tree::

    HeraldError(code, message, field=None)     -- anything answered with the envelope
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Seed 004 §3.6 error codes; ``http_status`` gives the status each one is answered with."""

    SUCCESS = 0
    INVALID_PARAMS = 1001
    UNAUTHENTICATED = 1002
    FORBIDDEN = 1003
    NOT_FOUND = 1004
    METHOD_NOT_ALLOWED = 1005
    DUPLICATE_REQUEST = 1006
    RATE_LIMITED = 1007
    QUOTA_EXCEEDED = 1008
    STATE_CONFLICT = 1009
    EMAIL_SEND_FAILED = 2001
    EMAIL_POOL_EXHAUSTED = 2002
    TEMPLATE_NOT_FOUND = 2003
    TEMPLATE_RENDER_FAILED = 2004
    ATTACHMENT_UPLOAD_FAILED = 2005
    ATTACHMENT_NOT_FOUND = 2006
    ATTACHMENT_TOO_LARGE = 2007
    MESSAGE_NOT_FOUND = 2008
    SMTP_CONNECT_FAILED = 2009
    CHANNEL_SEND_FAILED = 2010
    PROVIDER_NOT_CONFIGURED = 2011
    PROVIDER_AUTH_FAILED = 2012
    RECIPIENT_INVALID = 2013
    DATABASE_ERROR = 3001
    REDIS_ERROR = 3002
    QUEUE_ERROR = 3003
    INTERNAL_ERROR = 5000
    SERVICE_UNAVAILABLE = 5001

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]

    @property
    def default_message(self) -> str:
        return _MESSAGES[self]


_HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.SUCCESS: 200,
    ErrorCode.INVALID_PARAMS: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.DUPLICATE_REQUEST: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.QUOTA_EXCEEDED: 429,
    ErrorCode.STATE_CONFLICT: 409,
    ErrorCode.EMAIL_SEND_FAILED: 500,
    ErrorCode.EMAIL_POOL_EXHAUSTED: 503,
    ErrorCode.TEMPLATE_NOT_FOUND: 404,
    ErrorCode.TEMPLATE_RENDER_FAILED: 400,
    ErrorCode.ATTACHMENT_UPLOAD_FAILED: 500,
    ErrorCode.ATTACHMENT_NOT_FOUND: 404,
    ErrorCode.ATTACHMENT_TOO_LARGE: 413,
    ErrorCode.MESSAGE_NOT_FOUND: 404,
    ErrorCode.SMTP_CONNECT_FAILED: 502,
    ErrorCode.CHANNEL_SEND_FAILED: 502,
    ErrorCode.PROVIDER_NOT_CONFIGURED: 404,
    ErrorCode.PROVIDER_AUTH_FAILED: 502,
    ErrorCode.RECIPIENT_INVALID: 400,
    ErrorCode.DATABASE_ERROR: 500,
    ErrorCode.REDIS_ERROR: 500,
    ErrorCode.QUEUE_ERROR: 500,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
}

_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.SUCCESS: "success",
    ErrorCode.INVALID_PARAMS: "invalid request parameters",
    ErrorCode.UNAUTHENTICATED: "authentication failed (token invalid or expired)",
    ErrorCode.FORBIDDEN: "permission denied",
    ErrorCode.NOT_FOUND: "resource not found",
    ErrorCode.METHOD_NOT_ALLOWED: "method not allowed",
    ErrorCode.DUPLICATE_REQUEST: "duplicate request (idempotency key reused)",
    ErrorCode.RATE_LIMITED: "too many requests",
    ErrorCode.QUOTA_EXCEEDED: "monthly quota exhausted",
    ErrorCode.STATE_CONFLICT: "not possible in the message's current state",
    ErrorCode.EMAIL_SEND_FAILED: "email sending failed",
    ErrorCode.EMAIL_POOL_EXHAUSTED: "no mailbox available in the pool",
    ErrorCode.TEMPLATE_NOT_FOUND: "template not found or deleted",
    ErrorCode.TEMPLATE_RENDER_FAILED: "template rendering failed",
    ErrorCode.ATTACHMENT_UPLOAD_FAILED: "attachment upload failed",
    ErrorCode.ATTACHMENT_NOT_FOUND: "attachment not found or expired",
    ErrorCode.ATTACHMENT_TOO_LARGE: "attachment too large",
    ErrorCode.MESSAGE_NOT_FOUND: "message not found",
    ErrorCode.SMTP_CONNECT_FAILED: "SMTP connection failed",
    ErrorCode.CHANNEL_SEND_FAILED: "delivery through the provider failed",
    ErrorCode.PROVIDER_NOT_CONFIGURED: "no provider configured for the channel",
    ErrorCode.PROVIDER_AUTH_FAILED: "the provider refused the configured credentials",
    ErrorCode.RECIPIENT_INVALID: "the provider refused the recipient",
    ErrorCode.DATABASE_ERROR: "database unavailable",
    ErrorCode.REDIS_ERROR: "redis unavailable",
    ErrorCode.QUEUE_ERROR: "message queue error",
    ErrorCode.INTERNAL_ERROR: "internal error",
    ErrorCode.SERVICE_UNAVAILABLE: "service temporarily unavailable",
}


class HeraldError(Exception):
    """An error answered to the caller with seed 004's envelope.

    ``field`` names the offending request field when there is one; ``http_status``
    overrides the code's default status (a 413 for an oversized body is still 1001).
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        *,
        field: str | None = None,
        http_status: int | None = None,
        details: object | None = None,
    ) -> None:
        self.code = code
        self.message = message or code.default_message
        self.field = field
        self.http_status = http_status or code.http_status
        self.details = details
        super().__init__(self.message)


def field_errors(exc: object) -> list[dict[str, str]]:
    """``[{field, message}]`` from a pydantic ValidationError (dotted field paths), or one
    ``body`` entry for anything else (e.g. a JSON decode error)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return [{"field": ".".join(map(str, e["loc"])) or "body", "message": e["msg"]} for e in errors()]
    return [{"field": "body", "message": str(exc)[:200]}]
