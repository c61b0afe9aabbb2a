"""Folding a batch of events into PostgreSQL.

:func:`fold_plan` is pure: it turns a batch of events into three row sets (records to create,
timeline rows, state moves). :func:`write_fold` writes them in one transaction with three
statements, whatever the batch size. Every step is idempotent: a redelivered batch changes
nothing (event ids are unique; a state only moves forward in (attempt, rank) order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from services.tracker import callbacks
from shared.events import SEED_STATUS, STATE_RANK, DeadLetterV1, EventV1, State
from shared.statistics import Outcome, count_outcomes


@dataclass(slots=True)
class FoldPlan:
    new_records: list[EventV1] = field(default_factory=list)
    timeline: list[EventV1] = field(default_factory=list)
    moves: list[EventV1] = field(default_factory=list)
    # 'routed' events of templated messages: the subject and content the router rendered.
    rendered: list[EventV1] = field(default_factory=list)
    # 'scheduled' events: the message waits for a time (one per message, its latest parking).
    parked: list[Parking] = field(default_factory=list)


def _order(event: EventV1) -> tuple[int, int]:
    return (event.attempt, STATE_RANK[event.state])


def fold_plan(events: list[EventV1]) -> FoldPlan:
    """Which records to create, which timeline rows to add, and each message's furthest state."""
    plan = FoldPlan()
    seen_ids: set[str] = set()
    snapshots: dict[str, EventV1] = {}
    furthest: dict[str, EventV1] = {}
    parked: dict[str, Parking] = {}
    for event in events:
        if event.event_id in seen_ids:
            continue
        seen_ids.add(event.event_id)
        plan.timeline.append(event)
        if event.message is not None and event.message_id not in snapshots:
            snapshots[event.message_id] = event
        detail = event.detail or {}
        made = detail.get("template") or detail.get("digest")  # what the router rendered itself
        if event.state is State.ROUTED and event.message is not None and made:
            plan.rendered.append(event)
        if event.state is State.SCHEDULED:
            # Not a move like the others: the record becomes 'scheduled' only if its task is
            # stored or moved on (a parking redelivered after its release changes nothing).
            parking = Parking.of(event)
            latest = parked.get(event.message_id)
            if parking is not None and (latest is None or parking.seq > latest.seq):
                parked[event.message_id] = parking
            continue
        best = furthest.get(event.message_id)
        # Equal order: the later one (a failed attempt's own 'retrying' after the failover
        # events of the providers tried before it carries the attempt's error).
        if best is None or _order(event) >= _order(best):
            furthest[event.message_id] = event
    plan.new_records = list(snapshots.values())
    plan.moves = list(furthest.values())
    plan.parked = list(parked.values())
    return plan


@dataclass(frozen=True, slots=True)
class Parking:
    """What a 'scheduled' event asks the tracker to store: the message's task and the request
    the scheduler publishes again."""

    message_id: str
    tenant_id: str
    until: datetime
    seq: int  # which parking of the message (see services/router/routing.py park())
    reason: str
    request: dict[str, Any]

    @classmethod
    def of(cls, event: EventV1) -> Parking | None:
        """The parking a 'scheduled' event carries, or None if it lacks its parts."""
        detail = event.detail or {}
        try:
            until = datetime.fromisoformat(str(detail["scheduled_at"]))
            request = detail["request"]
            seq = int(detail.get("seq", 0))
        except (KeyError, TypeError, ValueError):
            return None
        if not isinstance(request, dict) or until.tzinfo is None:
            return None
        reason = str(detail.get("reason") or "scheduled")
        reason = reason if reason in ("scheduled", "deferred", "digest", "quiet_hours") else "scheduled"
        return cls(event.message_id, event.tenant_id, until, seq, reason, request)


_CREATE = """
INSERT INTO message_records (message_id, tenant_id, message_type, recipient, recipients, subject,
    content, content_type, idempotency_key, request_id, created_at, updated_at,
    status, state, state_rank, category, request, template_id, template_version)
SELECT u.message_id, u.tenant_id, u.message_type, u.recipient, u.recipients::jsonb, u.subject,
    -- A message that brings its request brings its content there (once); a templated one gets
    -- what the router rendered from its 'routed' event (_RENDERED).
    COALESCE(u.content, NULLIF(u.request::jsonb->>'content', '')),
    u.content_type, u.idempotency_key, u.request_id, u.created_at, u.created_at,
    'pending', 'accepted', 0, u.category, u.request::jsonb,
    (u.request::jsonb->'template'->>'template_id')::bigint, (u.request::jsonb->'template'->>'version')::int
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::text[], $9::text[], $10::text[], $11::timestamptz[], $12::text[], $13::text[])
     AS u(message_id, tenant_id, message_type, recipient, recipients, subject, content,
          content_type, idempotency_key, request_id, created_at, category, request)
ON CONFLICT DO NOTHING
RETURNING message_id
"""

# Ingest records a templated message before it is rendered; the router's 'routed' event brings
# what it rendered (the same each time: a version never changes). A digest is recorded when it
# opens, before it knows what it will list; its 'routed' event brings the listing (the same each
# time: its items are frozen).
_RENDERED = """
UPDATE message_records m SET subject = u.subject, content = u.content, content_type = u.content_type
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[])
     AS u(message_id, tenant_id, subject, content, content_type, digest)
WHERE m.message_id = u.message_id AND m.tenant_id = u.tenant_id
  AND ((m.template_id IS NOT NULL AND (m.content IS NULL OR m.content = '')) OR u.digest)
"""

# A send to a user without a channel is recorded by ingest to the user, as the channel its quota
# was counted against (or 'auto'); the router's 'routed' event names the channel and address its
# rules chose. (Its stored request names no channel: that is how it is recognised.)
_RESOLVED = """
UPDATE message_records m SET message_type = u.channel, recipient = u.recipient
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(message_id, tenant_id, channel, recipient)
WHERE m.message_id = u.message_id AND m.tenant_id = u.tenant_id
  AND m.request IS NOT NULL AND m.request->>'channel' IS NULL AND m.request ? 'recipient'
  AND (m.message_type <> u.channel OR m.recipient <> u.recipient)
"""

_TIMELINE = """
INSERT INTO message_events (event_id, message_id, tenant_id, state, attempt, service, channel,
    provider, error_code, error, detail, occurred_at)
SELECT e, m, t, s, a, sv, c, p, ec, er, d::jsonb, o
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[],
    $7::text[], $8::text[], $9::int[], $10::text[], $11::text[], $12::timestamptz[])
    AS u(e, m, t, s, a, sv, c, p, ec, er, d, o)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

_MOVE = """
UPDATE message_records m SET
    state = u.state,
    status = u.status,
    state_rank = u.rank,
    attempt = u.attempt,
    retry_count = GREATEST(u.attempt - 1, m.retry_count),
    sent_at = CASE WHEN u.state IN ('sent', 'delivered') THEN COALESCE(m.sent_at, u.occurred_at)
                   ELSE m.sent_at END,
    error_code = COALESCE(u.error_code, m.error_code),
    error_message = COALESCE(u.error, m.error_message),
    sender_info = COALESCE(u.sender_info::jsonb, m.sender_info),
    updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[],
            $7::timestamptz[], $8::int[], $9::text[], $10::text[])
     AS u(message_id, tenant_id, state, status, rank, attempt, occurred_at, error_code, error,
          sender_info)
WHERE m.message_id = u.message_id AND m.tenant_id = u.tenant_id
  AND (m.attempt, m.state_rank) < (u.attempt, u.rank)
"""


# A parked message: its task is stored (or, after a release, moved on to its next parking; a
# parking seen again after its release has an old number and changes nothing), then its record
# becomes 'scheduled' with the request to publish again. The scheduler is woken by NOTIFY.
_PARK = """
WITH u AS (
    SELECT u.* FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int[], $5::text[], $6::text[], $7::text[])
        AS u(message_id, tenant_id, scheduled_time, seq, reason, request, category)
    -- Only a message not yet on its way: a parking folded after the message moved on (a replay
    -- in the same batch as its 'routed' and 'sent') must not send it back to 'scheduled'.
    JOIN message_records m ON m.message_id = u.message_id AND m.tenant_id = u.tenant_id
    WHERE m.state_rank <= 1 AND m.attempt = 0
), task AS (
    INSERT INTO scheduled_tasks AS t (task_id, message_id, tenant_id, scheduled_time, reason, seq)
    SELECT message_id, message_id, tenant_id, scheduled_time, reason, seq FROM u
    ON CONFLICT (message_id) DO UPDATE SET scheduled_time = EXCLUDED.scheduled_time,
        reason = EXCLUDED.reason, seq = EXCLUDED.seq, status = 'pending', executed_at = NULL,
        updated_at = now()
    WHERE t.status = 'executed' AND t.seq < EXCLUDED.seq
    RETURNING t.message_id
), kept AS (
    -- Attachments are kept until a day after the new time (a deferral may outlast their expiry).
    UPDATE email_attachments a SET expires_at = GREATEST(a.expires_at, u.scheduled_time + interval '1 day')
    FROM u JOIN task ON task.message_id = u.message_id,
         jsonb_array_elements(COALESCE(u.request::jsonb->'email'->'attachments', '[]'::jsonb)) AS att
    WHERE a.tenant_id = u.tenant_id AND a.attachment_id = att->>'attachment_id'
)
UPDATE message_records m SET state = 'scheduled', status = 'pending', state_rank = 1,
    scheduled_at = u.scheduled_time, request = u.request::jsonb,
    category = COALESCE(m.category, u.category), updated_at = now()
FROM u JOIN task ON task.message_id = u.message_id
WHERE m.message_id = u.message_id AND m.tenant_id = u.tenant_id
"""


def _json(value: Any) -> str | None:
    """JSON values travel as text and are cast in SQL: asyncpg would read a list inside a
    jsonb[] parameter as another array dimension."""
    return None if value is None else orjson.dumps(value).decode()


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [[row[i] for row in rows] for i in range(width)] if rows else [[] for _ in range(width)]


def _sender_info(
    state: State, provider: str | None, detail: dict[str, Any] | None, channel: str | None = None
) -> dict[str, Any] | None:
    if state not in (State.SENT, State.DELIVERED, State.FAILED) or not provider:
        return None
    info: dict[str, Any] = {"provider": provider}
    if channel:  # a rule's fallback may deliver on another channel than the first
        info["channel"] = channel
    if detail:
        for key in ("account", "provider_message_id", "provider_name"):
            if detail.get(key):
                info[key] = detail[key]
    return info


# Events stored before their message's record existed. Events of one message share a partition,
# but not a producer: after a router crash its 'accepted'/'routed' events (which create the
# record of a message published straight to Kafka) can be lost while its dispatch survived, so
# the sender's 'sent' arrives first and moves no record; the router's replay then creates the
# record. A record created now catches up with what its timeline already holds.
_EARLIER = """
SELECT message_id, tenant_id, state, attempt, occurred_at, error_code, error, provider, detail
FROM message_events
WHERE message_id = ANY($1::text[]) AND NOT (event_id = ANY($2::text[]))
"""


async def write_fold(
    conn: asyncpg.Connection, plan: FoldPlan, *, statistics: str = "postgres"
) -> list[Outcome]:
    """Apply a :class:`FoldPlan` in one transaction; answers the outcomes among the events stored
    for the first time, counted where ``statistics`` says (shared/statistics.py count_outcomes:
    ``postgres``, ``clickhouse``; ``none``, for the benchmark's baseline)."""
    creates = []
    for e in plan.new_records:
        m = e.message
        assert m is not None
        creates.append(
            (
                e.message_id,
                e.tenant_id,
                m.channel,
                m.recipient[:320],
                _json(m.recipients),
                m.subject,
                m.content,
                m.content_type,
                m.idempotency_key,
                m.request_id,
                m.accepted_at or e.occurred_at,
                m.category,
                # A message the router made (an "all" rule's other channel) brings its request,
                # so the sweeper can publish it again.
                _json((e.detail or {}).get("request")) if e.state is State.ACCEPTED else None,
            )
        )
    timeline = [
        (
            e.event_id,
            e.message_id,
            e.tenant_id,
            e.state.value,
            e.attempt,
            e.service,
            e.channel,
            e.provider,
            e.error_code,
            e.error,
            _json(e.detail),
            e.occurred_at,
        )
        for e in plan.timeline
    ]
    moves = [
        _move(
            e.message_id,
            e.tenant_id,
            e.state,
            e.attempt,
            e.occurred_at,
            e.error_code,
            e.error,
            e.provider,
            e.detail,
            e.channel,
        )  # fmt: skip
        for e in plan.moves
    ]
    async with conn.transaction():
        created: list[str] = []
        if creates:
            created = [r["message_id"] for r in await conn.fetch(_CREATE, *_columns(creates, 13))]
        stored: list[EventV1] = []
        if timeline:
            # The events stored for the first time: what they say is counted once (statistics)
            # and announced once (status callbacks), whatever the times a batch is folded.
            new_ids = {r["event_id"] for r in await conn.fetch(_TIMELINE, *_columns(timeline, 12))}
            stored = [e for e in plan.timeline if e.event_id in new_ids]
        if moves:
            await conn.execute(_MOVE, *_columns(moves, 10))
        resolved = [(e.message_id, e.tenant_id, e.message.channel, e.message.recipient[:320])
                    for e in plan.timeline if e.state is State.ROUTED and e.message is not None]  # fmt: skip
        if resolved:
            await conn.execute(_RESOLVED, *_columns(resolved, 4))
        if plan.rendered:
            rendered = [
                (e.message_id, e.tenant_id, e.message.subject, e.message.content, e.message.content_type,
                 bool((e.detail or {}).get("digest")))
                for e in plan.rendered
                if e.message is not None
            ]  # fmt: skip
            await conn.execute(_RENDERED, *_columns(rendered, 6))
        if plan.parked:
            rows = [
                (p.message_id, p.tenant_id, p.until, p.seq, p.reason, _json(p.request), p.request.get("category"))
                for p in plan.parked
            ]
            await conn.execute(_PARK, *_columns(rows, 7))
            await conn.execute("SELECT pg_notify('herald_schedule', '')")
        troubled = {e.message_id for e in plan.timeline if e.state in _RETRY_LOG_STATES}
        if created:
            catch_up = await _catch_up(conn, created, [e.event_id for e in plan.timeline])
            if catch_up:
                await conn.execute(_MOVE, *_columns([m for m, _ in catch_up.values()], 10))
                troubled |= {mid for mid, (_, retried) in catch_up.items() if retried}
        if troubled:
            await conn.execute(_RETRY_LOGS, sorted(troubled))
        counted: list[Outcome] = []
        if stored:
            await callbacks.enqueue(conn, stored)
            # Last (the rollup rows are the ones other trackers' folds contend for), after the
            # records moved and were created: their templates, channels and starts.
            if statistics != "none":
                counted = await count_outcomes(conn, stored, backend=statistics)
    return counted


def _move(
    message_id: str,
    tenant_id: str,
    state: State,
    attempt: int,
    occurred_at: Any,
    error_code: int | None,
    error: str | None,
    provider: str | None,
    detail: dict[str, Any] | None,
    channel: str | None = None,
) -> tuple:
    return (
        message_id,
        tenant_id,
        state.value,
        SEED_STATUS[state].value,
        STATE_RANK[state],
        attempt,
        occurred_at,
        error_code,
        error,
        _json(_sender_info(state, provider, detail, channel)),
    )


async def _catch_up(conn: asyncpg.Connection, created: list[str], batch_event_ids: list[str]) -> dict[str, tuple]:
    """For records just created: the furthest state among events stored earlier (usually none),
    as a move row, and whether any of them was a failed attempt (for retry_logs)."""
    best: dict[str, tuple[tuple[int, int], asyncpg.Record]] = {}
    retried: set[str] = set()
    for row in await conn.fetch(_EARLIER, created, batch_event_ids):
        try:
            state = State(row["state"])
        except ValueError:
            continue
        if state in _RETRY_LOG_STATES:
            retried.add(row["message_id"])
        order = (row["attempt"], STATE_RANK[state])
        if row["message_id"] not in best or order > best[row["message_id"]][0]:
            best[row["message_id"]] = (order, row)
    out = {}
    for message_id, (_, r) in best.items():
        state = State(r["state"])
        move = _move(
            message_id,
            r["tenant_id"],
            state,
            r["attempt"],
            r["occurred_at"],
            r["error_code"],
            r["error"],
            r["provider"],
            r["detail"],
        )
        out[message_id] = (move, message_id in retried)
    return out


_RETRY_LOG_STATES = frozenset({State.RETRYING, State.FAILED, State.DEAD})

# retry_logs (seed 004): every failed attempt with its time, error and provider, rebuilt from the
# timeline so a redelivered batch cannot append twice.
_RETRY_LOGS = """
UPDATE message_records m SET retry_logs = (
    SELECT jsonb_agg(jsonb_build_object(
               'at', e.occurred_at, 'attempt', e.attempt, 'state', e.state, 'error_code', e.error_code,
               'error', e.error, 'provider', e.provider, 'account', e.detail->>'account',
               'next_attempt_at', e.detail->>'next_attempt_at')
           ORDER BY e.occurred_at, e.id)
    FROM message_events e
    WHERE e.message_id = m.message_id AND e.state IN ('retrying', 'failed', 'dead')
)
WHERE m.message_id = ANY($1::text[])
"""

_DEAD_LETTER = """
INSERT INTO dead_letters (source_topic, partition, "offset", message_id, service, reason, errors,
    payload, headers, occurred_at, tenant_id, letter_id)
SELECT st, pa, os, mi, sv, re, er::jsonb, pl, he::jsonb, oc, COALESCE(te, 'default'), li
FROM unnest($1::text[], $2::int[], $3::bigint[], $4::text[], $5::text[], $6::text[],
    $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::text[], $12::text[])
    AS u(st, pa, os, mi, sv, re, er, pl, he, oc, te, li)
ON CONFLICT (letter_id) WHERE letter_id IS NOT NULL DO NOTHING
"""


async def write_dead_letters(conn: asyncpg.Connection, letters: list[DeadLetterV1]) -> None:
    rows = [
        (
            d.source_topic,
            d.partition,
            d.offset,
            d.message_id,
            d.service,
            d.reason,
            _json(d.errors),
            d.payload,
            _json(d.headers),
            d.occurred_at,
            d.tenant_id,
            d.letter_id,
        )
        for d in letters
    ]
    if rows:
        await conn.execute(_DEAD_LETTER, *_columns(rows, 12))
