"""What every send endpoint checks the same way (single, scheduled and batch sends)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import Request

from services.ingest.dedup import fingerprint_of, request_hash
from services.ingest.http import JSONResponse, envelope, iso_z
from services.ingest.limits import QuotaExceeded
from services.ingest.publish import NewRecord
from shared.db import DB_UNAVAILABLE
from shared.errors import ErrorCode, HeraldError
from shared.events import SEED_STATUS, RecipientProfile, RequestV1, State
from shared.kafka import Trace
from shared.routing import Steps, channels_for, first_rule, quiet_until
from shared.schedule import ScheduleError, due_at
from shared.settings import Settings

# A language tag as sends name their template variant's locale (zh-CN, en).
LOCALE = r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$"


def missing_variable(required: Sequence[str], given: dict[str, Any]) -> tuple[str, str] | None:
    """The first declared template variable not given, and the message naming it (2004)."""
    missing = [name for name in required if name not in given]
    if not missing:
        return None
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return missing[0], f"missing template variable: {missing[0]}{more}"


def content_mode_error(body: Any) -> HeraldError | None:
    """Seed 004: ``content`` and a template are exclusive; direct mode needs both ``subject``
    and ``content``. ``body`` has the send fields (template_id, template_name, subject, content,
    text_content, template_vars, template_version, locale). A function rather than a model
    validator so that the error names the field."""
    templated = body.template_id is not None or body.template_name is not None
    if body.template_id is not None and body.template_name is not None:
        return HeraldError(
            ErrorCode.INVALID_PARAMS, "give template_id or template_name, not both", field="template_name"
        )
    for name in ("content", "subject", "text_content"):
        if templated and getattr(body, name) is not None:
            return HeraldError(
                ErrorCode.INVALID_PARAMS, f"{name} and template_id are mutually exclusive: the template provides it",
                field=name,
            )  # fmt: skip
    if not templated:
        for name in ("content", "subject"):
            if getattr(body, name) is None:
                return HeraldError(ErrorCode.INVALID_PARAMS, "field required without template_id", field=name)
        for name in ("template_vars", "template_version", "locale"):
            if getattr(body, name) is not None:
                return HeraldError(ErrorCode.INVALID_PARAMS, "only with template_id or template_name", field=name)
    return None


def idempotency_key(given: str | None, request: Request) -> str | None:
    """The key from the body (``given``) or the ``Idempotency-Key`` header; both must agree."""
    header = request.headers.get("idempotency-key")
    if header is not None and (not header.strip() or len(header) > 255):
        raise HeraldError(ErrorCode.INVALID_PARAMS, "1 to 255 characters", field="Idempotency-Key")
    if header and given and header != given:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "differs from the Idempotency-Key header", field="idempotency_key")
    return given or header


def due_time(
    settings: Settings,
    scheduled_time: str | None,
    delay: str | int | None,
    timezone: str | None,
    now: datetime,
    *,
    required: bool = False,
) -> datetime | None:
    """When a send is due (None: now), or 1001 naming the scheduling field at fault."""
    try:
        return due_at(
            scheduled_time=scheduled_time,
            delay=delay,
            timezone=timezone,
            default_timezone=settings.default_timezone,
            horizon_s=settings.schedule_horizon_s,
            now=now,
            required=required,
        )
    except ScheduleError as exc:
        raise HeraldError(ErrorCode.INVALID_PARAMS, exc.message, field=exc.field) from None


async def keyed(pool: Any, tenant_id: str, key: str) -> Any:
    """The message an idempotency key names in PostgreSQL (its record carries the key)."""
    return await pool.fetchrow(
        """SELECT message_id, state, request_hash, scheduled_at FROM message_records
           WHERE tenant_id = $1 AND idempotency_key = $2""",
        tenant_id,
        key,
    )


def answer(message_id: str, state: str, scheduled_at: datetime | None) -> dict[str, Any]:
    """A send's answer (202): its id, seed status and state, and its time when scheduled."""
    out = {"message_id": message_id, "status": SEED_STATUS[State(state)].value, "state": state}
    if scheduled_at is not None:
        out["scheduled_at"] = iso_z(scheduled_at)
    return out


def replay(message_id: str, first_hash: str | None, digest: str, response: dict) -> JSONResponse:
    """The first response again, or 409 when the key came back with another body."""
    if first_hash is not None and first_hash != digest:
        raise HeraldError(
            ErrorCode.DUPLICATE_REQUEST,
            f"idempotency key already used for {message_id} with a different request body",
            field="idempotency_key",
        )
    return envelope(response, status_code=202, headers={"Idempotent-Replayed": "true"})


async def accept(
    services: Any,
    tenant_id: str,
    req: RequestV1,
    recipients: dict[str, list[str]],
    *,
    trace: Trace,
    now: datetime,
    key: str | None,
    digest: str,
    dedup: bool,
    count_as: str | None = None,
) -> JSONResponse:
    """The end of every single send: the duplicate check (content fingerprint, unless a key or
    ``dedup: false``), the channel's monthly quota, the record and the request (or the record a
    key already names), the key remembered; 202 with the message's id and state. A message without
    a channel (to a user, routed by the tenant's rules) counts against the quota of ``count_as``:
    what :func:`check_route` answered for it, which must have run before (it refuses what can never
    be routed, and a refused send must leave neither a fingerprint nor a quota count)."""
    guard = services.guard
    channel = req.channel.value if req.channel is not None else count_as
    fp, skipped = None, False
    tenant = await services.tenants.get(tenant_id)
    if key is None and dedup:
        fp = fingerprint_of(req)
        window = tenant.dedup_window_s
        earlier, skipped = await guard.claim(fp, req.message_id or "", window)
        if earlier is not None:
            raise HeraldError(
                ErrorCode.DUPLICATE_REQUEST,
                f"duplicate of {earlier}: same recipients, subject and content within "
                f'{window} s (send with "dedup": false to force)',
                field="content",
            )
    try:
        counted = channel is not None and await services.quotas.take(tenant_id, channel, tenant.quotas.get(channel))
    except QuotaExceeded as exc:
        if fp is not None:
            await guard.release(fp, req.message_id or "")
        raise HeraldError(
            ErrorCode.QUOTA_EXCEEDED,
            f"the monthly {channel} quota of {exc.limit} messages is used up ({exc.used} this month); "
            f"it renews at {exc.resets_at.isoformat().replace('+00:00', 'Z')}",
        ) from None
    record = NewRecord(req, recipients, now, request_hash=digest, dedup_skipped=skipped,
                       counted_as=channel if req.channel is None else None)  # fmt: skip
    try:
        outcome = await services.publisher.accept(record, trace)
    except HeraldError:
        if counted:
            await services.quotas.give_back(tenant_id, channel)
        if fp is not None:
            await guard.release(fp, req.message_id or "")
        raise
    if counted and not outcome.created:
        await services.quotas.give_back(tenant_id, channel)
    response = answer(outcome.message_id, State(outcome.state).value, req.scheduled_at)
    if not outcome.created:
        return replay(outcome.message_id, outcome.request_hash, digest, response)
    if key is not None:
        await guard.remember(tenant_id, key, outcome.message_id, digest, response)
    return envelope(response, status_code=202)


async def check_route(
    services: Any,
    tenant_id: str,
    profile: RecipientProfile,
    *,
    priority: str,
    category: str | None,
    scheduled_at: datetime | None,
    now: datetime,
) -> str | None:
    """A send to a user without a channel, before it claims a fingerprint or a quota: decided as
    the router will decide it (:func:`shared.routing.channels_for` over the tenant's live rules and
    the profile), at the time the router will route it (its scheduled time, then the end of the
    recipient's quiet hours unless urgent). Answers the channel whose monthly quota it counts
    against (the first its rule gives; a first_success rule's later channels and an "all" rule's
    other channels are not counted at acceptance), or None when there is nothing to count: the
    recipient opted out (of the category, or of every channel the rule gives), which the router
    records as ``suppressed``. Refuses (1001, nothing recorded) what the router could only reject:
    no rule matches (naming ``channel``), or the profile has no address on any channel the rule
    gives (naming ``to.user_id``). The rules are this ingest's cached copy
    (:class:`services.ingest.routing.RuleCache`): a change made through another replica counts
    here within a few seconds."""
    if category is not None and category in profile.opt_outs.categories:
        return None  # suppressed by the router before any rule is looked at
    at = scheduled_at if scheduled_at is not None and scheduled_at > now else now
    if priority != "urgent" and (quiet_end := quiet_until(profile, at)) is not None:
        at = quiet_end
    try:
        rules = await asyncio.wait_for(services.routing_rules.get(tenant_id), services.settings.record_timeout_s)
    except (TimeoutError, *DB_UNAVAILABLE) as exc:
        raise HeraldError(ErrorCode.SERVICE_UNAVAILABLE, "database unavailable: routing rules could not be read",
                          http_status=503) from exc  # fmt: skip
    facts: dict[str, Any] = {"priority": priority, "category": category, "now": at}
    found = channels_for(rules, profile, channel=None, to=[], **facts)
    if isinstance(found, Steps):
        return found.channels[0][0].value
    if found.reason == "opted_out":
        return None
    if found.reason == "no_route":
        raise HeraldError(ErrorCode.INVALID_PARAMS, "no channel given and no routing rule of the tenant matches this "
                          "message: name a channel, or add a rule (POST /api/v1/routing/rules)",
                          field="channel")  # fmt: skip
    rule = first_rule(rules, profile=profile, **facts)
    wanted = ", ".join(c.value for c in found.wanted)
    named = f"routing rule {rule.name!r}" if rule is not None else "the routing rule"
    raise HeraldError(ErrorCode.INVALID_PARAMS, f"the profile of {profile.user_id!r} has no address on {wanted}, "
                      f"the channels {named} gives this message (add one to the profile, or name a channel)",
                      field="to.user_id")  # fmt: skip


@dataclass(slots=True)
class Opening:
    """The start of a single send: its idempotency key and body hash, and either the answer to
    replay (a key seen before) or when the message is due (None: now)."""

    key: str | None
    digest: str
    replayed: JSONResponse | None = None
    scheduled_at: datetime | None = None


async def open_send(services: Any, request: Request, tenant_id: str, body: Any, *, required: bool) -> Opening:
    """A retry with its key replays the first answer, even once a time it named has passed (the
    schedule check would refuse it now); else the send's due time, or 1001 naming the field."""
    key = idempotency_key(body.idempotency_key, request)
    digest = request_hash(body.model_dump(mode="json", by_alias=True))
    if key is not None and (remembered := await services.guard.recall(tenant_id, key)) is not None:
        return Opening(key, digest, replay(remembered.message_id, remembered.request_hash, digest,
                                           remembered.response))  # fmt: skip
    try:
        scheduled_at = due_time(services.settings, body.scheduled_time, body.delay, body.timezone, datetime.now(UTC),
                                required=required)  # fmt: skip
    except HeraldError:
        if (replayed := await replay_keyed(services, tenant_id, key, digest)) is not None:
            return Opening(key, digest, replayed)
        raise
    return Opening(key, digest, scheduled_at=scheduled_at)


async def replay_keyed(services: Any, tenant_id: str, key: str | None, digest: str) -> JSONResponse | None:
    """The first answer again for a key PostgreSQL already has a message under (None: no such
    message): for a retry that a check would refuse now (a time since passed, a routing rule since
    changed) although its first send was accepted, and that Redis no longer remembers."""
    if key is None or (first := await keyed(services.pool, tenant_id, key)) is None:
        return None
    response = answer(first["message_id"], first["state"], first["scheduled_at"])
    return replay(first["message_id"], first["request_hash"], digest, response)
