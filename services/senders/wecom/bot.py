"""WeCom (企业微信) group robot ("群机器人"): one JSON POST to
``https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=<key>``.

The configured robot IS the destination (its group); ``message.to`` is the provider's
configured name and is not sent. The webhook key is the only credential (WeCom robots have no
signature).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import quote

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints, model_validator

from services.senders.base import Permanent, Retryable
from services.senders.plugins.base import (
    ErrcodeBot,
    HttpCall,
    Message,
    ProviderConfig,
    RateLimit,
    as_markdown,
    as_text,
    vendor_text,
    webhook_shape,
)
from shared.errors import ErrorCode

DOCS_BOT = "https://developer.work.weixin.qq.com/document/path/91770"
DOCS_ERRORS = "https://developer.work.weixin.qq.com/document/path/90313"

TEXT_MAX = 2048  # text.content: "最长不超过2048个字节"
MARKDOWN_MAX = 4096  # markdown.content: "最长不超过4096个字节"
CARD_FIELDS_MAX = 6  # template_card.horizontal_content_list: "列表长度不超过6"

# errcode answers (global error codes page).
SYSTEM_BUSY = -1  # 系统繁忙
FREQ_LIMIT = 45009  # "api freq out of limit": over 20 messages a minute
CONCURRENCY_LIMIT = 45033  # 接口并发调用超过限制
INVALID_WEBHOOK = 93000  # "invalid webhook url": bad key (or the robot was removed from its group)
ROBOT_DISABLED = 93004  # 机器人被停用
NOT_IN_GROUP = 93008  # 不在群里
RECIPIENT_CODES = frozenset({ROBOT_DISABLED, NOT_IN_GROUP})
THROTTLE_CODES = frozenset({FREQ_LIMIT, CONCURRENCY_LIMIT})

# WeCom markdown's three colours (<font color="info|comment|warning">).
_FONT = {"green": "info", "grey": "comment", "orange": "warning", "red": "warning"}

UserId = Annotated[str, StringConstraints(pattern=r"^(@all|[A-Za-z0-9_\-.@]{1,64})$")]
Mobile = Annotated[str, StringConstraints(pattern=r"^(@all|\+?[0-9][0-9\-]{4,19})$")]


class WeComOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    mentioned_list: list[UserId] = Field(default_factory=list, max_length=50)
    mentioned_mobile_list: list[Mobile] = Field(default_factory=list, max_length=50)


def _size(text: str) -> int:
    return len(text.encode())


class WeComBot(ErrcodeBot["WeComBot.Config"]):
    """WeCom group robot.

    Formats: ``text`` (``msgtype: text``, 2048 bytes), ``markdown`` (``msgtype: markdown``,
    4096 bytes), ``card``: ``msgtype: template_card`` of ``card_type: text_notice`` (the title
    as ``main_title``, the text as ``sub_title_text``, the fields as
    ``horizontal_content_list``, the button in ``jump_list`` and the whole card opening
    ``url``), when the card has a ``url`` (a text_notice card requires ``card_action``), at
    most 6 fields and no mentions; otherwise a markdown card (bold title coloured with WeCom's
    ``<font color>``: green -> info, grey -> comment, orange/red -> warning; blue has none). A
    template card has no colour.

    Options (``message.options``):

    - ``mentioned_list``: userids of group members to @, or ``"@all"`` (text; in markdown
      and markdown cards they become ``<@userid>``, and ``"@all"`` is refused: WeCom
      documents it for text only);
    - ``mentioned_mobile_list``: phone numbers of members to @, or ``"@all"`` (text only:
      WeCom has no mention by phone number in markdown, so other formats refuse it).
    """

    channel = "wecom"
    name = "wecom"
    title = "WeCom group robot"
    docs = (DOCS_BOT, DOCS_ERRORS)
    formats = frozenset({"text", "markdown", "card"})
    rate_limits = (RateLimit(20, 60.0, "provider", source=f"{DOCS_BOT} (每个机器人发送的消息不能超过20条/分钟)"),)
    default_cost = Decimal("0")
    address = "the configured WeCom robot's name (its webhook is the destination)"
    option_error = "{name}: invalid option {path}: {problem}"

    class Config(ProviderConfig):
        model_config = ConfigDict(hide_input_in_errors=True)

        endpoint: str = Field(
            default="https://qyapi.weixin.qq.com/cgi-bin/webhook/send", pattern=r"^https?://[^?#\s]+$"
        )
        key: SecretStr | None = Field(default=None, description="the robot's webhook key")
        webhook_url: Annotated[
            SecretStr | None, webhook_shape("https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=...", token="key")
        ] = Field(
            default=None,
            description="instead of key: the whole webhook, https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=...",
        )

        @model_validator(mode="after")
        def _one_key(self) -> WeComBot.Config:
            if (self.key is None) == (self.webhook_url is None):
                raise ValueError("give either key or webhook_url")
            return self

    # --- rendering ----------------------------------------------------------------------

    def options(self, message: Message) -> WeComOptions:
        opts = self.read_options(WeComOptions, message)
        if self.msgtype(message, opts) != "text":
            if opts.mentioned_mobile_list:
                raise self.invalid_option(
                    "mentioned_mobile_list", "WeCom mentions by phone number in text messages only"
                )
            if "@all" in opts.mentioned_list:
                raise self.invalid_option("mentioned_list", "WeCom documents @all in text messages only")
        return opts

    @staticmethod
    def msgtype(message: Message, opts: WeComOptions) -> str:
        card = message.card
        if card is not None and message.format == "card":
            native = card.url is not None and len(card.fields) <= CARD_FIELDS_MAX and not opts.mentioned_list
            return "template_card" if native else "markdown"
        return "markdown" if message.format == "markdown" else "text"

    def render(self, message: Message, opts: WeComOptions) -> dict[str, Any]:
        kind = self.msgtype(message, opts)
        if kind == "template_card":
            return {"msgtype": "template_card", "template_card": self._template_card(message)}
        if kind == "markdown":
            text = self._markdown_card(message) if message.format == "card" else as_markdown(message)
            if opts.mentioned_list:
                text = f"{text}\n" + "".join(f"<@{u}>" for u in opts.mentioned_list)
            if _size(text) > MARKDOWN_MAX:
                raise Permanent(
                    f"wecom: markdown of {_size(text)} bytes, over the robot's {MARKDOWN_MAX}",
                    code=ErrorCode.CHANNEL_SEND_FAILED,
                )
            return {"msgtype": "markdown", "markdown": {"content": text}}
        text = as_text(message)
        if _size(text) > TEXT_MAX:
            raise Permanent(
                f"wecom: text of {_size(text)} bytes, over the robot's {TEXT_MAX}", code=ErrorCode.CHANNEL_SEND_FAILED
            )
        content: dict[str, Any] = {"content": text}
        if opts.mentioned_list:
            content["mentioned_list"] = opts.mentioned_list
        if opts.mentioned_mobile_list:
            content["mentioned_mobile_list"] = opts.mentioned_mobile_list
        return {"msgtype": "text", "text": content}

    @staticmethod
    def _template_card(message: Message) -> dict[str, Any]:
        card = message.card
        assert card is not None and card.url is not None
        body: dict[str, Any] = {"card_type": "text_notice", "main_title": {"title": card.title}}
        if card.text:
            body["sub_title_text"] = card.text
        if card.fields:
            body["horizontal_content_list"] = [{"keyname": f.title, "value": f.value} for f in card.fields]
        body["jump_list"] = [{"type": 1, "title": card.button or "Open", "url": card.url}]
        body["card_action"] = {"type": 1, "url": card.url}
        return body

    @staticmethod
    def _markdown_card(message: Message) -> str:
        card = message.card
        assert card is not None
        title = f"**{card.title}**"
        if card.color in _FONT:
            title = f'<font color="{_FONT[card.color]}">{title}</font>'
        lines = [title]
        if card.text:
            lines.append(card.text)
        lines += [f"> {f.title}: {f.value}" for f in card.fields]
        if card.url:
            lines.append(f"[{card.button or card.url}]({card.url})")
        return "\n".join(lines)

    # --- the exchange -------------------------------------------------------------------

    def url(self) -> str:
        if self.config.webhook_url is not None:
            return self.config.webhook_url.get_secret_value()
        assert self.config.key is not None
        return f"{self.config.endpoint}?key={quote(self.config.key.get_secret_value(), safe='')}"

    def build(self, message: Message) -> HttpCall:
        content = orjson.dumps(self.render(message, self.options(message)))
        return HttpCall(
            "POST", self.url(), headers={"Content-Type": "application/json; charset=utf-8"}, content=content
        )


    @staticmethod
    def classify(code: int, msg: str) -> Exception:
        # errmsg carries "hint: [...], from ip: ..., more info at ...": keep the first part.
        what = f"wecom: errcode {code}: {vendor_text(msg.split(',')[0], 200)}"
        if code == INVALID_WEBHOOK:
            return Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        if code in RECIPIENT_CODES:
            return Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
        if code in THROTTLE_CODES:
            return Retryable(what, code=ErrorCode.RATE_LIMITED, sender_fault=True)
        if code == SYSTEM_BUSY:
            return Retryable(what, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
        return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)
