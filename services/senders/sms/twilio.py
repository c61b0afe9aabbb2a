"""Twilio Programmable Messaging: ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``.

A form body (``To``, ``From`` or ``MessagingServiceSid``, ``Body``, optional ``StatusCallback``
and ``ValidityPeriod``) with HTTP Basic authentication ``AccountSid:AuthToken`` (see
:func:`basic_auth`). The answer is the Message resource (HTTP 201, ``sid`` ``SM...``); an error
is ``{"code", "message", "more_info", "status"}`` with the HTTP status.
"""

from __future__ import annotations

from decimal import Decimal
from typing import ClassVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
    Plugin,
    ProviderConfig,
    QuotaExceeded,
    RateLimit,
    as_text,
    basic_auth,
    body_of,
    http_failure,
    retry_after,
    unexpected_answer,
    vendor_text,
)
from shared.errors import ErrorCode

API_VERSION = "2010-04-01"
MAX_BODY = 1600  # characters, after which Twilio refuses the message (21617)


class TwilioSmsConfig(ProviderConfig):
    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$")
    auth_token: SecretStr = Field(min_length=1)
    from_number: str | None = Field(
        default=None,
        pattern=r"^(\+[1-9]\d{6,14}|[A-Za-z0-9 ]{1,11})$",
        description="an E.164 Twilio number, short code or alphanumeric sender id",
    )
    messaging_service_sid: str | None = Field(default=None, pattern=r"^MG[0-9a-fA-F]{32}$")
    status_callback: str | None = Field(default=None, pattern=r"^https?://", max_length=2000)
    api_base: str = Field(default="https://api.twilio.com", pattern=r"^https?://", max_length=2000)

    @model_validator(mode="after")
    def _a_sender(self) -> TwilioSmsConfig:
        if not self.from_number and not self.messaging_service_sid:
            raise ValueError("from_number or messaging_service_sid is required")
        return self


class _Options(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the Chinese providers' template options are not ours

    validity_period: int | None = Field(default=None, ge=1, le=36000)
    status_callback: str | None = Field(default=None, pattern=r"^https?://", max_length=2000)


# --- classification --------------------------------------------------------------------------

_RATE = {20429, 21611, 30001, 14107}  # too many requests; From's queue full; queue overflow; rate exceeded
_QUOTA = {20005, 10001}  # account not active: "potentially because you ran out of funds"
_AUTH = {20003, 20404, 20006, 20008}  # authenticate; account/resource not found; access denied; test creds
_RECIPIENT = {
    21211,  # invalid 'To' phone number
    21614,  # 'To' is not a valid mobile number (a landline)
    21610,  # the recipient unsubscribed (replied STOP)
    21612,  # 'To' not currently reachable via SMS
    21635,  # 'To' cannot be a landline
}
_MISCONFIGURED = {
    21212,  # invalid 'From' number
    21606,  # the 'From' number is not SMS-capable / not yours
    21659,  # 'From' is not a Twilio number
    21608,  # trial account: 'To' not verified
    21408,  # the account's geographic permissions exclude the 'To' region
    21703,  # invalid Messaging Service
    21704,  # the Messaging Service has no sender
    21705,
    21712,
}


def classify(name: str, code: int | None, text: str, response: httpx.Response) -> Exception:
    text = vendor_text(text)  # Twilio's messages quote the phone numbers
    what = f"{name}: HTTP {response.status_code}" + (f" {code}" if code else "") + (f": {text}" if text else "")
    if response.status_code == 429 or code in _RATE:
        return Retryable(what, code=ErrorCode.RATE_LIMITED, retry_after=retry_after(response, 1.0), sender_fault=True)
    if code in _QUOTA:
        return QuotaExceeded(what)
    if code in _AUTH or response.status_code == 401:
        return Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
    if code in _RECIPIENT:
        return Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
    if code in _MISCONFIGURED:
        return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
    if response.status_code >= 500:
        return Retryable(what, code=ErrorCode.CHANNEL_SEND_FAILED, retry_after=retry_after(response), sender_fault=True)
    if code is None:
        return http_failure(name, response, text)
    return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)  # 21602 empty body, 21617 too long, ...


class TwilioSms(Plugin[TwilioSmsConfig]):
    """Twilio Programmable Messaging (SMS).

    The message's text (a title or a card flattened to plain text) is the ``Body``, at most
    1,600 characters. Options (``message.options``, all optional):

    - ``validity_period``: seconds (1-36,000) the message may wait in Twilio's queue;
    - ``status_callback``: a URL for delivery status callbacks, default the configured one.

    The sender is the configured ``messaging_service_sid`` when set, else ``from_number``.
    """

    channel: ClassVar[str] = "sms"
    name: ClassVar[str] = "twilio"
    title: ClassVar[str] = "Twilio SMS"
    Config: ClassVar[type[ProviderConfig]] = TwilioSmsConfig
    docs: ClassVar[tuple[str, ...]] = (
        "https://www.twilio.com/docs/messaging/api/message-resource",
        "https://www.twilio.com/docs/usage/requests-to-twilio",  # HTTP Basic authentication
        "https://www.twilio.com/docs/usage/twilios-response",  # the error body
        "https://www.twilio.com/docs/api/errors",
        "https://www.twilio.com/docs/api/errors/20429",
        "https://www.twilio.com/docs/api/errors/21211",
        "https://www.twilio.com/docs/api/errors/21610",
        "https://www.twilio.com/docs/api/errors/20005",
    )
    formats: ClassVar[frozenset[str]] = frozenset({"text"})
    # Twilio queues messages itself and sends them at each sender's throughput (long code, toll
    # free, short code, Messaging Service pool: not a single number); too many concurrent API
    # requests are answered 429 / 20429. No fixed request rate to declare.
    rate_limits: ClassVar[tuple[RateLimit, ...]] = ()
    # List price of one outbound US SMS segment, about USD 0.0083; the currency is the
    # deployment's (set the real prices per country with the provider's costs).
    default_cost: ClassVar[Decimal] = Decimal("0.0083")
    address: ClassVar[str] = "E.164 phone number"

    def build(self, message: Message) -> HttpCall:
        config: TwilioSmsConfig = self.config
        options = self.read_options(_Options, message)
        text = as_text(message)
        if not text.strip():
            raise Permanent(f"{self.name}: the message is empty", code=ErrorCode.CHANNEL_SEND_FAILED)
        if len(text) > MAX_BODY:
            raise Permanent(
                f"{self.name}: the text is {len(text)} characters, Twilio takes at most {MAX_BODY}",
                code=ErrorCode.CHANNEL_SEND_FAILED,
            )
        form = {"To": message.to, "Body": text}
        if config.messaging_service_sid:
            form["MessagingServiceSid"] = config.messaging_service_sid
        else:
            form["From"] = config.from_number or ""
        callback = options.status_callback or config.status_callback
        if callback:
            form["StatusCallback"] = callback
        if options.validity_period is not None:
            form["ValidityPeriod"] = str(options.validity_period)
        url = f"{config.api_base.rstrip('/')}/{API_VERSION}/Accounts/{config.account_sid}/Messages.json"
        headers = {
            "Authorization": basic_auth(config.account_sid, config.auth_token.get_secret_value()),
            "Accept": "application/json",
        }
        return HttpCall(method="POST", url=url, headers=headers, form=form)

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        body = body_of(response)
        if response.status_code in (200, 201) and body.get("sid"):
            if body.get("error_code"):  # created but already failed
                raise classify(self.name, int(body["error_code"]), str(body.get("error_message") or ""), response)
            return SendResult(
                provider_message_id=str(body["sid"]),
                detail={"status": body.get("status"), "segments": body.get("num_segments")},
            )
        code = body.get("code")
        code = int(code) if isinstance(code, int | str) and str(code).isdigit() else None
        if response.status_code < 300:
            raise unexpected_answer(self.name, response)
        raise classify(self.name, code, str(body.get("message") or ""), response)
