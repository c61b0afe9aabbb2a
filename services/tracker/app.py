"""The tracker: folds ``notify.events`` into message records and their timeline, and keeps
every ``notify.dlq`` record in ``dead_letters``. Offsets are committed after the transaction.

It also counts configured providers' tries in Redis after each batch is folded, and one tracker
at a time publishes their quality and circuit breakers to ``notify.provider-health``
(:mod:`services.tracker.quality`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from redis.asyncio import Redis

from services.statistics_clickhouse import from_settings
from services.tracker.callbacks import CallbackWorker
from services.tracker.fold import fold_plan, write_dead_letters, write_fold
from services.tracker.lag import BacklogExporter
from services.tracker.quality import QualityBook, QualityPublisher
from services.tracker.stats_shipper import StatsShipper
from shared.crypto import EncryptionKeyError, SecretBox
from shared.db import DB_UNAVAILABLE, create_pool, migrate
from shared.errors import field_errors
from shared.events import DeadLetterV1, EventV1
from shared.health import HealthServer
from shared.kafka import Topics, ensure_topics, keep_topics, make_consumer, make_producer, stop_quietly
from shared.logging import log_event
from shared.metrics import (
    CONSUMER_LAST_PROGRESS,
    EVENTS_FOLDED,
    FOLD_BATCH,
    MESSAGES_REJECTED,
    WORKER_TASKS,
)
from shared.retention import archive_periodically
from shared.settings import Settings

log = logging.getLogger("herald.tracker")

# The database is away, not refusing this batch: wait and fold it again. A server shutting
# down cuts running queries with 57P01 (admin_shutdown), a PostgresError that is no connection
# error; taken for a refusal it sent the batch's events to the dead-letter topic, out of their
# records. Also: starting up (57P03), out of connections (53300), a failover's read-only
# standby (25006), serialization failures and deadlocks (40001, 40P01), and a connection the
# server terminated while idle, whose next query fails with asyncpg's InternalClientError
# ("cannot switch to state ...": it used to stop the tracker).
_UNAVAILABLE = DB_UNAVAILABLE
_RETRY_MAX_S = 5.0  # so a database that is back is used again within seconds


class _Stopping(Exception):
    """Stopping while the database is away: the batch is left uncommitted (it comes back)."""


class Tracker:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        quality: QualityBook | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.consumer = consumer
        self.producer = producer
        self.quality = quality
        self._stopping = asyncio.Event()

    @property
    def stopping(self) -> asyncio.Event:
        return self._stopping

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            batches = await self.consumer.getmany(timeout_ms=500, max_records=self.settings.tracker_batch_max)
            if not batches:
                continue
            records = [r for rs in batches.values() for r in rs]
            try:
                await self._fold_with_retry(records)
                await self.consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batches.items()})
            except _Stopping:
                return
            except KafkaError as exc:
                # A dead letter or the commit did not reach the broker (down, or the partitions
                # moved): read the batch again; folding is idempotent.
                log.warning("batch not committed (%s); reading it again", exc.__class__.__name__)
                for tp, rs in batches.items():
                    if tp in self.consumer.assignment():
                        self.consumer.seek(tp, rs[0].offset)
                continue
            CONSUMER_LAST_PROGRESS.labels("tracker").set(time.time())

    async def _fold_with_retry(self, records: list[ConsumerRecord]) -> None:
        """PostgreSQL down means wait, not skip: nothing is committed until the fold lands.
        A batch the database refuses for another reason is folded record by record, and a
        record refused on its own goes to the dead-letter topic with the database's reason."""
        delay = 0.5
        while True:
            try:
                await self.fold(records)
                return
            except _UNAVAILABLE as exc:
                if self._stopping.is_set():
                    raise _Stopping from exc
                log.error("database unavailable (%s); retrying the batch in %.1fs", exc.__class__.__name__, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, _RETRY_MAX_S)
            except asyncpg.PostgresError:
                if len(records) == 1:
                    await self._refused(records[0])
                    return
                log.exception("batch refused; folding its %d records one by one", len(records))
                for record in records:
                    await self._fold_with_retry([record])
                return

    async def _refused(self, record: ConsumerRecord) -> None:
        log.exception("record refused by the database")
        WORKER_TASKS.inc("tracker", "rejected")
        if record.topic == Topics.DLQ:
            return  # already a dead letter; the log above keeps it
        letter = self._letter(record, "fold_refused", [{"field": "body", "message": "refused by the database"}])
        await self.producer.send_and_wait(Topics.DLQ, letter.to_bytes(), headers=list(record.headers or []))

    async def fold(self, records: list[ConsumerRecord]) -> None:
        events: list[EventV1] = []
        letters: list[DeadLetterV1] = []
        malformed = 0
        for record in records:
            try:
                data = orjson.loads(record.value or b"")
                if record.topic == Topics.DLQ:
                    letters.append(DeadLetterV1.model_validate(data))
                else:
                    events.append(EventV1.model_validate(data))
            except (orjson.JSONDecodeError, ValidationError) as exc:
                malformed += 1
                letter = await self._reject(record, exc)
                if record.topic == Topics.DLQ:
                    letters.append(letter)  # cannot go back to the DLQ: keep it here
        plan = fold_plan(events)
        async with self.pool.acquire() as conn:
            # Statistics: PostgreSQL's rollups, or the outbox shipped to ClickHouse.
            await write_fold(conn, plan, statistics=self.settings.stats_backend)
            if letters:
                await write_dead_letters(conn, letters)
        FOLD_BATCH.observe(len(records))
        WORKER_TASKS.inc("tracker", "success", len(records) - malformed)
        for event in plan.timeline:
            EVENTS_FOLDED.labels(event.state.value).inc()
        if self.quality is not None:
            # Once folded, before the commit: a batch read again is counted again, and each
            # event once (the book remembers event ids). It never raises for Redis.
            await self.quality.record(plan.timeline)

    async def _reject(self, record: ConsumerRecord, exc: Exception) -> DeadLetterV1:
        """A malformed record on notify.events goes to notify.dlq, whence it comes back to be
        stored in dead_letters; a malformed one on notify.dlq itself is stored directly."""
        errors = field_errors(exc)
        reason = "invalid_event" if record.topic != Topics.DLQ else "invalid_dead_letter"
        letter = self._letter(record, reason, errors)
        if record.topic != Topics.DLQ:
            await self.producer.send_and_wait(Topics.DLQ, letter.to_bytes(), headers=list(record.headers or []))
        MESSAGES_REJECTED.labels("tracker", letter.reason).inc()
        WORKER_TASKS.inc("tracker", "rejected")
        log_event(log, logging.WARNING, "malformed record", topic=record.topic, errors=errors[:5])
        return letter

    @staticmethod
    def _letter(record: ConsumerRecord, reason: str, errors: list) -> DeadLetterV1:
        return DeadLetterV1.of_record(record, reason=reason, errors=errors, service="tracker")


async def serve(settings: Settings) -> None:
    if settings.run_migrations:
        await migrate(settings)
    await ensure_topics(settings)
    pool = await create_pool(settings)
    consumer = make_consumer(settings, [Topics.EVENTS, Topics.DLQ], group_id="herald-tracker")
    producer = make_producer(settings)
    await producer.start()
    await consumer.start()
    # Provider quality (no connection until the first command; a Redis that hangs costs a batch
    # at most the timeout, then quality is skipped and folding goes on).
    redis = Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=max(settings.redis_timeout_s, 2.0),
        socket_connect_timeout=settings.redis_timeout_s,
    )
    tracker = Tracker(settings, pool, consumer, producer, QualityBook(redis, settings))
    # ClickHouse, when it keeps the statistics: the trackers ship the outbox the folds write.
    statistics = from_settings(settings, pool=pool)
    shipping = (
        asyncio.create_task(StatsShipper(pool, statistics, settings).run(tracker.stopping)) if statistics else None
    )

    async def publish_health(key: bytes, value: bytes) -> None:
        # Bounded: send_and_wait can hang while the broker is down (aiokafka #1101).
        send = producer.send_and_wait(Topics.PROVIDER_HEALTH, value, key=key)
        await asyncio.wait_for(send, settings.publish_timeout_s)

    publisher = QualityPublisher(redis, settings, publish_health)
    # Consumer lag and Redis memory, from the tracker that publishes quality (services/tracker/lag.py).
    backlog = BacklogExporter(settings, redis, lambda: publisher.leading)

    async def kafka_ready() -> None:
        if not consumer.assignment():
            raise RuntimeError("no partitions assigned")

    async def database_ready() -> None:
        async with pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")

    health = HealthServer("0.0.0.0", settings.tracker_http_port, {"kafka": kafka_ready, "database": database_ready})
    await health.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, tracker.stop)
    log.info("tracker started")
    keeper = asyncio.create_task(keep_topics(settings))
    publishing = asyncio.create_task(publisher.run())
    exporting = asyncio.create_task(backlog.run())
    # Status callbacks (issue 11): deliveries the folds enqueue, signed with secrets stored
    # encrypted (without the key they stay pending, and the fold goes on).
    callbacks: CallbackWorker | None = None
    try:
        box = SecretBox.from_setting(settings.encryption_key.get_secret_value() if settings.encryption_key else None)
        callbacks = CallbackWorker(settings, pool, box)
    except EncryptionKeyError as exc:
        log.error("status callbacks are not delivered: %s", exc)
    delivering = asyncio.create_task(callbacks.run(), name="callbacks") if callbacks else None
    archiving = asyncio.create_task(archive_periodically(pool, settings, tracker.stopping))
    try:
        await tracker.run()
    finally:
        keeper.cancel()
        archiving.cancel()
        if shipping is not None:
            shipping.cancel()
        publisher.stop()  # its loop ends its tick and gives the lease up to the next tracker
        if callbacks is not None and delivering is not None:
            callbacks.stop()  # tries in flight keep their lease: another tracker makes them again
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(delivering, 3)
        backlog.stop()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.gather(publishing, exporting), 3)
        await health.stop()
        # Bounded and together: each can hang on a server that is down (aiokafka #1101, a
        # pool whose database went away), and SIGTERM must end the process in seconds.
        await asyncio.gather(
            stop_quietly(consumer, 3), stop_quietly(producer, 3), _close_pool(pool, 3), _close_redis(redis, 2)
        )
        if statistics is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(statistics.close(), 2)
    log.info("tracker stopped")


async def _close_redis(redis: Redis, timeout: float) -> None:
    with contextlib.suppress(TimeoutError, OSError):
        await asyncio.wait_for(redis.aclose(), timeout)


async def _close_pool(pool: asyncpg.Pool, timeout: float) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except (TimeoutError, *_UNAVAILABLE):
        pool.terminate()
