"""Generic webhook signed per Standard Webhooks (https://www.standardwebhooks.com/).

One configured endpoint receives every message of the provider as one HTTP request (``POST``
or ``PUT``) whose body is JSON and whose headers carry the Standard Webhooks metadata:

- ``webhook-id``: the message id, the same on every retry of the message (the spec's
  idempotency key);
- ``webhook-timestamp``: the attempt's time, unix seconds (a receiver rejects stale ones);
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` under the
  ``whsec_`` secret (signed with the ``standardwebhooks`` library, see :func:`sign`).

Answers (spec, "Delivery success and failure"): 2xx delivered; 3xx is a failure and is never
followed; ``410 Gone`` means the endpoint no longer wants webhooks (permanent, the provider's
configuration is at fault); 429/502/503/504 throttle (``Retry-After`` honoured); other 5xx are
transient; other 4xx are permanent.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar, Literal

import httpx
import orjson
from pydantic import Field, SecretStr, field_validator
from standardwebhooks.webhooks import Webhook

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
    Plugin,
    ProviderConfig,
    retry_after,
)
from shared.errors import ErrorCode
from shared.templates import Renderer, TemplateProblem, TemplateVersion, Variant, check

SECRET_PREFIX = "whsec_"
# The spec: a symmetric secret is random, at least 24 bytes and at most 64 (512 bits).
SECRET_MIN_BYTES = 24
SECRET_MAX_BYTES = 64

# The variables a body template may use.
TEMPLATE_VARIABLES = (
    "message_id",
    "tenant_id",
    "title",
    "content",
    "format",
    "card",
    "options",
    "attempt",
    "timestamp",
)
# A leaf that is exactly one variable keeps the variable's JSON value (an object, a number).
_WHOLE_VARIABLE = re.compile(r"^\{\{\s*(" + "|".join(TEMPLATE_VARIABLES) + r")\s*\}\}$")

# Headers a configuration may not set: the signature's, the body's framing and the hop's.
_RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "host", "transfer-encoding", "connection", "te", "upgrade", "trailer"}
)
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}$")
_MAX_TEMPLATE_LEAVES = 200


def decode_secret(secret: str) -> bytes:
    """The key bytes of a ``whsec_`` secret; ValueError when it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"must start with {SECRET_PREFIX}")
    body = secret[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"must be {SECRET_PREFIX} followed by base64") from None
    if not SECRET_MIN_BYTES <= len(key) <= SECRET_MAX_BYTES:
        raise ValueError(f"must encode {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} random bytes")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value (``v1,<base64>``) of ``body`` sent as ``msg_id`` at
    ``timestamp`` (unix seconds): HMAC-SHA256 of ``{msg_id}.{timestamp}.{body}``."""
    return Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, tz=UTC), body.decode())


def _leaves(value: Any, path: str = "$") -> list[tuple[str, str]]:
    """(path, source) of every string leaf of a JSON value."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        out: list[tuple[str, str]] = []
        for key, item in value.items():
            out += _leaves(item, f"{path}.{key}")
        return out
    if isinstance(value, list):
        out = []
        for i, item in enumerate(value):
            out += _leaves(item, f"{path}[{i}]")
        return out
    return []


class StandardWebhookConfig(ProviderConfig):
    url: str = Field(max_length=2000, description="the endpoint (http or https)")
    secret: SecretStr = Field(description="whsec_ followed by base64 of 24 to 64 random bytes")
    # Secret as a whole: custom headers are where receivers' API keys and Authorization go.
    headers: dict[str, str] = Field(
        default_factory=dict, description="extra request headers (stored encrypted, never shown)",
        json_schema_extra={"secret": True, "writeOnly": True},
    )
    body_template: Any = Field(
        default=None,
        description="a JSON value whose string leaves are Jinja2 templates (sandboxed); default: the standard body",
    )
    method: Literal["POST", "PUT"] = "POST"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parsed = httpx.URL(value)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: SecretStr) -> SecretStr:
        decode_secret(value.get_secret_value())
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 20:
            raise ValueError("at most 20 headers")
        for name, header in value.items():
            lowered = name.lower()
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a header name")
            if lowered in _RESERVED_HEADERS or lowered.startswith("webhook-"):
                raise ValueError(f"{name} is set by Herald and cannot be configured")
            if any(c in header for c in "\r\n\x00") or len(header) > 4000:
                raise ValueError(f"the value of {name} is not a valid header value")
        return value

    @field_validator("body_template")
    @classmethod
    def _body_template(cls, value: Any) -> Any:
        if value is None:
            return None
        try:
            size = len(orjson.dumps(value))
        except TypeError:
            raise ValueError("must be a JSON value") from None
        if size > 64 * 1024:
            raise ValueError("at most 64 KiB")
        leaves = _leaves(value)
        if len(leaves) > _MAX_TEMPLATE_LEAVES:
            raise ValueError(f"at most {_MAX_TEMPLATE_LEAVES} string leaves")
        for path, source in leaves:
            if not source:
                continue
            try:
                check(list(TEMPLATE_VARIABLES), [Variant(channel="webhook", format="json", content=source)])
            except TemplateProblem as exc:
                raise ValueError(f"{path}: {exc.message}") from None
        return value


class _Options(ProviderConfig):
    """Nothing is read from ``message.options`` except what the body carries; ``event_type``
    names the default body's ``type``."""

    model_config = ProviderConfig.model_config | {"extra": "allow"}
    event_type: str = Field(default="message", pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$", max_length=100)


class StandardWebhook(Plugin[StandardWebhookConfig]):
    """A Standard Webhooks endpoint.

    Options (``message.options``): all of them travel in the body (``data.options``, or the
    template's ``options`` variable); ``event_type`` (``a.b_c``) sets the default body's
    ``type`` (default ``message``).

    Default body::

        {"type": "message", "timestamp": "2026-12-02T08:00:00Z",
         "data": {"message_id", "title", "content", "format", "card"?, "options"?}}

    ``body_template`` replaces it: a JSON value whose string leaves are Jinja2 templates
    rendered in the project's sandbox (``shared.templates``: no ``_`` attributes, bounded work)
    with the variables message_id, tenant_id, title, content, format, card (an object or null),
    options, attempt, timestamp (unix seconds). A leaf that is exactly ``{{ name }}`` keeps the
    variable's JSON value (``"{{ card }}"`` is the card object); other leaves are strings.
    A template the sandbox refuses is a permanent failure.
    """

    channel: ClassVar[str] = "webhook"
    name: ClassVar[str] = "webhook"
    title: ClassVar[str] = "Standard Webhooks endpoint"
    Config: ClassVar[type[ProviderConfig]] = StandardWebhookConfig
    docs: ClassVar[tuple[str, ...]] = (
        "https://www.standardwebhooks.com/",
        "https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md",
    )
    formats: ClassVar[frozenset[str]] = frozenset({"text", "markdown", "html", "card"})
    rate_limits = ()  # the receiver's own; it answers 429 with Retry-After
    default_cost: ClassVar[Decimal] = Decimal("0")
    address: ClassVar[str] = "a configured webhook endpoint's name"
    option_error: ClassVar[str] = "{name}: invalid option {path}: {problem}"

    @classmethod
    def client_options(cls, config: StandardWebhookConfig) -> dict[str, Any]:
        return {"follow_redirects": False}  # the spec: a 3xx is a failure, never followed

    def __init__(self, config: StandardWebhookConfig, http: httpx.AsyncClient, **kwargs: Any) -> None:
        super().__init__(config, http, **kwargs)
        self._renderer = Renderer(max_cached=_MAX_TEMPLATE_LEAVES)
        self._versions: dict[str, TemplateVersion] = {}

    # --- the body -----------------------------------------------------------------------------

    def body(self, message: Message, timestamp: int) -> Any:
        options = self.read_options(_Options, message)
        card = message.card.model_dump(mode="json", exclude_none=True) if message.card is not None else None
        if self.config.body_template is None:
            data: dict[str, Any] = {
                "message_id": message.message_id,
                "title": message.title,
                "content": message.content,
                "format": message.format,
            }
            if card is not None:
                data["card"] = card
            if message.options:
                data["options"] = message.options
            return {"type": options.event_type, "timestamp": _iso(timestamp), "data": data}
        variables = {
            "message_id": message.message_id,
            "tenant_id": message.tenant_id,
            "title": message.title,
            "content": message.content,
            "format": message.format,
            "card": card,
            "options": dict(message.options or {}),
            "attempt": message.attempt,
            "timestamp": timestamp,
        }
        return self._render(self.config.body_template, variables, "$")

    def _render(self, value: Any, variables: dict[str, Any], path: str) -> Any:
        if isinstance(value, dict):
            return {k: self._render(v, variables, f"{path}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self._render(v, variables, f"{path}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str) or not value:
            return value
        whole = _WHOLE_VARIABLE.match(value)
        if whole:
            return variables[whole.group(1)]
        version = self._versions.get(path)
        if version is None or version.variants[0].content != value:
            version = TemplateVersion(
                template_id=len(self._versions) + 1,
                tenant_id="webhook",
                template_name=path,
                template_type="webhook",
                version=1,
                variables=list(TEMPLATE_VARIABLES),
                variants=[Variant(channel="webhook", format="json", content=value)],
            )
            self._versions[path] = version
        try:
            return self._renderer.render(version, "webhook", None, variables).content
        except TemplateProblem as exc:
            raise Permanent(
                f"webhook: body_template at {path} refused: {exc.message}", code=ErrorCode.CHANNEL_SEND_FAILED
            ) from None

    # --- the request ----------------------------------------------------------------------------

    def build(self, message: Message) -> HttpCall:
        if "." in message.message_id or not message.message_id:
            # The spec: the id must not contain "." (it delimits the signed content).
            raise Permanent("webhook: message id not usable as webhook-id", code=ErrorCode.CHANNEL_SEND_FAILED)
        timestamp = int(self.clock())
        body = orjson.dumps(self.body(message, timestamp))
        headers = dict(self.config.headers)
        headers.update(
            {
                "content-type": "application/json",
                "user-agent": "Herald-Webhooks/1.0",
                "webhook-id": message.message_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(self.config.secret.get_secret_value(), message.message_id, timestamp, body),
            }
        )
        return HttpCall(self.config.method, self.config.url, headers=headers, content=body)

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        status = response.status_code
        if response.history or 300 <= status < 400:
            raise Permanent(
                f"webhook: HTTP {response.history[0].status_code if response.history else status}: "
                "the endpoint redirects (redirects are not followed; update the URL)",
                code=ErrorCode.CHANNEL_SEND_FAILED,
                sender_fault=True,
            )
        if 200 <= status < 300:
            return SendResult(provider_message_id=None, detail={"status": status})
        what = f"webhook: HTTP {status}"
        if status == 410:
            raise Permanent(
                f"{what}: the endpoint is gone (disable it)", code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True
            )
        if status == 429:
            raise Retryable(
                what, code=ErrorCode.RATE_LIMITED, retry_after=retry_after(response, 5.0), sender_fault=True
            )
        if status in (502, 503, 504):
            raise Retryable(
                what, code=ErrorCode.CHANNEL_SEND_FAILED, retry_after=retry_after(response, 5.0), sender_fault=True
            )
        if status >= 500 or status == 408:
            raise Retryable(
                what, code=ErrorCode.CHANNEL_SEND_FAILED, retry_after=retry_after(response), sender_fault=True
            )
        if status in (401, 403):
            raise Permanent(
                f"{what}: the endpoint refused the signature", code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True
            )
        if status == 404:
            raise Permanent(f"{what}: no such endpoint", code=ErrorCode.RECIPIENT_INVALID)
        raise Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)


def _iso(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
