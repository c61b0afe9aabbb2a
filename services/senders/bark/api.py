"""Bark (iOS push via bark-server, self-hostable): ``POST {server}/push`` with a JSON body
``{"device_key", "title", "body", "markdown", ...}`` (API V2; ``to`` is the device key).

The answer is ``{"code": 200, "message": "success", "timestamp": ...}``; errors carry the same
shape with the HTTP status as ``code``: 400 "failed to get device token: ..." for an unknown
device key, 500 "push failed: APNS push failed: <APNs reason>" when Apple refused the push. A
self-hosted server with basic auth enabled (``--user``/``--password``) answers 418 "I'm a teapot"
to missing or wrong credentials.

``markdown`` (Bark docs: "Push content with basic Markdown. When this is provided, the body field
is ignored") carries markdown and cards; ``body`` still carries the plain text for older apps.
Encrypted pushes (``ciphertext``, AES with a key set in the app) are not supported.

Options (``message.options``; unknown ones are ignored): ``subtitle``, ``group``, ``sound``
(a Bark sound name), ``url`` (opened on tap), ``level`` (``critical``/``active``/
``timeSensitive``/``passive``), ``icon`` (image URL), ``badge`` (int), ``is_archive`` (bool).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
    Plugin,
    ProviderConfig,
    basic_auth,
    body_of,
    card_body,
    http_failure,
    retry_after,
    vendor_text,
)
from shared.errors import ErrorCode


class BarkConfig(ProviderConfig):
    server: str = Field(default="https://api.day.app", pattern=r"^https?://", max_length=2000)
    username: str | None = Field(default=None, min_length=1, max_length=200, description="basic auth (self-hosted)")
    password: SecretStr | None = Field(default=None, description="basic auth (self-hosted)")

    @model_validator(mode="after")
    def _pair(self) -> BarkConfig:
        if bool(self.username) != (self.password is not None):
            raise ValueError("username and password go together")
        return self


class BarkOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    subtitle: str | None = Field(default=None, max_length=200)
    group: str | None = Field(default=None, min_length=1, max_length=100)
    sound: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\-]{1,60}$")
    url: str | None = Field(default=None, max_length=2000, pattern=r"^[A-Za-z][A-Za-z0-9+.\-]*:")
    level: Literal["critical", "active", "timeSensitive", "passive"] | None = None
    icon: str | None = Field(default=None, max_length=2000, pattern=r"^https?://")
    badge: int | None = Field(default=None, ge=0, le=1_000_000)
    is_archive: bool | None = None


# APNs reasons bark-server passes on ("push failed: APNS push failed: <reason>").
_APNS_RECIPIENT = ("BadDeviceToken", "Unregistered", "DeviceTokenNotForTopic", "ExpiredToken")
_APNS_THROTTLED = ("TooManyRequests",)


class Bark(Plugin[BarkConfig]):
    """Bark push to one device key; options: see the module."""

    channel = "bark"
    name = "bark"
    title = "Bark"
    Config = BarkConfig
    docs = (
        "https://bark.day.app/#/en-us/tutorial",
        "https://github.com/Finb/bark-server/blob/master/docs/API_V2.md",
        "https://github.com/Finb/bark-server/blob/master/route_push.go",
        "https://github.com/Finb/bark-server/blob/master/route_auth.go",
    )
    formats = frozenset({"text", "markdown"})
    rate_limits = ()  # none documented (api.day.app is free; self-hosted servers have none)
    default_cost = Decimal("0")
    address = "a Bark device key"

    def build(self, message: Message) -> HttpCall:
        options = self.read_options(BarkOptions, message)
        payload: dict[str, Any] = {"device_key": message.to}
        if message.card is not None:
            card = message.card
            payload["title"] = card.title
            payload["body"] = card_body(card) or card.title
            if markdown := card_body(card, markdown=True):
                payload["markdown"] = markdown
            if card.url and not options.url:
                payload["url"] = card.url
        else:
            if message.title:
                payload["title"] = message.title
            payload["body"] = message.content
            if message.format == "markdown":
                payload["markdown"] = message.content
        for name in ("subtitle", "group", "sound", "url", "level", "icon", "badge"):
            value = getattr(options, name)
            if value is not None:
                payload[name] = value
        if options.is_archive is not None:
            payload["isArchive"] = "1" if options.is_archive else "0"
        headers = {}
        if self.config.username and self.config.password is not None:
            headers["authorization"] = basic_auth(self.config.username, self.config.password.get_secret_value())
        return HttpCall("POST", f"{self.config.server.rstrip('/')}/push", headers=headers, json=payload)

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        body = body_of(response)
        status = response.status_code
        text = str(body.get("message") or "")
        if status == 200 and body.get("code") == 200:
            return SendResult(detail={"timestamp": body.get("timestamp")})
        what = f"bark: HTTP {status}" + (f": {vendor_text(text, 200)}" if text else "")
        if status in (401, 418):  # 418: bark-server's answer to failed basic auth
            raise Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        if any(reason in text for reason in _APNS_RECIPIENT) or status == 400 and "device" in text.lower():
            raise Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
        if any(reason in text for reason in _APNS_THROTTLED):
            raise Retryable(
                what, code=ErrorCode.RATE_LIMITED, retry_after=retry_after(response, 60.0), sender_fault=True
            )
        if status == 200:  # 200 with another code: not a success
            raise Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)
        raise http_failure("bark", response, vendor_text(text, 200))
