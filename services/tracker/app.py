"""The tracker: folds ``notify.events`` into message records and their timeline, and keeps
every ``notify.dlq`` record in ``dead_letters``. Offsets are committed after the transaction."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from pydantic import ValidationError

from services.tracker.fold import fold_plan, write_dead_letters, write_fold
from shared.db import create_pool, migrate
from shared.errors import field_errors
from shared.events import DeadLetterV1, EventV1
from shared.health import HealthServer
from shared.kafka import Topics, ensure_topics, make_consumer, make_producer, stop_quietly
from shared.logging import log_event
from shared.metrics import CONSUMER_LAST_PROGRESS, EVENTS_FOLDED, FOLD_BATCH, MESSAGES_REJECTED
from shared.settings import Settings

log = logging.getLogger("herald.tracker")

_UNAVAILABLE = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
)


class Tracker:
    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.consumer = consumer
        self.producer = producer
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            batches = await self.consumer.getmany(timeout_ms=500, max_records=self.settings.tracker_batch_max)
            if not batches:
                continue
            records = [r for rs in batches.values() for r in rs]
            await self._fold_with_retry(records)
            await self.consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batches.items()})
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
                log.error("database unavailable (%s); retrying the batch in %.1fs", exc.__class__.__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
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
        if record.topic == Topics.DLQ:
            return  # already a dead letter; the log above keeps it
        letter = self._letter(record, "fold_refused", [{"field": "body", "message": "refused by the database"}])
        await self.producer.send_and_wait(Topics.DLQ, letter.to_bytes(), headers=list(record.headers or []))

    async def fold(self, records: list[ConsumerRecord]) -> None:
        events: list[EventV1] = []
        letters: list[DeadLetterV1] = []
        for record in records:
            try:
                data = orjson.loads(record.value or b"")
                if record.topic == Topics.DLQ:
                    letters.append(DeadLetterV1.model_validate(data))
                else:
                    events.append(EventV1.model_validate(data))
            except (orjson.JSONDecodeError, ValidationError) as exc:
                letter = await self._reject(record, exc)
                if record.topic == Topics.DLQ:
                    letters.append(letter)  # cannot go back to the DLQ: keep it here
        plan = fold_plan(events)
        async with self.pool.acquire() as conn:
            await write_fold(conn, plan)
            if letters:
                await write_dead_letters(conn, letters)
        FOLD_BATCH.observe(len(records))
        for event in plan.timeline:
            EVENTS_FOLDED.labels(event.state.value).inc()

    async def _reject(self, record: ConsumerRecord, exc: Exception) -> DeadLetterV1:
        """A malformed record on notify.events goes to notify.dlq, whence it comes back to be
        stored in dead_letters; a malformed one on notify.dlq itself is stored directly."""
        errors = field_errors(exc)
        reason = "invalid_event" if record.topic != Topics.DLQ else "invalid_dead_letter"
        letter = self._letter(record, reason, errors)
        if record.topic != Topics.DLQ:
            await self.producer.send_and_wait(Topics.DLQ, letter.to_bytes(), headers=list(record.headers or []))
        MESSAGES_REJECTED.labels("tracker", letter.reason).inc()
        log_event(log, logging.WARNING, "malformed record", topic=record.topic, errors=errors[:5])
        return letter

    @staticmethod
    def _letter(record: ConsumerRecord, reason: str, errors: list) -> DeadLetterV1:
        return DeadLetterV1(
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
            errors=errors[:50],
            service="tracker",
            key=record.key.decode("utf-8", "replace") if record.key else None,
            payload=(record.value or b"").decode("utf-8", "replace"),
            headers={k: v.decode("utf-8", "replace") for k, v in (record.headers or [])},
        )


async def serve(settings: Settings) -> None:
    if settings.run_migrations:
        await migrate(settings)
    await ensure_topics(settings)
    pool = await create_pool(settings)
    consumer = make_consumer(settings, [Topics.EVENTS, Topics.DLQ], group_id="herald-tracker")
    producer = make_producer(settings)
    await producer.start()
    await consumer.start()
    tracker = Tracker(settings, pool, consumer, producer)

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
    try:
        await tracker.run()
    finally:
        await health.stop()
        await stop_quietly(consumer)
        await stop_quietly(producer)
        await pool.close()
