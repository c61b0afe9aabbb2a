"""The scheduler: publishes each parked message again when its time comes.

A message waits as a row of ``scheduled_tasks`` (status ``pending``) beside its record (state
``scheduled``, the request to publish in ``request``): ingest writes both for a send that named a
time; the tracker writes them from the router's 'scheduled' event for anything parked on the
way (a direct publisher's ``scheduled_at``, a frequency cap's deferral, a digest). PostgreSQL is
the only place a waiting message lives, so restarts of any service or of the broker lose none.

One loop per router, not a timer per message: it sleeps until the earliest pending task is due
(one indexed query), and is woken early by ``NOTIFY herald_schedule`` when a task is added or
moved; a sleep never exceeds ``HERALD_SCHEDULER_MAX_SLEEP_S`` (a missed notification costs no
more). When woken it claims every due task in one transaction (``FOR UPDATE SKIP LOCKED``: several
routers share the work) and moves the records back to ``accepted``, commits, and only then
publishes their requests to ``notify.requests``. Committing first settles the race with a cancel
(which takes the task's row lock too): once claimed, a message is released and a cancel answers
409, even if the broker is slow to take it. A request the broker did not take is published again
next round; if this router stops first, the record is an 'accepted' one that made no progress and
the sweeper publishes it. Published twice, the router and sender recognise the same message id
(the dispatch id is the message id and attempt). A request the broker can never take (too large)
is rejected rather than retried for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from services.tracker import callbacks
from shared.db import DB_UNAVAILABLE, create_pool, follow_notifications
from shared.events import EventV1, State
from shared.kafka import Topics, make_producer, message_key, stop_quietly
from shared.logging import log_event
from shared.metrics import SCHEDULE_LATENESS, SCHEDULED_OVERDUE, SCHEDULED_PENDING, SCHEDULED_RELEASED
from shared.settings import Settings
from shared.statistics import count_outcomes

log = logging.getLogger("herald.router.schedule")

NOTIFY_CHANNEL = "herald_schedule"

_CLAIM = """
WITH due AS (
    SELECT id FROM scheduled_tasks
    WHERE status = 'pending' AND scheduled_time <= clock_timestamp()
    ORDER BY scheduled_time
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), done AS (
    UPDATE scheduled_tasks t SET status = 'executed', executed_at = clock_timestamp(), updated_at = now()
    FROM due WHERE t.id = due.id
    RETURNING t.message_id, t.scheduled_time, t.executed_at
)
UPDATE message_records m SET state = 'accepted', status = 'pending', state_rank = 0, updated_at = now()
FROM done
WHERE m.message_id = done.message_id AND m.state = 'scheduled' AND m.request IS NOT NULL
RETURNING m.message_id, m.tenant_id, m.recipient, m.request, m.request_id,
    EXTRACT(EPOCH FROM done.executed_at - done.scheduled_time)::float8 AS late_s
"""

_REJECT = """
WITH r AS (
    UPDATE message_records SET state = 'rejected', status = 'failed', state_rank = 8, error_code = 1001,
        error_message = $2, updated_at = now()
    WHERE message_id = ANY($1::text[]) AND state = 'accepted'
    RETURNING message_id, tenant_id, message_type
), e AS (
    INSERT INTO message_events (event_id, message_id, tenant_id, state, attempt, service, channel, error_code,
        error, occurred_at)
    SELECT message_id || ':0:rejected', message_id, tenant_id, 'rejected', 0, 'router', message_type, 1001, $2, now()
    FROM r
    ON CONFLICT (event_id) DO NOTHING
)
SELECT message_id, tenant_id, message_type FROM r
"""

# Seconds until the earliest pending task is due (negative: overdue), and how many wait.
_NEXT = """
SELECT EXTRACT(EPOCH FROM min(scheduled_time) - clock_timestamp())::float8 AS wait_s
FROM scheduled_tasks WHERE status = 'pending'
"""
# For the gauge only, and not on every wake-up (every scheduled send wakes the scheduler): a count
# of a large backlog reads the whole partial index, the earliest task only its first entry.
_PENDING = "SELECT count(*) FROM scheduled_tasks WHERE status = 'pending'"
_COUNT_EVERY_S = 30.0

# After a release that found nothing (another router holds the due rows), wait this long.
_IDLE_RETRY_S = 0.05
_ERROR_RETRY_MAX_S = 5.0


def released_request(stored: dict) -> bytes:
    """The request to publish for a released message: as stored, without its time (so the
    router routes it now) and marked as recorded (its record exists)."""
    request = {k: v for k, v in stored.items() if k not in ("scheduled_at", "attempt")}
    request["recorded"] = True
    return orjson.dumps(request)


class Scheduler:
    """Releases due tasks; see the module docstring."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.pool = pool
        self.producer = producer
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._unpublished: list[asyncpg.Record] = []  # released, not yet on the broker
        self._count_at = 0.0  # when to count the pending tasks again (the gauge)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def wake(self, *_: object) -> None:
        """The NOTIFY callback: a task was added or moved; look again."""
        self._wake.set()

    async def release_due(self) -> int:
        """Release every task due now (in batches); answers how many messages were published."""
        total = 0
        while not self._stopping.is_set():
            released = await self._release_batch()
            total += released
            if released < self.settings.scheduler_batch:
                return total
        return total

    async def _release_batch(self) -> int:
        # Claimed and committed first: the records are 'accepted' again from here on, so a cancel
        # now answers 409 and a publish lost below is the sweeper's, like any accepted message's.
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, self.settings.scheduler_batch)
        if not rows:
            return 0
        SCHEDULED_RELEASED.inc(len(rows))
        for row in rows:
            SCHEDULE_LATENESS.observe(max(row["late_s"] or 0.0, 0.0))
        await self._publish(list(rows))
        return len(rows)

    async def _publish(self, rows: list[asyncpg.Record]) -> None:
        """Publish released requests; what the broker did not take is tried again next round
        (and by the sweeper if this router stops); what it can never take is rejected."""
        futures, sent, refused = [], [], []
        for row in rows:
            headers = [("request_id", row["request_id"].encode())] if row["request_id"] else []
            try:
                futures.append(
                    await self.producer.send(
                        Topics.REQUESTS,
                        released_request(row["request"]),
                        key=message_key(row["tenant_id"], row["recipient"]),
                        headers=headers,
                    )
                )
                sent.append(row)
            except MessageSizeTooLargeError:
                refused.append(row)
            except KafkaError:
                self._unpublished.append(row)
        try:
            # Bounded (aiokafka #1101).
            results = await asyncio.wait_for(
                asyncio.gather(*futures, return_exceptions=True), self.settings.publish_timeout_s
            )
        except TimeoutError:
            results = [TimeoutError()] * len(sent)
        for row, result in zip(sent, results, strict=True):
            if isinstance(result, BaseException):
                self._unpublished.append(row)
            else:
                log_event(log, logging.INFO, "scheduled message released", message_id=row["message_id"],
                          late_s=round(row["late_s"] or 0.0, 3))  # fmt: skip
        if refused:
            await self._reject(refused)
        if self._unpublished:
            log.warning("%d released messages not taken by the broker; trying again", len(self._unpublished))

    async def _retry_unpublished(self) -> None:
        rows, self._unpublished = self._unpublished, []
        if rows:
            await self._publish(rows)

    async def _reject(self, rows: list[asyncpg.Record]) -> None:
        """Requests the broker can never take (too large): rejected, not retried for ever."""
        ids = [r["message_id"] for r in rows]
        why = "too large to queue: the broker refuses records over its limit"
        async with self.pool.acquire() as conn, conn.transaction():
            rejected = await conn.fetch(_REJECT, ids, why)
            # A status change the tracker's fold never sees: counted and called back from here.
            now = datetime.now(UTC)
            events = [
                EventV1(event_id=f"{r['message_id']}:0:rejected", message_id=r["message_id"], tenant_id=r["tenant_id"],
                        state=State.REJECTED, service="router", channel=r["message_type"], error_code=1001, error=why,
                        occurred_at=now)
                for r in rejected
            ]  # fmt: skip
            if events:
                await callbacks.enqueue(conn, events)
                await count_outcomes(conn, events, backend=self.settings.stats_backend)
        for message_id in ids:
            log_event(log, logging.ERROR, "scheduled message too large to publish; rejected", message_id=message_id)

    async def next_wait(self) -> float:
        """Seconds to sleep before the next release (bounded by the setting)."""
        row = await self.pool.fetchrow(_NEXT)
        if time.monotonic() >= self._count_at:
            self._count_at = time.monotonic() + _COUNT_EVERY_S
            SCHEDULED_PENDING.set(await self.pool.fetchval(_PENDING))
        SCHEDULED_OVERDUE.set(max(0.0, -(row["wait_s"] or 0.0)))
        if row["wait_s"] is None:
            return self.settings.scheduler_max_sleep_s
        return min(max(row["wait_s"], 0.0), self.settings.scheduler_max_sleep_s)

    async def run(self) -> None:
        """Release, sleep until the next task is due or a NOTIFY, repeat; errors are waited out."""
        delay = 0.2
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                await self._retry_unpublished()
                released = await self.release_due()
                wait = await self.next_wait()
                if wait <= 0 and released == 0:
                    wait = _IDLE_RETRY_S  # due rows locked by another router: let it finish
                if self._unpublished:
                    wait = min(wait, 1.0)
                delay = 0.2
            except (TimeoutError, KafkaError, asyncpg.UndefinedTableError, *DB_UNAVAILABLE) as exc:
                # (No table yet: ingest and the tracker apply the migrations at start-up.)
                log.warning("scheduler round failed (%s); trying again in %.1f s", type(exc).__name__, delay)
                wait, delay = delay, min(delay * 2, _ERROR_RETRY_MAX_S)
            except Exception:  # never let the loop die: scheduled messages would wait forever
                log.exception("scheduler round failed; trying again in %.1f s", delay)
                wait, delay = delay, min(delay * 2, _ERROR_RETRY_MAX_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)


async def listen(settings: Settings, scheduler: Scheduler) -> None:
    """Keep a connection listening on ``herald_schedule`` (reconnecting when it is lost)."""

    async def listening(conn: asyncpg.Connection) -> None:
        scheduler.wake()  # anything added while not listening

    await follow_notifications(
        settings.database_url.get_secret_value(), NOTIFY_CHANNEL, scheduler.wake, listening, name="schedule"
    )


async def serve_scheduler(settings: Settings) -> None:
    """Run the scheduler until cancelled (the router's faust app runs it as a task); a database
    that cannot be reached at start-up is waited for, not given up on."""
    started = time.monotonic()
    while True:
        try:
            pool = await create_pool(settings, max_size=3, attempts=5)
            break
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("scheduler: database unavailable (%s); trying again", type(exc).__name__)
            await asyncio.sleep(2.0)
    producer = make_producer(settings)
    scheduler = Scheduler(settings, pool, producer)
    listener = None
    try:
        await producer.start()
        listener = asyncio.create_task(listen(settings, scheduler), name="schedule-listener")
        log.info("scheduler started in %.1f s", time.monotonic() - started)
        await scheduler.run()
    finally:
        scheduler.stop()
        if listener is not None:
            listener.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(stop_quietly(producer, 3), asyncio.wait_for(pool.close(), 3))
