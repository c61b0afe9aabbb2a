"""The sender loop of one channel: consume → skip if done → provider.send → event → commit.

An offset is committed only after the outcome events of every record before it are on the
broker. A command already completed (redelivered after a crash or a rebalance) is skipped, so
it is not sent twice; the window left is a crash between the provider's acceptance and the
'done' mark, which at-least-once delivery cannot close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from datetime import timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.senders import registry
from services.senders.base import DeliveryError, Permanent, Provider, Retryable
from shared.errors import field_errors
from shared.events import DeadLetterV1, DispatchV1, EventV1, ProviderHealthV1, State, event_id, utcnow
from shared.health import HealthServer
from shared.ids import new_request_id
from shared.kafka import Topics, Trace, ensure_topics, make_consumer, make_producer, message_key, stop_quietly
from shared.logging import log_event, request_id_var, traceparent_var
from shared.metrics import (
    CONSUMER_LAST_PROGRESS,
    MESSAGES_REJECTED,
    MESSAGES_SENT,
    RETRIES_SCHEDULED,
    SEND_DURATION,
)
from shared.settings import Settings

log = logging.getLogger("herald.sender")


class SenderRunner:
    """Consumes ``notify.dispatch.<channel>`` and delivers through the channel's provider."""

    def __init__(
        self,
        settings: Settings,
        channel: str,
        provider: Provider,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        redis: Redis,
    ) -> None:
        self.settings = settings
        self.channel = channel
        self.provider = provider
        self.consumer = consumer
        self.producer = producer
        self.redis = redis
        self.service = f"sender-{channel}"
        self._slots = asyncio.Semaphore(settings.sender_concurrency)
        self._stopping = asyncio.Event()

    # --- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        while not self._stopping.is_set():
            batches = await self.consumer.getmany(timeout_ms=500, max_records=self.settings.kafka_max_batch)
            if not batches:
                continue
            await asyncio.gather(*(self._partition(tp, records) for tp, records in batches.items()))

    def stop(self) -> None:
        self._stopping.set()

    async def _partition(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        # Records of one partition are delivered concurrently (bounded); the offset after the
        # last one is committed once all of their outcome events are on the broker. Redis is
        # asked once per batch which dispatches are already done, and told once which now are.
        parsed = [_parse(r) for r in records]
        done = await self._done_flags([d.dispatch_id for d in parsed if isinstance(d, DispatchV1)])
        results = await asyncio.gather(*(self._one(r, d, done) for r, d in zip(records, parsed, strict=True)))
        await asyncio.gather(*(f for futures, _ in results for f in futures))
        await self._mark_done([d for _, d in results if d is not None])
        await self.consumer.commit({tp: records[-1].offset + 1})
        CONSUMER_LAST_PROGRESS.labels(self.service).set(time.time())

    async def _one(
        self, record: ConsumerRecord, parsed: DispatchV1 | list[dict], done: set[str]
    ) -> tuple[list[asyncio.Future], DispatchV1 | None]:
        """Deliver one record; answers the futures of the events it produced and the dispatch
        to mark done (None when nothing was delivered)."""
        trace = Trace.from_headers(record.headers)
        rid = request_id_var.set(trace.request_id or new_request_id())
        tp = traceparent_var.set(trace.traceparent)
        try:
            if not isinstance(parsed, DispatchV1):
                return [await self._dead_letter(record, trace, "invalid_dispatch", parsed, None)], None
            if parsed.dispatch_id in done:
                log_event(
                    log,
                    logging.INFO,
                    "dispatch already completed; skipped",
                    message_id=parsed.message_id,
                    dispatch_id=parsed.dispatch_id,
                )
                return [], None
            async with self._slots:
                return await self._deliver(parsed, trace), parsed
        except Exception as exc:  # one bad record never stops the channel
            log.exception("unexpected failure; sending the record to the dead-letter topic")
            errors = [{"field": "body", "message": str(exc)[:200]}]
            return [await self._dead_letter(record, trace, "sender_error", errors, None)], None
        finally:
            request_id_var.reset(rid)
            traceparent_var.reset(tp)

    async def _deliver(self, dispatch: DispatchV1, trace: Trace) -> list[asyncio.Future]:
        headers = trace.headers()
        futures = [await self._emit(self._event(dispatch, State.SENDING), headers)]
        started = time.perf_counter()
        provider_name = getattr(self.provider, "name", "unknown")
        try:
            result = await self.provider.send(dispatch)
        except DeliveryError as exc:
            elapsed = time.perf_counter() - started
            SEND_DURATION.labels(self.channel, provider_name).observe(elapsed)
            MESSAGES_SENT.labels(self.channel, "failed", provider_name).inc()
            outcome = await self._failure(dispatch, exc, elapsed, headers)
            futures.extend(outcome)
            return futures
        else:
            elapsed = time.perf_counter() - started
            SEND_DURATION.labels(self.channel, provider_name).observe(elapsed)
            MESSAGES_SENT.labels(self.channel, "success", provider_name).inc()
            event = self._event(
                dispatch,
                State.SENT,
                detail={
                    **result.detail,
                    "provider_message_id": result.provider_message_id,
                    "duration_ms": round(elapsed * 1000, 1),
                },
            )
            log_event(
                log,
                logging.INFO,
                "message sent",
                message_id=dispatch.message_id,
                recipient=dispatch.to[0],
                duration_ms=round(elapsed * 1000, 1),
            )
        futures.append(await self._emit(event, headers))
        return futures

    async def _failure(
        self, dispatch: DispatchV1, exc: DeliveryError, elapsed: float, headers: list
    ) -> list[asyncio.Future]:
        """A failed attempt: retry later (transient, attempts left), dead (transient, none
        left: also dead-lettered), or failed (permanent)."""
        delays = self.settings.retry_delays
        detail: dict[str, Any] = {"permanent": isinstance(exc, Permanent), "duration_ms": round(elapsed * 1000, 1)}
        fields = {"error_code": exc.code, "error": exc.message}
        if isinstance(exc, Retryable) and dispatch.attempt <= len(delays):
            tier = dispatch.attempt - 1
            delay = max(delays[tier], exc.retry_after or 0)
            due = utcnow() + timedelta(seconds=delay)
            retry = dispatch.model_copy(
                update={
                    "attempt": dispatch.attempt + 1,
                    "dispatch_id": f"{dispatch.message_id}:{dispatch.attempt + 1}",
                    "not_before": due,
                    "last_error": exc.message,
                }
            )
            topic = Topics.RETRY[min(tier, len(Topics.RETRY) - 1)]
            RETRIES_SCHEDULED.labels(self.channel, topic).inc()
            log_event(
                log,
                logging.WARNING,
                "delivery failed; retry scheduled",
                message_id=dispatch.message_id,
                attempt=dispatch.attempt,
                retry_in_s=delay,
                error=exc.message,
            )
            event = self._event(
                dispatch,
                State.RETRYING,
                detail={**detail, "next_attempt_at": due.isoformat(), "retry_topic": topic},
                **fields,
            )
            return [
                await self._emit(event, headers),
                await self.producer.send(
                    topic, retry.to_bytes(), key=message_key(dispatch.tenant_id, dispatch.to[0]), headers=headers
                ),
            ]
        if isinstance(exc, Retryable):
            log_event(
                log,
                logging.ERROR,
                "delivery failed; no attempts left",
                message_id=dispatch.message_id,
                attempt=dispatch.attempt,
                error=exc.message,
            )
            event = self._event(dispatch, State.DEAD, detail={**detail, "attempts": dispatch.attempt}, **fields)
            letter = DeadLetterV1(
                source_topic=Topics.dispatch(self.channel),
                partition=-1,
                offset=-1,
                reason="retries_exhausted",
                errors=[{"field": "delivery", "message": exc.message}],
                message_id=dispatch.message_id,
                service=self.service,
                payload=dispatch.to_bytes().decode(),
            )
            return [
                await self._emit(event, headers),
                await self.producer.send(
                    Topics.DLQ, letter.to_bytes(), key=dispatch.message_id.encode(), headers=headers
                ),
            ]
        log_event(
            log,
            logging.ERROR,
            "delivery failed permanently",
            message_id=dispatch.message_id,
            recipient=dispatch.to[0],
            error=exc.message,
        )
        return [await self._emit(self._event(dispatch, State.FAILED, detail=detail, **fields), headers)]

    # --- pieces ----------------------------------------------------------------------------

    def _event(self, dispatch: DispatchV1, state: State, **fields: Any) -> EventV1:
        return EventV1(
            event_id=event_id(dispatch.message_id, dispatch.attempt, state),
            message_id=dispatch.message_id,
            tenant_id=dispatch.tenant_id,
            state=state,
            attempt=dispatch.attempt,
            occurred_at=utcnow(),
            service=self.service,
            channel=self.channel,
            provider=getattr(self.provider, "name", None),
            request_id=dispatch.request_id,
            **fields,
        )

    async def _emit(self, event: EventV1, headers: list) -> asyncio.Future:
        return await self.producer.send(Topics.EVENTS, event.to_bytes(), key=event.message_id.encode(), headers=headers)

    @staticmethod
    def _done_key(dispatch_id: str) -> str:
        return f"herald:done:{dispatch_id}"

    async def _done_flags(self, dispatch_ids: list[str]) -> set[str]:
        """Which of these dispatches were completed before (one round trip)."""
        if not dispatch_ids:
            return set()
        try:
            values = await self.redis.mget([self._done_key(i) for i in dispatch_ids])
        except RedisError:
            # Without Redis we cannot tell; delivering (at least once) beats dropping.
            log.warning("redis unavailable; cannot check whether %d dispatches were already sent", len(dispatch_ids))
            return set()
        return {i for i, v in zip(dispatch_ids, values, strict=True) if v is not None}

    async def _mark_done(self, dispatches: list[DispatchV1]) -> None:
        """Called once the outcome events are on the broker (one round trip)."""
        if not dispatches:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for d in dispatches:
                    pipe.set(self._done_key(d.dispatch_id), b"1", ex=self.settings.sender_done_ttl_s)
                await pipe.execute()
        except RedisError:
            log.warning("redis unavailable; %d dispatches not marked done", len(dispatches))

    async def _dead_letter(
        self, record: ConsumerRecord, trace: Trace, reason: str, errors: list, message_id: str | None
    ) -> asyncio.Future:
        letter = DeadLetterV1(
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
            errors=errors[:50],
            message_id=message_id,
            service=self.service,
            key=record.key.decode("utf-8", "replace") if record.key else None,
            payload=(record.value or b"").decode("utf-8", "replace"),
            headers={k: v.decode("utf-8", "replace") for k, v in (record.headers or [])},
        )
        MESSAGES_REJECTED.labels(self.service, reason).inc()
        log_event(log, logging.WARNING, "record rejected to the dead-letter topic", reason=reason, errors=errors[:5])
        return await self.producer.send(
            Topics.DLQ, letter.to_bytes(), key=message_id.encode() if message_id else None, headers=trace.headers()
        )


def _parse(record: ConsumerRecord) -> DispatchV1 | list[dict]:
    """The dispatch a record carries, or the errors that make it unusable."""
    try:
        return DispatchV1.model_validate_json(record.value or b"")
    except ValidationError as exc:
        return field_errors(exc)


async def serve(settings: Settings, channel: str) -> None:
    """Run the sender of ``channel`` until SIGTERM/SIGINT."""
    provider_class = registry.load(channel)
    provider_class.check(settings)  # a bad configuration stops here, before any connection
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()

    async def publish_health(change: dict[str, Any]) -> None:
        record = ProviderHealthV1(**change)
        await producer.send_and_wait(Topics.PROVIDER_HEALTH, record.to_bytes(), key=record.identity.encode())

    provider = await provider_class.open(settings, publish_health)
    consumer = make_consumer(settings, [Topics.dispatch(channel)], group_id=f"herald-sender-{channel}")
    redis = Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=2)
    await consumer.start()
    runner = SenderRunner(settings, channel, provider, consumer, producer, redis)

    async def kafka_ready() -> None:
        if not consumer.assignment():
            raise RuntimeError("no partitions assigned")

    async def redis_ready() -> None:
        await redis.ping()

    health = HealthServer(
        "0.0.0.0",
        settings.sender_http_port,
        {"kafka": kafka_ready, "redis": redis_ready, "provider": provider.ready},
    )
    await health.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.stop)
    log.info("sender for %s started (provider %s)", channel, provider.name)
    try:
        await runner.run()
    finally:
        await health.stop()
        await stop_quietly(consumer)
        await stop_quietly(producer)
        await provider.close()
        await redis.aclose()
