"""Discord webhook execution (https://discord.com/developers/docs/resources/webhook#execute-webhook).

``POST /api/webhooks/{id}/{token}?wait=true`` with a JSON body: ``content`` (at most 2000
characters, Discord markdown) and/or ``embeds`` (a card: title, description, url, color,
fields). ``wait=true`` makes Discord answer the created message object, whose ``id`` is kept.
Mentions are not parsed unless the send allows them (``allowed_mentions: {"parse": []}``), so a
message quoting ``@everyone`` does not ping a whole server.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, ClassVar

import httpx
from pydantic import Field, SecretStr, field_validator

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
    Plugin,
    ProviderConfig,
    RateLimit,
    body_of,
    http_failure,
    retry_after,
    secret_matching,
    vendor_text,
)
from shared.errors import ErrorCode

CONTENT_MAX = 2000
EMBED_TITLE_MAX = 256
EMBED_DESCRIPTION_MAX = 4096
FIELD_NAME_MAX = 256
FIELD_VALUE_MAX = 1024
FIELDS_MAX = 25

COLORS = {"blue": 0x3498DB, "green": 0x2ECC71, "orange": 0xE67E22, "red": 0xE74C3C, "grey": 0x95A5A6}

# JSON error codes (https://discord.com/developers/docs/topics/opcodes-and-status-codes#json)
UNKNOWN_CHANNEL = 10003
UNKNOWN_WEBHOOK = 10015
INVALID_WEBHOOK_TOKEN = 50027
_MARKDOWN_SPECIALS = re.compile(r"([\\*_~`|>])")
_LINE_START = re.compile(r"^(\s*)([#\-+]|\d+\.)(?=\s)", re.MULTILINE)


def escape_markdown(text: str) -> str:
    """``text`` shown literally by Discord's markdown (backslash escapes)."""
    text = _MARKDOWN_SPECIALS.sub(r"\\\1", text)
    return _LINE_START.sub(lambda m: m.group(1) + "\\" + m.group(2), text)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class DiscordConfig(ProviderConfig):
    webhook_url: Annotated[
        SecretStr,
        secret_matching(
            r"https?://[^/\s]+(/.*)?/webhooks/\d+/[A-Za-z0-9_\-]+/?(\?.*)?",
            "not a Discord webhook URL (.../api/webhooks/{id}/{token})",
        ),
    ] = Field(description="https://discord.com/api/webhooks/{id}/{token}")
    username: str | None = Field(default=None, min_length=1, max_length=80)
    avatar_url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://")

    @field_validator("username")
    @classmethod
    def _username(cls, value: str | None) -> str | None:
        # Discord refuses these substrings in a webhook's username.
        if value is not None and re.search(r"discord|clyde|@|#|:|```", value, re.IGNORECASE):
            raise ValueError("Discord refuses usernames with 'discord', 'clyde', @, #, : or ```")
        return value


class _Options(ProviderConfig):
    thread_id: str | None = Field(default=None, pattern=r"^\d{1,20}$")
    allow_mentions: bool = False
    tts: bool = False


class DiscordWebhook(Plugin[DiscordConfig]):
    """A Discord channel's webhook.

    Options (``message.options``): ``thread_id`` (snowflake string: post in that thread of the
    channel), ``allow_mentions`` (bool, default false: let ``@everyone``/roles/users in the
    content ping), ``tts`` (bool).

    Text is escaped (Discord renders markdown everywhere), markdown goes as is; content longer
    than 2000 characters goes as an embed description (up to 4096, cut beyond). A card is an
    embed: title (linked to ``url``), description (the text, plus the button as a link),
    fields, color.
    """

    channel: ClassVar[str] = "discord"
    name: ClassVar[str] = "discord"
    title: ClassVar[str] = "Discord webhook"
    Config: ClassVar[type[ProviderConfig]] = DiscordConfig
    docs: ClassVar[tuple[str, ...]] = (
        "https://discord.com/developers/docs/resources/webhook#execute-webhook",
        "https://discord.com/developers/docs/resources/message#embed-object-embed-limits",
        "https://discord.com/developers/docs/topics/rate-limits",
        "https://discord.com/developers/docs/topics/opcodes-and-status-codes#json",
    )
    formats: ClassVar[frozenset[str]] = frozenset({"text", "markdown", "card"})
    # Discord publishes no fixed numbers for webhooks ("do not hard code"; read X-RateLimit-*):
    # these are the bucket its webhook answers carry (X-RateLimit-Limit 5, reset after 2 s) and
    # the per-channel webhook limit commonly cited by Discord staff (30 a minute; not in the docs).
    rate_limits: ClassVar[tuple[RateLimit, ...]] = (
        RateLimit(5, 2.0, "provider", "X-RateLimit-Limit/Reset-After of webhook answers (topics/rate-limits)"),
        RateLimit(30, 60.0, "provider", "commonly cited per-channel webhook limit, not in Discord's docs"),
    )
    default_cost: ClassVar[Decimal] = Decimal("0")
    address: ClassVar[str] = "a configured Discord webhook's name"
    option_error: ClassVar[str] = "{name}: invalid option {path}: {problem}"

    def payload(self, message: Message, options: _Options) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if message.card is not None:
            card = message.card
            description = card.text
            if card.url and card.button:
                description = f"{description}\n\n[{escape_markdown(card.button)}]({card.url})".strip()
            embed: dict[str, Any] = {"title": _cut(card.title, EMBED_TITLE_MAX)}
            if description:
                embed["description"] = _cut(description, EMBED_DESCRIPTION_MAX)
            if card.url:
                embed["url"] = card.url
            if card.color:
                embed["color"] = COLORS[card.color]
            if card.fields:
                embed["fields"] = [
                    {"name": _cut(f.title, FIELD_NAME_MAX), "value": _cut(f.value or "\u200b", FIELD_VALUE_MAX),
                     "inline": False}
                    for f in card.fields[:FIELDS_MAX]
                ]  # fmt: skip
            body["embeds"] = [embed]
        else:
            text = message.content if message.format == "markdown" else escape_markdown(message.content)
            title = f"**{escape_markdown(message.title)}**" if message.title else ""
            content = f"{title}\n{text}" if title and text else title or text
            if len(content) <= CONTENT_MAX:
                body["content"] = content
            else:  # too long for content: an embed holds up to 4096
                embed = {"description": _cut(text, EMBED_DESCRIPTION_MAX)}
                if message.title:
                    embed["title"] = _cut(message.title, EMBED_TITLE_MAX)
                body["embeds"] = [embed]
        if not body.get("content") and not body.get("embeds"):
            raise Permanent("discord: empty message", code=ErrorCode.CHANNEL_SEND_FAILED)
        if self.config.username:
            body["username"] = self.config.username
        if self.config.avatar_url:
            body["avatar_url"] = self.config.avatar_url
        if options.tts:
            body["tts"] = True
        if not options.allow_mentions:
            body["allowed_mentions"] = {"parse": []}
        return body

    def build(self, message: Message) -> HttpCall:
        options = self.read_options(_Options, message)
        url = httpx.URL(self.config.webhook_url.get_secret_value())
        params = dict(url.params)
        params["wait"] = "true"
        if options.thread_id:
            params["thread_id"] = options.thread_id
        return HttpCall("POST", str(url.copy_with(params=params)), json=self.payload(message, options))

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        status = response.status_code
        body = body_of(response)
        if status == 200 and body.get("id"):
            detail = {"channel_id": body["channel_id"]} if body.get("channel_id") else {}
            return SendResult(provider_message_id=str(body["id"]), detail=detail)
        if status == 204:  # no wait=true (a URL configured with wait=false)
            return SendResult(provider_message_id=None, detail={})
        code = body.get("code")
        what = f"discord: HTTP {status}" + (f" {code} {vendor_text(str(body.get('message', '')))}" if body else "")
        if status == 429:
            after = body.get("retry_after")
            seconds = float(after) if isinstance(after, int | float) else retry_after(response, 1.0)
            scope = response.headers.get("x-ratelimit-scope") or ("global" if body.get("global") else "")
            raise Retryable(
                what + (f" (scope {scope})" if scope else ""),
                code=ErrorCode.RATE_LIMITED,
                retry_after=seconds,
                sender_fault=True,
            )
        if code == UNKNOWN_CHANNEL:  # the thread (or the webhook's channel) does not exist
            raise Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
        if code in (UNKNOWN_WEBHOOK, INVALID_WEBHOOK_TOKEN) or status in (401, 403, 404):
            raise Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        if status >= 500:
            raise Retryable(
                what, code=ErrorCode.CHANNEL_SEND_FAILED, retry_after=retry_after(response), sender_fault=True
            )
        if 400 <= status < 500:  # 50006 empty message, 50035 invalid form body ...
            raise Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)
        raise http_failure("discord", response, "unexpected answer")
