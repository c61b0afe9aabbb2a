"""Tencent Cloud SMS: ``SendSms``, API version 2021-01-11, host ``sms.tencentcloudapi.com``.

One ``POST /`` with a JSON body, the common parameters in ``X-TC-*`` headers and the request
signed with TC3-HMAC-SHA256 (signature v3): see :func:`canonical_request`,
:func:`string_to_sign`, :func:`signature` and :func:`authorization`. Every answer is HTTP 200:
``Response.Error`` for a refused request, ``Response.SendStatusSet[i].Code`` per number.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
from pydantic import Field, SecretStr

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
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

SERVICE = "sms"
ACTION = "SendSms"
API_VERSION = "2021-01-11"
ALGORITHM = "TC3-HMAC-SHA256"
CONTENT_TYPE = "application/json; charset=utf-8"
SIGNED_HEADERS = ("content-type", "host", "x-tc-action")


# --- TC3-HMAC-SHA256 (signature v3) ----------------------------------------------------------


def canonical_request(
    method: str, uri: str, query: str, headers: Mapping[str, str], signed: Sequence[str], payload: bytes
) -> str:
    """``HTTPRequestMethod \\n CanonicalURI \\n CanonicalQueryString \\n CanonicalHeaders \\n
    SignedHeaders \\n HashedRequestPayload``; header names and values lower-cased and trimmed,
    names in ASCII order, each line ending in ``\\n``."""
    lower = {k.lower(): v for k, v in headers.items()}
    names = sorted(n.lower() for n in signed)
    canonical_headers = "".join(f"{n}:{lower[n].strip().lower()}\n" for n in names)
    return "\n".join(
        [method.upper(), uri, query, canonical_headers, ";".join(names), hashlib.sha256(payload).hexdigest()]
    )


def credential_date(timestamp: int) -> str:
    """The UTC date of ``timestamp`` (``2019-02-25``), the first element of the credential scope."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


def string_to_sign(timestamp: int, service: str, canonical: str) -> str:
    """``Algorithm \\n RequestTimestamp \\n CredentialScope \\n HashedCanonicalRequest``."""
    scope = f"{credential_date(timestamp)}/{service}/tc3_request"
    return "\n".join([ALGORITHM, str(timestamp), scope, hashlib.sha256(canonical.encode()).hexdigest()])


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signature(secret_key: str, timestamp: int, service: str, to_sign: str) -> str:
    """``SecretDate = HMAC("TC3" + SecretKey, Date)``, ``SecretService = HMAC(SecretDate, Service)``,
    ``SecretSigning = HMAC(SecretService, "tc3_request")``, hex ``HMAC(SecretSigning, StringToSign)``."""
    secret_date = _hmac(f"TC3{secret_key}".encode(), credential_date(timestamp))
    secret_signing = _hmac(_hmac(secret_date, service), "tc3_request")
    return hmac.new(secret_signing, to_sign.encode(), hashlib.sha256).hexdigest()


def authorization(
    secret_id: str,
    secret_key: str,
    service: str,
    timestamp: int,
    headers: Mapping[str, str],
    payload: bytes,
    signed: Sequence[str] = SIGNED_HEADERS,
    method: str = "POST",
    uri: str = "/",
    query: str = "",
) -> str:
    """The ``Authorization`` header of a request."""
    names = sorted(n.lower() for n in signed)
    canonical = canonical_request(method, uri, query, headers, names, payload)
    sig = signature(secret_key, timestamp, service, string_to_sign(timestamp, service, canonical))
    scope = f"{credential_date(timestamp)}/{service}/tc3_request"
    return f"{ALGORITHM} Credential={secret_id}/{scope}, SignedHeaders={';'.join(names)}, Signature={sig}"


# --- configuration and options ---------------------------------------------------------------


class TencentSmsConfig(ProviderConfig):
    secret_id: str = Field(min_length=1, max_length=128)
    secret_key: SecretStr = Field(min_length=1)
    sdk_app_id: str = Field(pattern=r"^\d{6,20}$", description="SmsSdkAppId, e.g. 1400006666")
    sign_name: str | None = Field(default=None, min_length=1, max_length=100, description="approved signature")
    region: str = Field(default="ap-guangzhou", min_length=1, max_length=64)
    endpoint: str = Field(default="https://sms.tencentcloudapi.com", pattern=r"^https?://", max_length=2000)


# --- classification --------------------------------------------------------------------------

_WAITS = {  # the per-number frequency limits and their windows
    "LimitExceeded.PhoneNumberThirtySecondLimit": 30.0,
    "LimitExceeded.PhoneNumberOneHourLimit": 3600.0,
    "LimitExceeded.PhoneNumberDailyLimit": 86400.0,
    "LimitExceeded.PhoneNumberSameContentDailyLimit": 86400.0,
    "LimitExceeded.DeliveryFrequencyLimit": 30.0,
}
_QUOTA = {
    "FailedOperation.InsufficientBalanceInSmsPackage",
    "UnauthorizedOperation.SerivceSuspendDueToArrears",  # (sic, as the API spells it)
    "UnauthorizedOperation.ServiceSuspendDueToArrears",
    "LimitExceeded.AppDailyLimit",  # the application's daily volume cap set in the console
    "LimitExceeded.DailyLimit",
    "LimitExceeded.AppCountryOrRegionDailyLimit",
    "LimitExceeded.AppGlobalDailyLimit",
    "LimitExceeded.AppMainlandChinaDailyLimit",
}
_RECIPIENT = {
    "InvalidParameterValue.IncorrectPhoneNumber",
    "FailedOperation.PhoneNumberInBlacklist",  # unsubscribed or on the carrier's do-not-disturb list
    "FailedOperation.PhoneNumberParseFail",
    "UnsupportedOperation.UnsupportedRegion",
}
_AUTH_PREFIXES = ("AuthFailure.",)
_AUTH = {
    "UnauthorizedOperation.SmsSdkAppIdVerifyFail",
    "UnauthorizedOperation.RequestPermissionDeny",
    "UnauthorizedOperation.IndividualUserMarketingSmsPermissionDeny",
}
_MISCONFIGURED = {  # the provider's setup is wrong; another provider could still deliver
    "FailedOperation.SignatureIncorrectOrUnapproved",
    "FailedOperation.TemplateIncorrectOrUnapproved",
    "FailedOperation.MissingSignature",
    "FailedOperation.MissingTemplateToModify",
    "InvalidParameterValue.SdkAppIdNotExist",
    "UnauthorizedOperation.RequestIpNotInWhitelist",
    "UnauthorizedOperation.SdkAppIdIsDisabled",
    "UnsupportedOperation.ChineseMainlandTemplateToGlobalPhone",
    "UnsupportedOperation.GlobalTemplateToChineseMainlandPhone",
    "InvalidParameterValue.MissingSignatureList",
}


def classify(name: str, code: str, text: str) -> Exception:
    """The exception for a Tencent Cloud error code (request-level or per number)."""
    what = f"{name}: {code}" + (f": {vendor_text(text)}" if text and not code.startswith("AuthFailure") else "")
    if code in _WAITS:
        return Retryable(what, code=ErrorCode.RATE_LIMITED, retry_after=_WAITS[code], sender_fault=True)
    if code in _QUOTA:
        return QuotaExceeded(what)
    if code.startswith("RequestLimitExceeded") or code.startswith("LimitExceeded"):
        return Retryable(what, code=ErrorCode.RATE_LIMITED, retry_after=1.0, sender_fault=True)
    if code in _RECIPIENT:
        return Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
    if code.startswith(_AUTH_PREFIXES) or code in _AUTH:
        return Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
    if code in _MISCONFIGURED:
        return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
    if code.startswith("InternalError") or code in ("ResourceUnavailable", "ServiceUnavailable"):
        return Retryable(what, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
    # this message's content or parameters (FailedOperation.ContainSensitiveWord,
    # InvalidParameterValue.TemplateParameterFormatError, ...)
    return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)


# --- the plugin ------------------------------------------------------------------------------


class TencentSms(Plugin[TencentSmsConfig]):
    """Tencent Cloud SMS (腾讯云短信), ``SendSms`` 2021-01-11.

    SMS in China goes through approved templates. Options (``message.options``):

    - ``template_code`` (required): the approved template's id (``TemplateId``, e.g. ``1110``);
    - ``sign_name``: the approved signature, default the configured ``sign_name`` (not needed
      for international templates);
    - ``params``: the template's variables in order, a list (``["4370", "5"]``) or a mapping
      whose values are taken in order (``TemplateParamSet``);
    - ``with_content``: ``true`` appends the message's text as the last template variable.

    ``SessionContext`` carries the dispatch id.
    """

    channel: ClassVar[str] = "sms"
    name: ClassVar[str] = "tencent"
    title: ClassVar[str] = "Tencent Cloud SMS"
    Config: ClassVar[type[ProviderConfig]] = TencentSmsConfig
    docs: ClassVar[tuple[str, ...]] = (
        "https://cloud.tencent.com/document/api/382/55981",  # SendSms 2021-01-11
        "https://cloud.tencent.com/document/api/213/30654",  # signature v3 (TC3-HMAC-SHA256), worked example
        "https://cloud.tencent.com/document/api/382/52075",  # error codes (common and SMS)
        "https://cloud.tencent.com/document/api/382/59177",  # SMS API 3.0 send error codes
        "https://www.tencentcloud.com/document/product/382/13303",  # default frequency limits
    )
    formats: ClassVar[frozenset[str]] = frozenset({"text"})
    rate_limits: ClassVar[tuple[RateLimit, ...]] = (
        RateLimit(
            3000,
            1.0,
            "provider",
            source="https://cloud.tencent.com/document/api/382/55981 (默认接口请求频率限制：3000次/秒); "
            "per-number limits are the console's and come back as LimitExceeded.PhoneNumber*",
        ),
    )
    # List price of one domestic (Chinese mainland) message, about CNY 0.05; the currency is the
    # deployment's (set the real prices per country with the provider's costs).
    default_cost: ClassVar[Decimal] = Decimal("0.05")
    address: ClassVar[str] = "E.164 phone number"

    def build(self, message: Message) -> HttpCall:
        config: TencentSmsConfig = self.config
        options = self.read_options(OrderedTemplateOptions, message)
        body: dict[str, Any] = {
            "PhoneNumberSet": [message.to],
            "SmsSdkAppId": config.sdk_app_id,
            "TemplateId": options.template_code,
            "SessionContext": message.dispatch_id[:500],
        }
        sign_name = options.sign_name or config.sign_name
        if sign_name:
            body["SignName"] = sign_name
        params = options.template_params(message)
        if params:
            body["TemplateParamSet"] = params
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        now = int(self.clock())
        host = urlsplit(config.endpoint).netloc
        headers = {"Content-Type": CONTENT_TYPE, "Host": host, "X-TC-Action": ACTION}
        headers["Authorization"] = authorization(
            config.secret_id, config.secret_key.get_secret_value(), SERVICE, now, headers, payload
        )
        headers.update({"X-TC-Timestamp": str(now), "X-TC-Version": API_VERSION, "X-TC-Region": config.region})
        url = config.endpoint if urlsplit(config.endpoint).path else config.endpoint + "/"
        return HttpCall(method="POST", url=url, headers=headers, content=payload)

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        answer = body_of(response).get("Response")
        if response.status_code != 200 or not isinstance(answer, dict):
            raise http_failure(self.name, response)
        request_id = answer.get("RequestId")
        error = answer.get("Error")
        if isinstance(error, dict):
            raise classify(self.name, str(error.get("Code") or "Error"), str(error.get("Message") or ""))
        statuses = answer.get("SendStatusSet")
        if not isinstance(statuses, list) or not statuses or not isinstance(statuses[0], dict):
            raise unexpected_answer(self.name, response)
        status = statuses[0]
        code = str(status.get("Code") or "")
        if code == "Ok":
            return SendResult(
                provider_message_id=status.get("SerialNo") or None,
                detail={"request_id": request_id, "fee": status.get("Fee"), "iso_code": status.get("IsoCode")},
            )
        raise classify(self.name, code or "Error", str(status.get("Message") or ""))
