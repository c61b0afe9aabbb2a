"""What the router decides for one raw request: pure functions, no I/O.

``plan(raw)`` parses and validates a ``notify.request.v1`` record and answers either a
:class:`Routed` (the dispatch command and the events to emit) or a :class:`Rejected` (the
reason, the offending fields, and the events to emit). The faust app only moves bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson
from pydantic import ValidationError

from shared.channels import AddressError, check_address, spec
from shared.events import (
    Candidate,
    Channel,
    ContentType,
    DispatchV1,
    EmailOptions,
    EventV1,
    MessageSnapshot,
    RequestV1,
    State,
    event_id,
    utcnow,
)
from shared.ids import derived_message_id, is_message_id, new_message_id
from shared.routing import (
    HealthStore,
    Probes,
    RoutingStore,
    Scored,
    Steps,
    channels_for,
    quiet_until,
    rank,
    score,
)
from shared.templates import Rendered, Renderer, TemplateProblem, TemplateVersion

SERVICE = "router"

_RENDERER = Renderer()
# Template variants' formats that are content types (html, text, markdown).
_RENDERED_TYPES = frozenset({"html", "text", "markdown"})
# What a rendered message may weigh in all (the broker's default request limit is 1 MiB).
MAX_RENDERED_BYTES = 768 * 1024


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record sits in the log (topic, partition, offset) and when the broker stamped it.

    Ids the router assigns are derived from it rather than drawn at random: a record routed a
    second time (the router crashed before committing its offset) gets the same message id,
    so its dispatch has the same dispatch id and the sender does not send it twice."""

    topic: str
    partition: int
    offset: int
    timestamp: datetime

    def message_id(self) -> str:
        ms = int(self.timestamp.timestamp() * 1000)
        seed = f"{self.topic}:{self.partition}:{self.offset}:{ms}"
        return derived_message_id(f"{self.timestamp.astimezone(UTC):%Y%m%d}", seed)


@dataclass(slots=True)
class Routed:
    request: RequestV1
    dispatch: DispatchV1
    events: list[EventV1]
    # The other channels' messages of an "all" rule: requests of their own, published to
    # notify.requests and routed like any (see _child).
    children: list[RequestV1] = field(default_factory=list)


@dataclass(slots=True)
class Held:
    """A message the router does not dispatch on purpose: ``state`` is suppressed (a cap
    dropped it, the recipient opted out) or digested (handed to a digest); only ``events``
    are emitted."""

    message_id: str
    state: State
    events: list[EventV1]


@dataclass(slots=True)
class Routing:
    """What smart routing decides on (issue 10): providers, rules and policies from the config
    topic, providers' health from ``notify.provider-health``, this router's probe bookkeeping."""

    store: RoutingStore
    health: HealthStore
    probes: Probes = field(default_factory=Probes)
    rng: random.Random = field(default_factory=random.Random)


@dataclass(slots=True)
class Rejected:
    message_id: str
    reason: str
    errors: list[dict[str, Any]]
    events: list[EventV1] = field(default_factory=list)


@dataclass(slots=True)
class Parked:
    """The request waits until ``until``: recorded as 'scheduled' (the tracker stores the request
    and a scheduled task) and published again by the scheduler when due. ``reason`` is
    ``scheduled`` (its sender asked for a time), ``deferred`` (a frequency cap) or ``digest``."""

    request: RequestV1
    until: datetime
    reason: str
    events: list[EventV1]


@dataclass(slots=True)
class Unknown:
    """The request's template version is not in the router's store (yet)."""

    message_id: str
    tenant_id: str
    template_id: int
    version: int


class Templates(Protocol):
    """What routing needs of the template store and renderer."""

    def version(self, tenant_id: str, template_id: int, version: int) -> TemplateVersion | None: ...


def _field(loc: tuple | list) -> str:
    return ".".join(str(p) for p in loc) or "body"


def _snapshot(data: dict[str, Any], channel: str, accepted_at: datetime | None) -> MessageSnapshot:
    """Best effort: what a (possibly invalid) request says about its message."""
    to = data.get("to")
    to_list = [str(t)[:320] for t in to] if isinstance(to, list) else ([str(to)[:320]] if to else [])
    email = data.get("email") if isinstance(data.get("email"), dict) else {}
    recipients = {"to": to_list}
    for key in ("cc", "bcc"):
        if isinstance(email.get(key), list):
            recipients[key] = [str(a)[:320] for a in email[key]]
    subject = data.get("subject")
    content = data.get("content")
    return MessageSnapshot(
        channel=channel[:20],
        recipient=to_list[0] if to_list else "",
        recipients=recipients,
        subject=str(subject)[:998] if subject is not None else None,
        content=content if isinstance(content, str) else None,
        content_type=str(data.get("content_type") or "html")[:10],
        idempotency_key=str(data["idempotency_key"])[:255] if data.get("idempotency_key") else None,
        request_id=str(data["request_id"])[:64] if data.get("request_id") else None,
        accepted_at=accepted_at,
    )


def _mode_errors(request: RequestV1) -> list[dict[str, str]]:
    """Content or a template, not both (checked before rendering)."""
    errors: list[dict[str, str]] = []
    if request.recipient is None:  # a send to a user's profile gets both from it (and the rules)
        if request.channel is None:
            errors.append({"field": "channel", "message": "field required unless the message goes to a recipient"})
        if not request.to:
            errors.append({"field": "to", "message": "at least one recipient required"})
    if request.template is None and not request.content and request.card is None:
        if request.content_type is ContentType.CARD:
            errors.append({"field": "card", "message": "field required with content_type card"})
        else:
            errors.append({"field": "content", "message": "field required unless a template or a card is given"})
    if request.template is not None and (request.content or request.subject):
        field_name = "content" if request.content else "subject"
        errors.append({"field": field_name, "message": "not allowed with a template (the template provides it)"})
    return errors


def _channel_errors(request: RequestV1) -> list[dict[str, str]]:
    """Checks that depend on the channel: addresses of its form (normalised in place: a direct
    publisher's "+86 138-0013-8000" reaches providers, pacing and costs as "+8613800138000"), a
    content format it takes, its required fields, no other channel's options."""
    errors: list[dict[str, str]] = []
    channel = spec(request.channel)
    for i, address in enumerate(request.to):
        try:
            normal = check_address(request.channel, address)
        except AddressError as exc:
            errors.append({"field": f"to.{i}", "message": str(exc)})
            continue
        if request.channel is not Channel.EMAIL:  # emails go as given (as they always have)
            request.to[i] = normal
    if request.channel is Channel.EMAIL:
        if not request.subject:
            errors.append({"field": "subject", "message": "field required for email"})
    else:
        if len(request.to) > 1:
            errors.append({"field": "to", "message": f"one recipient per message on {request.channel.value}"})
        if request.email is not None:
            errors.append({"field": "email", "message": "email options on a message of another channel"})
    if request.content_type.value not in channel.formats:
        errors.append({
            "field": "content_type",
            "message": f"{request.channel.value} takes {', '.join(sorted(channel.formats))}",
        })  # fmt: skip
    elif request.content_type is ContentType.CARD and request.card is None:
        errors.append({"field": "card", "message": "field required with content_type card"})
    return errors


def _reject(
    message_id: str,
    reason: str,
    errors: list[dict[str, Any]],
    data: dict[str, Any] | None,
    tenant_id: str,
    now: datetime,
    code: int = 1001,
) -> Rejected:
    data = data or {}
    snapshot = _snapshot(data, str(data.get("channel") or "unknown"), now)
    text = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5]) or reason
    event = EventV1(
        event_id=event_id(message_id, 0, State.REJECTED),
        message_id=message_id,
        tenant_id=tenant_id,
        state=State.REJECTED,
        attempt=0,
        occurred_at=now,
        service=SERVICE,
        channel=snapshot.channel,
        error_code=code,
        error=f"{reason}: {text}"[:2000],
        detail={"reason": reason, "errors": errors[:20]},
        message=snapshot,
        request_id=snapshot.request_id,
    )
    return Rejected(message_id, reason, errors, [event])


def plan(
    raw: bytes | None,
    *,
    now: datetime | None = None,
    origin: Origin | None = None,
    templates: Templates | None = None,
    renderer: Renderer | None = None,
    horizon_s: float | None = None,
    routing: Routing | None = None,
) -> Routed | Rejected | Unknown | Parked | Held:
    """Decide what to do with one record of ``notify.requests``; ``origin`` (the record's
    place in the log) makes the ids the router assigns the same each time it is routed.
    A request in template mode is rendered from ``templates`` (never a database query);
    :class:`Unknown` when its version is not there. A request whose ``scheduled_at`` is
    still ahead is :class:`Parked` (at most ``horizon_s`` ahead)."""
    now = now or utcnow()
    assigned = origin.message_id() if origin is not None else new_message_id(now)  # when none is given
    try:
        data = orjson.loads(raw or b"")
    except orjson.JSONDecodeError as exc:
        return _reject(assigned, "invalid_json", [{"field": "body", "message": str(exc)[:200]}], None, "default", now)
    if not isinstance(data, dict):
        return _reject(
            assigned,
            "invalid_json",
            [{"field": "body", "message": "not a JSON object"}],
            None,
            "default",
            now,
        )

    tenant = data.get("tenant_id")
    tenant_id = tenant if isinstance(tenant, str) and 0 < len(tenant) <= 64 else "default"
    given = data.get("message_id")
    if given is None:
        message_id = assigned
        data = {**data, "message_id": message_id}
    elif isinstance(given, str) and is_message_id(given):
        message_id = given
    else:
        return _reject(
            assigned,
            "invalid_request",
            [{"field": "message_id", "message": "expected msg_<yyyymmdd>_<random> or no value"}],
            data,
            tenant_id,
            now,
        )
    schema = data.get("schema", "notify.request.v1")
    if schema != "notify.request.v1":
        return _reject(
            message_id,
            "unknown_schema",
            [{"field": "schema", "message": f"expected notify.request.v1, got {str(schema)[:64]!r}"}],
            data,
            tenant_id,
            now,
        )
    try:
        request = RequestV1.model_validate({**data, "schema": "notify.request.v1"})
    except ValidationError as exc:
        errors = [{"field": _field(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        return _reject(message_id, "invalid_request", errors, data, tenant_id, now)
    errors = _mode_errors(request) or (
        _channel_errors(request) if request.template is None and request.channel is not None else []
    )
    if errors:
        return _reject(message_id, "invalid_request", errors, data, tenant_id, now)
    if request.scheduled_at is not None:
        # Direct publishers may ask for a time; what came through ingest was parked there and
        # comes back from the scheduler without one.
        if horizon_s is not None and request.scheduled_at > now + timedelta(seconds=horizon_s):
            errors = [{"field": "scheduled_at", "message": f"more than {int(horizon_s)} s ahead (the horizon)"}]
            return _reject(message_id, "invalid_request", errors, data, tenant_id, now)
        if request.scheduled_at > now:  # not before its time, even by a moment
            return park(request, request.scheduled_at, "scheduled", now)
    request = request.model_copy(update={"message_id": message_id})
    steps = Steps(None, "first_success", None, [(request.channel, list(request.to))]) if request.channel else None
    if request.recipient is not None:
        personal = _personal(request, data, routing, now)
        if not isinstance(personal, Steps):
            return personal
        steps = personal
    assert steps is not None
    prepared: list[RequestV1] = []
    refused: list[Rejected] = []
    for channel, to in steps.channels:
        one = _prepare(request.model_copy(update={"channel": channel, "to": to}), data, templates, renderer, now)
        if isinstance(one, Unknown):
            return one
        if isinstance(one, Rejected):  # a channel this message cannot take (its format, no subject)
            refused.append(one)
            why = "; ".join(f"{e['field']}: {e['message']}" for e in one.errors[:3])
            steps.left_out.append({"channel": channel.value, "why": f"the message does not fit it ({why})"})
            continue
        prepared.append(one)
    if not prepared:
        return refused[0]
    if refused:
        steps.channels = [(r.channel, r.to) for r in prepared]  # type: ignore[misc]
    if request.step:  # numbered as when it was first routed: after the channels left out
        prepared = prepared[steps.resume_at(request.step) :]
    children: list[RequestV1] = []
    if steps.strategy == "all":  # as sent (rendered again when each is routed), on its channel
        children = [_child(request.model_copy(update={"channel": r.channel, "to": r.to}), message_id, now)
                    for r in prepared[1:]]  # fmt: skip
        prepared = prepared[:1]
    return _route_steps(prepared, steps, now, routing, children, request)


def _prepare(
    request: RequestV1, data: dict[str, Any], templates: Templates | None, renderer: Renderer | None, now: datetime
) -> RequestV1 | Rejected | Unknown:
    """The request on its channel: rendered from its template (for that channel) and checked."""
    assert request.channel is not None and request.message_id is not None
    message_id, tenant_id = request.message_id, request.tenant_id
    if request.template is None:
        if request.recipient is not None:  # its address came from the profile: check it here
            errors = _channel_errors(request)
            if errors:
                return _reject(message_id, "invalid_request", errors, data, tenant_id, now)
        return request
    ref = request.template
    version = templates.version(tenant_id, ref.template_id, ref.version) if templates is not None else None
    if version is None:
        return Unknown(message_id, tenant_id, ref.template_id, ref.version)
    locale = ref.locale or (request.recipient.locale if request.recipient is not None else None)
    try:
        rendered = (renderer or _RENDERER).render(version, request.channel.value, locale, ref.vars)
    except TemplateProblem as exc:
        errors = [{"field": exc.field, "message": exc.message}]
        return _reject(message_id, "template_render_failed", errors, data, tenant_id, now, int(exc.code))
    try:
        request = _with_rendered(request, rendered)
    except ValidationError as exc:  # e.g. a subject over 998 characters
        errors = [{"field": _field(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        return _reject(message_id, "template_render_failed", errors, data, tenant_id, now, 2004)
    errors = _channel_errors(request)
    if errors:  # e.g. a template without a subject for email
        return _reject(message_id, "invalid_request", errors, data, tenant_id, now)
    return request


def _personal(
    request: RequestV1, data: dict[str, Any], routing: Routing | None, now: datetime
) -> Steps | Rejected | Parked | Held:
    """A message to a recipient's profile: their opt-outs, their quiet hours, then the tenant's
    first matching rule (or the channel the send named) over the channels they have addresses on."""
    profile = request.recipient
    assert profile is not None and request.message_id is not None
    message_id = request.message_id
    if request.category is not None and request.category in profile.opt_outs.categories:
        return _opted_out(request, now, {"category": request.category},
                          f"the recipient opted out of category {request.category!r}")  # fmt: skip
    if request.priority != "urgent" and not request.later_attempt:
        until = quiet_until(profile, now)
        if until is not None:
            return park(request, until, "quiet_hours", now)
    rules = routing.store.rules_of(request.tenant_id) if routing is not None else []
    found = channels_for(rules, profile, channel=request.channel, to=request.to, priority=request.priority,
                         category=request.category, now=now)  # fmt: skip
    if isinstance(found, Steps):
        return found
    if found.reason == "no_route":
        errors = [{"field": "channel", "message": "no channel given and no routing rule of the tenant matches"}]
        return _reject(message_id, "no_route", errors, data, request.tenant_id, now)
    if found.reason == "opted_out":
        return _opted_out(request, now, {"channels": [x["channel"] for x in found.left_out]},
                          "the recipient opted out of every channel the message could go to")  # fmt: skip
    errors = [{"field": "to.user_id", "message": "the recipient's profile has no address on "
               + ", ".join(c.value for c in found.wanted)}]  # fmt: skip
    return _reject(message_id, "no_address", errors, data, request.tenant_id, now)


def _opted_out(request: RequestV1, now: datetime, what: dict[str, Any], why: str) -> Held:
    """Not sent: the recipient does not want it (recorded as suppressed, the opt-out named)."""
    assert request.message_id is not None
    snapshot = _snapshot_of(request, request.accepted_at or now)
    event = router_event(request, request.message_id, State.SUPPRESSED, now, error=why,
                         detail={"reason": "opted_out", **what}, message=snapshot)  # fmt: skip
    return Held(request.message_id, State.SUPPRESSED, [*_accepted(request, request.message_id, snapshot), event])


@dataclass(slots=True)
class Unavailable:
    """A template version that may still come (the config topic unreadable, or being written
    again after a broker lost it): not the request's fault. Dead-lettered for replay and left
    unrouted, so the sweeper publishes it again; no event."""

    message_id: str
    errors: list[dict[str, Any]]


class KnownTemplates(Templates, Protocol):
    def missing_for_good(self, tenant_id: str, template_id: int, version: int) -> bool: ...


def settle_unknown(
    unknown: Unknown, raw: bytes | None, *, synced: bool, templates: KnownTemplates, now: datetime | None = None
) -> Rejected | Unavailable:
    """What to do with a request whose template version is still unknown after the store read
    the config topic (``synced``: to its end): rejected 2003 only when it can never come (its
    template is deleted, or the version is newer than the current one)."""
    if not synced or not templates.missing_for_good(unknown.tenant_id, unknown.template_id, unknown.version):
        return Unavailable(unknown.message_id, [{"field": "template", "message": "template not available yet"}])
    now = now or utcnow()
    data = orjson.loads(raw or b"{}")
    errors = [{"field": "template", "message": f"template {unknown.template_id} version {unknown.version} not found"}]
    return _reject(unknown.message_id, "template_not_found", errors, data, unknown.tenant_id, now, 2003)


def _routed_detail(request: RequestV1) -> dict[str, Any]:
    detail: dict[str, Any] = {"channel": request.channel.value}
    if request.template is not None:
        ref = request.template
        detail["template"] = {"template_id": ref.template_id, "version": ref.version, "locale": ref.locale}
    return detail


def route_rendered(request: RequestV1, rendered: Rendered, now: datetime, routing: Routing | None = None) -> Routed:
    """Route ``request`` with a subject and content the router made itself (a digest's listing);
    ``ValidationError`` when they do not fit (too long)."""
    return _route(_with_rendered(request, rendered), now, routing)


def _with_rendered(request: RequestV1, rendered: Rendered) -> RequestV1:
    """The request as if sent with the rendered subject and content (the template stays, so
    the dispatch and the record can name it)."""
    update: dict[str, Any] = {
        "subject": rendered.subject,
        "content": rendered.content,
        "content_type": ContentType(rendered.format) if rendered.format in _RENDERED_TYPES else ContentType.TEXT,
    }
    size = sum(len(v.encode()) for v in (rendered.subject, rendered.content, rendered.text_content) if v)
    if size > MAX_RENDERED_BYTES:
        raise ValidationError.from_exception_data(
            "RequestV1",
            [
                {
                    "type": "too_long",
                    "loc": ("content",),
                    "input": "",
                    "ctx": {"field_type": "Value", "max_length": MAX_RENDERED_BYTES, "actual_length": size},
                }
            ],
        )
    if request.channel is Channel.EMAIL and rendered.text_content:
        email = request.email or EmailOptions()
        update["email"] = {**email.model_dump(), "text": rendered.text_content}
    # Validated like any request (subject length, no line breaks, ...): model_copy would not.
    return RequestV1.model_validate({**request.model_dump(by_alias=True), **update})


def _snapshot_of(request: RequestV1, accepted_at: datetime) -> MessageSnapshot:
    email = request.email
    recipients: dict[str, list[str]] = {"to": list(request.to)}
    if email:
        recipients["cc"] = list(email.cc)
        recipients["bcc"] = list(email.bcc)
    return MessageSnapshot(
        # A send to a user whose channel the rules have not chosen yet (parked, suppressed).
        channel=request.channel.value if request.channel is not None else "auto",
        recipient=request.to[0] if request.to else (request.recipient.user_id if request.recipient else ""),
        recipients=recipients,
        subject=request.subject,
        content=request.content,
        content_type=request.content_type.value,
        idempotency_key=request.idempotency_key,
        request_id=request.request_id,
        accepted_at=accepted_at,
        category=request.category,
        callback_url=request.callback_url,
    )


def _common(request: RequestV1, message_id: str) -> dict[str, Any]:
    return {
        "message_id": message_id,
        "tenant_id": request.tenant_id,
        "service": SERVICE,
        "channel": request.channel.value if request.channel is not None else None,
        "request_id": request.request_id,
    }


def router_event(request: RequestV1, message_id: str, state: State, now: datetime, **fields: Any) -> EventV1:
    """An event of the router's about ``request``'s message, before any delivery attempt
    (attempt 0: suppressed, digested, rejected, ...); ``fields`` adds detail, error, snapshot."""
    return EventV1(
        event_id=event_id(message_id, 0, state),
        state=state,
        attempt=0,
        occurred_at=now,
        **_common(request, message_id),
        **fields,
    )


def _accepted(
    request: RequestV1, message_id: str, snapshot: MessageSnapshot, stored: RequestV1 | None = None
) -> list[EventV1]:
    """The 'accepted' event of a request published straight to Kafka (nobody has recorded its
    acceptance yet); none for one ingest recorded."""
    if request.recorded:
        return []
    # The other channels' messages of an "all" rule carry their request as it was published
    # (``stored``: not rendered, so it is routed again as the first time), which the tracker keeps
    # on the record: the sweeper can publish it again if the broker loses it (as for what ingest
    # records). Its content then travels once, in the request (the record takes it from there).
    # A direct publisher's message does not: its request is in the producer's hands.
    detail = None
    if request.parent_id:
        kept = (stored or request).model_copy(update={"message_id": message_id})
        detail = {"parent_id": request.parent_id, "request": orjson.loads(kept.to_bytes())}
        snapshot = snapshot.model_copy(update={"content": None})
    return [
        EventV1(
            event_id=event_id(message_id, 0, State.ACCEPTED),
            state=State.ACCEPTED,
            occurred_at=snapshot.accepted_at or utcnow(),
            message=snapshot,
            detail=detail,
            **_common(request, message_id),
        )
    ]


def scheduled_event_id(message_id: str, seq: int) -> str:
    """The first parking keeps the usual id; each later one (a deferral) gets its own."""
    base = event_id(message_id, 0, State.SCHEDULED)
    return base if seq == 0 else f"{base}.{seq}"


def park(request: RequestV1, until: datetime, reason: str, now: datetime) -> Parked:
    """Park ``request`` until ``until``: its 'scheduled' event carries the request as it must be
    published again (with ``scheduled_at`` and the parking's number). The first parking of a
    request that asked for a time is number 0; each deferral after it counts one more."""
    message_id = request.message_id or new_message_id(now)
    seq = request.deferrals + (0 if reason == "scheduled" else 1)
    accepted_at = request.accepted_at or now
    stored = request.model_copy(
        update={"message_id": message_id, "scheduled_at": until, "deferrals": seq, "recorded": True,
                "accepted_at": accepted_at, "attempt": None}
    )  # fmt: skip
    events = _accepted(request, message_id, _snapshot_of(request, accepted_at))
    # No snapshot: the record exists (ingest's, or made by the 'accepted' event before it), and
    # the content is already in the request; twice would not fit a record (~500 KB messages).
    events.append(
        EventV1(
            event_id=scheduled_event_id(message_id, seq),
            state=State.SCHEDULED,
            occurred_at=max(now, accepted_at),
            detail={
                "scheduled_at": until.astimezone(UTC).isoformat(),
                "reason": reason,
                "seq": seq,
                "request": orjson.loads(stored.to_bytes()),
            },
            **_common(request, message_id),
        )
    )
    return Parked(stored, until, reason, events)


def _route(request: RequestV1, now: datetime, routing: Routing | None = None) -> Routed:
    assert request.channel is not None
    return _route_steps([request], Steps(None, "first_success", None, [(request.channel, list(request.to))]), now,
                        routing)  # fmt: skip


def _route_steps(
    prepared: list[RequestV1], steps: Steps, now: datetime, routing: Routing | None,
    children: list[RequestV1] | None = None, published: RequestV1 | None = None,
) -> Routed:  # fmt: skip
    """The dispatch of the first channel (with the next ones chained as its fallbacks for a
    first_success rule), or of every channel at once (``all``: the other channels' deliveries
    are messages of their own, linked to this one by ``parent_id``), and the 'routed' event that
    records the decision and its reasons."""
    first = prepared[0]
    message_id = first.message_id or new_message_id(now)
    accepted_at = first.accepted_at or now
    snapshot = _snapshot_of(first, accepted_at)
    events = _accepted(first, message_id, snapshot, published)
    attempt = first.attempt or 1
    chained = prepared
    children = children or []
    dispatches: list[DispatchV1] = []
    decisions: list[dict[str, Any]] = []
    for i, request in enumerate(chained):
        candidates, decision = _candidates(request, routing, now, probe=i == 0)
        decisions.append({"step": steps.first + i, "channel": request.channel.value, **decision})  # type: ignore[union-attr]
        dispatches.append(_dispatch(request, message_id, attempt, now, candidates, step=steps.first + i,
                                    timeout_s=steps.timeout_s if len(chained) > 1 else None))  # fmt: skip
    for i in range(len(dispatches) - 2, -1, -1):  # each step carries the ones after it
        dispatches[i] = dispatches[i].model_copy(update={"fallback": dispatches[i + 1]})
    head = dispatches[0]
    detail = _routed_detail(first)
    if routing is not None or steps.rule is not None or first.recipient is not None:
        detail["routing"] = _decision(steps, decisions, children)
    events.append(
        EventV1(
            event_id=event_id(message_id, 0, State.ROUTED),
            state=State.ROUTED,
            occurred_at=max(now, accepted_at),
            message=snapshot,
            detail=detail,
            **_common(first, message_id),
        )
    )
    return Routed(first.model_copy(update={"message_id": message_id}), head, events, children)


def _dispatch(request: RequestV1, message_id: str, attempt: int, now: datetime, candidates: list[Candidate], *,
              step: int, timeout_s: int | None) -> DispatchV1:  # fmt: skip
    assert request.channel is not None
    return DispatchV1(
        dispatch_id=f"{message_id}:{attempt}",
        message_id=message_id,
        tenant_id=request.tenant_id,
        channel=request.channel,
        attempt=attempt,
        first_attempt=attempt,
        to=list(request.to),
        subject=request.subject,
        content=request.content,
        content_type=request.content_type,
        email=request.email,
        card=request.card,
        options=request.options,
        provider=request.provider,
        request_id=request.request_id,
        created_at=now,
        candidates=candidates,
        step=step,
        step_timeout_s=timeout_s,
    )


def _child(request: RequestV1, parent_id: str, now: datetime) -> RequestV1:
    """Another channel's delivery of an "all" rule: a message of its own (recorded by its
    'accepted' event), its id derived from the parent's so a replay gives the same."""
    assert request.channel is not None
    day = parent_id.split("_")[1] if parent_id.count("_") >= 2 else f"{now:%Y%m%d}"
    child_id = derived_message_id(day, f"{parent_id}:{request.channel.value}")
    return request.model_copy(update={"message_id": child_id, "parent_id": parent_id, "recorded": False,
                                      "idempotency_key": None, "batch_id": None, "attempt": None})  # fmt: skip


def _decision(steps: Steps, decisions: list[dict[str, Any]], children: list[RequestV1]) -> dict[str, Any]:
    """What the 'routed' event records of the routing decision (GET /api/v1/messages/{id})."""
    out: dict[str, Any] = {
        "strategy": steps.strategy,
        "channels": [c.value for c, _ in steps.channels],
        "steps": decisions,
    }
    if steps.rule is not None:
        out["rule"] = {"rule_id": steps.rule.rule_id, "name": steps.rule.name}
        if steps.strategy == "first_success" and len(steps.channels) > 1:
            out["step_timeout_s"] = steps.timeout_s
    if steps.left_out:
        out["left_out"] = steps.left_out
    if children:
        out["children"] = [{"message_id": c.message_id, "channel": c.channel.value}  # type: ignore[union-attr]
                           for c in children]  # fmt: skip
    return out


def _candidates(
    request: RequestV1, routing: Routing | None, now: datetime, *, probe: bool = True
) -> tuple[list[Candidate], dict[str, Any]]:
    """The providers of the request's channel in the order to try them, and why (see
    :mod:`shared.routing`). None known to the router (no routing state, the email pool, a
    provider configured a moment ago): no candidates, the sender chooses as it always has."""
    channel = request.channel
    assert channel is not None
    if routing is None:
        return [], {}
    if channel is Channel.EMAIL:
        return [], {"reason": "the tenant's mailbox pool chooses the mailbox"}
    store = routing.store
    named = request.to[0] if spec(channel).endpoint else request.provider
    if named is not None:
        route = store.named(request.tenant_id, channel, named)
        routes = [route] if route is not None else []
    else:
        routes = store.providers_of(request.tenant_id, channel)
    if not routes:
        return [], {"reason": "no provider of this channel known to the router yet: the sender chooses"}
    policy = store.policy(request.tenant_id)
    to = request.to[0] if channel is Channel.SMS else None
    scored = [score(r, routing.health.get(r.provider_id, now), policy, to, now) for r in routes]
    # Only the step that goes now may probe a half-open breaker (a later step's order is a plan
    # that may never be used, and would spend the probe).
    ordered = rank(scored, probes=routing.probes if probe else None, now=now, rng=routing.rng)
    decision = {
        "chosen": ordered[0].route.name,
        "reason": _why_first(ordered, named),
        "candidates": [s.describe() for s in ordered],
        "policy": {
            "min_success_rate": policy.min_success_rate,
            "min_samples": policy.min_samples,
            **({"max_p95_ms": policy.max_p95_ms} if policy.max_p95_ms else {}),
        },  # fmt: skip
    }
    return [Candidate(id=s.route.provider_id, name=s.route.name) for s in ordered], decision


def _why_first(ordered: list[Scored], named: str | None) -> str:
    top = ordered[0]
    if named is not None:
        return f"{top.route.name} named by the send ({top.why})"
    if top.probe:
        return f"probing {top.route.name}: its breaker's cooldown is over (half-open)"
    if top.tier == 0:
        ties = sum(1 for s in ordered if s.tier == 0 and s.cost == top.cost)
        drawn = f", weighted draw among {ties} at this cost" if ties > 1 else ""
        return f"cheapest provider that meets the threshold (cost {top.cost}{drawn})"
    if top.tier == 1:
        return "no provider meets the threshold: the best success rate first"
    return "every provider's breaker is open: tried anyway, cheapest first"


# The reason label of herald_routing_decisions_total (docs/observability.md): the first
# candidate's tier as _why_first words it, in a few fixed values.
_TIER_REASON = {"eligible": "cheapest", "below_threshold": "below_threshold", "breaker_open": "breaker_open"}


def decision_labels(routed: Routed) -> tuple[str, str, str]:
    """(channel, provider, reason) of a dispatched message's routing decision, as its 'routed'
    event records it: provider is the plugin put first (``smtp`` for the mailbox pool,
    ``unknown`` when the router knew no provider and the sender chooses); reason is ``named``
    (the send named it), ``probe`` (a half-open breaker's probe), ``cheapest`` (cheapest above the
    quality threshold), ``below_threshold``, ``breaker_open``, ``mailbox_pool`` or ``sender_chooses``."""
    dispatch = routed.dispatch
    channel = dispatch.channel
    steps: list[dict[str, Any]] = []
    for event in routed.events:
        if event.state is State.ROUTED:
            steps = ((event.detail or {}).get("routing") or {}).get("steps") or []
    candidates = (steps[0].get("candidates") or []) if steps else []
    if not candidates:
        if channel is Channel.EMAIL:
            return channel.value, "smtp", "mailbox_pool"
        return channel.value, "unknown", "sender_chooses"
    top = candidates[0]
    if dispatch.provider is not None or spec(channel).endpoint:
        reason = "named"
    elif top.get("probe"):
        reason = "probe"
    else:
        reason = _TIER_REASON.get(str(top.get("tier")), "ranked")
    return channel.value, str(top.get("provider") or "unknown"), reason
