"""WeChat Official Account template messages (模板消息), seed 004 §4.2.3.

Two requests: an access token, then
``POST /cgi-bin/message/template/send?access_token=TOKEN`` with ``{touser, template_id, url?,
miniprogram?, client_msg_id, data: {key: {value, color?}}}``, answered
``{"errcode": 0, "errmsg": "ok", "msgid": ...}``.

The token comes from the *stable* token endpoint (``POST /cgi-bin/stable_token``, normal mode):
unlike ``GET /cgi-bin/token``, fetching it does not invalidate the token other services of the
same account hold (a deployment often shares its AppID with other systems, and Herald runs
several sender processes), and in normal mode WeChat renews it five minutes before it expires.
It is cached on the instance until five minutes before ``expires_in``; an answer saying the
token is invalid or expired (40001, 40014, 42001) drops it, fetches it again (forcing a new one
if WeChat hands back the same token) and retries the send once.
"""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from typing import Annotated, Any, ClassVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
    Plugin,
    ProviderConfig,
    QuotaExceeded,
    RateLimit,
    as_text,
    body_of,
    first_error,
    http_failure,
    secret_matching,
    vendor_text,
)
from shared.errors import ErrorCode

TOKEN_MARGIN_S = 300  # WeChat renews a stable token 5 minutes before it expires
TOKEN_INVALID = frozenset({40001, 40014, 42001})  # invalid credential, invalid token, token expired
# Global return codes (https://developers.weixin.qq.com/doc/offiaccount/Getting_Started/Global_Return_Code.html)
_AUTH = {
    40001: "invalid credential (AppSecret wrong or the token is not the latest)",
    40002: "invalid grant_type",
    40013: "invalid AppID",
    40125: "invalid AppSecret",
    40164: "the server's IP is not in the account's IP whitelist",
    41001: "access_token missing",
    41002: "appid missing",
    41004: "appsecret missing",
    48001: "the account has no permission for this API",
    50001: "the user has not authorised this API",
    50002: "the user is restricted",
    61024: "the account is under third-party management",
}
_RECIPIENT = {
    40003: "invalid OpenID",
    43004: "the user does not follow the account",
    43019: "the user is in the account's blacklist",
}
_QUOTA = {45009: "the API's daily quota is used up"}
_THROTTLED = {45011: "the API's per-minute quota is used up", 45047: "too many messages to this user"}
_TEMPLATE = {40037: "invalid template_id"}
_TEMPLATE_SEND = "https://developers.weixin.qq.com/doc/offiaccount/Message_Management/Template_Message_Interface.html"


class WeChatConfig(ProviderConfig):
    app_id: str = Field(pattern=r"^wx[0-9a-f]{16}$", description="the Official Account's AppID")
    app_secret: Annotated[
        SecretStr, secret_matching(r"[A-Za-z0-9]{16,64}", "not an AppSecret (32 letters and digits)")
    ] = Field(description="the AppSecret")
    api_base: str = Field(default="https://api.weixin.qq.com", max_length=500)
    default_template_id: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_\-]+$")

    @field_validator("api_base")
    @classmethod
    def _base(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")


class _Value(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str = Field(max_length=1000)
    color: str | None = Field(default=None, pattern=r"^#[0-9A-Fa-f]{6}$")


class _MiniProgram(BaseModel):
    model_config = ConfigDict(extra="forbid")
    appid: str = Field(pattern=r"^wx[0-9a-f]{16}$")
    pagepath: str | None = Field(default=None, max_length=500)


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    template_id: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_\-]+$")
    data: dict[str, Any] | None = Field(default=None, min_length=1, max_length=50)
    url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://")
    miniprogram: _MiniProgram | None = None

    @field_validator("data")
    @classmethod
    def _data(cls, value: dict[str, Any] | None) -> dict[str, _Value] | None:
        if value is None:
            return None
        out = {}
        for key, item in value.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,31}", key):
                raise ValueError(f"{key!r} is not a template keyword name")
            data = {"value": item} if isinstance(item, str) else item
            try:
                out[key] = _Value.model_validate(data)
            except ValidationError as exc:
                where, problem = first_error(exc, data)
                raise ValueError(f"{key}.{where or 'value'}: {problem}") from None
        return out


class WeChatTemplate(Plugin[WeChatConfig]):
    """A WeChat Official Account: ``to`` is a follower's OpenID.

    Options (``message.options``, seed 004 §4.2.3's fields):

    - ``template_id``: the template (else the configuration's ``default_template_id``);
    - ``data``: ``{keyword: value}`` or ``{keyword: {"value": ..., "color": "#173177"}}``; without
      it the message fills ``{"content": {"value": <the text>}}`` (and ``first`` with the
      title), which suits a template with a ``{{content.DATA}}`` keyword;
    - ``url``: the page the message opens; ``miniprogram``: ``{"appid", "pagepath"}``.

    ``client_msg_id`` is the message id, so a retry within WeChat's ten-minute window is not
    delivered twice.
    """

    channel: ClassVar[str] = "wechat_mp"
    name: ClassVar[str] = "wechat_mp"
    title: ClassVar[str] = "WeChat Official Account template message"
    Config: ClassVar[type[ProviderConfig]] = WeChatConfig
    docs: ClassVar[tuple[str, ...]] = (
        _TEMPLATE_SEND,
        "https://developers.weixin.qq.com/doc/service/api/base/api_getstableaccesstoken.html",
        "https://developers.weixin.qq.com/doc/offiaccount/Getting_Started/Global_Return_Code.html",
    )
    formats: ClassVar[frozenset[str]] = frozenset({"text"})
    rate_limits: ClassVar[tuple[RateLimit, ...]] = (
        RateLimit(100_000, 86_400.0, "provider", _TEMPLATE_SEND + " (daily call limit of template messages: 100,000)"),
    )
    default_cost: ClassVar[Decimal] = Decimal("0")
    address: ClassVar[str] = "a follower's OpenID"
    option_error: ClassVar[str] = "{name}: invalid option {path}: {problem}"

    def __init__(self, config: WeChatConfig, http: httpx.AsyncClient, **kwargs: Any) -> None:
        super().__init__(config, http, **kwargs)
        self._token: str | None = None
        self._token_until = 0.0
        self._lock = asyncio.Lock()

    # --- the access token -----------------------------------------------------------------------

    def token_call(self, force_refresh: bool = False) -> HttpCall:
        body = {
            "grant_type": "client_credential",
            "appid": self.config.app_id,
            "secret": self.config.app_secret.get_secret_value(),
            "force_refresh": force_refresh,
        }
        return HttpCall("POST", f"{self.config.api_base}/cgi-bin/stable_token", json=body)

    async def access_token(self, *, rejected: str | None = None) -> str:
        """The cached token, or a new one; ``rejected``: WeChat refused that one, fetch again."""
        async with self._lock:
            if rejected is not None and self._token == rejected:
                self._token = None
            if self._token is not None and self.clock() < self._token_until:
                return self._token
            token, expires_in = await self._fetch(force_refresh=False)
            if token == rejected:  # WeChat still hands out the refused token: force a new one
                token, expires_in = await self._fetch(force_refresh=True)
            self._token = token
            self._token_until = self.clock() + max(0, expires_in - TOKEN_MARGIN_S)
            return token

    async def _fetch(self, *, force_refresh: bool) -> tuple[str, int]:
        response = await self.request(self.token_call(force_refresh))
        body = body_of(response)
        if response.status_code != 200:
            raise http_failure("wechat_mp token", response)
        token = body.get("access_token")
        if isinstance(token, str) and token:
            expires_in = body.get("expires_in")
            return token, int(expires_in) if isinstance(expires_in, int) else 7200
        raise self._error("token", body)

    # --- the message -----------------------------------------------------------------------------

    def payload(self, message: Message) -> dict[str, Any]:
        options = self.read_options(_Options, message)
        template_id = options.template_id or self.config.default_template_id
        if not template_id:
            raise self.invalid_option("template_id", "required (no default_template_id configured)")
        if options.data is not None:
            data = {key: v.model_dump(exclude_none=True) for key, v in options.data.items()}
        else:
            data = {"content": {"value": message.content if message.card is None else as_text(message)}}
            if message.title and message.card is None:
                data = {"first": {"value": message.title}, **data}
        body: dict[str, Any] = {
            "touser": message.to,
            "template_id": template_id,
            "client_msg_id": message.message_id[:64],
            "data": data,
        }
        if options.url:
            body["url"] = options.url
        if options.miniprogram is not None:
            body["miniprogram"] = options.miniprogram.model_dump(exclude_none=True)
        return body

    def send_call(self, message: Message, token: str) -> HttpCall:
        url = httpx.URL(f"{self.config.api_base}/cgi-bin/message/template/send", params={"access_token": token})
        return HttpCall("POST", str(url), json=self.payload(message))

    def build(self, message: Message) -> HttpCall:
        """The send request with the cached token (:meth:`send` makes sure there is one)."""
        return self.send_call(message, self._token or "")

    async def send(self, message: Message) -> SendResult:
        self.payload(message)  # a bad option fails before any request
        token = await self.access_token()
        response = await self.request(self.send_call(message, token))
        if _errcode(response) in TOKEN_INVALID:
            token = await self.access_token(rejected=token)
            response = await self.request(self.send_call(message, token))
        return self.parse(message, response)

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        if response.status_code != 200:
            raise http_failure("wechat_mp", response)
        body = body_of(response)
        if body.get("errcode", 0) == 0 and "msgid" in body:
            return SendResult(provider_message_id=str(body["msgid"]), detail={})
        raise self._error("send", body)

    @staticmethod
    def _error(what: str, body: dict[str, Any]) -> Exception:
        code = body.get("errcode")
        errmsg = str(body.get("errmsg") or "")
        # errmsg ends with a request id ("rid: ..."), kept for WeChat support; no secrets in it.
        text = f"wechat_mp {what}: errcode {code}: {vendor_text(errmsg)}"
        if code == -1:  # system busy
            return Retryable(text, code=ErrorCode.CHANNEL_SEND_FAILED, retry_after=1.0, sender_fault=True)
        if code in _QUOTA:
            return QuotaExceeded(text)
        if code in _THROTTLED:
            return Retryable(text, code=ErrorCode.RATE_LIMITED, retry_after=60.0, sender_fault=True)
        if code in _AUTH or code in TOKEN_INVALID:
            return Permanent(text, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        if code in _RECIPIENT:
            return Permanent(text, code=ErrorCode.RECIPIENT_INVALID)
        if code in _TEMPLATE:  # the configured template does not exist for this account
            return Permanent(text, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
        if code is None:
            return Permanent(f"wechat_mp {what}: unexpected answer", code=ErrorCode.CHANNEL_SEND_FAILED)
        return Permanent(text, code=ErrorCode.CHANNEL_SEND_FAILED)  # 47003 bad data, 40036 ...


def _errcode(response: httpx.Response) -> Any:
    return body_of(response).get("errcode") if response.status_code == 200 else None
