"""Microsoft Teams incoming webhook: a Workflows ("When a Teams webhook request is received")
URL or a legacy Office 365 connector URL, both fed the same body -- a message whose one
attachment is an Adaptive Card (``application/vnd.microsoft.card.adaptive``, version 1.4):

- text / markdown: a bold TextBlock title and a TextBlock body (Adaptive Cards render a
  markdown subset: bold, italic, lists, links; headings become bold lines);
- card: title TextBlock (colored), text TextBlock, a FactSet for the fields, an
  Action.OpenUrl button.

Answers: a connector says 200 with body ``1``; a workflow says 202 with no body. Connectors
report a failed delivery in the text of the answer ("Webhook message delivery failed with
error: Microsoft Teams endpoint returned HTTP error 429 ...", the docs: connectors do not
throw 429s), so that text is read before the status: the inner 429 is throttling, an inner
403/404 means the channel behind the webhook is gone (recipient), an inner 5xx is transient.
A removed webhook or a bad workflow signature (401/403/404/410) is the configuration's fault.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, ClassVar

import httpx
from pydantic import Field, SecretStr

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
    Plugin,
    ProviderConfig,
    RateLimit,
    body_of,
    retry_after,
    secret_matching,
    vendor_text,
)
from shared.errors import ErrorCode

CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
CARD_VERSION = "1.4"
CARD_SCHEMA = "http://adaptivecards.io/schemas/adaptive-card.json"
# Card color -> TextBlock color (Adaptive Cards' named colors).
COLORS = {"blue": "Accent", "green": "Good", "orange": "Warning", "red": "Attention", "grey": "Default"}
_INNER = re.compile(r"returned HTTP error (\d{3})")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
_MD_SPECIALS = re.compile(r"([\\*_`\[\]])")
_LIST_START = re.compile(r"^(\s*)([-+*]|\d+\.)(?=\s)", re.MULTILINE)
_CONNECTORS = "https://learn.microsoft.com/en-us/microsoftteams/platform/webhooks-and-connectors/how-to/connectors-using#rate-limiting-for-connectors"  # noqa: E501


def escape_markdown(text: str) -> str:
    """Plain text shown literally in a TextBlock (which renders a markdown subset)."""
    text = _MD_SPECIALS.sub(r"\\\1", text)
    return _LIST_START.sub(lambda m: m.group(1) + "\\" + m.group(2), text)


def teams_markdown(text: str) -> str:
    """Markdown for a TextBlock: headings (unsupported there) as bold lines."""
    return _HEADING.sub(lambda m: f"**{m.group(1)}**", text)


class TeamsConfig(ProviderConfig):
    webhook_url: Annotated[SecretStr, secret_matching(r"https?://[^/\s]+/\S+", "must be an https:// URL")] = Field(
        description="the Workflows trigger URL or the connector's webhook URL"
    )


class _Options(ProviderConfig):
    full_width: bool = False


class TeamsWebhook(Plugin[TeamsConfig]):
    """A Teams channel's incoming webhook (Workflows or connector).

    Options (``message.options``): ``full_width`` (bool: the card spans the channel's width,
    Teams' ``msteams.width: Full``).
    """

    channel: ClassVar[str] = "teams"
    name: ClassVar[str] = "teams"
    title: ClassVar[str] = "Microsoft Teams webhook"
    Config: ClassVar[type[ProviderConfig]] = TeamsConfig
    docs: ClassVar[tuple[str, ...]] = (
        "https://learn.microsoft.com/en-us/microsoftteams/platform/webhooks-and-connectors/how-to/add-incoming-webhook",
        _CONNECTORS,
        "https://learn.microsoft.com/en-us/microsoftteams/platform/task-modules-and-cards/cards/cards-format",
        "https://adaptivecards.io/explorer/",
    )
    formats: ClassVar[frozenset[str]] = frozenset({"text", "markdown", "card"})
    rate_limits: ClassVar[tuple[RateLimit, ...]] = (
        RateLimit(4, 1.0, "provider", _CONNECTORS),
        RateLimit(60, 30.0, "provider", _CONNECTORS),
        RateLimit(100, 3600.0, "provider", _CONNECTORS),
        RateLimit(150, 7200.0, "provider", _CONNECTORS),
        RateLimit(1800, 86400.0, "provider", _CONNECTORS),
    )
    default_cost: ClassVar[Decimal] = Decimal("0")
    address: ClassVar[str] = "a configured Teams webhook's name"
    option_error: ClassVar[str] = "{name}: invalid option {path}: {problem}"

    def card(self, message: Message, options: _Options) -> dict[str, Any]:
        body: list[dict[str, Any]] = []
        actions: list[dict[str, Any]] = []
        if message.card is not None:
            card = message.card
            title: dict[str, Any] = {"type": "TextBlock", "text": escape_markdown(card.title), "weight": "Bolder",
                                     "size": "Large", "wrap": True}  # fmt: skip
            if card.color:
                title["color"] = COLORS[card.color]
            body.append(title)
            if card.text:
                body.append({"type": "TextBlock", "text": teams_markdown(card.text), "wrap": True})
            if card.fields:
                body.append({"type": "FactSet", "facts": [{"title": f.title, "value": f.value} for f in card.fields]})
            if card.url:
                actions.append({"type": "Action.OpenUrl", "title": card.button or "Open", "url": card.url})
        else:
            if message.title:
                body.append({"type": "TextBlock", "text": escape_markdown(message.title), "weight": "Bolder",
                             "size": "Medium", "wrap": True})  # fmt: skip
            if message.content:
                text = (
                    teams_markdown(message.content)
                    if message.format == "markdown"
                    else escape_markdown(message.content)
                )
                body.append({"type": "TextBlock", "text": text, "wrap": True})
        if not body:
            raise Permanent("teams: empty message", code=ErrorCode.CHANNEL_SEND_FAILED)
        content: dict[str, Any] = {
            "$schema": CARD_SCHEMA,
            "type": "AdaptiveCard",
            "version": CARD_VERSION,
            "body": body,
        }
        if actions:
            content["actions"] = actions
        if options.full_width:
            content["msteams"] = {"width": "Full"}
        return content

    def build(self, message: Message) -> HttpCall:
        options = self.read_options(_Options, message)
        payload = {
            "type": "message",
            "attachments": [
                {"contentType": CARD_CONTENT_TYPE, "contentUrl": None, "content": self.card(message, options)}
            ],
        }
        return HttpCall("POST", self.config.webhook_url.get_secret_value(), json=payload)

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        status = response.status_code
        text = response.text.strip()
        inner = _INNER.search(text)
        if inner:  # a connector's "delivery failed" answer, whatever its status
            self._failed_delivery(int(inner.group(1)), text, response)
        if 200 <= status < 300:
            if text in ("", "1") or not re.search(r"error|fail", text, re.IGNORECASE):
                return SendResult(provider_message_id=None, detail={"status": status})
            raise Permanent(f"teams: HTTP {status}: {vendor_text(text, 200)}", code=ErrorCode.CHANNEL_SEND_FAILED)
        error = body_of(response).get("error")
        code = error.get("code", "") if isinstance(error, dict) else ""
        what = f"teams: HTTP {status}" + (f" {code}" if code else f": {vendor_text(text)}" if text else "")
        if status == 429:
            raise Retryable(
                what, code=ErrorCode.RATE_LIMITED, retry_after=retry_after(response, 1.0), sender_fault=True
            )
        if status in (401, 403, 404, 410):  # bad workflow signature, removed webhook or flow
            raise Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        if status >= 500 or status == 408:
            raise Retryable(
                what, code=ErrorCode.CHANNEL_SEND_FAILED, retry_after=retry_after(response), sender_fault=True
            )
        raise Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)  # 400 bad payload, 413 larger than 28 KB

    @staticmethod
    def _failed_delivery(inner: int, text: str, response: httpx.Response) -> None:
        what = f"teams: delivery failed: Teams answered HTTP {inner}"
        if inner == 429:
            raise Retryable(
                what, code=ErrorCode.RATE_LIMITED, retry_after=retry_after(response, 1.0), sender_fault=True
            )
        if inner in (403, 404, 410):
            raise Permanent(what + " (the channel is gone or closed)", code=ErrorCode.RECIPIENT_INVALID)
        if inner >= 500 or inner == 408:
            raise Retryable(
                what, code=ErrorCode.CHANNEL_SEND_FAILED, retry_after=retry_after(response), sender_fault=True
            )
        if inner == 401:
            raise Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        raise Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)
