"""Apple Push Notification service, token-based provider API over HTTP/2:
``POST {endpoint}/3/device/{device token}`` (production ``https://api.push.apple.com``, development
``https://api.sandbox.push.apple.com``).

Authentication is a provider token: an ES256 JWT (header ``alg``/``kid`` = the key id, claims
``iss`` = the team id and ``iat``) signed with the ``.p8`` key, sent as ``authorization: bearer``.
Apple rejects tokens older than an hour (``ExpiredProviderToken``) and tokens renewed more often
than every 20 minutes (``TooManyProviderTokenUpdates``). The plugin keeps one token per instance:
``iat`` is the start of the current half hour and the token is renewed once it is 50 minutes
old, so renewals are at least 20 minutes apart, no token is used past 50 minutes, and, because
the signature is deterministic (RFC 6979), every sender process holding the same key computes the
very same token for a half hour instead of one each. On ``ExpiredProviderToken`` (clock skew) the
token is renewed once with ``iat`` = now and the request sent again.

``apns-id`` is a UUID derived from the dispatch id (:func:`apns_id`), so a retried attempt is the
same notification for Apple.

Options (``message.options``, shared with the FCM plugin; unknown ones are ignored): ``data``
(custom top-level payload keys), ``priority`` (``high`` = ``apns-priority: 10``, ``normal`` = 5),
``sound`` (``aps.sound``), ``badge`` (``aps.badge``), ``collapse_key`` (``apns-collapse-id``),
``ttl_s`` (``apns-expiration`` = now + ttl_s; 0 = deliver now or never; default one day).
"""

from __future__ import annotations

import json
import re
import ssl
import uuid
from decimal import Decimal
from functools import lru_cache
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from pydantic import Field, SecretStr, field_validator

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import HttpCall, Message, Plugin, ProviderConfig, body_of, http_failure, retry_after
from services.senders.push.fcm import PushOptions, b64url, notification_text
from shared.errors import ErrorCode

TOKEN_PERIOD_S = 1800  # provider tokens are issued at the start of each half hour ...
TOKEN_MAX_AGE_S = 3000  # ... and renewed at 50 minutes: between Apple's 20 min and 60 min bounds
DEFAULT_TTL_S = 86_400
# A namespace of our own for apns-id (uuid5 of the dispatch id).
APNS_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://herald.invalid/apns-id")


# --- the provider token (ES256 JWT) ----------------------------------------------------------


def es256(signing_input: bytes, private_key_pem: str) -> str:
    """ECDSA P-256 with SHA-256 (JWA ``ES256``), the JWS form of the signature (``R || S``, 32
    bytes each, base64url). The nonce is derived deterministically (RFC 6979): the same key and
    input always give the same signature."""
    key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("not an EC P-256 private key")
    der = key.sign(signing_input, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    r, s = utils.decode_dss_signature(der)
    return b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def _json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def provider_token(team_id: str, key_id: str, private_key_pem: str, iat: int) -> str:
    """The provider authentication token Apple documents: header ``{"alg": "ES256", "kid":
    key_id}``, claims ``{"iss": team_id, "iat": iat}``, ES256-signed."""
    signing_input = f"{_json({'alg': 'ES256', 'kid': key_id})}.{_json({'iss': team_id, 'iat': iat})}"
    return f"{signing_input}.{es256(signing_input.encode(), private_key_pem)}"


def apns_id(dispatch_id: str) -> str:
    """The notification's ``apns-id``: the same for every attempt of one dispatch."""
    return str(uuid.uuid5(APNS_ID_NAMESPACE, dispatch_id))


# --- configuration ---------------------------------------------------------------------------


class ApnsConfig(ProviderConfig):
    team_id: str = Field(pattern=r"^[A-Z0-9]{10}$", description="the 10-character Team ID")
    key_id: str = Field(pattern=r"^[A-Z0-9]{10}$", description="the 10-character Key ID of the .p8 key")
    private_key: SecretStr = Field(description="the .p8 key (PEM, EC P-256)")
    bundle_id: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9\-.]+$", description="apns-topic")
    endpoint: str = Field(default="https://api.push.apple.com", pattern=r"^https://", max_length=2000)
    # The CA's PEM itself, not a path: a tenant must not name files on the sender's host.
    ca_pem: str | None = Field(default=None, max_length=65536, description="PEM of a private CA (gateways, tests)")

    @field_validator("ca_pem")
    @classmethod
    def _pem(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ssl.create_default_context(cadata=value)
            except (ssl.SSLError, ValueError):
                raise ValueError("ca_pem is not a PEM certificate") from None
        return value

    @field_validator("private_key")
    @classmethod
    def _p256(cls, value: SecretStr) -> SecretStr:
        try:
            key = serialization.load_pem_private_key(value.get_secret_value().encode(), password=None)
        except (ValueError, TypeError):
            raise ValueError("private_key is not a PEM private key (the .p8 file's content)") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError("private_key is not an EC P-256 key")
        return value


@lru_cache(maxsize=32)
def _ssl_context(ca_pem: str) -> ssl.SSLContext:
    """One context per CA, so the sender's per-option-set client is shared."""
    return ssl.create_default_context(cadata=ca_pem)


# --- classification --------------------------------------------------------------------------

_RECIPIENT = {"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered", "ExpiredToken", "MissingDeviceToken"}
_AUTH = {
    "InvalidProviderToken",
    "MissingProviderToken",
    "ExpiredProviderToken",
    "BadCertificate",
    "BadCertificateEnvironment",
    "Forbidden",
    "UnrelatedKeyIdInToken",
    "BadEnvironmentKeyInToken",
}
_MISCONFIGURED = {"BadTopic", "TopicDisallowed", "MissingTopic", "InvalidPushType", "BadPath", "MethodNotAllowed"}
_HEX = re.compile(r"^[0-9A-Fa-f]{16,}$")


class Apns(Plugin[ApnsConfig]):
    """Apple Push Notification service (token auth, HTTP/2) to one device token; options: see
    the module."""

    channel = "push"
    name = "apns"
    title = "Apple Push Notification service"
    Config = ApnsConfig
    docs = (
        "https://developer.apple.com/documentation/usernotifications/sending-notification-requests-to-apns",
        "https://developer.apple.com/documentation/usernotifications/establishing-a-token-based-connection-to-apns",
        "https://developer.apple.com/documentation/usernotifications/handling-notification-responses-from-apns",
        "https://developer.apple.com/documentation/usernotifications/generating-a-remote-notification",
        "https://www.rfc-editor.org/rfc/rfc7518#section-3.4",
        "https://www.rfc-editor.org/rfc/rfc6979",
    )
    formats = frozenset({"text"})
    rate_limits = ()  # Apple publishes no number: 429 TooManyRequests is per device token
    default_cost = Decimal("0")
    address = "an APNs device token (hex)"

    @classmethod
    def client_options(cls, config: ApnsConfig) -> dict[str, Any]:
        options: dict[str, Any] = {"http2": True}
        if config.ca_pem:
            options["verify"] = _ssl_context(config.ca_pem)
        return options

    def __init__(self, config: ApnsConfig, http: httpx.AsyncClient, **kwargs: Any) -> None:
        super().__init__(config, http, **kwargs)
        self._token: str | None = None
        self._token_iat = 0

    def provider_token(self, *, renew: bool = False) -> str:
        """The cached provider token; a new one past 50 minutes (or when ``renew``)."""
        now = self.clock()
        if renew:
            iat = int(now)
        elif self._token is None or now - self._token_iat >= TOKEN_MAX_AGE_S:
            iat = int(now // TOKEN_PERIOD_S * TOKEN_PERIOD_S)
        else:
            return self._token
        secret = self.config.private_key.get_secret_value()
        self._token, self._token_iat = provider_token(self.config.team_id, self.config.key_id, secret, iat), iat
        return self._token

    def build(self, message: Message) -> HttpCall:
        options = self.read_options(PushOptions, message)
        if not _HEX.match(message.to):
            raise Permanent("apns: the address is not an APNs device token (hex)", code=ErrorCode.RECIPIENT_INVALID)
        title, body = notification_text(message)
        aps: dict[str, Any] = {"alert": {"title": title, "body": body} if title else {"body": body}}
        if options.sound:
            aps["sound"] = options.sound
        if options.badge is not None:
            aps["badge"] = options.badge
        ttl = DEFAULT_TTL_S if options.ttl_s is None else options.ttl_s
        headers = {
            "authorization": f"bearer {self.provider_token()}",
            "apns-topic": self.config.bundle_id,
            "apns-push-type": "alert",
            "apns-priority": "10" if options.priority == "high" else "5",
            "apns-expiration": str(int(self.clock()) + ttl) if ttl else "0",
            "apns-id": apns_id(message.dispatch_id),
        }
        if options.collapse_key:
            headers["apns-collapse-id"] = options.collapse_key
        url = f"{self.config.endpoint.rstrip('/')}/3/device/{message.to}"
        return HttpCall("POST", url, headers=headers, json={**options.data, "aps": aps})

    async def send(self, message: Message) -> SendResult:
        response = await self.request(self.build(message))
        if response.status_code == 403 and body_of(response).get("reason") == "ExpiredProviderToken":
            self.provider_token(renew=True)  # Apple's clock says it is older than an hour: renew once
            response = await self.request(self.build(message))
        return self.parse(message, response)

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        status = response.status_code
        if status == 200:
            return SendResult(
                provider_message_id=response.headers.get("apns-id"), detail={"topic": self.config.bundle_id}
            )
        body = body_of(response)
        reason = str(body.get("reason") or "")
        what = f"apns: HTTP {status}" + (f" {reason}" if reason else "")
        if reason in _RECIPIENT or status == 410:
            raise Permanent(what, code=ErrorCode.RECIPIENT_INVALID)
        if reason in _AUTH or status == 403:
            raise Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        if reason in _MISCONFIGURED:
            raise Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
        if status == 429:  # TooManyRequests (one device token) or TooManyProviderTokenUpdates
            raise Retryable(
                what, code=ErrorCode.RATE_LIMITED, retry_after=retry_after(response, 60.0), sender_fault=True
            )
        if status == 413:
            raise Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)
        if status >= 500:
            raise Retryable(
                what, code=ErrorCode.CHANNEL_SEND_FAILED, retry_after=retry_after(response), sender_fault=True
            )
        raise http_failure("apns", response, reason)
