"""Firebase Cloud Messaging, HTTP v1 API: ``POST {endpoint}/v1/projects/{project_id}/messages:send``
with an OAuth 2.0 access token (``Authorization: Bearer ...``).

The access token comes from the service account: an RS256-signed JWT assertion (RFC 7523, Google's
"OAuth 2.0 for Server to Server Applications") posted form-encoded to the account's ``token_uri``
with ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``. The token is cached on the plugin
instance until five minutes before it expires and fetched again once when FCM answers 401
UNAUTHENTICATED. See :func:`assertion` / :func:`rs256`.

Options (``message.options``, shared with the APNs plugin; unknown ones are ignored):

- ``data``: ``{str: str}`` custom key/values delivered with the notification (FCM ``data``);
- ``priority``: ``"high"`` (default) or ``"normal"`` (Android priority, ``apns-priority`` 10/5);
- ``sound``: sound name (Android notification sound, ``aps.sound``);
- ``badge``: app badge number (iOS, ``aps.badge``);
- ``collapse_key``: collapses undelivered messages (Android ``collapse_key``, ``apns-collapse-id``);
- ``ttl_s``: seconds FCM keeps an undelivered message (Android ``ttl``, 0..2419200).
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import re
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
    Plugin,
    ProviderConfig,
    RateLimit,
    body_of,
    first_error,
    http_failure,
    retry_after,
    vendor_text,
)
from shared.errors import ErrorCode

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
ASSERTION_LIFETIME_S = 3600  # Google: exp at most one hour after iat
TOKEN_MARGIN_S = 300  # refresh the access token this long before it expires


# --- the service account's JWT assertion (RFC 7515 / RFC 7523) -------------------------------


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@lru_cache(maxsize=64)
def rsa_key(private_key_pem: str) -> rsa.RSAPrivateKey:
    """The parsed key (parsing checks the key, which is slow: once per key)."""
    try:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    except (ValueError, TypeError):
        raise ValueError("not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key


def rs256(signing_input: bytes, private_key_pem: str) -> str:
    """RSASSA-PKCS1-v1_5 with SHA-256 (JWA ``RS256``) of the JWS signing input, base64url."""
    return b64url(rsa_key(private_key_pem).sign(signing_input, padding.PKCS1v15(), hashes.SHA256()))


def jws(header: dict[str, Any], claims: dict[str, Any], private_key_pem: str) -> str:
    """A compact RS256 JWS: ``b64url(header).b64url(claims).b64url(signature)``."""
    signing_input = f"{b64url(_json(header))}.{b64url(_json(claims))}"
    return f"{signing_input}.{rs256(signing_input.encode(), private_key_pem)}"


def assertion_claims(client_email: str, token_uri: str, iat: int, scope: str = FCM_SCOPE) -> dict[str, Any]:
    """The JWT claim set Google documents: iss, scope, aud, exp, iat (exp = iat + 1 h)."""
    return {"iss": client_email, "scope": scope, "aud": token_uri, "exp": iat + ASSERTION_LIFETIME_S, "iat": iat}


def assertion(account: ServiceAccount, iat: int, scope: str = FCM_SCOPE) -> str:
    """The signed assertion for the token request (header ``kid`` = the key's id)."""
    header = {"alg": "RS256", "typ": "JWT", "kid": account.private_key_id}
    return jws(header, assertion_claims(account.client_email, account.token_uri, iat, scope), account.private_key)


# --- configuration and options ---------------------------------------------------------------


class ServiceAccount(BaseModel):
    """The fields of a service-account key file this plugin uses (others are ignored)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["service_account"]
    project_id: str = Field(min_length=1, max_length=100, pattern=r"^[a-z0-9][a-z0-9\-.:]*$")
    private_key_id: str = Field(min_length=1, max_length=200)
    private_key: str = Field(min_length=1)
    client_email: str = Field(min_length=3, max_length=320)
    token_uri: str = Field(default=GOOGLE_TOKEN_URI, pattern=r"^https?://", max_length=2000)

    @field_validator("private_key")
    @classmethod
    def _rsa_pem(cls, value: str) -> str:
        try:
            rsa_key(value)
        except ValueError as exc:
            raise ValueError(f"private_key: {exc}") from None
        return value


def _service_account(secret: SecretStr) -> ServiceAccount:
    try:
        raw = json.loads(secret.get_secret_value())
    except ValueError:
        raise ValueError("service_account is not JSON (paste the key file's content)") from None
    try:
        return ServiceAccount.model_validate(raw)
    except ValidationError as exc:
        where, problem = first_error(exc, raw)
        raise ValueError(f"service_account{'.' + where if where else ''}: {problem}") from None


class FcmConfig(ProviderConfig):
    service_account: SecretStr = Field(description="the service account's JSON key file, as text")
    endpoint: str = Field(default="https://fcm.googleapis.com", pattern=r"^https?://", max_length=2000)

    @field_validator("service_account")
    @classmethod
    def _valid_account(cls, value: SecretStr) -> SecretStr:
        _service_account(value)
        return value


class PushOptions(BaseModel):
    """The options of a push send (FCM and APNs read the same ones)."""

    model_config = ConfigDict(extra="ignore")
    data: dict[str, str] = Field(default_factory=dict, max_length=100)
    priority: Literal["high", "normal"] = "high"
    sound: str | None = Field(default=None, min_length=1, max_length=200)
    badge: int | None = Field(default=None, ge=0, le=1_000_000)
    collapse_key: str | None = Field(default=None, min_length=1, max_length=64)
    ttl_s: int | None = Field(default=None, ge=0, le=2_419_200)

    @field_validator("data")
    @classmethod
    def _data_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            # FCM reserves these (ErrorCode INVALID_ARGUMENT "invalid data key"); APNs: "aps".
            if not key or key in {"from", "gcm", "message_type", "notification", "aps"} or key.startswith("google"):
                raise ValueError(f"reserved data key {key!r}")
        return value


# --- rendering: push notifications are plain text -------------------------------------------

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)[^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)[^)]*\)")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+", re.MULTILINE)
_MARKS = re.compile(r"\*\*|__|~~|`")
_TAGS = re.compile(r"<[^>]+>")
_BREAKS = re.compile(r"<\s*(br|/p|/div|/li|/h[1-6])\s*/?>", re.IGNORECASE)


def plain(markdown: str) -> str:
    """Markdown as notification text: links as ``text (url)``, headings and emphasis marks
    dropped (single ``*``/``_`` are kept: they are as often part of the text)."""
    text = _IMAGE.sub(lambda m: m.group(1) or m.group(2), markdown)
    text = _LINK.sub(lambda m: m.group(1) if m.group(1) == m.group(2) else f"{m.group(1)} ({m.group(2)})", text)
    return _MARKS.sub("", _HEADING.sub("", text)).strip()


def notification_text(message: Message) -> tuple[str | None, str]:
    """(title, body) of a notification: a card's title and its text, fields and link; markdown
    and HTML reduced to plain text."""
    if message.card is not None:
        card = message.card
        lines = [plain(card.text)] if card.text else []
        lines += [f"{f.title}: {f.value}" for f in card.fields]
        if card.url:
            lines.append(card.url)
        return card.title, "\n".join(lines)
    body = message.content
    if message.format == "markdown":
        body = plain(body)
    elif message.format == "html":
        body = html.unescape(_TAGS.sub("", _BREAKS.sub("\n", body))).strip()
    return message.title or None, body


# --- the plugin ------------------------------------------------------------------------------

_RECIPIENT_CODES = {"UNREGISTERED"}
_AUTH_CODES = {"SENDER_ID_MISMATCH", "THIRD_PARTY_AUTH_ERROR"}


def _fcm_error(body: dict[str, Any]) -> tuple[str, str, str, list[dict[str, Any]]]:
    """(status, FCM errorCode, message, details) of a google.rpc error body."""
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    details = [d for d in error.get("details") or [] if isinstance(d, dict)]
    code = next((str(d["errorCode"]) for d in details if d.get("errorCode")), "")
    return str(error.get("status") or ""), code, str(error.get("message") or ""), details


def _bad_token(message: str, details: list[dict[str, Any]]) -> bool:
    """INVALID_ARGUMENT about the registration token (not about the message's content)."""
    for detail in details:
        for violation in detail.get("fieldViolations") or []:
            if isinstance(violation, dict) and violation.get("field") == "message.token":
                return True
    return "registration token" in message.lower()


class Fcm(Plugin[FcmConfig]):
    """Firebase Cloud Messaging (HTTP v1) to one registration token; options: see the module."""

    channel = "push"
    name = "fcm"
    title = "Firebase Cloud Messaging"
    Config = FcmConfig
    docs = (
        "https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages/send",
        "https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages",
        "https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode",
        "https://firebase.google.com/docs/cloud-messaging/error-codes",
        "https://firebase.google.com/docs/cloud-messaging/throttling-and-quotas",
        "https://developers.google.com/identity/protocols/oauth2/service-account",
        "https://www.rfc-editor.org/rfc/rfc7523",
    )
    formats = frozenset({"text"})
    rate_limits = (
        # "The default quota of 600k messages per minute" per project (HTTP v1 API).
        RateLimit(600_000, 60.0, source="https://firebase.google.com/docs/cloud-messaging/throttling-and-quotas"),
    )
    default_cost = Decimal("0")
    address = "an FCM registration token"

    def __init__(self, config: FcmConfig, http: httpx.AsyncClient, **kwargs: Any) -> None:
        super().__init__(config, http, **kwargs)
        self.account = _service_account(config.service_account)
        self._token: str | None = None
        self._token_expires = 0.0
        self._lock: asyncio.Lock | None = None

    # --- the access token --------------------------------------------------------------------

    def token_call(self) -> HttpCall:
        """The token request: the JWT bearer grant with a fresh assertion."""
        form = {"grant_type": JWT_BEARER, "assertion": assertion(self.account, int(self.clock()))}
        return HttpCall("POST", self.account.token_uri, headers={"accept": "application/json"}, form=form)

    def parse_token(self, response: httpx.Response) -> str:
        body = body_of(response)
        if response.status_code == 200 and body.get("access_token"):
            try:
                lifetime = float(body.get("expires_in") or 3600)
            except (TypeError, ValueError):
                lifetime = 3600.0
            self._token = str(body["access_token"])
            self._token_expires = self.clock() + lifetime - TOKEN_MARGIN_S
            return self._token
        # OAuth errors (RFC 6749 5.2): invalid_grant (bad signature, unknown key, clock), invalid_client ...
        error = str(body.get("error") or "")
        detail = f"token request: {error}" + (
            f" ({body['error_description']})" if body.get("error_description") else ""
        )
        if response.status_code in (400, 401, 403) and error:
            raise Permanent(f"fcm: {detail}", code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        raise http_failure("fcm", response, detail if error else "token request")

    async def access_token(self, *, refresh: bool = False) -> str:
        if self._lock is None:
            self._lock = asyncio.Lock()
        stale = self._token
        async with self._lock:
            if self._token and self.clock() < self._token_expires and not (refresh and self._token == stale):
                return self._token
            self._token = None
            return self.parse_token(await self.request(self.token_call()))

    # --- the message -------------------------------------------------------------------------

    def build(self, message: Message) -> HttpCall:
        options = self.read_options(PushOptions, message)
        title, body = notification_text(message)
        notification = {"title": title, "body": body} if title else {"body": body}
        fcm: dict[str, Any] = {"token": message.to, "notification": notification}
        if options.data:
            fcm["data"] = dict(options.data)
        android: dict[str, Any] = {"priority": "HIGH" if options.priority == "high" else "NORMAL"}
        if options.collapse_key:
            android["collapse_key"] = options.collapse_key
        if options.ttl_s is not None:
            android["ttl"] = f"{options.ttl_s}s"
        if options.sound:
            android["notification"] = {"sound": options.sound}
        fcm["android"] = android
        headers = {"apns-priority": "10" if options.priority == "high" else "5"}
        if options.collapse_key:
            headers["apns-collapse-id"] = options.collapse_key
        aps: dict[str, Any] = {}
        if options.sound:
            aps["sound"] = options.sound
        if options.badge is not None:
            aps["badge"] = options.badge
        fcm["apns"] = {"headers": headers, "payload": {"aps": aps}} if aps else {"headers": headers}
        url = f"{self.config.endpoint.rstrip('/')}/v1/projects/{self.account.project_id}/messages:send"
        return HttpCall(
            "POST",
            url,
            headers={"authorization": f"Bearer {self._token or ''}"},
            json={"message": fcm},
        )

    async def send(self, message: Message) -> SendResult:
        self.read_options(PushOptions, message)  # a bad option fails before any request
        await self.access_token()
        response = await self.request(self.build(message))
        if response.status_code == 401 and _fcm_error(body_of(response))[1] != "THIRD_PARTY_AUTH_ERROR":
            await self.access_token(refresh=True)  # expired or revoked: one fresh token, one more try
            response = await self.request(self.build(message))
        return self.parse(message, response)

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        body = body_of(response)
        status = response.status_code
        if status == 200 and body.get("name"):
            return SendResult(provider_message_id=str(body["name"]), detail={"project_id": self.account.project_id})
        rpc_status, code, text, details = _fcm_error(body)
        what = f"fcm: {code or rpc_status or f'HTTP {status}'}" + (f": {vendor_text(text, 200)}" if text else "")
        if code in _RECIPIENT_CODES or status == 404 and rpc_status == "NOT_FOUND":
            raise Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
        if code == "INVALID_ARGUMENT" or rpc_status == "INVALID_ARGUMENT":
            if _bad_token(text, details):
                raise Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
            raise Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)
        if code in _AUTH_CODES or status in (401, 403):
            raise Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        if code == "QUOTA_EXCEEDED" or status == 429:
            # The per-project quota refills "in the following minute".
            raise Retryable(
                what, code=ErrorCode.RATE_LIMITED, retry_after=retry_after(response, 60.0), sender_fault=True
            )
        if code in ("UNAVAILABLE", "INTERNAL") or status >= 500:
            raise Retryable(
                what, code=ErrorCode.CHANNEL_SEND_FAILED, retry_after=retry_after(response), sender_fault=True
            )
        raise http_failure("fcm", response, code or rpc_status or vendor_text(text, 200))
