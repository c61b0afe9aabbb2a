"""ntfy (ntfy.sh or a self-hosted server): publishing as JSON, ``POST {server}/`` with
``{"topic", "message", "title", "priority", "tags", "click", "icon", "markdown"}``.

JSON publishing (docs: "Publish as JSON") rather than ``POST /{topic}`` with headers: titles and
tags in any language travel as UTF-8 JSON, where headers would need RFC 2047 encoding. ``to`` is
the topic. Authentication, when the topic is protected: an access token (``Authorization:
Bearer tk_...``) or a username/password (Basic).

The answer is the published message, ``{"id", "time", "expires", "event": "message", "topic",
...}``. Errors are ``{"code": 40101, "http": 401, "error": "unauthorized", "link": ...}`` (server
/errors.go): 401/403 credentials; 429 42901 requests, 42902-42904 other limits (throttling),
42905 daily attachment bandwidth and 42908 "too many messages" (the daily message quota,
``visitor-message-daily-limit``) are quotas; 413 4130x too large; 400 40009/40010 invalid or
disallowed topic; 507 50701 "cannot publish to UnifiedPush topic without previously active
subscriber".

Options (``message.options``; unknown ones are ignored): ``priority`` (1-5 or min/low/default/
high/max/urgent), ``tags`` (list of strings, emoji short codes), ``click`` (URL opened on tap; a
card's link by default), ``icon`` (JPEG/PNG URL).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
    Plugin,
    ProviderConfig,
    QuotaExceeded,
    RateLimit,
    basic_auth,
    body_of,
    card_body,
    http_failure,
    retry_after,
    vendor_text,
)
from shared.errors import ErrorCode

PRIORITIES = {"min": 1, "low": 2, "default": 3, "high": 4, "max": 5, "urgent": 5}


class NtfyConfig(ProviderConfig):
    server: str = Field(default="https://ntfy.sh", pattern=r"^https?://", max_length=2000)
    token: SecretStr | None = Field(default=None, description="access token (tk_...), sent as Bearer")
    username: str | None = Field(default=None, min_length=1, max_length=200)
    password: SecretStr | None = None

    @model_validator(mode="after")
    def _one_way(self) -> NtfyConfig:
        if self.token is not None and self.username:
            raise ValueError("give either token or username/password, not both")
        if bool(self.username) != (self.password is not None):
            raise ValueError("username and password go together")
        return self


class NtfyOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    priority: int | str | None = None
    tags: list[str] = Field(default_factory=list, max_length=20)
    click: str | None = Field(default=None, max_length=2000, pattern=r"^[A-Za-z][A-Za-z0-9+.\-]*:")
    icon: str | None = Field(default=None, max_length=2000, pattern=r"^https?://")

    @field_validator("priority")
    @classmethod
    def _priority(cls, value: int | str | None) -> int | None:
        if value is None:
            return None
        if isinstance(value, str) and value.strip().lower() in PRIORITIES:
            return PRIORITIES[value.strip().lower()]
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5:
            return value
        raise ValueError("1-5 or min/low/default/high/max/urgent")

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        if any(not tag.strip() or "," in tag or len(tag) > 100 for tag in value):
            raise ValueError("tags are non-empty strings without commas")
        return value


_QUOTA = {42905, 42908}  # daily attachment bandwidth, daily message limit
_TOPIC = {40009, 40010}  # topic invalid, topic disallowed


class Ntfy(Plugin[NtfyConfig]):
    """ntfy publish (JSON) to one topic; options: see the module."""

    channel = "ntfy"
    name = "ntfy"
    title = "ntfy"
    Config = NtfyConfig
    docs = (
        "https://docs.ntfy.sh/publish/#publish-as-json",
        "https://docs.ntfy.sh/publish/#markdown-formatting",
        "https://docs.ntfy.sh/publish/#authentication",
        "https://docs.ntfy.sh/publish/#limitations",
        "https://docs.ntfy.sh/config/#rate-limiting",
        "https://github.com/binwiederhier/ntfy/blob/main/server/errors.go",
    )
    formats = frozenset({"text", "markdown"})
    rate_limits = (
        # Per visitor: a bucket of 60 requests ("visitor-request-limit-burst") refilled one per 5 s
        # ("visitor-request-limit-replenish"); 60 per 300 s never overdraws that bucket.
        RateLimit(60, 300.0, source="https://docs.ntfy.sh/config/#rate-limiting"),
    )
    default_cost = Decimal("0")
    address = "an ntfy topic"

    def build(self, message: Message) -> HttpCall:
        options = self.read_options(NtfyOptions, message)
        payload: dict[str, Any] = {"topic": message.to}
        if message.card is not None:
            payload["title"] = message.card.title
            payload["message"] = card_body(message.card, markdown=True) or message.card.title
            payload["markdown"] = True
            if message.card.url and not options.click:
                payload["click"] = message.card.url
        else:
            if message.title:
                payload["title"] = message.title
            payload["message"] = message.content
            if message.format == "markdown":
                payload["markdown"] = True
        if options.priority is not None:
            payload["priority"] = options.priority
        if options.tags:
            payload["tags"] = options.tags
        if options.click:
            payload["click"] = options.click
        if options.icon:
            payload["icon"] = options.icon
        headers = {}
        if self.config.token is not None:
            headers["authorization"] = f"Bearer {self.config.token.get_secret_value()}"
        elif self.config.username and self.config.password is not None:
            headers["authorization"] = basic_auth(self.config.username, self.config.password.get_secret_value())
        return HttpCall("POST", f"{self.config.server.rstrip('/')}/", headers=headers, json=payload)

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        body = body_of(response)
        status = response.status_code
        if status == 200 and body.get("id"):
            return SendResult(
                provider_message_id=str(body["id"]), detail={"topic": body.get("topic"), "time": body.get("time")}
            )
        code = body.get("code") if isinstance(body.get("code"), int) else 0
        error = vendor_text(str(body.get("error") or ""), 200)
        what = f"ntfy: HTTP {status}" + (f" {code}" if code else "") + (f": {error}" if error else "")
        if status in (401, 403):
            raise Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        if code in _QUOTA:
            raise QuotaExceeded(what, retry_after=retry_after(response))
        if status == 429:
            # The request bucket refills one request every 5 s.
            raise Retryable(
                what, code=ErrorCode.RATE_LIMITED, retry_after=retry_after(response, 5.0), sender_fault=True
            )
        if code in _TOPIC or status == 507:
            raise Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
        if status == 200:
            raise Permanent(what + ": no message id in the answer", code=ErrorCode.CHANNEL_SEND_FAILED)
        raise http_failure("ntfy", response, error)
