"""Record, then produce: how ingest accepts a message.

A message is accepted when its record is in PostgreSQL (state ``accepted``, with its
``accepted`` timeline event) and the broker has acknowledged the request (acks=all). Records of
concurrent requests are written in one statement (:class:`RecordBatcher`), so PostgreSQL sees a
few large inserts instead of one round trip per request.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from shared.db import DB_UNAVAILABLE
from shared.errors import ErrorCode, HeraldError
from shared.events import RequestV1, State
from shared.kafka import MAX_RECORD_BYTES, Topics, Trace, message_key
from shared.logging import log_event
from shared.metrics import MESSAGES_ACCEPTED

log = logging.getLogger("herald.ingest")

# message_type of a message to a user whose channels the tenant's routing rules choose.
AUTO_CHANNEL = "auto"


@dataclass(slots=True)
class NewRecord:
    """One message record to insert, built from an accepted request."""

    request: RequestV1
    recipients: dict[str, list[str]]
    accepted_at: datetime
    request_hash: str | None = None
    dedup_skipped: bool = False
    # A message to a user without a channel: the channel its routing rules give it now, whose
    # quota it was counted against (so a cancellation gives it back there); the router's 'routed'
    # event puts the channel it took.
    counted_as: str | None = None
    _payload: bytes | None = None

    @property
    def recipient(self) -> str:
        """The record's ``recipient`` and the Kafka key's: the first address, or for a message to
        a user without a channel (routed by the tenant's rules) the user's id."""
        if self.request.to:
            return self.request.to[0]
        assert self.request.recipient is not None  # RequestV1 allows no other addressless request
        return self.request.recipient.user_id

    @property
    def message_type(self) -> str:
        """The record's ``message_type``: the channel; for a message to a user without one, the
        channel it was counted as (else ``auto``) until routing chooses."""
        if self.request.channel is not None:
            return self.request.channel.value
        return self.counted_as or AUTO_CHANNEL

    @property
    def payload(self) -> bytes:
        """The request as published (and stored on the record), serialised once: its size is
        checked, it is inserted, and it is produced, from the same bytes."""
        if self._payload is None:
            self._payload = self.request.to_bytes()
        return self._payload


@dataclass(slots=True)
class Outcome:
    """What the insert did: a new record, or the record an idempotency key already names."""

    message_id: str
    created: bool
    state: str = State.ACCEPTED.value
    request_hash: str | None = None  # of the record an idempotency key named


_INSERT = """
WITH rows AS (
    SELECT * FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
        $7::text[], $8::text[], $9::text[], $10::text[], $11::timestamptz[],
        $12::text[], $13::text[], $14::bool[], $15::bigint[], $16::int[], $17::text[], $18::text[],
        $19::timestamptz[], $20::text[], $21::text[]
    ) AS r(message_id, tenant_id, message_type, recipient, recipients, subject,
           content, content_type, idempotency_key, request_id, created_at,
           request_hash, request, dedup_skipped, template_id, template_version, template_vars, locale,
           scheduled_at, category, batch_id)
), inserted AS (
    INSERT INTO message_records (message_id, tenant_id, message_type, recipient, recipients,
        subject, content, content_type, idempotency_key, request_id, created_at, updated_at,
        status, state, state_rank, request_hash, request, dedup_skipped,
        template_id, template_version, template_vars, locale, scheduled_at, category, batch_id)
    SELECT message_id, tenant_id, message_type, recipient, recipients::jsonb, subject, NULLIF(content, ''),
        content_type, idempotency_key, request_id, created_at, created_at,
        'pending', CASE WHEN scheduled_at IS NULL THEN 'accepted' ELSE 'scheduled' END,
        CASE WHEN scheduled_at IS NULL THEN 0 ELSE 1 END, request_hash, request::jsonb, dedup_skipped,
        template_id, template_version, template_vars::jsonb, locale, scheduled_at, category, batch_id
    FROM rows
    ON CONFLICT DO NOTHING
    RETURNING message_id, tenant_id, message_type, created_at, scheduled_at
), timeline AS (
    INSERT INTO message_events (event_id, message_id, tenant_id, state, attempt, service,
        channel, occurred_at, detail)
    SELECT i.message_id || ':0:accepted', i.message_id, i.tenant_id, 'accepted', 0, 'ingest',
        i.message_type, i.created_at, NULL
    FROM inserted i
    UNION ALL
    SELECT i.message_id || ':0:scheduled', i.message_id, i.tenant_id, 'scheduled', 0, 'ingest',
        i.message_type, i.created_at,
        jsonb_build_object('scheduled_at', i.scheduled_at, 'reason', 'scheduled', 'seq', 0)
    FROM inserted i WHERE i.scheduled_at IS NOT NULL
    ON CONFLICT (event_id) DO NOTHING
), tasks AS (
    INSERT INTO scheduled_tasks (task_id, message_id, tenant_id, scheduled_time, reason, seq)
    SELECT i.message_id, i.message_id, i.tenant_id, i.scheduled_at, 'scheduled', 0
    FROM inserted i WHERE i.scheduled_at IS NOT NULL
    ON CONFLICT (message_id) DO NOTHING
), kept AS (
    -- A scheduled message's attachments are kept until a day after its time (they would expire
    -- first otherwise), whichever endpoint accepted it.
    UPDATE email_attachments a SET expires_at = GREATEST(a.expires_at, i.scheduled_at + interval '1 day')
    FROM inserted i JOIN rows r ON r.message_id = i.message_id,
         jsonb_array_elements(COALESCE(r.request::jsonb->'email'->'attachments', '[]'::jsonb)) AS att
    WHERE i.scheduled_at IS NOT NULL AND a.tenant_id = i.tenant_id AND a.attachment_id = att->>'attachment_id'
)
SELECT message_id, scheduled_at IS NOT NULL AS scheduled FROM inserted
"""

_EXISTING = """
SELECT DISTINCT ON (tenant_id, idempotency_key) tenant_id, idempotency_key, message_id, state, request_hash
FROM message_records
WHERE (tenant_id, idempotency_key) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""

# A record withdrawn because the broker did not take it (3003) becomes accepted again when its
# client retries with the same key and body. Its timeline keeps the rejection.
_REVIVE = """
UPDATE message_records SET state = 'accepted', status = 'pending', state_rank = 0,
    error_code = NULL, error_message = NULL, updated_at = now()
WHERE message_id = $1 AND state = 'rejected' AND error_code = 3003 AND request IS NOT NULL
RETURNING request::text
"""

# A key older than its time to live no longer names its message: let it go before inserting.
_RELEASE_EXPIRED_KEYS = """
UPDATE message_records SET idempotency_key = NULL
WHERE (tenant_id, idempotency_key) IN (SELECT * FROM unnest($1::text[], $2::text[]))
  AND created_at < now() - make_interval(secs => $3)
"""


class RecordBatcher:
    """Collects records from concurrent requests and inserts them in one statement."""

    def __init__(self, pool: asyncpg.Pool, max_batch: int, max_wait_ms: float, key_ttl_s: float = 300) -> None:
        self.pool = pool
        self.key_ttl_s = key_ttl_s
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self._queue: asyncio.Queue[tuple[NewRecord, asyncio.Future[Outcome]]] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="record-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def insert(self, record: NewRecord) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        await self._queue.put((record, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            await self._flush(batch)

    async def _flush(self, batch: list[tuple[NewRecord, asyncio.Future[Outcome]]]) -> None:
        try:
            outcomes = await self._write([r for r, _ in batch])
        except Exception as exc:  # the callers turn this into a 500 with code 3001
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), outcome in zip(batch, outcomes, strict=True):
            if not fut.done():
                fut.set_result(outcome)

    async def _write(self, records: list[NewRecord]) -> list[Outcome]:
        cols: list[list] = [[] for _ in range(21)]
        for r in records:
            q = r.request
            t = q.template
            for i, value in enumerate(
                (
                    q.message_id,
                    q.tenant_id,
                    r.message_type,
                    r.recipient,
                    orjson.dumps(r.recipients).decode(),
                    q.subject,
                    q.content,
                    q.content_type.value,
                    q.idempotency_key,
                    q.request_id,
                    r.accepted_at,
                    r.request_hash,
                    r.payload.decode(),
                    r.dedup_skipped,
                    t.template_id if t else None,
                    t.version if t else None,
                    orjson.dumps(t.vars).decode() if t else None,
                    t.locale if t else None,
                    q.scheduled_at,
                    q.category,
                    q.batch_id,
                )
            ):
                cols[i].append(value)
        keyed_all = [r for r in records if r.request.idempotency_key]
        async with self.pool.acquire() as conn, conn.transaction():
            if keyed_all:
                await conn.execute(
                    _RELEASE_EXPIRED_KEYS,
                    [r.request.tenant_id for r in keyed_all],
                    [r.request.idempotency_key for r in keyed_all],
                    float(self.key_ttl_s),
                )
            rows = await conn.fetch(_INSERT, *cols)
            created = {row["message_id"] for row in rows}
            if any(row["scheduled"] for row in rows):
                await conn.execute("SELECT pg_notify('herald_schedule', '')")  # wake the scheduler
            lost = [r for r in records if r.request.message_id not in created]
            existing: dict[tuple[str, str], tuple[str, str, str | None]] = {}
            if lost:
                keyed = [r for r in lost if r.request.idempotency_key]
                found = await conn.fetch(
                    _EXISTING,
                    [r.request.tenant_id for r in keyed],
                    [r.request.idempotency_key for r in keyed],
                )
                existing = {
                    (f["tenant_id"], f["idempotency_key"]): (f["message_id"], f["state"], f["request_hash"])
                    for f in found
                }
        outcomes = []
        for r in records:
            q = r.request
            if q.message_id in created:
                state = State.SCHEDULED if q.scheduled_at is not None else State.ACCEPTED
                outcomes.append(Outcome(q.message_id, True, state.value))
                continue
            hit = existing.get((q.tenant_id, q.idempotency_key or ""))
            if hit is None:
                # Two requests of this batch shared a key: the loser replays the winner.
                twin = next(
                    (
                        o
                        for o in records
                        if o.request.message_id in created
                        and o.request.tenant_id == q.tenant_id
                        and o.request.idempotency_key == q.idempotency_key
                    ),
                    None,
                )
                if twin is None:
                    raise RuntimeError(f"message {q.message_id} was neither inserted nor found")
                outcomes.append(Outcome(twin.request.message_id, False, request_hash=twin.request_hash))
            else:
                outcomes.append(Outcome(hit[0], False, hit[1], hit[2]))
        return outcomes


class Publisher:
    """Accepts requests: record in PostgreSQL, then publish to ``notify.requests``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        batcher: RecordBatcher,
        publish_timeout_s: float,
        record_timeout_s: float = 1.0,
    ) -> None:
        self.record_timeout_s = record_timeout_s
        self.pool = pool
        self.producer = producer
        self.batcher = batcher
        self.publish_timeout_s = publish_timeout_s

    async def accept(self, record: NewRecord, trace: Trace) -> Outcome:
        if len(record.payload) > MAX_RECORD_BYTES:
            raise HeraldError(
                ErrorCode.INVALID_PARAMS,
                f"the message is too large to queue (more than {MAX_RECORD_BYTES} bytes with its recipients)",
                field="content",
                http_status=413,
            )
        try:
            # Bounded: with PostgreSQL gone the caller hears so within a second, not a minute.
            # (A write that lands after the deadline is an accepted record the sweeper will
            # publish; a client retrying a 503 should send an idempotency key.)
            outcome = await asyncio.wait_for(self.batcher.insert(record), self.record_timeout_s)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise HeraldError(
                ErrorCode.SERVICE_UNAVAILABLE,
                "database unavailable: the message was not accepted; try again",
                http_status=503,
            ) from exc
        if not outcome.created:
            if outcome.state != State.REJECTED.value or outcome.request_hash != record.request_hash:
                return outcome
            # The key names a message the broker never took (withdrawn with 3003): the client
            # is retrying a 503, as it should. The same message is accepted again, same id.
            revived = await self._revive(outcome.message_id)
            if revived is None:
                return outcome
            record = NewRecord(revived, record.recipients, record.accepted_at, record.request_hash)
            outcome = Outcome(outcome.message_id, True)
        request = record.request
        scheduled = outcome.state == State.SCHEDULED.value
        if not scheduled:  # a scheduled one waits in PostgreSQL; the router's scheduler publishes it
            await self._publish(request, record.payload, record.recipient, trace)
        MESSAGES_ACCEPTED.labels(record.message_type).inc()
        log_event(log, logging.INFO, "message scheduled" if scheduled else "message accepted",
                  message_id=request.message_id, recipient=record.recipient, channel=record.message_type,
                  scheduled_at=str(request.scheduled_at) if scheduled else None)  # fmt: skip
        return outcome

    async def _publish(self, request: RequestV1, payload: bytes, recipient: str, trace: Trace) -> None:
        """Publish an accepted record's request; withdraw the record if the broker does not
        take it in time (nothing will be sent: 503)."""
        try:
            await asyncio.wait_for(
                self.producer.send_and_wait(
                    Topics.REQUESTS,
                    payload,
                    key=message_key(request.tenant_id, recipient),
                    headers=trace.headers(),
                ),
                self.publish_timeout_s,
            )
        except (TimeoutError, KafkaError, OSError) as exc:
            await self._withdraw(request.message_id or "", str(exc) or exc.__class__.__name__)
            raise HeraldError(
                ErrorCode.SERVICE_UNAVAILABLE,
                "message queue unavailable: the message was not accepted and will not be sent; try again",
                http_status=503,
            ) from exc

    async def _revive(self, message_id: str) -> RequestV1 | None:
        """Back to accepted, a record withdrawn after a publish failure; answers its stored
        request, or None if it is not (or no longer) such a record."""
        try:
            stored = await asyncio.wait_for(self.pool.fetchval(_REVIVE, message_id), self.record_timeout_s)
        except (TimeoutError, *DB_UNAVAILABLE) as exc:
            raise HeraldError(
                ErrorCode.SERVICE_UNAVAILABLE,
                "database unavailable: the message was not accepted; try again",
                http_status=503,
            ) from exc
        if stored is None:
            return None
        log_event(log, logging.INFO, "withdrawn message accepted again", message_id=message_id)
        return RequestV1.model_validate_json(stored)

    async def _withdraw(self, message_id: str, reason: str) -> None:
        """The broker did not take the request: mark the record rejected so it is not
        mistaken for one in flight. (If the broker did store it after all, the router may
        still deliver it; the tracker then records what happened.)"""
        try:
            await self.pool.execute(
                """UPDATE message_records SET state='rejected', status='failed', state_rank=8,
                   error_code=3003, error_message=$2, updated_at=now()
                   WHERE message_id=$1 AND state='accepted'""",
                message_id,
                f"queue unavailable: {reason}"[:500],
            )
        except Exception:
            log.exception("could not mark %s rejected after a publish failure", message_id)
