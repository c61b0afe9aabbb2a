"""Gotify (self-hosted): ``POST {server}/message`` with the application's token in the
``X-Gotify-Key`` header and a JSON body ``{"title", "message", "priority", "extras"}``.

An endpoint channel: the configured application is the destination (``to`` names the provider
configuration and is not sent). Markdown and cards are sent with the message extra
``client::display`` ``contentType: text/markdown``; a link to open with ``client::notification``
``click.url``.

The answer is the created message ``{"id", "appid", "message", "title", "priority", "extras",
"date"}``. Errors are ``{"error": "Unauthorized", "errorCode": 401, "errorDescription": ...}``:
401 (no or unknown token) and 403 (credentials that are not an application token) are the
provider's credentials; 400 a rejected message.

Options (``message.options``; unknown ones are ignored): ``priority`` (int, overrides the
configured default), ``click_url`` (opened on notification tap).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from services.senders.base import Permanent, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
    Plugin,
    ProviderConfig,
    body_of,
    card_body,
    http_failure,
    vendor_text,
)
from shared.errors import ErrorCode


class GotifyConfig(ProviderConfig):
    server: str = Field(pattern=r"^https?://", max_length=2000, description="the Gotify server's base URL")
    app_token: SecretStr = Field(min_length=1, description="the application's token")
    priority: int = Field(default=5, ge=0, le=10)


class GotifyOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    priority: int | None = Field(default=None, ge=0, le=10, strict=True)
    click_url: str | None = Field(default=None, max_length=2000, pattern=r"^[A-Za-z][A-Za-z0-9+.\-]*:")


class Gotify(Plugin[GotifyConfig]):
    """Gotify message to the configured application; options: see the module."""

    channel = "gotify"
    name = "gotify"
    title = "Gotify"
    Config = GotifyConfig
    docs = (
        "https://gotify.net/docs/pushmsg",
        "https://gotify.net/docs/msgextras",
        "https://gotify.net/api-docs",
        "https://github.com/gotify/server/blob/master/auth/authentication.go",
    )
    formats = frozenset({"text", "markdown"})
    rate_limits = ()  # a self-hosted server documents none
    default_cost = Decimal("0")
    address = "a configured Gotify application's name"

    def build(self, message: Message) -> HttpCall:
        options = self.read_options(GotifyOptions, message)
        extras: dict[str, Any] = {}
        payload: dict[str, Any] = {}
        click = options.click_url
        if message.card is not None:
            payload["title"] = message.card.title
            payload["message"] = card_body(message.card, markdown=True) or message.card.title
            click = click or message.card.url
        else:
            if message.title:
                payload["title"] = message.title
            payload["message"] = message.content
        if message.card is not None or message.format == "markdown":
            extras["client::display"] = {"contentType": "text/markdown"}
        if click:
            extras["client::notification"] = {"click": {"url": click}}
        payload["priority"] = self.config.priority if options.priority is None else options.priority
        if extras:
            payload["extras"] = extras
        headers = {"x-gotify-key": self.config.app_token.get_secret_value()}
        return HttpCall("POST", f"{self.config.server.rstrip('/')}/message", headers=headers, json=payload)

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        body = body_of(response)
        status = response.status_code
        if status == 200 and body.get("id") is not None:
            return SendResult(provider_message_id=str(body["id"]), detail={"appid": body.get("appid")})
        text = vendor_text(str(body.get("errorDescription") or body.get("error") or ""), 200)
        if status == 200:
            raise Permanent("gotify: no message id in the answer", code=ErrorCode.CHANNEL_SEND_FAILED)
        raise http_failure("gotify", response, text)  # 401/403 credentials, 400 rejected, 5xx transient
