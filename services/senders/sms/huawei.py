"""Huawei Cloud Message & SMS (MSGSMS): ``POST /sms/batchSendSms/v1`` with X-WSSE authentication.

The form body carries ``from`` (the signature's channel number), ``to``, ``templateId``,
``templateParas`` (a JSON array of strings), ``signature`` (for generic templates) and
``statusCallback``; the headers ``Authorization: WSSE realm="SDP",profile="UsernameToken",
type="Appkey"`` and ``X-WSSE: UsernameToken Username=..., PasswordDigest=..., Nonce=...,
Created=...`` (:func:`password_digest`, :func:`wsse_header`).
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import ClassVar

import httpx
from pydantic import Field, SecretStr

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
    OrderedParams,
    OrderedTemplateOptions,
    Plugin,
    ProviderConfig,
    QuotaExceeded,
    RateLimit,
    body_of,
    http_failure,
    unexpected_answer,
    vendor_text,
)
from shared.errors import ErrorCode

PATH = "/sms/batchSendSms/v1"
AUTHORIZATION = 'WSSE realm="SDP",profile="UsernameToken",type="Appkey"'


# --- X-WSSE ----------------------------------------------------------------------------------


def created(epoch: float) -> str:
    """``Created``: UTC, ``yyyy-MM-ddTHH:mm:ssZ``."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def password_digest(nonce: str, created_at: str, app_secret: str) -> str:
    """``PasswordDigest = Base64(SHA256(Nonce + Created + Password))``, Password being the
    app_secret (the API reference's formula; the Java sample encodes the raw digest)."""
    return base64.b64encode(hashlib.sha256(f"{nonce}{created_at}{app_secret}".encode()).digest()).decode()


def wsse_header(app_key: str, app_secret: str, nonce: str, created_at: str) -> str:
    digest = password_digest(nonce, created_at, app_secret)
    return f'UsernameToken Username="{app_key}",PasswordDigest="{digest}",Nonce="{nonce}",Created="{created_at}"'


# --- configuration and options ---------------------------------------------------------------


class HuaweiSmsConfig(ProviderConfig):
    app_key: str = Field(min_length=1, max_length=128)
    app_secret: SecretStr = Field(min_length=1)
    sender: str = Field(min_length=1, max_length=21, description="channel number of the signature (from)")
    signature: str | None = Field(
        default=None, min_length=1, max_length=100, description="signature name, needed with generic templates"
    )
    status_callback: str | None = Field(default=None, pattern=r"^https?://", max_length=2000)
    endpoint: str = Field(
        default="https://smsapi.cn-north-4.myhuaweicloud.com:443",
        pattern=r"^https?://",
        max_length=2000,
        description="the application's access address (APP接入地址)",
    )


class _Options(OrderedTemplateOptions):
    template_code: str = Field(min_length=1, max_length=32)  # templateId
    params: OrderedParams = Field(default_factory=list, max_length=20)


# --- classification --------------------------------------------------------------------------

# E000001-E000008: the Authorization header; E000020-E000027: the X-WSSE header; E000045: AK/SK.
_AUTH = {f"E0000{n:02d}" for n in (*range(1, 9), *range(20, 28), 45)} | {
    "E000101",  # Authentication failed
    "E000102",  # Invalid app_key
    "E000103",  # app_key has no available ability
    "E000104",  # app_key has no available ability (SMS)
    "E000105",
    "E000106",
    "E000109",  # user status not activated
    "E000110",  # Created too far from now
    "E000111",  # user name or password incorrect
    "E000112",  # user frozen (arrears or violation)
}
_QUOTA = {"E000623", "E000630"}  # the SP's total sending limit; the country/region limit
_MISCONFIGURED = {
    "E000620",  # the client IP is not in the application's whitelist
    "E200018",  # from does not belong to the application
    "E200019",
    "E200020",  # signature and channel do not match
    "E200021",
    "E200027",  # no gateway route configured
    "E200029",  # template type check failed
    "E200030",  # template not activated
    "E200031",
    "E200033",  # wrong template type
}
_RECIPIENT = {
    "E200022",  # receiver channel check failed
    "E200023",  # the number is in no carrier's number table of the application
}


def classify(name: str, code: str, text: str, status: int) -> Exception:
    """The exception for a Huawei ``code`` (request level) or per-number ``status``."""
    what = f"{name}: {code}" + (f": {vendor_text(text)}" if text else "")
    if code == "E200015":  # 待发送短信数量太大: normal flow control, "wait about 10 minutes"
        return Retryable(what, code=ErrorCode.RATE_LIMITED, retry_after=600.0, sender_fault=True)
    if code in _QUOTA:
        return QuotaExceeded(what)
    if code in _AUTH:
        return Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
    if code in _MISCONFIGURED:
        return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
    if code in _RECIPIENT:
        return Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
    if status >= 500:
        return Retryable(what, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
    # E000000 (request not parsable: template params), E000503 (parameter format), E200028
    # (template variables), E200041 (duplicate number): this message's parameters
    return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)


# --- the plugin ------------------------------------------------------------------------------


class HuaweiSms(Plugin[HuaweiSmsConfig]):
    """Huawei Cloud Message & SMS (华为云消息&短信), ``batchSendSms`` v1 with X-WSSE.

    SMS in China goes through approved templates. Options (``message.options``):

    - ``template_code`` (required): the template id (``templateId``, 32 characters);
    - ``sign_name``: the signature name sent as ``signature`` (needed with generic templates),
      default the configured ``signature``;
    - ``params``: the template's variables in order, a list (``["3", "人民公园正门"]``) or a
      mapping whose values are taken in order (``templateParas``);
    - ``with_content``: ``true`` appends the message's text as the last template variable.
    """

    channel: ClassVar[str] = "sms"
    name: ClassVar[str] = "huawei"
    title: ClassVar[str] = "Huawei Cloud SMS"
    Config: ClassVar[type[ProviderConfig]] = HuaweiSmsConfig
    docs: ClassVar[tuple[str, ...]] = (
        "https://support.huaweicloud.com/api-msgsms/sms_05_0001.html",  # 发送短信 (batchSendSms)
        "https://support.huaweicloud.com/api-msgsms/sms_05_0050.html",  # API错误码（发送短信）
        "https://support.huaweicloud.com/intl/en-us/msgsms_faq/sms_faq_0160.html",  # number format
        "https://support.huaweicloud.com/intl/zh-cn/productdesc-msgsms/sms_01_0004.html",  # frequency limits
    )
    formats: ClassVar[frozenset[str]] = frozenset({"text"})
    rate_limits: ClassVar[tuple[RateLimit, ...]] = (
        RateLimit(
            50,
            86400.0,
            "recipient",
            source="https://support.huaweicloud.com/intl/zh-cn/productdesc-msgsms/sms_01_0004.html "
            "(Chinese mainland: 50 messages per number per 24 hours)",
        ),
    )
    # List price of one domestic (Chinese mainland) message, about CNY 0.045; the currency is the
    # deployment's (set the real prices per country with the provider's costs).
    default_cost: ClassVar[Decimal] = Decimal("0.045")
    address: ClassVar[str] = "E.164 phone number"

    def build(self, message: Message) -> HttpCall:
        config: HuaweiSmsConfig = self.config
        options = self.read_options(_Options, message)
        form = {"from": config.sender, "to": message.to, "templateId": options.template_code}
        params = options.template_params(message)
        if params:
            form["templateParas"] = json.dumps(params, ensure_ascii=False)
        if config.status_callback:
            form["statusCallback"] = config.status_callback
        signature = options.sign_name or config.signature
        if signature:
            form["signature"] = signature
        nonce = "".join(ch for ch in self.nonce() if ch.isascii() and ch.isalnum())[:128] or "0"
        headers = {
            "Authorization": AUTHORIZATION,
            "X-WSSE": wsse_header(config.app_key, config.app_secret.get_secret_value(), nonce, created(self.clock())),
        }
        return HttpCall(method="POST", url=config.endpoint.rstrip("/") + PATH, headers=headers, form=form)

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        body = body_of(response)
        code = str(body.get("code") or "")
        results = body.get("result")
        first = results[0] if isinstance(results, list) and results and isinstance(results[0], dict) else {}
        if response.status_code == 200 and code == "000000" and first.get("status", "000000") == "000000":
            return SendResult(
                provider_message_id=first.get("smsMsgId") or None, detail={"country": first.get("countryId")}
            )
        if code == "E000510" and first.get("status"):  # failed: the per-number status says why
            raise classify(self.name, str(first["status"]), "", response.status_code)
        if code and code != "000000":
            raise classify(self.name, code, str(body.get("description") or ""), response.status_code)
        if first.get("status") and first["status"] != "000000":
            raise classify(self.name, str(first["status"]), "", response.status_code)
        if response.status_code == 200:
            raise unexpected_answer(self.name, response)
        raise http_failure(self.name, response)
