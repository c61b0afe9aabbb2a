"""Kafka in one place: topic names, topic creation, producer/consumer factories, headers.

aiokafka's defaults are the unsafe ones (acks=1, auto-commit, offset reset 'latest'); every
factory here sets them explicitly. ``send_and_wait``/``stop`` can hang while the broker is down
(aiokafka #1101), so callers bound them with :func:`asyncio.wait_for`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from shared.events import Channel
from shared.settings import Settings

log = logging.getLogger(__name__)


# What one record may weigh: aiokafka's max_request_size (1 MiB) holds the batch around it, and
# faust's producer refuses more than 1,000,000 bytes. Ingest refuses larger requests at once
# (a scheduled one would otherwise fail only at its release).
MAX_RECORD_BYTES = 1_000_000


class Topics:
    """Every topic name, defined once."""

    REQUESTS = "notify.requests"
    EVENTS = "notify.events"
    DLQ = "notify.dlq"
    RETRY = ("notify.retry.1m", "notify.retry.5m", "notify.retry.10m")
    PROVIDER_HEALTH = "notify.provider-health"
    # Templates (and later routing rules, provider settings): ingest writes, routers read all.
    CONFIG = "notify.config"
    # Keyed state where only the latest record per key matters.
    COMPACTED = frozenset({PROVIDER_HEALTH, CONFIG})

    @staticmethod
    def dispatch(channel: Channel | str) -> str:
        return f"notify.dispatch.{Channel(channel).value}"

    @classmethod
    def all(cls) -> list[str]:
        return [
            cls.REQUESTS,
            cls.EVENTS,
            cls.DLQ,
            *cls.RETRY,
            cls.PROVIDER_HEALTH,
            cls.CONFIG,
            *(cls.dispatch(c) for c in Channel),
        ]


# --- headers ---------------------------------------------------------------------------------

HeaderList = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Trace:
    """The tracing context carried from the HTTP request through every service."""

    request_id: str | None = None
    traceparent: str | None = None

    def headers(self) -> HeaderList:
        out: HeaderList = []
        if self.request_id:
            out.append(("request_id", self.request_id.encode()))
        if self.traceparent:
            out.append(("traceparent", self.traceparent.encode()))
        return out

    @classmethod
    def from_headers(cls, headers: Iterable[tuple[str, bytes]] | dict | None) -> Trace:
        if not headers:
            return cls()
        items = headers.items() if isinstance(headers, dict) else headers
        found: dict[str, str] = {}
        for k, v in items:
            if k in ("request_id", "traceparent") and v is not None:
                found[k] = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        return cls(found.get("request_id"), found.get("traceparent"))


def message_key(tenant_id: str, recipient: str) -> bytes:
    """Requests and dispatches are keyed by tenant + recipient: ordering per recipient."""
    return f"{tenant_id}:{recipient}".encode()


# --- factories -------------------------------------------------------------------------------


def make_producer(settings: Settings, **overrides: object) -> AIOKafkaProducer:
    options: dict[str, object] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "acks": "all",
        "enable_idempotence": settings.kafka_enable_idempotence,
        "linger_ms": settings.kafka_linger_ms,
        "request_timeout_ms": int(settings.kafka_request_timeout_s * 1000),
        "client_id": f"herald-{settings.service_name}",
        "metadata_max_age_ms": int(settings.kafka_metadata_max_age_s * 1000),
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(settings: Settings, topics: Sequence[str], group_id: str, **overrides: object) -> AIOKafkaConsumer:
    options: dict[str, object] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": int(settings.kafka_session_timeout_s * 1000),
        "rebalance_timeout_ms": int(settings.kafka_rebalance_timeout_s * 1000),
        "heartbeat_interval_ms": int(settings.kafka_heartbeat_interval_s * 1000),
        "max_poll_records": settings.kafka_max_batch,
        "client_id": f"herald-{settings.service_name}",
        "metadata_max_age_ms": int(settings.kafka_metadata_max_age_s * 1000),
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


async def ensure_topics(settings: Settings, topics: Iterable[str] | None = None, *, attempts: int = 30) -> list[str]:
    """Create the topics that are missing (answers their names); retried while the broker is
    still starting."""
    wanted = list(topics or Topics.all())
    delay = 0.2
    for attempt in range(1, attempts + 1):
        admin = AIOKafkaAdminClient(
            bootstrap_servers=settings.bootstrap_servers,
            request_timeout_ms=int(settings.kafka_request_timeout_s * 1000),
            client_id=f"herald-{settings.service_name}-admin",
        )
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in wanted if t not in existing]
            if missing:
                try:
                    await admin.create_topics(
                        [
                            NewTopic(
                                t,
                                num_partitions=settings.kafka_topic_partitions,
                                replication_factor=settings.kafka_replication_factor,
                                topic_configs={"cleanup.policy": "compact"} if t in Topics.COMPACTED else {},
                            )
                            for t in missing
                        ]
                    )
                except TopicAlreadyExistsError:
                    pass  # another service created them first
                log.info("created topics %s", ", ".join(missing))
            return missing
        except (KafkaError, OSError) as exc:
            if attempt == attempts:
                raise
            log.warning("broker not ready (%s), retrying", exc.__class__.__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        finally:
            await _bounded(admin.close(), 5)
    return []  # not reached: the last attempt raises


async def keep_topics(settings: Settings, on_created: Callable[[list[str]], None] | None = None) -> None:
    """Create again the topics that disappear. A broker that restarts without its data (Tansu
    keeps everything in memory; a Kafka cluster rebuilt from scratch) comes back with no topics,
    and worse, Tansu then acknowledges writes to them while listing none, so no consumer is ever
    assigned a partition. Every service runs this every ``HERALD_KAFKA_TOPIC_CHECK_INTERVAL_S``;
    what was lost meanwhile is the sweeper's to publish again."""
    while True:
        await asyncio.sleep(settings.kafka_topic_check_interval_s)
        try:
            created = await ensure_topics(settings, attempts=1)
        except (KafkaError, OSError) as exc:
            log.debug("topic check failed (%s); next round tries again", exc.__class__.__name__)
            continue
        if created:
            log.warning("topics were missing and have been created again: %s", ", ".join(created))
            if on_created is not None:
                on_created(created)


async def _bounded(coro: object, timeout: float) -> None:
    try:
        await asyncio.wait_for(coro, timeout)  # type: ignore[arg-type]
    except (TimeoutError, KafkaError, OSError):
        pass


async def stop_quietly(client: AIOKafkaProducer | AIOKafkaConsumer, timeout: float = 5) -> None:
    """``stop()`` bounded in time: it can hang while the broker is down (aiokafka #1101)."""
    await _bounded(client.stop(), timeout)
