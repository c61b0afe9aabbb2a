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
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.senders import registry
from services.senders.base import DeliveryError, Permanent, Provider
from shared.events import DeadLetterV1, DispatchV1, EventV1, State, event_id, utcnow
from shared.health import HealthServer
from shared.ids import new_request_id
from shared.kafka import Topics, Trace, ensure_topics, make_consumer, make_producer, stop_quietly
from shared.logging import log_event, request_id_var, traceparent_var
from shared.metrics import CONSUMER_LAST_PROGRESS, MESSAGES_REJECTED, MESSAGES_SENT, SEND_DURATION
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
        # Records of one partition are handled concurrently (bounded); the offset after the last
        # one is committed once all of their outcomes are on the broker.
        pending = await asyncio.gather(*(self._one(r) for r in records))
        await asyncio.gather(*(f for futures in pending for f in futures))
        await self.consumer.commit({tp: records[-1].offset + 1})
        CONSUMER_LAST_PROGRESS.labels(self.service).set(time.time())

    async def _one(self, record: ConsumerRecord) -> list[asyncio.Future]:
        trace = Trace.from_headers(record.headers)
        rid = request_id_var.set(trace.request_id or new_request_id())
        tp = traceparent_var.set(trace.traceparent)
        try:
            async with self._slots:
                return await self._deliver(record, trace)
        except Exception as exc:  # one bad record never stops the channel
            log.exception("unexpected failure; sending the record to the dead-letter topic")
            return [
                await self._dead_letter(
                    record, trace, "sender_error", [{"field": "body", "message": str(exc)[:200]}], None
                )
            ]
        finally:
            request_id_var.reset(rid)
            traceparent_var.reset(tp)

    async def _deliver(self, record: ConsumerRecord, trace: Trace) -> list[asyncio.Future]:
        try:
            dispatch = DispatchV1.model_validate(orjson.loads(record.value or b""))
        except (orjson.JSONDecodeError, ValidationError) as exc:
            errors = (
                [{"field": ".".join(map(str, e["loc"])) or "body", "message": e["msg"]} for e in exc.errors()]
                if isinstance(exc, ValidationError)
                else [{"field": "body", "message": str(exc)[:200]}]
            )
            return [await self._dead_letter(record, trace, "invalid_dispatch", errors, None)]
        if await self._already_done(dispatch):
            log_event(
                log,
                logging.INFO,
                "dispatch already completed; skipped",
                message_id=dispatch.message_id,
                dispatch_id=dispatch.dispatch_id,
            )
            return []
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
            event = self._event(
                dispatch,
                State.FAILED,
                error_code=exc.code,
                error=exc.message,
                detail={"permanent": isinstance(exc, Permanent), "duration_ms": round(elapsed * 1000, 1)},
            )
            log_event(
                log,
                logging.ERROR,
                "delivery failed",
                message_id=dispatch.message_id,
                recipient=dispatch.to[0],
                error=exc.message,
                permanent=isinstance(exc, Permanent),
            )
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
        done = asyncio.ensure_future(self._mark_done(dispatch, futures))
        return [done]

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

    def _done_key(self, dispatch: DispatchV1) -> str:
        return f"herald:done:{dispatch.dispatch_id}"

    async def _already_done(self, dispatch: DispatchV1) -> bool:
        try:
            return bool(await self.redis.exists(self._done_key(dispatch)))
        except RedisError:
            # Without Redis we cannot tell; delivering (at least once) beats dropping.
            log.warning("redis unavailable; cannot check whether %s was already sent", dispatch.dispatch_id)
            return False

    async def _mark_done(self, dispatch: DispatchV1, futures: list[asyncio.Future]) -> None:
        await asyncio.gather(*futures)  # the outcome is on the broker before we call it done
        try:
            await self.redis.set(self._done_key(dispatch), b"1", ex=self.settings.sender_done_ttl_s)
        except RedisError:
            log.warning("redis unavailable; %s not marked done", dispatch.dispatch_id)

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


async def serve(settings: Settings, channel: str) -> None:
    """Run the sender of ``channel`` until SIGTERM/SIGINT."""
    await ensure_topics(settings)
    provider = registry.load(channel).from_settings(settings)
    consumer = make_consumer(settings, [Topics.dispatch(channel)], group_id=f"herald-sender-{channel}")
    producer = make_producer(settings)
    redis = Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=2)
    await producer.start()
    await consumer.start()
    runner = SenderRunner(settings, channel, provider, consumer, producer, redis)

    async def kafka_ready() -> None:
        if not consumer.assignment():
            raise RuntimeError("no partitions assigned")

    async def redis_ready() -> None:
        await redis.ping()

    health = HealthServer("0.0.0.0", settings.sender_http_port, {"kafka": kafka_ready, "redis": redis_ready})
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
