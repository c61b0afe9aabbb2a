"""The events every topic carries, defined once; JSON Schemas in ``shared/schemas`` derive from
these models (``python -m shared.events`` rewrites them, a test checks they are current).

Topics and their schema:

    notify.requests          notify.request.v1    key tenant:recipient
    notify.dispatch.<chan>   notify.dispatch.v1   key tenant:recipient
    notify.events            notify.event.v1      key message_id
    notify.dlq               notify.dlq.v1        key message_id or none
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    TypeAdapter,
    field_validator,
)

SCHEMA_DIR = Path(__file__).parent / "schemas"


class Channel(StrEnum):
    """Every channel; each has its dispatch topic and sender (shared.channels: address forms)."""

    EMAIL = "email"
    SMS = "sms"
    FEISHU = "feishu"
    DINGTALK = "dingtalk"
    WECOM = "wecom"
    SLACK = "slack"
    TEAMS = "teams"
    DISCORD = "discord"
    TELEGRAM = "telegram"
    FLOMO = "flomo"
    WEBHOOK = "webhook"
    PUSH = "push"
    WECHAT_MP = "wechat_mp"
    BARK = "bark"
    NTFY = "ntfy"
    GOTIFY = "gotify"
    PUSHDEER = "pushdeer"


class ContentType(StrEnum):
    HTML = "html"
    TEXT = "text"
    MARKDOWN = "markdown"
    # The content is the channel-neutral card in ``card`` (IM channels and webhooks).
    CARD = "card"


class State(StrEnum):
    """DESIGN.md's lifecycle of a message."""

    ACCEPTED = "accepted"
    SCHEDULED = "scheduled"
    ROUTED = "routed"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"
    RETRYING = "retrying"
    DEAD = "dead"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    # Not sent on purpose: a frequency cap dropped it (issue 8).
    SUPPRESSED = "suppressed"
    # Handed to a digest: delivered as one line of the digest message named in its event.
    DIGESTED = "digested"


class Status(StrEnum):
    """Seed 004's coarse status, derived from :class:`State`."""

    PENDING = "pending"
    SENDING = "sending"
    SUCCESS = "success"
    FAILED = "failed"


SEED_STATUS: dict[State, Status] = {
    State.ACCEPTED: Status.PENDING,
    State.SCHEDULED: Status.PENDING,
    State.ROUTED: Status.PENDING,
    State.SENDING: Status.SENDING,
    State.SENT: Status.SUCCESS,
    State.DELIVERED: Status.SUCCESS,
    State.FAILED: Status.FAILED,
    State.RETRYING: Status.PENDING,
    State.DEAD: Status.FAILED,
    State.REJECTED: Status.FAILED,
    State.CANCELLED: Status.FAILED,
    State.SUPPRESSED: Status.FAILED,
    State.DIGESTED: Status.SUCCESS,
}

# Within one attempt, a state only moves to a higher rank; a later attempt starts over.
# Terminal states outrank everything so that a late 'sending' cannot undo a 'sent'.
STATE_RANK: dict[State, int] = {
    State.ACCEPTED: 0,
    State.SCHEDULED: 1,
    State.ROUTED: 2,
    State.SENDING: 3,
    State.RETRYING: 4,
    State.FAILED: 5,
    State.SENT: 6,
    State.DELIVERED: 7,
    State.DEAD: 8,
    State.REJECTED: 8,
    State.CANCELLED: 8,
    State.SUPPRESSED: 8,
    State.DIGESTED: 8,
}
TERMINAL_STATES = frozenset(
    {State.SENT, State.DELIVERED, State.DEAD, State.REJECTED, State.CANCELLED, State.SUPPRESSED, State.DIGESTED}
)

# A category names a kind of message for frequency caps and digests ("marketing", "otp").
Category = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
# Where a message's status callbacks go (issue 11): an http(s) URL without credentials.
CallbackURL = Annotated[str, Field(min_length=8, max_length=500, pattern=r"^https?://[^\s@/?#]+(?:[/?#][^\s]*)?$")]


def utcnow() -> datetime:
    return datetime.now(UTC)


# Values that end up in a mail header or protocol line: CR, LF or NUL would inject headers.
NO_NEWLINES = r"^[^\r\n\x00]*$"

Address = Annotated[str, Field(min_length=1, max_length=320, pattern=NO_NEWLINES)]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True))


class AttachmentRef(BaseModel):
    """An uploaded attachment, as ingest resolved it: where the sender finds the file (``path``,
    relative to the shared data folder) and what it must find there (``size``, ``sha256``)."""

    model_config = ConfigDict(extra="forbid")

    attachment_id: str = Field(min_length=1, max_length=64)
    filename: str = Field(min_length=1, max_length=255)
    mime_type: str = Field(pattern=r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$", max_length=100)
    size: int = Field(ge=0)
    path: str = Field(min_length=1, max_length=500, description="relative to the data folder")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("filename")
    @classmethod
    def _printable(cls, value: str) -> str:
        # It becomes a MIME header parameter: no control characters (CR/LF would inject headers).
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("control characters are not allowed in a filename")
        return value

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        parts = value.split("/")
        if value.startswith("/") or "\\" in value or any(p in ("", ".", "..") for p in parts):
            raise ValueError("expected a relative path without '.' or '..' segments")
        return value


class EmailOptions(BaseModel):
    """What only the email channel needs."""

    model_config = ConfigDict(extra="forbid")

    cc: list[EmailStr] = Field(default_factory=list, max_length=100)
    bcc: list[EmailStr] = Field(default_factory=list, max_length=100)
    from_name: str | None = Field(default=None, max_length=100, pattern=NO_NEWLINES)
    reply_to: EmailStr | None = None
    # The plain-text alternative of an HTML body; derived from the HTML when not given.
    text: str | None = Field(default=None, min_length=1)
    # None rather than []: a message without attachments serialises exactly as before them.
    attachments: list[AttachmentRef] | None = Field(default=None, max_length=20)


class CardField(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=200)
    value: str = Field(max_length=2000)


class Card(BaseModel):
    """A channel-neutral card (content_type ``card``): each IM plugin renders it as its own
    (Feishu interactive card, DingTalk actionCard, Slack blocks, Teams Adaptive Card, Discord
    embed ...); channels without cards get it as text or markdown."""

    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=200)
    text: str = Field(default="", max_length=4000, description="markdown")
    fields: list[CardField] = Field(default_factory=list, max_length=20)
    url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://[^\s]+$")
    button: str | None = Field(default=None, max_length=60, description="label of the link button")
    color: Literal["blue", "green", "orange", "red", "grey"] | None = None


# Channel-specific fields of a send (SMS template_code/params, WeChat MP data, push data, IM
# mentions ...): each provider plugin documents and validates the ones it reads.
Options = dict[str, Any]


class TemplateRef(BaseModel):
    """A send in template mode: which template version, its variables and the locale. Ingest
    pins the version (the current one unless the caller named one); the router renders."""

    model_config = ConfigDict(extra="forbid")

    template_id: int = Field(ge=1)
    version: int = Field(ge=1)
    vars: dict[str, Any] = Field(default_factory=dict)
    locale: str | None = Field(default=None, max_length=35)


Priority = Literal["urgent", "high", "normal", "low"]
# "HH:MM" (or "HH:MM:SS"), 24-hour clock.
ClockTime = Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?$")]
UserId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@+\-]*$")]


def _seconds(clock: str) -> int:
    """Seconds after midnight of an ``HH:MM[:SS]`` time."""
    parts = [int(p) for p in clock.split(":")] + [0]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


class QuietHours(BaseModel):
    """The recipient's quiet hours, in their time zone: non-urgent messages wait until ``end``.
    ``start`` after ``end`` spans midnight (22:00-07:00)."""

    model_config = ConfigDict(extra="forbid")

    start: ClockTime
    end: ClockTime

    @field_validator("end")
    @classmethod
    def _not_empty(cls, value: str, info: Any) -> str:
        start = info.data.get("start")
        if start is not None and _seconds(start) == _seconds(value):  # "22:00" is "22:00:00"
            raise ValueError("start and end are the same time")
        return value


class OptOuts(BaseModel):
    """What the recipient does not want: categories of message, and channels."""

    model_config = ConfigDict(extra="forbid")

    categories: list[Category] = Field(default_factory=list, max_length=100)
    channels: list[Channel] = Field(default_factory=list, max_length=len(Channel))


AttributeValue = str | int | float | bool


class RecipientProfile(BaseModel):
    """A recipient's profile (``/api/v1/recipients``) as it stood when their message was accepted:
    a send to ``{"user_id": ...}`` carries it, so the router never queries for it."""

    model_config = ConfigDict(extra="forbid")

    user_id: UserId
    addresses: dict[Channel, Address] = Field(default_factory=dict)
    locale: str | None = Field(default=None, max_length=35)
    timezone: str = Field(default="UTC", max_length=64)
    opt_outs: OptOuts = Field(default_factory=OptOuts)
    quiet_hours: QuietHours | None = None
    attributes: dict[Annotated[str, Field(min_length=1, max_length=64)], AttributeValue] = Field(
        default_factory=dict, max_length=50
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("not a known IANA time zone (e.g. Asia/Shanghai)") from None
        return value


class Candidate(BaseModel):
    """A provider the router lets a dispatch use, in the order to try them."""

    model_config = ConfigDict(extra="forbid")

    id: int
    name: str


class DigestRef(BaseModel):
    """Marks a digest message (issue 8): the router parks one when the first message of a digest
    opens its bucket, and when it comes back delivers the bucket's messages as one listing."""

    model_config = ConfigDict(extra="forbid")

    rule_id: int = Field(ge=1)
    # The message that opened the bucket (the digest's id is derived from it).
    opened_by: str = Field(min_length=1, max_length=64)
    # Rendered with this template when given (variables items, count, category), else a listing.
    template_id: int | None = Field(default=None, ge=1)


class RequestV1(_Event):
    """``notify.request.v1``: a message to send, from ingest or from any internal producer."""

    schema_: Literal["notify.request.v1"] = Field(default="notify.request.v1", alias="schema")
    message_id: str | None = Field(default=None, max_length=64)
    tenant_id: str = Field(default="default", min_length=1, max_length=64)
    # None: the recipient's profile and the tenant's routing rules choose (``recipient``).
    channel: Channel | None = None
    # Empty when ``recipient`` gives the address (its profile's address on the channel).
    to: list[Address] = Field(default_factory=list, max_length=100)
    subject: str | None = Field(default=None, max_length=998, pattern=NO_NEWLINES)
    # Required unless ``template`` is given (the router renders subject and content from it);
    # the router checks that exactly one of the two is there.
    content: str = ""
    content_type: ContentType = ContentType.HTML
    template: TemplateRef | None = None
    email: EmailOptions | None = None
    # Other channels (issue 9): the card of content_type "card", the channel's options, and the
    # configured provider to use (its name; default: the tenant's first by priority). On
    # endpoint channels (bots, webhooks) ``to`` already names the provider.
    card: Card | None = None
    options: Options | None = None
    provider: str | None = Field(default=None, max_length=64)
    idempotency_key: str | None = Field(default=None, max_length=255)
    request_id: str | None = Field(default=None, max_length=64)
    accepted_at: datetime | None = None
    # True when ingest already wrote the message record and its 'accepted' event.
    recorded: bool = False
    # Set by the sweeper when it publishes a stalled message again: the delivery attempt to
    # dispatch (the same one when its outcome may exist, so the sender replays it, not resends).
    attempt: int | None = Field(default=None, ge=1)
    # Not before this moment: the router parks a request whose time has not come (it is
    # recorded as 'scheduled' and released by the scheduler). Absent once released.
    scheduled_at: AwareDatetime | None = None
    # For frequency caps and digests (issue 8).
    category: Category | None = None
    # The batch this message is one item of (POST /api/v1/messages/batch).
    batch_id: str | None = Field(default=None, max_length=64)
    # How many times the router has parked this message since it was accepted (a frequency
    # cap deferring it, a digest holding it): each parking is a new 'scheduled' event, told
    # apart by this number, so a redelivered one is recognised and not parked twice.
    deferrals: int = Field(default=0, ge=0, le=10_000)
    # Set on a digest message only (the router makes them; see DigestRef).
    digest: DigestRef | None = None
    # Smart routing (issue 10): urgent messages go through quiet hours; rules match on it.
    priority: Priority = "normal"
    # A send to a user: their profile as it stood when the message was accepted.
    recipient: RecipientProfile | None = None
    # Set on the other channels' messages of an "all" rule: the message they were routed with.
    parent_id: str | None = Field(default=None, max_length=64)
    # Set by the sweeper on a first_success rule's message that had moved on to a later channel
    # (its fallback events name the step): routed again from that step, not from the first.
    step: int | None = Field(default=None, ge=1, le=8)
    # Status callbacks (issue 11): the message's status changes are POSTed here, signed with the
    # tenant's callback signing secret (ingest checks it against SSRF; the tracker again at each try).
    callback_url: CallbackURL | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, str_strip_whitespace=True)

    @field_validator("to")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True, by_alias=True))

    @property
    def later_attempt(self) -> bool:
        """A replayed dead letter or a sweep names an attempt after the first: what the router
        decides once (caps, digests, quiet hours) was decided when it was first routed."""
        return self.attempt is not None and self.attempt > 1


class DispatchV1(_Event):
    """``notify.dispatch.v1``: one delivery attempt of one message through one channel."""

    schema_: Literal["notify.dispatch.v1"] = Field(default="notify.dispatch.v1", alias="schema")
    dispatch_id: str
    message_id: str
    tenant_id: str
    channel: Channel
    provider: str | None = None
    attempt: int = Field(default=1, ge=1)
    to: list[str] = Field(min_length=1)
    subject: str | None = None
    content: str
    content_type: ContentType = ContentType.HTML
    email: EmailOptions | None = None
    card: Card | None = None
    options: Options | None = None
    request_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    # A retry waits on a notify.retry.* topic until this moment, then goes back to dispatch.
    not_before: datetime | None = None
    last_error: str | None = None
    # How many times this attempt waited for a provider's rate limit (each a new dispatch id,
    # "<message>:<attempt>.<n>", the same attempt).
    deferrals: int = Field(default=0, ge=0)
    # Smart routing (issue 10). The providers to try, in order: a failed try moves to the next at
    # once; the retry schedule starts when every one failed. Empty: the sender's own choice.
    candidates: list[Candidate] = Field(default_factory=list)
    # first_success rules: the next channel's dispatch, sent when this one fails for good or would
    # still be unsent at ``step_deadline``; attempts go on counting from this step's.
    fallback: DispatchV1 | None = None  # noqa: UP037
    step: int = Field(default=1, ge=1)
    step_timeout_s: int | None = Field(default=None, ge=1)
    # The attempt this channel's step began with (retries count from it).
    first_attempt: int = Field(default=1, ge=1)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True, by_alias=True))

    @property
    def step_deadline(self) -> datetime | None:
        """When this channel's step gives way to the next: ``step_timeout_s`` after the step began
        (its first attempt's ``created_at``, which its retries and deferrals keep)."""
        return self.created_at + timedelta(seconds=self.step_timeout_s) if self.step_timeout_s else None


class MessageSnapshot(BaseModel):
    """What the tracker needs to create a message record it has not seen yet."""

    model_config = ConfigDict(extra="forbid")

    channel: str
    recipient: str
    recipients: dict[str, list[str]] = Field(default_factory=dict)
    subject: str | None = None
    content: str | None = None
    content_type: str | None = None
    idempotency_key: str | None = None
    request_id: str | None = None
    accepted_at: datetime | None = None
    category: str | None = None
    callback_url: str | None = None  # the request's (a direct publisher's message: recorded from here)


class EventV1(_Event):
    """``notify.event.v1``: something that happened to a message; the tracker folds these."""

    schema_: Literal["notify.event.v1"] = Field(default="notify.event.v1", alias="schema")
    event_id: str
    message_id: str
    tenant_id: str = "default"
    state: State
    attempt: int = Field(default=0, ge=0)
    occurred_at: datetime = Field(default_factory=utcnow)
    service: str
    channel: str | None = None
    provider: str | None = None
    error_code: int | None = None
    error: str | None = None
    detail: dict[str, Any] | None = None
    message: MessageSnapshot | None = None
    request_id: str | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True, by_alias=True))


def event_id(message_id: str, attempt: int, state: State) -> str:
    """Deterministic: a redelivered command re-emits the same id and the tracker dedups it."""
    return f"{message_id}:{attempt}:{state.value}"


class DeadLetterV1(_Event):
    """``notify.dlq.v1``: a record Herald could not process, with the reason, never dropped."""

    schema_: Literal["notify.dlq.v1"] = Field(default="notify.dlq.v1", alias="schema")
    source_topic: str
    partition: int
    offset: int
    reason: str
    errors: list[dict[str, Any]] = Field(default_factory=list)
    message_id: str | None = None
    service: str
    occurred_at: datetime = Field(default_factory=utcnow)
    key: str | None = None
    payload: str  # the original bytes, decoded as UTF-8 with replacement
    headers: dict[str, str] = Field(default_factory=dict)
    tenant_id: str | None = None  # when the record says whose it is
    # The same failure reported twice (a redelivered batch, an outcome published again after a
    # crash) has the same id and is stored once: "<topic>:<partition>:<offset>:<reason>" for a
    # consumed record, "<dispatch id>:<reason>" for a delivery's outcome.
    letter_id: str | None = Field(default=None, max_length=255)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @classmethod
    def of_record(
        cls,
        record: Any,
        *,
        reason: str,
        errors: list[dict[str, Any]],
        service: str,
        message_id: str | None = None,
        tenant_id: str | None = None,
    ) -> DeadLetterV1:
        """The letter for a consumed record (aiokafka's ``ConsumerRecord`` shape: topic,
        partition, offset, key, value, headers as pairs), its bytes kept as text."""
        return cls(
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
            errors=errors[:50],
            message_id=message_id,
            service=service,
            tenant_id=tenant_id,
            key=record.key.decode("utf-8", "replace") if record.key else None,
            payload=(record.value or b"").decode("utf-8", "replace"),
            headers={k: v.decode("utf-8", "replace") for k, v in (record.headers or [])},
            letter_id=f"{record.topic}:{record.partition}:{record.offset}:{reason}",
        )

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True, by_alias=True))


class ProviderHealthV1(_Event):
    """``notify.provider-health.v1`` (compacted, keyed by identity): a sending identity's
    health changed, e.g. a mailbox disabled after consecutive failures."""

    schema_: Literal["notify.provider-health.v1"] = Field(default="notify.provider-health.v1", alias="schema")
    provider: str
    channel: str
    identity: str
    state: Literal["healthy", "degraded", "disabled"]
    tenant_id: str = "default"
    account: str | None = None
    failures: int | None = None
    reason: str | None = None
    occurred_at: datetime = Field(default_factory=utcnow)
    # A configured provider's live quality (issue 10; identity "provider:<id>"), computed by the
    # tracker over ``window_s``: its share of successful tries, p95 of the vendor's answer time,
    # and its circuit breaker (open: traffic leaves it; routers probe it after ``cooldown_s``).
    provider_id: int | None = None
    samples: int | None = None
    success_rate: float | None = None
    p95_ms: float | None = None
    breaker: Literal["closed", "open"] | None = None
    opened_at: datetime | None = None
    cooldown_s: float | None = None
    window_s: float | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True, by_alias=True))


EVENT_MODELS: dict[str, type[BaseModel]] = {
    "notify.request.v1": RequestV1,
    "notify.dispatch.v1": DispatchV1,
    "notify.event.v1": EventV1,
    "notify.dlq.v1": DeadLetterV1,
    "notify.provider-health.v1": ProviderHealthV1,
}

_email_adapter = TypeAdapter(EmailStr)


def validate_email_address(value: str) -> str:
    """Return the address if valid, else raise ``pydantic.ValidationError``."""
    return _email_adapter.validate_python(value)


def json_schema(name: str) -> dict[str, Any]:
    schema = EVENT_MODELS[name].model_json_schema(by_alias=True, mode="validation")
    schema["$id"] = f"https://herald.dev/schemas/{name}.json"
    schema["title"] = name
    return schema


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Regenerate the checked-in JSON Schema files from the models."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in EVENT_MODELS:
        path = directory / f"{name}.json"
        path.write_text(json.dumps(json_schema(name), indent=2, ensure_ascii=False) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_schemas():
        sys.stdout.write(f"wrote {p}\n")
