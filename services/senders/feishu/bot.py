"""Feishu / Lark custom group bot ("自定义机器人"): one JSON POST to the bot's webhook
``https://open.feishu.cn/open-apis/bot/v2/hook/<token>`` (Lark: ``open.larksuite.com``).

The configured bot IS the destination (the group it was added to); ``message.to`` is the
provider's configured name and is not sent.

Signature (optional "签名校验"): the body carries ``timestamp`` (seconds, a string) and
``sign`` = base64(HMAC-SHA256(key = ``timestamp + "\\n" + secret``, message = empty)); Feishu
refuses a timestamp more than an hour away from its clock (code 19021).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
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
    as_text,
    body_of,
    http_failure,
    result_code,
    retry_after,
    vendor_text,
    webhook_shape,
)
from shared.errors import ErrorCode

DOCS_BOT = "https://open.feishu.cn/document/client-docs/bot-v3/add-custom-bot"
DOCS_CARD = "https://open.feishu.cn/document/uAjLw4CM/ukzMukzMukzM/feishu-cards/feishu-card-overview"
DOCS_POST = "https://open.feishu.cn/document/server-docs/im-v1/message-content-description/create_json"

MAX_BODY = 20 * 1024  # "请求体的数据大小不能超过 20 KB"
HOOK_PATH = r"/open-apis/bot/v2/hook/[A-Za-z0-9_\-]{8,128}"

# Answers of the webhook (custom bot guide; 11232 and 19007 as the service answers them).
SUCCESS = 0
BAD_REQUEST = 9499  # "Bad Request" (malformed body); also seen as "too many request"
TOKEN_INVALID = 19001  # "param invalid: incoming webhook access token invalid"
BOT_NOT_ENABLED = 19007  # "Bot Not Enabled": the bot was disabled in its group
SIGN_MISMATCH = 19021  # "sign match fail or timestamp is not within one hour from current time"
IP_NOT_ALLOWED = 19022  # "Ip Not Allowed"
KEYWORDS_NOT_FOUND = 19024  # "Key Words Not Found"
FREQUENCY_LIMITED = 11232  # "frequency limited": over 100/min or 5/s for the bot
AUTH_CODES = frozenset({TOKEN_INVALID, SIGN_MISMATCH, IP_NOT_ALLOWED})


def feishu_sign(timestamp: int | str, secret: str) -> str:
    """The custom bot signature: base64(HMAC-SHA256) of an empty message under the key
    ``"<timestamp>\\n<secret>"`` (the guide's "签名校验", timestamp in seconds)."""
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


Mention = Annotated[str, StringConstraints(pattern=r"^(all|[A-Za-z0-9_\-]{1,64})$")]


class FeishuOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    mentions: list[Mention] = Field(default_factory=list, max_length=50)


_TEMPLATES = {"blue": "blue", "green": "green", "orange": "orange", "red": "red", "grey": "grey"}
_INLINE = re.compile(r"\[([^\]\n]+)\]\((https?://[^)\s]+)\)|\*\*([^*\n]+)\*\*")
_HEADING = re.compile(r"^#{1,6}\s+(.*)$")


def _post_line(line: str) -> list[dict[str, Any]]:
    """One markdown line as rich-text nodes: links become ``a``, ``**bold**`` and headings
    bold ``text``; everything else stays text."""
    heading = _HEADING.match(line)
    if heading:
        return [{"tag": "text", "text": heading.group(1), "style": ["bold"]}]
    nodes: list[dict[str, Any]] = []
    pos = 0
    for m in _INLINE.finditer(line):
        if m.start() > pos:
            nodes.append({"tag": "text", "text": line[pos : m.start()]})
        if m.group(1) is not None:
            nodes.append({"tag": "a", "text": m.group(1), "href": m.group(2)})
        else:
            nodes.append({"tag": "text", "text": m.group(3), "style": ["bold"]})
        pos = m.end()
    if pos < len(line) or not nodes:
        nodes.append({"tag": "text", "text": line[pos:]})
    return nodes


class FeishuBot(Plugin["FeishuBot.Config"]):
    """Feishu / Lark custom bot of a group chat.

    Formats: ``text`` (``msg_type: text``), ``markdown`` (``msg_type: post`` rich text: the
    title, one paragraph per line, links, bold), ``card`` (``msg_type: interactive``: header
    with the title and the colour as template, a markdown element, the fields as a ``div``
    with short fields, a button opening ``url``).

    Options (``message.options``):

    - ``mentions``: list of ``open_id``/``user_id`` values of group members, or ``"all"``
      (the group must allow @all). Rendered as ``<at user_id=...>`` in text, ``at`` nodes in
      rich text and ``<at id=...>`` in a card.
    """

    channel = "feishu"
    name = "feishu"
    title = "Feishu / Lark custom bot"
    docs = (DOCS_BOT, DOCS_CARD, DOCS_POST)
    formats = frozenset({"text", "markdown", "card"})
    rate_limits = (
        RateLimit(100, 60.0, "provider", source=f"{DOCS_BOT} (100 次/分钟, per bot)"),
        RateLimit(5, 1.0, "provider", source=f"{DOCS_BOT} (5 次/秒, per bot)"),
    )
    default_cost = Decimal("0")
    address = "the configured Feishu bot's name (its webhook is the destination)"
    option_error = "{name}: invalid option {path}: {problem}"

    class Config(ProviderConfig):
        model_config = ConfigDict(hide_input_in_errors=True)

        webhook_url: Annotated[
            SecretStr, webhook_shape("https://open.feishu.cn/open-apis/bot/v2/hook/<token>", path=HOOK_PATH)
        ] = Field(
            description="the bot's webhook, https://open.feishu.cn/open-apis/bot/v2/hook/<token> "
            "(Lark: https://open.larksuite.com/...); secret: the token is in the URL"
        )
        secret: SecretStr | None = Field(default=None, description="the signing secret (签名校验), when enabled")

    # --- rendering ----------------------------------------------------------------------

    def options(self, message: Message) -> FeishuOptions:
        return self.read_options(FeishuOptions, message)

    @staticmethod
    def msg_type(message: Message) -> str:
        if message.card is not None and message.format == "card":
            return "interactive"
        if message.format == "markdown":
            return "post"
        return "text"

    def render(self, message: Message, opts: FeishuOptions) -> dict[str, Any]:
        kind = self.msg_type(message)
        if kind == "interactive":
            return {"msg_type": "interactive", "card": self._card(message, opts)}
        if kind == "post":
            return {"msg_type": "post", "content": {"post": {"zh_cn": self._post(message, opts)}}}
        text = as_text(message)
        if opts.mentions:
            tags = " ".join(
                '<at user_id="all">所有人</at>' if m == "all" else f'<at user_id="{m}"></at>' for m in opts.mentions
            )
            text = f"{tags} {text}"
        return {"msg_type": "text", "content": {"text": text}}

    @staticmethod
    def _post(message: Message, opts: FeishuOptions) -> dict[str, Any]:
        paragraphs = [_post_line(line) for line in message.content.split("\n")]
        if opts.mentions:
            at = [{"tag": "at", "user_id": m} for m in opts.mentions]
            paragraphs[0] = [*at, {"tag": "text", "text": " "}, *paragraphs[0]]
        post: dict[str, Any] = {"content": paragraphs}
        if message.title:
            post = {"title": message.title, **post}
        return post

    @staticmethod
    def _card(message: Message, opts: FeishuOptions) -> dict[str, Any]:
        card = message.card
        assert card is not None
        header: dict[str, Any] = {"title": {"tag": "plain_text", "content": card.title}}
        if card.color:
            header["template"] = _TEMPLATES[card.color]
        elements: list[dict[str, Any]] = []
        text = card.text
        if opts.mentions:
            text = " ".join(f"<at id={m}></at>" for m in opts.mentions) + (f"\n{text}" if text else "")
        if text:
            elements.append({"tag": "markdown", "content": text})
        if card.fields:
            elements.append(
                {
                    "tag": "div",
                    "fields": [
                        {"is_short": True, "text": {"tag": "lark_md", "content": f"**{f.title}**\n{f.value}"}}
                        for f in card.fields
                    ],
                }
            )
        if card.url:
            elements.append(
                {
                    "tag": "action",
                    "actions": [
                        {
                            "tag": "button",
                            "text": {"tag": "plain_text", "content": card.button or "Open"},
                            "type": "primary",
                            "url": card.url,
                        }
                    ],
                }
            )
        if not elements:  # a card needs a body: the title alone
            elements.append({"tag": "markdown", "content": card.title})
        return {"config": {"wide_screen_mode": True}, "header": header, "elements": elements}

    # --- the exchange -------------------------------------------------------------------

    def build(self, message: Message) -> HttpCall:
        body = self.render(message, self.options(message))
        if self.config.secret is not None:
            timestamp = int(self.clock())
            body = {
                "timestamp": str(timestamp),
                "sign": feishu_sign(timestamp, self.config.secret.get_secret_value()),
                **body,
            }
        content = orjson.dumps(body)
        if len(content) > MAX_BODY:
            raise Permanent(
                f"feishu: the request is {len(content)} bytes, over the bot's 20 KB limit",
                code=ErrorCode.CHANNEL_SEND_FAILED,
            )
        return HttpCall(
            "POST",
            self.config.webhook_url.get_secret_value(),
            headers={"Content-Type": "application/json; charset=utf-8"},
            content=content,
        )

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        status = response.status_code
        if status == 429:
            raise self._throttled(response, "HTTP 429")
        if status >= 500:
            raise http_failure(self.name, response)
        body = body_of(response)
        code = result_code(self.name, response, body, "code", "StatusCode")
        if code == SUCCESS and response.is_success:
            return SendResult(provider_message_id=None, detail={"msg_type": self.msg_type(message)})
        raise self.classify(code, str(body.get("msg") or body.get("StatusMessage") or ""), response)

    def classify(self, code: int, msg: str, response: httpx.Response) -> Exception:
        what = f"feishu: code {code}: {vendor_text(msg, 200)}"
        if code in AUTH_CODES:
            return Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        if code == KEYWORDS_NOT_FOUND:  # the bot's keyword filter: its configuration, not the message
            return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
        if code == BOT_NOT_ENABLED:
            return Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
        if code == FREQUENCY_LIMITED or (code == BAD_REQUEST and "too many" in msg.lower()):
            return self._throttled(response, f"code {code}: {vendor_text(msg, 200)}")
        return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)

    def _throttled(self, response: httpx.Response, what: str) -> Retryable:
        # The open platform's gateway tells when its window resets (x-ogw-ratelimit-reset, s).
        wait = retry_after(response)
        reset = response.headers.get("x-ogw-ratelimit-reset")
        if wait is None and reset:
            try:
                wait = max(0.0, float(reset))
            except ValueError:
                wait = None
        return Retryable(f"feishu: throttled: {what}", code=ErrorCode.RATE_LIMITED, retry_after=wait, sender_fault=True)
