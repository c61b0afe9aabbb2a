"""Aliyun (Alibaba Cloud) SMS: Dysmsapi ``SendSms``, API version 2017-05-25, RPC style.

The request is one ``POST /`` whose form body carries every parameter, the common ones
(``AccessKeyId``, ``Action``, ``Format``, ``SignatureMethod``, ``SignatureNonce``,
``SignatureVersion``, ``Timestamp``, ``Version``) and the operation's (``PhoneNumbers``,
``SignName``, ``TemplateCode``, ``TemplateParam``, ``OutId``), signed with the RPC signature
(V2, HMAC-SHA1): see :func:`string_to_sign` / :func:`sign`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, ClassVar
from urllib.parse import quote

import httpx
from pydantic import BeforeValidator, Field, SecretStr

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
    Plugin,
    ProviderConfig,
    QuotaExceeded,
    RateLimit,
    TemplateOptions,
    TemplateValue,
    as_text,
    body_of,
    http_failure,
    template_values,
    unexpected_answer,
    vendor_text,
)
from shared.errors import ErrorCode

API_VERSION = "2017-05-25"
ACTION = "SendSms"


# --- the RPC signature (V2) ------------------------------------------------------------------


def percent_encode(value: str) -> str:
    """RFC 3986 encoding of the UTF-8 bytes: ``A-Z a-z 0-9 - _ . ~`` kept, everything else
    ``%XY`` (a space is ``%20``, never ``+``; ``*`` is ``%2A``; ``~`` stays)."""
    return quote(value, safe="-_.~")


def canonical_query(params: Mapping[str, str]) -> str:
    """The canonicalized query string: parameters (``Signature`` excluded) sorted by name, names
    and values percent-encoded, joined with ``=`` and ``&``."""
    return "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in sorted(params.items()) if k != "Signature")


def string_to_sign(method: str, params: Mapping[str, str]) -> str:
    """``HTTPMethod & percentEncode("/") & percentEncode(CanonicalizedQueryString)``."""
    return f"{method.upper()}&{percent_encode('/')}&{percent_encode(canonical_query(params))}"


def sign(access_key_secret: str, method: str, params: Mapping[str, str]) -> str:
    """``Base64(HMAC-SHA1(AccessKeySecret + "&", StringToSign))``."""
    key = f"{access_key_secret}&".encode()
    digest = hmac.new(key, string_to_sign(method, params).encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def timestamp(epoch: float) -> str:
    """ISO 8601 UTC, ``yyyy-MM-ddTHH:mm:ssZ``."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def phone_number(to: str) -> str:
    """``PhoneNumbers`` form of an E.164 number: Chinese mainland numbers as their 11 digits,
    others as country code + number without ``+`` (``+85212345678`` -> ``85212345678``)."""
    digits = to.lstrip("+")
    if to.startswith("+86") and len(digits) == 13:
        return digits[2:]
    return digits


# --- configuration and options ---------------------------------------------------------------


class AliyunSmsConfig(ProviderConfig):
    access_key_id: str = Field(min_length=1, max_length=128)
    access_key_secret: SecretStr = Field(min_length=1)
    sign_name: str = Field(min_length=1, max_length=100, description="the approved signature (签名) used by default")
    region_id: str = Field(default="cn-hangzhou", min_length=1, max_length=64)
    endpoint: str = Field(default="https://dysmsapi.aliyuncs.com/", pattern=r"^https?://", max_length=2000)


class _Options(TemplateOptions):
    params: Annotated[dict[str, TemplateValue], BeforeValidator(template_values)] = Field(
        default_factory=dict, max_length=50
    )
    content_param: str | None = Field(default=None, min_length=1, max_length=100)


# --- classification --------------------------------------------------------------------------

# isv.BUSINESS_LIMIT_CONTROL is the per-number frequency control (1/min, 5/h, 10/day for codes;
# 50/day for notifications); its Message names the window that tripped.
_WINDOWS = (("分钟", 60.0), ("minute", 60.0), ("小时", 3600.0), ("hour", 3600.0), ("天", 86400.0), ("day", 86400.0))

_QUOTA = {
    "isv.AMOUNT_NOT_ENOUGH",  # 账户余额不足
    "isv.OUT_OF_SERVICE",  # 业务停机 (balance below zero)
    "isv.DAY_LIMIT_CONTROL",  # the account's daily volume cap set in the console
    "isv.MONTH_LIMIT_CONTROL",  # the account's monthly volume cap
}
_AUTH = {
    "InvalidAccessKeyId.NotFound",
    "InvalidAccessKeyId.Inactive",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "isv.ACCOUNT_NOT_EXISTS",
    "isv.ACCOUNT_ABNORMAL",
    "isp.RAM_PERMISSION_DENY",
    "Forbidden.RAM",
    "isv.PRODUCT_UN_SUBSCRIPT",
    "isv.PRODUCT_UNSUBSCRIBE",
}
_RECIPIENT = {
    "isv.MOBILE_NUMBER_ILLEGAL",
    "isv.BLACK_KEY_CONTROL_LIMIT",  # the number is on the blacklist
    "isv.DOMESTIC_NUMBER_NOT_SUPPORTED",
}
_MISCONFIGURED = {  # the provider's setup (signature, template, network) is wrong: another provider may do
    "isv.SMS_TEMPLATE_ILLEGAL",
    "isv.SMS_SIGNATURE_ILLEGAL",
    "isv.SMS_SIGN_ILLEGAL",
    "isv.SIGN_STATE_ILLEGAL",
    "isv.SMS_SIGNATURE_SCENE_ILLEGAL",
    "isv.EXTEND_CODE_ERROR",
    "isv.DENY_IP_RANGE",
    "InvalidTimeStamp.Expired",  # the sender's clock
    "InvalidTimeStamp.Format",
}


def classify(name: str, code: str, message: str, response: httpx.Response) -> Exception:
    """The exception for an Aliyun error ``Code`` (and its ``Message``)."""
    shown = vendor_text(message)
    what = f"{name}: {code}" + (f": {shown}" if message and code != "SignatureDoesNotMatch" else "")
    if code == "isv.BUSINESS_LIMIT_CONTROL":
        wait = next((s for word, s in _WINDOWS if word in message.lower()), 60.0)
        return Retryable(what, code=ErrorCode.RATE_LIMITED, retry_after=wait, sender_fault=True)
    if code.startswith("Throttling") or code == "ServiceUnavailable.Throttling":
        return Retryable(what, code=ErrorCode.RATE_LIMITED, retry_after=1.0, sender_fault=True)
    if code in _QUOTA:
        return QuotaExceeded(what)
    if code in _AUTH:
        return Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
    if code in _RECIPIENT:
        return Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
    if code in _MISCONFIGURED:
        return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
    if code == "SignatureNonceUsed":  # a fresh nonce next time
        return Retryable(what, code=ErrorCode.CHANNEL_SEND_FAILED, retry_after=1.0, sender_fault=True)
    if code.startswith("isp.") or code in ("InternalError", "ServiceUnavailable") or response.status_code >= 500:
        return Retryable(what, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
    # the content or parameters of this message (isv.SMS_CONTENT_ILLEGAL, TEMPLATE_MISSING_PARAMETERS,
    # INVALID_JSON_PARAM, PARAM_LENGTH_LIMIT, MissingParameter ...)
    return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)


# --- the plugin ------------------------------------------------------------------------------


class AliyunSms(Plugin[AliyunSmsConfig]):
    """Aliyun SMS (阿里云短信服务), Dysmsapi ``SendSms``.

    SMS in China goes through approved templates, so the message's text is only sent when a
    template variable is named for it. Options (``message.options``):

    - ``template_code`` (required): the approved template (``SMS_123456789``);
    - ``sign_name``: the approved signature, default the configured ``sign_name``;
    - ``params``: the template's variables, ``{"code": "1234"}`` (strings or numbers; sent as
      the ``TemplateParam`` JSON, all values as strings);
    - ``content_param``: the name of a template variable that receives the message's text
      (a card or a title flattened to plain text).

    Recipients: Chinese mainland numbers are sent as their 11 digits, others as country code +
    number without ``+``. ``OutId`` carries the dispatch id.
    """

    channel: ClassVar[str] = "sms"
    name: ClassVar[str] = "aliyun"
    title: ClassVar[str] = "Aliyun SMS"
    Config: ClassVar[type[ProviderConfig]] = AliyunSmsConfig
    docs: ClassVar[tuple[str, ...]] = (
        "https://help.aliyun.com/en/sms/developer-reference/api-dysmsapi-2017-05-25-sendsms",
        "https://help.aliyun.com/document_detail/25490.htm",  # V2 RPC request syntax and signature
        "https://help.aliyun.com/zh/sms/developer-reference/api-error-codes",
        "https://help.aliyun.com/document_detail/2881383.html",  # 短信发送流控限制
    )
    formats: ClassVar[frozenset[str]] = frozenset({"text"})
    rate_limits: ClassVar[tuple[RateLimit, ...]] = (
        RateLimit(
            5000,
            1.0,
            "provider",
            source="https://help.aliyun.com/en/sms/developer-reference/api-dysmsapi-2017-05-25-sendsms "
            "(QPS limit 5,000 per user); per-number limits depend on the template type and the "
            "console settings and come back as isv.BUSINESS_LIMIT_CONTROL",
        ),
    )
    # List price of one domestic (Chinese mainland) message, about CNY 0.045; the currency is the
    # deployment's (set the real prices per country with the provider's costs).
    default_cost: ClassVar[Decimal] = Decimal("0.045")
    address: ClassVar[str] = "E.164 phone number (sent as 11 digits for +86, country code + number otherwise)"

    def build(self, message: Message) -> HttpCall:
        config: AliyunSmsConfig = self.config
        options = self.read_options(_Options, message)
        variables = {k: str(v) for k, v in options.params.items()}
        if options.content_param:
            variables[options.content_param] = as_text(message)
        params = {
            "AccessKeyId": config.access_key_id,
            "Action": ACTION,
            "Format": "JSON",
            "OutId": message.dispatch_id[:256],
            "PhoneNumbers": phone_number(message.to),
            "RegionId": config.region_id,
            "SignName": options.sign_name or config.sign_name,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureNonce": self.nonce(),
            "SignatureVersion": "1.0",
            "TemplateCode": options.template_code,
            "Timestamp": timestamp(self.clock()),
            "Version": API_VERSION,
        }
        if variables:
            params["TemplateParam"] = json.dumps(variables, ensure_ascii=False, separators=(",", ":"))
        params["Signature"] = sign(config.access_key_secret.get_secret_value(), "POST", params)
        return HttpCall(
            method="POST",
            url=config.endpoint,
            headers={"Accept": "application/json"},
            form=params,
        )

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        body = body_of(response)
        code = str(body.get("Code") or "")
        if response.status_code == 200 and code == "OK":
            biz_id = str(body["BizId"]) if body.get("BizId") else None
            return SendResult(provider_message_id=biz_id, detail={"request_id": body.get("RequestId")})
        if code:
            raise classify(self.name, code, str(body.get("Message") or ""), response)
        if response.status_code == 200:  # 200 but not the documented answer
            raise unexpected_answer(self.name, response)
        raise http_failure(self.name, response)
