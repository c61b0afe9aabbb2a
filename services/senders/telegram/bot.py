"""Telegram Bot API ``sendMessage`` (https://core.telegram.org/bots/api#sendmessage).

Every message is sent with ``parse_mode: "HTML"``: Telegram's HTML style needs only ``<``,
``>`` and ``&`` escaped outside tags (https://core.telegram.org/bots/api#html-style), which a
converter can guarantee, where MarkdownV2 needs 18 characters escaped with context-dependent
rules. Plain text is escaped, markdown is converted (:func:`markdown_to_html`) to the tags
Telegram supports (b, i, s, code, pre, a, blockquote), a card becomes a bold title, its text,
its fields and an inline keyboard URL button.
"""

from __future__ import annotations

import html
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
    secret_matching,
    vendor_text,
)
from shared.errors import ErrorCode

TEXT_MAX = 4096  # characters of a message after entities parsing

_SAFE_SCHEMES = ("http://", "https://", "tg://", "mailto:")

# --- markdown -> Telegram HTML ----------------------------------------------------------------

_INLINE = re.compile(
    r"(?P<code>(?P<ticks>`+)(?P<code_body>.+?)(?P=ticks))"
    r"|(?P<escape>\\(?P<escaped>[\\`*_{}\[\]()#+\-.!~|>]))"
    r"|(?P<link>\[(?P<link_text>[^\]\n]+)\]\((?P<link_url>[^)\s]+)\))"
    r"|(?P<bold>\*\*(?P<bold_body>(?!\s).+?(?<!\s))\*\*|__(?P<bold_body2>(?!\s).+?(?<!\s))__)"
    r"|(?P<strike>~~(?P<strike_body>(?!\s).+?(?<!\s))~~)"
    r"|(?P<italic>\*(?P<italic_body>(?![\s*]).*?(?<![\s\\]))\*"
    r"|(?<![A-Za-z0-9_])_(?P<italic_body2>(?![\s_]).*?(?<!\s))_(?![A-Za-z0-9_]))"
)


def escape(text: str) -> str:
    """``text`` as literal Telegram HTML (``<``, ``>``, ``&`` and quotes as entities)."""
    return html.escape(text, quote=True)


def inline_to_html(text: str) -> str:
    """One line of markdown's inline syntax as Telegram HTML; anything unmatched is literal."""
    out: list[str] = []
    pos = 0
    for m in _INLINE.finditer(text):
        out.append(escape(text[pos : m.start()]))
        pos = m.end()
        if m.group("code") is not None:
            out.append(f"<code>{escape(m.group('code_body'))}</code>")
        elif m.group("escape") is not None:
            out.append(escape(m.group("escaped")))
        elif m.group("link") is not None:
            url = m.group("link_url")
            if url.lower().startswith(_SAFE_SCHEMES):
                out.append(f'<a href="{escape(url)}">{inline_to_html(m.group("link_text"))}</a>')
            else:  # javascript: and friends stay text
                out.append(escape(m.group(0)))
        elif m.group("bold") is not None:
            out.append(f"<b>{inline_to_html(m.group('bold_body') or m.group('bold_body2'))}</b>")
        elif m.group("strike") is not None:
            out.append(f"<s>{inline_to_html(m.group('strike_body'))}</s>")
        else:
            out.append(f"<i>{inline_to_html(m.group('italic_body') or m.group('italic_body2'))}</i>")
    out.append(escape(text[pos:]))
    return "".join(out)


_FENCE = re.compile(r"^(```|~~~)\s*([A-Za-z0-9_+\-]*)\s*$")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^(\s*)[-*+]\s+(.*)$")
_ORDERED = re.compile(r"^(\s*)(\d{1,9})[.)]\s+(.*)$")
_QUOTE = re.compile(r"^\s{0,3}>\s?(.*)$")
_RULE = re.compile(r"^\s{0,3}([-*_])(\s*\1){2,}\s*$")


def markdown_to_html(text: str) -> str:
    """Common markdown as Telegram HTML: headings bold, lists with bullets, ``>`` quotes as
    ``<blockquote>``, fenced code as ``<pre><code>``, inline bold/italic/strike/code/links."""
    lines = text.split("\n")
    out: list[str] = []
    quote: list[str] = []
    i = 0

    def flush_quote() -> None:
        if quote:
            out.append("<blockquote>" + "\n".join(quote) + "</blockquote>")
            quote.clear()

    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            flush_quote()
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(fence.group(1)):
                end += 1
            code = escape("\n".join(lines[i + 1 : end]))
            language = fence.group(2)
            cls = f' class="language-{language}"' if language else ""
            out.append(f"<pre><code{cls}>{code}</code></pre>")
            i = end + 1
            continue
        quoted = _QUOTE.match(line)
        if quoted:
            quote.append(inline_to_html(quoted.group(1)))
            i += 1
            continue
        flush_quote()
        if heading := _HEADING.match(line):
            out.append(f"<b>{inline_to_html(heading.group(1))}</b>")
        elif _RULE.match(line):
            out.append("──────────")
        elif bullet := _BULLET.match(line):
            out.append(f"{bullet.group(1)}• {inline_to_html(bullet.group(2))}")
        elif ordered := _ORDERED.match(line):
            out.append(f"{ordered.group(1)}{ordered.group(2)}. {inline_to_html(ordered.group(3))}")
        else:
            out.append(inline_to_html(line))
        i += 1
    flush_quote()
    return "\n".join(out)


# --- the plugin -----------------------------------------------------------------------------


class TelegramConfig(ProviderConfig):
    bot_token: Annotated[
        SecretStr,
        secret_matching(
            r"\d{3,20}:[A-Za-z0-9_-]{30,64}", "not a bot token (digits:characters, as @BotFather gives it)"
        ),
    ] = Field(description="the token @BotFather gave: 123456789:AA...")
    api_base: str = Field(default="https://api.telegram.org", max_length=500)

    @field_validator("api_base")
    @classmethod
    def _base(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")


class _Options(ProviderConfig):
    disable_notification: bool = False
    silent: bool = False  # the same, as Herald's other push channels name it
    protect_content: bool = False
    disable_link_preview: bool = False
    message_thread_id: int | None = Field(default=None, ge=1)


class TelegramBot(Plugin[TelegramConfig]):
    """A Telegram bot: ``to`` is a chat id (``-1001234567890``) or ``@channelusername``.

    Options (``message.options``): ``disable_notification`` / ``silent`` (bool: deliver
    without sound), ``protect_content`` (bool: no forwarding or saving),
    ``disable_link_preview`` (bool), ``message_thread_id`` (int: a forum topic).
    """

    channel: ClassVar[str] = "telegram"
    name: ClassVar[str] = "telegram"
    title: ClassVar[str] = "Telegram bot"
    Config: ClassVar[type[ProviderConfig]] = TelegramConfig
    docs: ClassVar[tuple[str, ...]] = (
        "https://core.telegram.org/bots/api#sendmessage",
        "https://core.telegram.org/bots/api#html-style",
        "https://core.telegram.org/bots/api#responseparameters",
        "https://core.telegram.org/bots/api#inlinekeyboardmarkup",
        "https://core.telegram.org/bots/faq#my-bot-is-hitting-limits-how-do-i-avoid-this",
    )
    formats: ClassVar[frozenset[str]] = frozenset({"text", "markdown", "card"})
    _FAQ = "https://core.telegram.org/bots/faq#my-bot-is-hitting-limits-how-do-i-avoid-this"
    rate_limits: ClassVar[tuple[RateLimit, ...]] = (
        RateLimit(1, 1.0, "recipient", _FAQ + " (one message a second per chat)"),
        RateLimit(20, 60.0, "recipient", _FAQ + " (20 a minute per group; applied to every chat)"),
        RateLimit(30, 1.0, "provider", _FAQ + " (about 30 messages a second per bot)"),
    )
    default_cost: ClassVar[Decimal] = Decimal("0")
    address: ClassVar[str] = "a chat id (-1001234567890) or @channelusername"
    option_error: ClassVar[str] = "{name}: invalid option {path}: {problem}"

    def render(self, message: Message) -> tuple[str, dict[str, Any] | None]:
        """(HTML text, reply_markup) of a message."""
        if message.card is not None:
            card = message.card
            parts = [f"<b>{escape(card.title)}</b>"]
            if card.text:
                parts.append(markdown_to_html(card.text))
            if card.fields:
                parts.append("\n".join(f"<b>{escape(f.title)}</b>: {escape(f.value)}" for f in card.fields))
            markup = None
            if card.url:
                markup = {"inline_keyboard": [[{"text": card.button or "Open", "url": card.url}]]}
            return "\n\n".join(parts), markup
        body = markdown_to_html(message.content) if message.format == "markdown" else escape(message.content)
        if message.title:
            body = f"<b>{escape(message.title)}</b>\n{body}" if body else f"<b>{escape(message.title)}</b>"
        return body, None

    def build(self, message: Message) -> HttpCall:
        options = self.read_options(_Options, message)
        text, markup = self.render(message)
        if not text.strip():
            raise Permanent("telegram: empty message", code=ErrorCode.CHANNEL_SEND_FAILED)
        to = message.to
        payload: dict[str, Any] = {
            "chat_id": int(to) if re.fullmatch(r"-?\d+", to) else to,
            "text": text,
            "parse_mode": "HTML",
        }
        if options.disable_notification or options.silent:
            payload["disable_notification"] = True
        if options.protect_content:
            payload["protect_content"] = True
        if options.disable_link_preview:
            payload["link_preview_options"] = {"is_disabled": True}
        if options.message_thread_id is not None:
            payload["message_thread_id"] = options.message_thread_id
        if markup is not None:
            payload["reply_markup"] = markup
        token = self.config.bot_token.get_secret_value()
        return HttpCall("POST", f"{self.config.api_base}/bot{token}/sendMessage", json=payload)

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        body = body_of(response)
        if response.status_code == 200 and body.get("ok") is True:
            result = body.get("result") or {}
            message_id = result.get("message_id")
            chat = result.get("chat") or {}
            return SendResult(
                provider_message_id=str(message_id) if message_id is not None else None,
                detail={"chat_type": chat.get("type")} if chat.get("type") else {},
            )
        code = body.get("error_code") or response.status_code
        description = str(body.get("description") or "")
        parameters = body.get("parameters") or {}
        what = f"telegram: {code} {vendor_text(description, 200)}".rstrip()
        if not body:
            raise http_failure("telegram", response)
        if code == 429:
            after = parameters.get("retry_after")
            raise Retryable(
                what,
                code=ErrorCode.RATE_LIMITED,
                retry_after=float(after) if isinstance(after, int | float) else 1.0,
                sender_fault=True,
            )
        if code in (401, 404):  # a revoked or wrong token: 401 Unauthorized, 404 Not Found
            raise Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        lowered = description.lower()
        if "migrate_to_chat_id" in parameters:
            raise Permanent(
                f"{what} (the group is now the supergroup {parameters['migrate_to_chat_id']})",
                code=ErrorCode.RECIPIENT_INVALID,
            )
        if code == 403 or (code == 400 and _RECIPIENT.search(lowered)):
            raise Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
        if isinstance(code, int) and code >= 500:
            raise Retryable(what, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
        raise Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)


# 400 answers about the chat rather than the message.
_RECIPIENT = re.compile(r"chat not found|user not found|peer_id_invalid|chat_id is empty|group chat was deactivated"
                        r"|have no rights to send|not enough rights to send|need administrator rights")  # fmt: skip
