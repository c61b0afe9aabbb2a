"""The provider plugin contract: one module per provider, registered by one line in
:mod:`services.senders.plugins` (``CATALOGUE``), tested against a local emulation of the
vendor's documented endpoint (``tests/emulators``).

A plugin declares:

- ``channel`` and ``name`` (``sms``/``aliyun``), ``docs`` (the vendor pages it follows);
- ``Config``: a pydantic model of what a tenant configures (``POST /api/v1/providers``). Fields
  typed :class:`~pydantic.SecretStr` are secrets: stored encrypted (AES-256-GCM), never logged,
  never returned by the API. Vendor endpoints are fields with the vendor's URL as default, so a
  private deployment (or a test) can point elsewhere;
- ``formats``: the content formats it renders natively (``text``, ``markdown``, ``html``,
  ``card``); anything else is converted by :func:`as_text` / :func:`as_markdown`;
- ``rate_limits``: the vendor's documented limits (the sender waits for a slot, never drops);
- ``default_cost``: cost of one message in the deployment's currency (overridable per
  provider, per destination country for SMS, see :class:`Costs`);
- ``build(message) -> HttpCall``: render and sign one request (pure: time and nonces come from
  ``self.clock`` / ``self.nonce`` so tests can pin them); ``parse(message, response)``: the
  vendor's answer as a :class:`SendResult`, or one of the exceptions below (classification).
  Plugins whose exchange is more than one request (an OAuth token first) override ``send``;
- ``client_options(config)``: what its HTTP client needs (HTTP/2 for APNs).

What several plugins need is here, once: :meth:`Plugin.read_options` (a message's options as a
model, a bad one named by its path), :func:`vendor_text` (a vendor's words quoted in an error),
:func:`http_failure` / :func:`result_code` / :func:`unexpected_answer` (classification without
a vendor code), :func:`secret_matching` / :func:`webhook_shape` (configured secrets checked
without echoing them), :func:`basic_auth`, :func:`as_text` / :func:`as_markdown` /
:func:`card_body`, and :class:`TemplateOptions` (a templated SMS).

Classification of a failed attempt (``services.senders.base``):

- :class:`Retryable` -- transient: network, 5xx, vendor throttling (``retry_after`` honoured);
- :class:`QuotaExceeded` -- the account's quota or balance is used up: retryable later, and
  the provider (not the message) is at fault so routing may move to another provider;
- :class:`Permanent` -- never retried: invalid recipient, rejected content; with
  ``sender_fault=True`` for bad credentials or a misconfigured provider (another provider of
  the channel could still deliver it).
"""

from __future__ import annotations

import base64
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError

from services.senders.base import Permanent, Retryable, SendResult
from shared.errors import ErrorCode
from shared.events import Card, CardField  # noqa: F401 - plugins take the card from here
from shared.outbound import retry_after  # plugins take it from here too
from shared.routing import price
from shared.ssrf import UnsafeURL

Format = Literal["text", "markdown", "html", "card"]


class QuotaExceeded(Retryable):
    """The provider account's quota or balance is exhausted: try later or elsewhere."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, code=ErrorCode.QUOTA_EXCEEDED, retry_after=retry_after, sender_fault=True)


class ProviderConfig(BaseModel):
    """Base of every plugin's configuration model."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


@dataclass(slots=True)
class Message:
    """One rendered delivery attempt as a plugin sees it (one recipient)."""

    message_id: str
    dispatch_id: str
    tenant_id: str
    to: str
    content: str
    format: Format = "text"
    title: str | None = None
    card: Card | None = None
    # Channel-specific fields a send may carry (SMS: template_code, sign_name, params; WeChat
    # MP: template_id, data, url; push: data, badge, sound; IM: mentions ...). Each plugin
    # documents the ones it reads and validates them in ``build`` (Permanent on bad ones).
    options: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1


@dataclass(slots=True)
class HttpCall:
    """One HTTP request as a plugin builds it; exactly one of ``json``/``content``/``form``."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None
    content: bytes | None = None
    form: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` messages per ``per_s`` seconds, per provider configuration (a bot, an
    account) or per recipient of it (Telegram's one message a second per chat)."""

    count: int
    per_s: float
    scope: Literal["provider", "recipient"] = "provider"
    source: str = ""  # where the vendor documents it


class Costs(BaseModel):
    """What one message costs through a configured provider: ``default`` or, for SMS, by the
    destination's country calling code (``{"86": 0.045, "1": 0.0079}``)."""

    model_config = ConfigDict(extra="forbid")
    default: Decimal | None = Field(default=None, ge=0)
    by_country: dict[Annotated[str, Field(pattern=r"^[1-9][0-9]{0,3}$")], Annotated[Decimal, Field(ge=0)]] = Field(
        default_factory=dict, description="calling code (86, 1, 1242) -> price"
    )


C = TypeVar("C", bound=ProviderConfig)
M = TypeVar("M", bound=BaseModel)


class Plugin(Generic[C]):
    channel: ClassVar[str]
    name: ClassVar[str]
    title: ClassVar[str]  # human name: "Aliyun SMS"
    Config: ClassVar[type[ProviderConfig]]
    docs: ClassVar[tuple[str, ...]] = ()
    formats: ClassVar[frozenset[str]] = frozenset({"text"})
    rate_limits: ClassVar[tuple[RateLimit, ...]] = ()
    default_cost: ClassVar[Decimal] = Decimal("0")
    # The recipient's address form on this provider, for the API catalogue ("E.164 phone
    # number", "chat id", "device token") -- validated per channel by shared.channels.
    address: ClassVar[str] = ""
    # How :meth:`invalid_option` words a refused option (``path`` dotted: ``data.n``); the chat
    # plugins keep their own "invalid option data.n:".
    option_error: ClassVar[str] = "{name}: option '{path}': {problem}"

    @classmethod
    def client_options(cls, config: C) -> dict[str, Any]:
        """Options of the HTTP client this provider needs (``http2=True``; ``verify=`` an SSL
        context for a private CA); the sender builds one SSRF-guarded client per option set
        and gives the plugin that one. Plugins are kept per configuration (until it changes),
        so a token cached on the instance (OAuth) lives as long as the configuration."""
        return {}

    def __init__(
        self,
        config: C,
        http: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.time,
        nonce: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.config = config
        self.http = http
        self.clock = clock
        self.nonce = nonce

    # --- what a plugin writes ---------------------------------------------------------------

    def build(self, message: Message) -> HttpCall:
        raise NotImplementedError

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        raise NotImplementedError

    # --- shared behaviour -------------------------------------------------------------------

    def read_options(self, model: type[M], message: Message) -> M:
        """``message.options`` as ``model``. A bad option is the message's fault, not the
        provider's: :class:`Permanent` naming the option's path, before any request."""
        options = message.options or {}
        try:
            return model.model_validate(options)
        except ValidationError as exc:
            raise self.invalid_option(*first_error(exc, options)) from None

    def invalid_option(self, path: str, problem: str) -> Permanent:
        """The refusal of an option (also one the model accepts but this send cannot use)."""
        text = self.option_error.format(name=self.name, path=path or "options", problem=problem)
        return Permanent(text, code=ErrorCode.CHANNEL_SEND_FAILED)

    async def send(self, message: Message) -> SendResult:
        call = self.build(message)
        response = await self.request(call)
        return self.parse(message, response)

    async def request(self, call: HttpCall) -> httpx.Response:
        """Send ``call``; a network failure is :class:`Retryable`, a refused address (SSRF
        guard) :class:`Permanent` with ``sender_fault`` (the provider's URL is at fault)."""
        try:
            return await self.http.request(
                call.method,
                call.url,
                headers=call.headers,
                json=call.json,
                content=call.content,
                data=call.form,
            )
        except UnsafeURL as exc:
            raise Permanent(
                f"{self.name}: refused URL: {exc}", code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True
            ) from None
        except httpx.TransportError as exc:
            what = "timed out" if isinstance(exc, httpx.TimeoutException) else exc.__class__.__name__
            failure = Retryable(f"{self.name}: {what}", code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)
            # Only a connection never made is sure not to have delivered: a read timeout or a
            # connection cut after the request was written may have (no failover then).
            failure.unsure = not isinstance(exc, _NOT_SENT)
            raise failure from None

    @classmethod
    def cost(cls, costs: Costs | None, to: str) -> Decimal:
        """One message to ``to``: the configured country price, else the configured default,
        else the plugin's ``default_cost`` (:func:`shared.routing.price`, which routers rank with)."""
        if costs is None:
            return cls.default_cost
        return price(costs.by_country, costs.default, cls.default_cost, to)


# Transport failures before any byte of the request left: the vendor cannot have the message.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


# --- helpers every plugin uses ---------------------------------------------------------------


def http_failure(name: str, response: httpx.Response, detail: str = "") -> Exception:
    """The classification of an HTTP status when the body said nothing more specific:
    429 throttled (Retry-After), 5xx/408 transient, 401/403 bad credentials (the provider's
    fault), other 4xx rejected."""
    status = response.status_code
    what = f"{name}: HTTP {status}" + (f": {detail}" if detail else "")
    if status == 429:
        return Retryable(what, code=ErrorCode.RATE_LIMITED, retry_after=retry_after(response, 1.0), sender_fault=True)
    if status >= 500 or status == 408:
        return Retryable(what, code=ErrorCode.CHANNEL_SEND_FAILED, retry_after=retry_after(response), sender_fault=True)
    if status in (401, 403):
        return Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
    return Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)


def unexpected_answer(name: str, response: httpx.Response) -> Retryable:
    """A success status without the vendor's documented answer (a proxy's page, a changed API):
    tried again, and the provider's fault rather than the message's."""
    what = f"{name}: unexpected answer (HTTP {response.status_code})"
    return Retryable(what, code=ErrorCode.CHANNEL_SEND_FAILED, sender_fault=True)


def result_code(name: str, response: httpx.Response, body: dict[str, Any], *keys: str) -> int:
    """The vendor's integer result code, the first of ``keys`` in a JSON answer. Without one the
    answer is not the vendor's: an error status classifies it, a success status is unexpected."""
    code = next((body[key] for key in keys if key in body), None)
    if isinstance(code, int):
        return code
    if response.status_code >= 400:
        raise http_failure(name, response)
    raise unexpected_answer(name, response)


_NUMBERS = re.compile(r"\+?\d[\d ()-]{5,}\d")


def vendor_text(text: str, limit: int = 160) -> str:
    """A vendor's own words as an error quotes them: clipped, and phone numbers replaced (SMS
    vendors quote the recipient's), since errors are stored, logged and shown to the tenant."""
    return _NUMBERS.sub("<number>", text)[:limit]


def body_of(response: httpx.Response) -> dict[str, Any]:
    """The response's JSON object, or {} when it is not one."""
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def basic_auth(user: str, password: str) -> str:
    """``Authorization: Basic base64(user:password)`` (RFC 7617, UTF-8)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def first_error(exc: ValidationError, data: Any) -> tuple[str, str]:
    """(dotted path, message) of the first error of validating ``data``. The path follows the
    data: the union member pydantic also names (``params.list[str]``) means nothing to whoever
    wrote it, so a step that is not in the data is left out, except a missing field's name."""
    err = exc.errors()[0]
    loc, value, path = err["loc"], data, []
    for i, step in enumerate(loc):
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, list) and isinstance(step, int) and 0 <= step < len(value):
            value = value[step]
        elif not (err["type"] == "missing" and i == len(loc) - 1):
            continue
        path.append(str(step))
    return ".".join(path), err["msg"]


def secret_matching(pattern: str, problem: str) -> AfterValidator:
    """The check of a secret field (``Annotated[SecretStr, secret_matching(...)]``): the whole
    value matches ``pattern``, else ``problem``, which says what is expected without the value."""
    regex = re.compile(pattern)

    def check(value: SecretStr) -> SecretStr:
        if not regex.fullmatch(value.get_secret_value()):
            raise ValueError(problem)
        return value

    return AfterValidator(check)


def webhook_shape(example: str, *, path: str | None = None, token: str | None = None) -> AfterValidator:
    """The check of a vendor's webhook URL (a secret, ``Annotated[SecretStr | None, ...]``): http(s),
    a host, the vendor's ``path`` (a pattern), and its token either in the path (no query) or in
    the ``token`` query parameter; the errors show ``example``, never the value."""
    shape = re.compile(path) if path else None

    def check(value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        parts = urlsplit(value.get_secret_value())
        wrong = parts.scheme not in ("https", "http") or not parts.netloc or (shape and not shape.fullmatch(parts.path))
        if wrong or (token is not None and parts.fragment):
            raise ValueError(f"expected {example}")
        if token is None and (parts.query or parts.fragment):
            raise ValueError("the webhook URL takes no query or fragment")
        if token is not None and not parse_qs(parts.query).get(token):
            raise ValueError(f"the webhook URL has no {token}")
        return value

    return AfterValidator(check)


def card_body(card: Card, *, markdown: bool = False) -> str:
    """A card below its title, for vendors whose notification carries the title apart: the
    text, the fields and the link, as plain text or as markdown ('' for a bare title)."""
    lines = [card.text] if card.text else []
    if markdown:
        lines += [f"- **{f.title}**: {f.value}" for f in card.fields]
        if card.url:
            lines.append(f"[{card.button or card.url}]({card.url})")
        return "\n\n".join(lines)
    lines += [f"{f.title}: {f.value}" for f in card.fields]
    if card.url:
        lines.append(card.url)
    return "\n".join(lines)


def as_text(message: Message) -> str:
    """The message as plain text (a card flattened: title, text, fields, link)."""
    if message.card is not None:
        body = card_body(message.card)
        return f"{message.card.title}\n{body}" if body else message.card.title
    if message.title and message.format != "card":
        return f"{message.title}\n{message.content}" if message.content else message.title
    return message.content


def as_markdown(message: Message) -> str:
    """The message as markdown (a card: bold title, text, fields as a list, link)."""
    if message.card is not None:
        title, body = f"**{message.card.title}**", card_body(message.card, markdown=True)
        return f"{title}\n\n{body}" if body else title
    body = message.content
    if message.title:
        return f"**{message.title}**\n\n{body}" if body else f"**{message.title}**"
    return body


def random_token(n: int = 16) -> str:
    return base64.urlsafe_b64encode(os.urandom(n)).decode().rstrip("=")


# --- SMS templates -----------------------------------------------------------------------------

TemplateValue = str | int | float


def template_values(value: Any) -> Any:
    """Template variables (a list, or a mapping's values) are strings or numbers: a bool or a
    null would reach the text as "True"/"None"."""
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if any(isinstance(v, bool) or v is None for v in values):
        raise ValueError("template params must be strings or numbers")
    return value


# The variables in order: a list, or a mapping taken in order.
OrderedParams = Annotated[list[TemplateValue] | dict[str, TemplateValue], BeforeValidator(template_values)]


class TemplateOptions(BaseModel):
    """The options of an SMS through a vendor-approved template (how a Chinese mainland SMS is
    sent): the template and the signature; a provider adds how it takes the variables and
    narrows the limits to its vendor's."""

    model_config = ConfigDict(extra="ignore")  # options meant for other SMS providers are not ours
    template_code: str = Field(min_length=1, max_length=100)
    sign_name: str | None = Field(default=None, min_length=1, max_length=100)


class OrderedTemplateOptions(TemplateOptions):
    """Variables in order (Tencent Cloud, Huawei Cloud): ``params``, and with ``with_content``
    the message's text as the last one."""

    params: OrderedParams = Field(default_factory=list, max_length=50)
    with_content: bool = False

    def template_params(self, message: Message) -> list[str]:
        values = self.params.values() if isinstance(self.params, dict) else self.params
        return [str(v) for v in values] + ([as_text(message)] if self.with_content else [])


class ErrcodeBot(Plugin[C]):
    """A group bot whose JSON answer is ``{"errcode": 0, "errmsg": ...}`` (DingTalk, WeCom): 429
    and 5xx by status, then the code; subclasses give ``msgtype``, ``options`` and ``classify``."""

    def msgtype(self, message: Message, options: Any) -> str:
        raise NotImplementedError

    def options(self, message: Message) -> Any:
        raise NotImplementedError

    def classify(self, code: int, errmsg: str) -> Exception:
        raise NotImplementedError

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        if response.status_code == 429 or response.status_code >= 500:
            raise http_failure(self.name, response)
        body = body_of(response)
        code = result_code(self.name, response, body, "errcode")
        if code == 0 and response.is_success:
            msgtype = self.msgtype(message, self.options(message))
            return SendResult(provider_message_id=None, detail={"msgtype": msgtype})
        raise self.classify(code, str(body.get("errmsg") or ""))
