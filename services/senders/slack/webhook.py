"""Slack incoming webhook: one JSON POST to ``https://hooks.slack.com/services/T.../B.../...``.

The webhook IS the destination (the channel chosen when it was created); ``message.to`` is
the provider's configured name and is not sent. The URL is the only credential (incoming
webhooks are not signed). Slack answers in plain text: ``ok``, or an error string with a
4xx/5xx status.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
    Plugin,
    ProviderConfig,
    RateLimit,
    as_markdown,
    as_text,
    http_failure,
    retry_after,
    webhook_shape,
)
from shared.errors import ErrorCode

DOCS_WEBHOOKS = "https://docs.slack.dev/messaging/sending-messages-using-incoming-webhooks"
DOCS_ERRORS = "https://api.slack.com/changelog/2016-05-17-changes-to-errors-for-incoming-webhooks"
DOCS_LIMITS = "https://docs.slack.dev/apis/web-api/rate-limits"
DOCS_BLOCKS = "https://docs.slack.dev/reference/block-kit/blocks"
DOCS_MRKDWN = "https://docs.slack.dev/messaging/formatting-message-text"

HOOK_PATH = r"/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+"

# Block Kit limits.
HEADER_MAX = 150
SECTION_TEXT_MAX = 3000
FIELDS_PER_SECTION = 10
FIELD_TEXT_MAX = 2000

# Error strings of incoming webhooks.
RECIPIENT_ERRORS = frozenset({"channel_not_found", "channel_is_archived", "user_not_found"})
AUTH_ERRORS = frozenset(
    {
        "invalid_token",
        "no_service",
        "no_service_id",
        "no_team",
        "team_disabled",
        "no_active_hooks",
        "action_prohibited",
        "posting_to_general_channel_denied",
    }
)

# Colours as an attachment's colour bar (Block Kit blocks have none).
COLORS = {"blue": "#1D9BD1", "green": "#2EB67D", "orange": "#ECB22E", "red": "#E01E5A", "grey": "#9E9E9E"}

Mention = Annotated[str, StringConstraints(pattern=r"^([UW][A-Z0-9]{2,20}|here|channel|everyone)$")]


class SlackOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    mentions: list[Mention] = Field(default_factory=list, max_length=50)

    def tags(self) -> str:
        return " ".join(f"<!{m}>" if m in ("here", "channel", "everyone") else f"<@{m}>" for m in self.mentions)


def escape(text: str) -> str:
    """Slack's three control characters (``&``, ``<``, ``>``) escaped, as its formatting
    guide requires for text that is not meant as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^)\s]+)\)")
_BOLD = re.compile(r"\*\*([^*\n]+)\*\*")
_HEADING = re.compile(r"^#{1,6}\s+(.+)$", re.MULTILINE)


def mrkdwn(markdown: str) -> str:
    """Markdown as Slack mrkdwn: ``**b**``/headings -> ``*b*``, ``[t](u)`` -> ``<u|t>``, the
    rest escaped."""
    out: list[str] = []
    pos = 0
    for m in _LINK.finditer(markdown):
        out.append(_inline(markdown[pos : m.start()]))
        out.append(f"<{m.group(2)}|{escape(m.group(1)).replace('|', '¦')}>")
        pos = m.end()
    out.append(_inline(markdown[pos:]))
    return "".join(out)


def _inline(text: str) -> str:
    text = escape(text)
    text = _HEADING.sub(
        lambda m: f"*{m.group(1).strip().strip('*')}*" + (" " if m.group(1).endswith(" ") else ""), text
    )
    return _BOLD.sub(r"*\1*", text)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SlackWebhook(Plugin["SlackWebhook.Config"]):
    """Slack incoming webhook.

    Formats: ``text`` (``text``, escaped), ``markdown`` (``text`` as mrkdwn: bold, headings
    as bold lines, links), ``card`` (Block Kit: a ``header`` with the title, a ``section``
    with the text as mrkdwn, ``section`` fields (10 a section), an ``actions`` block with a
    button opening ``url``; with a ``color`` the blocks go in an attachment whose bar has
    that colour; ``text`` carries the plain-text version for notifications).

    Options (``message.options``):

    - ``mentions``: Slack user ids (``U...``/``W...``) or ``here``/``channel``/``everyone``,
      put before the text (``<@U...>``, ``<!here>``).
    """

    channel = "slack"
    name = "slack"
    title = "Slack incoming webhook"
    docs = (DOCS_WEBHOOKS, DOCS_ERRORS, DOCS_LIMITS, DOCS_BLOCKS, DOCS_MRKDWN)
    formats = frozenset({"text", "markdown", "card"})
    rate_limits = (
        RateLimit(1, 1.0, "provider", source=f"{DOCS_LIMITS} (incoming webhooks: 1 per second, short bursts allowed)"),
    )
    default_cost = Decimal("0")
    address = "the configured Slack webhook's name (the webhook's channel is the destination)"
    option_error = "{name}: invalid option {path}: {problem}"

    class Config(ProviderConfig):
        model_config = ConfigDict(hide_input_in_errors=True)

        webhook_url: Annotated[
            SecretStr, webhook_shape("https://hooks.slack.com/services/T.../B.../...", path=HOOK_PATH)
        ] = Field(description="the incoming webhook, https://hooks.slack.com/services/T.../B.../... (secret)")

    # --- rendering ----------------------------------------------------------------------

    def options(self, message: Message) -> SlackOptions:
        return self.read_options(SlackOptions, message)

    @staticmethod
    def kind(message: Message) -> str:
        if message.card is not None and message.format == "card":
            return "blocks"
        return "mrkdwn" if message.format == "markdown" else "text"

    def render(self, message: Message, opts: SlackOptions) -> dict[str, Any]:
        kind = self.kind(message)
        mentions = opts.tags()
        if kind == "blocks":
            blocks = self._blocks(message)
            if mentions:
                blocks.insert(0, {"type": "section", "text": {"type": "mrkdwn", "text": mentions}})
            fallback = escape(as_text(message))
            color = message.card.color if message.card else None
            if color:
                return {"text": fallback, "attachments": [{"color": COLORS[color], "blocks": blocks}]}
            return {"text": fallback, "blocks": blocks}
        text = mrkdwn(as_markdown(message)) if kind == "mrkdwn" else escape(as_text(message))
        return {"text": f"{mentions} {text}" if mentions else text}

    @staticmethod
    def _blocks(message: Message) -> list[dict[str, Any]]:
        card = message.card
        assert card is not None
        blocks: list[dict[str, Any]] = [
            {"type": "header", "text": {"type": "plain_text", "text": _clip(card.title, HEADER_MAX), "emoji": True}}
        ]
        text = mrkdwn(card.text) if card.text else ""
        for start in range(0, len(text), SECTION_TEXT_MAX):
            blocks.append(
                {"type": "section", "text": {"type": "mrkdwn", "text": text[start : start + SECTION_TEXT_MAX]}}
            )
        fields = [
            {"type": "mrkdwn", "text": _clip(f"*{escape(f.title)}*\n{escape(f.value)}", FIELD_TEXT_MAX)}
            for f in card.fields
        ]
        for start in range(0, len(fields), FIELDS_PER_SECTION):
            blocks.append({"type": "section", "fields": fields[start : start + FIELDS_PER_SECTION]})
        if card.url:
            button = {
                "type": "button",
                "text": {"type": "plain_text", "text": card.button or "Open", "emoji": True},
                "url": card.url,
            }
            blocks.append({"type": "actions", "elements": [button]})
        return blocks

    # --- the exchange -------------------------------------------------------------------

    def build(self, message: Message) -> HttpCall:
        content = orjson.dumps(self.render(message, self.options(message)))
        return HttpCall(
            "POST",
            self.config.webhook_url.get_secret_value(),
            headers={"Content-Type": "application/json; charset=utf-8"},
            content=content,
        )

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        status = response.status_code
        if response.is_success:
            return SendResult(provider_message_id=None, detail={"kind": self.kind(message)})
        error = response.text.strip()[:100]
        if status == 429:
            raise Retryable(
                f"slack: HTTP 429: {error}",
                code=ErrorCode.RATE_LIMITED,
                retry_after=retry_after(response, 1.0),
                sender_fault=True,
            )
        if status >= 500:
            raise http_failure(self.name, response, error)
        if error in RECIPIENT_ERRORS:
            raise Permanent(f"slack: HTTP {status}: {error}", code=ErrorCode.RECIPIENT_INVALID)
        if error in AUTH_ERRORS:
            raise Permanent(f"slack: HTTP {status}: {error}", code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        raise http_failure(self.name, response, error if re.fullmatch(r"[a-z_]{1,60}", error) else "")
