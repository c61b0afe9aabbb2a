"""The retry relay: puts each delayed attempt back on its channel's dispatch topic when due.

A failed attempt with attempts left is published by the sender to ``notify.retry.<tier>`` with
``not_before``. One topic per delay tier keeps each partition in due order (every record in it
waited the same delay, give or take a provider's ``Retry-After``), so only the head of a
partition needs watching:

- due records are published to ``notify.dispatch.<channel>`` and their offsets committed once
  the broker has them;
- at the first record not yet due, the partition is rewound to it and **paused** until its time,
  while the others go on; the consumer keeps polling (and heartbeating), so a 10-minute wait
  neither holds other partitions nor drops the member from the group.

A restart or rebalance loses nothing: the paused record's offset was never committed, so the
next owner reads it again and waits for the rest of its delay. A malformed record goes to
``notify.dlq``. It runs inside the router process (the router owns retries, DESIGN.md) with its
own consumer group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from shared.errors import field_errors
from shared.events import DeadLetterV1, DispatchV1
from shared.kafka import Topics, Trace, make_consumer, make_producer, stop_quietly
from shared.logging import log_event
from shared.metrics import CONSUMER_LAST_PROGRESS, MESSAGES_REJECTED
from shared.settings import Settings

log = logging.getLogger("herald.router.retry")

GROUP = "herald-router-retry"


class RetryRelay:
    """Relays ``notify.retry.*`` to ``notify.dispatch.<channel>`` as each record falls due."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        *,
        target: Callable[[str], str] = Topics.dispatch,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self._target = target  # channel -> the topic its due attempts go to
        self._timers: dict[TopicPartition, asyncio.TimerHandle] = {}
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        try:
            while not self._stopping.is_set():
                batches = await self.consumer.getmany(timeout_ms=500)
                for tp, records in batches.items():
                    await self._partition(tp, records)
                CONSUMER_LAST_PROGRESS.labels("router-retry").set(time.time())
        finally:
            for timer in self._timers.values():
                timer.cancel()

    @property
    def waiting(self) -> set[TopicPartition]:
        """Partitions paused until their head record is due."""
        return set(self._timers)

    async def _partition(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        futures: list[asyncio.Future] = []
        commit_to: int | None = None
        for record in records:
            try:
                dispatch = DispatchV1.model_validate_json(record.value or b"")
            except ValidationError as exc:
                futures.append(await self._dead_letter(record, "invalid_retry", field_errors(exc)))
                commit_to = record.offset + 1
                continue
            wait = dispatch.not_before.timestamp() - time.time() if dispatch.not_before else 0.0
            if wait > 0:
                self._wait(tp, record.offset, wait)
                break
            futures.append(
                await self.producer.send(
                    self._target(dispatch.channel.value),
                    record.value,
                    key=record.key,
                    headers=list(record.headers or []),
                )
            )
            commit_to = record.offset + 1
        if commit_to is None:
            return
        try:
            await asyncio.gather(*futures)
            await self.consumer.commit({tp: commit_to})
        except KafkaError as exc:
            # Not on the broker, or the partition moved: read them again (a dispatch relayed
            # twice is sent once; the sender's ledger knows its id).
            log.warning("retries of %s not committed (%s); reading them again", tp, exc.__class__.__name__)
            self._cancel(tp)
            if tp in self.consumer.assignment():
                self.consumer.seek(tp, records[0].offset)

    def _wait(self, tp: TopicPartition, offset: int, seconds: float) -> None:
        """Rewind ``tp`` to its head record and pause it until that record is due."""
        self.consumer.seek(tp, offset)
        self.consumer.pause(tp)
        self._cancel(tp)
        self._timers[tp] = asyncio.get_running_loop().call_later(seconds, self._resume, tp)

    def _resume(self, tp: TopicPartition) -> None:
        self._timers.pop(tp, None)
        if tp in self.consumer.assignment():  # a rebalance may have moved it meanwhile
            self.consumer.resume(tp)

    def _cancel(self, tp: TopicPartition) -> None:
        timer = self._timers.pop(tp, None)
        if timer is not None:
            timer.cancel()

    async def _dead_letter(self, record: ConsumerRecord, reason: str, errors: list) -> asyncio.Future:
        letter = DeadLetterV1.of_record(record, reason=reason, errors=errors, service="router")
        MESSAGES_REJECTED.labels("router", reason).inc()
        log_event(log, logging.WARNING, "record rejected to the dead-letter topic", reason=reason, errors=errors[:5])
        trace = Trace.from_headers(record.headers)
        return await self.producer.send(Topics.DLQ, letter.to_bytes(), headers=trace.headers())


async def serve_relay(settings: Settings) -> None:
    """Run a relay until cancelled (the router's faust app runs it as a task)."""
    consumer = make_consumer(settings, list(Topics.RETRY), group_id=GROUP)
    producer = make_producer(settings)
    relay = RetryRelay(consumer, producer)
    try:
        await producer.start()
        await consumer.start()
        await relay.run()
    finally:
        relay.stop()
        with contextlib.suppress(Exception):
            await asyncio.gather(stop_quietly(consumer, 3), stop_quietly(producer, 3))
