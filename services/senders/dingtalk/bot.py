"""DingTalk custom group robot ("自定义机器人"): one JSON POST to
``https://oapi.dingtalk.com/robot/send?access_token=<token>``.

The configured robot IS the destination (its group); ``message.to`` is the provider's
configured name and is not sent.

Signing ("加签", optional): the query carries ``timestamp`` (milliseconds) and ``sign`` =
urlencode(base64(HMAC-SHA256(key = secret, message = ``timestamp + "\\n" + secret``))); the
secret is the robot's "SEC..." string and the timestamp must be within an hour of DingTalk's
clock (errcode 310000).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import quote, quote_plus

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints, field_validator, model_validator

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

DOCS_BOT = "https://open.dingtalk.com/document/robots/custom-robot-access"
DOCS_SIGN = "https://open.dingtalk.com/document/robots/customize-robot-security-settings"
DOCS_TYPES = "https://open.dingtalk.com/document/robots/message-types-and-data-format"

MAX_BODY = 20_000  # "请保持大小在 20000bytes 以内" (errcode 460101)
BLOCKED_S = 600.0  # "每个机器人每分钟最多发送20条。如果超过20条，会限流10分钟"

# errcode answers of robot/send.
SYSTEM_BUSY = -1  # 系统繁忙
SECURITY = 310000  # keywords not in content / invalid timestamp / sign not match / ip not in whitelist
TOKEN_NOT_EXIST = 300001  # "token is not exist" (also "robot 不存在")
GROUP_DISBANDED = 400013  # 群已被解散
TOKEN_ABSENT = 400101  # access_token不存在
ROBOT_STOPPED = 400102  # 机器人已停用
ROBOT_ABSENT = 400106  # 机器人不存在
SEND_TOO_FAST = 130101  # "send too fast, exceed 20 times per minute"
THROTTLED = 410100  # 发送速度太快而限流
OVER_LIMIT = 90030  # "webhook over limit"
AUTH_CODES = frozenset({TOKEN_NOT_EXIST, TOKEN_ABSENT, ROBOT_ABSENT})
RECIPIENT_CODES = frozenset({GROUP_DISBANDED, ROBOT_STOPPED})
THROTTLE_CODES = frozenset({SEND_TOO_FAST, THROTTLED, OVER_LIMIT})


def dingtalk_sign(timestamp_ms: int | str, secret: str) -> str:
    """The robot's "加签": base64(HMAC-SHA256) of ``"<timestamp>\\n<secret>"`` keyed by the
    secret (UTF-8). The query carries it URL-encoded (:func:`signed_query`)."""
    mac = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def signed_query(timestamp_ms: int, secret: str) -> str:
    """``timestamp=...&sign=...`` with the signature URL-encoded as the documentation asks."""
    return f"timestamp={timestamp_ms}&sign={quote_plus(dingtalk_sign(timestamp_ms, secret))}"


Mobile = Annotated[str, StringConstraints(pattern=r"^\+?[0-9][0-9\-]{4,19}$")]
UserId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_\-$.@]{1,64}$")]


class DingTalkOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    at_mobiles: list[Mobile] = Field(default_factory=list, max_length=50)
    at_user_ids: list[UserId] = Field(default_factory=list, max_length=50)
    at_all: bool = False

    @property
    def mentions(self) -> bool:
        return bool(self.at_mobiles or self.at_user_ids or self.at_all)


def card_markdown(message: Message, *, with_link: bool) -> str:
    """A card as DingTalk markdown (the title as a heading: the markdown ``title`` field only
    shows in the conversation list)."""
    card = message.card
    assert card is not None
    parts = [f"### {card.title}"]
    if card.text:
        parts.append(card.text)
    if card.fields:
        parts.append("\n".join(f"- **{f.title}**: {f.value}" for f in card.fields))
    if with_link and card.url:
        parts.append(f"[{card.button or card.url}]({card.url})")
    return "\n\n".join(parts)


def _preview(text: str) -> str:
    first = next((line.strip("#*> ").strip() for line in text.splitlines() if line.strip()), "")
    return first[:64] or "Notification"


class DingTalkBot(ErrcodeBot["DingTalkBot.Config"]):
    """DingTalk custom robot of a group chat.

    Formats: ``text`` (``msgtype: text``), ``markdown`` (``msgtype: markdown``: ``title`` is
    the conversation-list preview, the message title is also the first line of ``text``),
    ``card`` (``msgtype: actionCard``: the title, the text and the fields as markdown, one
    button ``singleTitle``/``singleURL`` opening ``url``; a card without ``url``, or with
    mentions, which an actionCard cannot carry, goes as markdown). DingTalk documents no
    colours, so a card's ``color`` is not rendered.

    Options (``message.options``):

    - ``at_mobiles``: phone numbers of group members to @ (appended as ``@<mobile>`` to the
      text, as DingTalk requires);
    - ``at_user_ids``: DingTalk user ids to @ (appended as ``@<userid>``);
    - ``at_all``: ``true`` to @ everyone.
    """

    channel = "dingtalk"
    name = "dingtalk"
    title = "DingTalk custom robot"
    docs = (DOCS_BOT, DOCS_SIGN, DOCS_TYPES)
    formats = frozenset({"text", "markdown", "card"})
    rate_limits = (RateLimit(20, 60.0, "provider", source=f"{DOCS_BOT} (每个机器人每分钟最多发送20条)"),)
    default_cost = Decimal("0")
    address = "the configured DingTalk robot's name (its webhook is the destination)"
    option_error = "{name}: invalid option {path}: {problem}"

    class Config(ProviderConfig):
        model_config = ConfigDict(hide_input_in_errors=True)

        endpoint: str = Field(default="https://oapi.dingtalk.com/robot/send", pattern=r"^https?://[^?#\s]+$")
        access_token: SecretStr | None = Field(default=None, description="the robot's access_token")
        webhook_url: Annotated[
            SecretStr | None,
            webhook_shape("https://oapi.dingtalk.com/robot/send?access_token=...", token="access_token"),
        ] = Field(
            default=None,
            description="instead of access_token: the whole webhook, "
            "https://oapi.dingtalk.com/robot/send?access_token=...",
        )
        secret: SecretStr | None = Field(default=None, description='the "加签" secret (SEC...), when enabled')

        @field_validator("secret")
        @classmethod
        def _secret(cls, value: SecretStr | None) -> SecretStr | None:
            if value is not None and not value.get_secret_value().startswith("SEC"):
                raise ValueError('the signing secret is the "SEC..." string of the robot\'s security settings')
            return value

        @model_validator(mode="after")
        def _one_token(self) -> DingTalkBot.Config:
            if (self.access_token is None) == (self.webhook_url is None):
                raise ValueError("give either access_token or webhook_url")
            return self

    # --- rendering ----------------------------------------------------------------------

    def options(self, message: Message) -> DingTalkOptions:
        return self.read_options(DingTalkOptions, message)

    @staticmethod
    def msgtype(message: Message, opts: DingTalkOptions) -> str:
        if message.card is not None and message.format == "card":
            return "actionCard" if message.card.url and not opts.mentions else "markdown"
        return "markdown" if message.format == "markdown" else "text"

    def render(self, message: Message, opts: DingTalkOptions) -> dict[str, Any]:
        kind = self.msgtype(message, opts)
        ats = [*(f"@{m}" for m in opts.at_mobiles), *(f"@{u}" for u in opts.at_user_ids)]
        if kind == "actionCard":
            card = message.card
            assert card is not None and card.url is not None
            body: dict[str, Any] = {
                "msgtype": "actionCard",
                "actionCard": {
                    "title": card.title,
                    "text": card_markdown(message, with_link=False),
                    "btnOrientation": "0",
                    "singleTitle": card.button or "Open",
                    "singleURL": card.url,
                },
            }
            return body
        if kind == "markdown":
            if message.card is not None and message.format == "card":
                text, title = card_markdown(message, with_link=True), message.card.title
            else:
                text = as_markdown(message)
                title = message.title or _preview(message.content)
            if ats:
                text = f"{text}\n\n{' '.join(ats)}"
            body = {"msgtype": "markdown", "markdown": {"title": title, "text": text}}
        else:
            text = as_text(message)
            if ats:
                text = f"{text} {' '.join(ats)}"
            body = {"msgtype": "text", "text": {"content": text}}
        if opts.mentions:
            at: dict[str, Any] = {}
            if opts.at_mobiles:
                at["atMobiles"] = opts.at_mobiles
            if opts.at_user_ids:
                at["atUserIds"] = opts.at_user_ids
            at["isAtAll"] = opts.at_all
            body["at"] = at
        return body

    # --- the exchange -------------------------------------------------------------------

    def url(self) -> str:
        config = self.config
        if config.webhook_url is not None:
            base = config.webhook_url.get_secret_value()
        else:
            assert config.access_token is not None
            base = f"{config.endpoint}?access_token={quote(config.access_token.get_secret_value(), safe='')}"
        if config.secret is None:
            return base
        return f"{base}&{signed_query(int(self.clock() * 1000), config.secret.get_secret_value())}"

    def build(self, message: Message) -> HttpCall:
        content = orjson.dumps(self.render(message, self.options(message)))
        if len(content) > MAX_BODY:
            raise Permanent(
                f"dingtalk: the request is {len(content)} bytes, over the robot's 20000 bytes",
                code=ErrorCode.CHANNEL_SEND_FAILED,
            )
        return HttpCall(
            "POST", self.url(), headers={"Content-Type": "application/json; charset=utf-8"}, content=content
        )


    def classify(self, code: int, msg: str) -> Exception:
        what = f"dingtalk: errcode {code}: {vendor_text(msg, 200)}"
        if code == SECURITY:
            if "keyword" in msg.lower():  # the robot's keyword filter: its configuration
                return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
            return Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)  # sign, timestamp, ip
        if code == TOKEN_NOT_EXIST and re.search(r"param", msg, re.IGNORECASE):
            return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)  # "param error": the body
        if code in AUTH_CODES:
            return Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        if code in RECIPIENT_CODES:
            return Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
        if code in THROTTLE_CODES:
            return Retryable(what, code=ErrorCode.RATE_LIMITED, retry_after=BLOCKED_S, sender_fault=True)
        if code == SYSTEM_BUSY:
            return Retryable(what, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
        return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)
