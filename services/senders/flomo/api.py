"""Flomo's record API ("记录 API", a PRO feature): ``POST`` the account's own URL
(``https://flomoapp.com/iwh/<id>/<token>/``, shown in flomo's settings, so the URL is the
secret) with ``{"content": "..."}``; ``#tag`` words in the content become the memo's tags.

Flomo answers HTTP 200 with ``{"code": 0, "message": ..., "memo": {..., "slug"}}`` when the
memo is recorded and ``{"code": -1, "message": "<why>"}`` otherwise; it documents no finer
codes, so a refusal is classified by its message: the daily API limit (Herald's quota), the
URL being invalid or the account not PRO (credentials), throttling; anything else is a
permanent refusal of the memo.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, ClassVar

import httpx
from pydantic import Field, SecretStr, field_validator

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
    Plugin,
    ProviderConfig,
    QuotaExceeded,
    as_markdown,
    as_text,
    body_of,
    http_failure,
    retry_after,
    secret_matching,
    vendor_text,
)
from shared.errors import ErrorCode

_QUOTA = re.compile(r"上限|用完|超出|超过.*(次|条|额)|limit|quota", re.IGNORECASE)
_THROTTLED = re.compile(r"频繁|太快|稍后|too many|too fast|rate", re.IGNORECASE)
_AUTH = re.compile(r"token|api\s*(地址|链接)|无效|非法|授权|\bpro\b|会员|invalid|unauthori", re.IGNORECASE)
_NO_ACCOUNT = re.compile(r"用户不存在|账号不存在|account (does not exist|not found)|user not found", re.IGNORECASE)
_TAG = re.compile(r"^[^\s#]{1,60}$")


class FlomoConfig(ProviderConfig):
    api_url: Annotated[
        SecretStr,
        secret_matching(
            r"https?://[^/\s]+/iwh/[A-Za-z0-9_\-]+/[A-Za-z0-9_\-]+/?",
            "not a flomo record API URL (https://flomoapp.com/iwh/<id>/<token>/)",
        ),
    ] = Field(description="the record API URL from flomo's settings: https://flomoapp.com/iwh/.../")


class _Options(ProviderConfig):
    tags: list[str] = Field(default_factory=list, max_length=20)

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not _TAG.match(tag.lstrip("#")):
                raise ValueError(f"{tag!r} is not a flomo tag (no spaces or #, at most 60 characters)")
        return [tag.lstrip("#") for tag in value]


class Flomo(Plugin[FlomoConfig]):
    """A flomo account (its record API URL).

    Options (``message.options``): ``tags`` (list of tag names, ``a/b`` for nested tags):
    appended to the memo as ``#a #b`` on a last line.

    The memo is the message's markdown (flomo keeps the text; a card is flattened to its
    markdown form); the title, if any, is the first line.
    """

    channel: ClassVar[str] = "flomo"
    name: ClassVar[str] = "flomo"
    title: ClassVar[str] = "flomo"
    Config: ClassVar[type[ProviderConfig]] = FlomoConfig
    # Where flomo shows the record API (URL, request format and example); its help pages on
    # the API were not reachable when this was written, so no finer documentation is cited.
    docs: ClassVar[tuple[str, ...]] = ("https://flomoapp.com/mine?source=incoming_webhook",)
    formats: ClassVar[frozenset[str]] = frozenset({"text", "markdown"})
    # flomo publishes no per-second limit; its daily limit is answered as a refusal (quota).
    rate_limits = ()
    default_cost: ClassVar[Decimal] = Decimal("0")
    address: ClassVar[str] = "a configured flomo account's name"
    option_error: ClassVar[str] = "{name}: invalid option {path}: {problem}"

    def content(self, message: Message, tags: list[str]) -> str:
        text = as_markdown(message) if message.format == "markdown" or message.card is not None else as_text(message)
        if tags:
            text = f"{text}\n{' '.join('#' + t for t in tags)}" if text else " ".join("#" + t for t in tags)
        return text

    def build(self, message: Message) -> HttpCall:
        options = self.read_options(_Options, message)
        content = self.content(message, options.tags)
        if not content.strip():
            raise Permanent("flomo: empty memo", code=ErrorCode.CHANNEL_SEND_FAILED)
        return HttpCall("POST", self.config.api_url.get_secret_value(), json={"content": content})

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        body = body_of(response)
        if response.status_code != 200 or "code" not in body:
            if response.status_code == 404:  # an unknown record URL
                raise Permanent("flomo: HTTP 404 (record API URL unknown)", code=ErrorCode.PROVIDER_AUTH_FAILED,
                                sender_fault=True)  # fmt: skip
            raise http_failure("flomo", response)
        code = body.get("code")
        text = str(body.get("message") or "")
        if code == 0:
            memo = body.get("memo") or {}
            slug = memo.get("slug")
            return SendResult(provider_message_id=str(slug) if slug else None, detail={"tags": memo.get("tags", [])})
        what = f"flomo: code {code}: {vendor_text(text, 200)}"
        if _QUOTA.search(text):
            raise QuotaExceeded(what)
        if _THROTTLED.search(text):
            raise Retryable(
                what, code=ErrorCode.RATE_LIMITED, retry_after=retry_after(response, 60.0), sender_fault=True
            )
        if _NO_ACCOUNT.search(text):
            raise Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
        if _AUTH.search(text):
            raise Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        raise Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)
