"""Backlog, consumer lag and Redis memory (issue 11), exported by one tracker at a time.

Kafka has no queue length. Herald's backlog of a topic is the consumer lag of the group that
consumes it: for each partition, the end offset (the next offset to be written) minus the
group's committed offset, summed over the partitions. A group that committed nothing yet counts
from the partition's first offset (every Herald consumer starts from the earliest record), and so
does a group whose committed offset retention has deleted past (it will resume at the first record
there is: the deleted ones are no backlog):

- ``herald_consumer_lag{group, topic}``: every consumed topic, the retry tiers included;
- ``queue_length{queue=topic}`` (seed 004 §3.1.9's name; the same number, each topic has one
  consuming group) for every topic but the retry tiers, and ``herald_retries_waiting{queue}`` for
  those: the retry relay commits a ``notify.retry.*`` record only once it is due and relayed, so
  their lag is mostly attempts waiting out their delay on purpose (a provider outage fills them),
  not a backlog of work nobody does. ``HeraldQueueBacklogHigh`` reads ``queue_length`` only;
- ``redis_memory_usage_bytes{redis}``: ``INFO memory`` ``used_memory``.

Polled every ``HERALD_LAG_POLL_S`` (5 s), with a group-less consumer (ListOffsets) and the admin
client (OffsetFetch with the partitions named: Tansu cannot answer OffsetFetch for "all
partitions", the client fails to decode its answer), only by the tracker that holds the
provider-quality lease (:class:`services.tracker.quality.QualityPublisher`): every other tracker
exports none of these, so a sum over instances counts each topic once, and when the lease moves
the old holder clears its gauges. A broker or Redis that cannot be asked clears the gauges too:
no number is better than a stale one (alert on their absence, docs/observability.md). A group
whose committed offsets cannot be read (OffsetFetch fails for it: on Tansu, e.g., a group that
never existed) clears only its own topics' gauges; every other group's are still exported.

Which group consumes which topic is Herald's own wiring: the router (faust app id
``herald-router``) consumes ``notify.requests``, its retry relay (``herald-router-retry``) the
retry topics, each channel's sender (``herald-sender-<channel>``) its dispatch topic, the tracker
(``herald-tracker``) ``notify.events`` and ``notify.dlq``. ``notify.config`` and
``notify.provider-health`` are read whole by every router, without a group: they have no backlog.
A channel whose sender is not deployed shows every record of its dispatch topic as backlog, which
it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.events import Channel
from shared.kafka import Topics
from shared.metrics import CONSUMER_LAG, QUEUE_LENGTH, REDIS_MEMORY, RETRIES_WAITING
from shared.settings import Settings

log = logging.getLogger("herald.tracker.lag")

ROUTER_GROUP = "herald-router"  # services/router/app.py: the faust app's id is its group
RETRY_GROUP = "herald-router-retry"  # services/router/retry.py GROUP
TRACKER_GROUP = "herald-tracker"  # services/tracker/app.py


def sender_group(channel: Channel | str) -> str:
    return f"herald-sender-{Channel(channel).value}"  # services/senders/runner.py


def is_retry_topic(topic: str) -> bool:
    """A retry tier: its lag is attempts waiting for their delay, not a backlog (module docstring)."""
    return topic in Topics.RETRY


def consuming_groups() -> dict[str, str]:
    """Each topic with a backlog → the group that consumes it."""
    groups = {Topics.REQUESTS: ROUTER_GROUP, Topics.EVENTS: TRACKER_GROUP, Topics.DLQ: TRACKER_GROUP}
    groups.update({topic: RETRY_GROUP for topic in Topics.RETRY})
    groups.update({Topics.dispatch(c): sender_group(c) for c in Channel})
    return groups


@dataclass(frozen=True, slots=True)
class Lag:
    group: str
    topic: str
    records: int


def lags(
    groups: dict[str, str],
    partitions: dict[str, list[int]],
    first: dict[TopicPartition, int],
    end: dict[TopicPartition, int],
    committed: dict[TopicPartition, int],
) -> list[Lag]:
    """Each topic's lag summed over its partitions (pure: the numbers the brokers gave). A
    partition the group committed nothing on (-1, or absent) counts from its first offset, and so
    does one whose committed offset is below the first (retention deleted records the group never
    read: it resumes at the first record there is)."""
    out: list[Lag] = []
    for topic, group in sorted(groups.items()):
        if topic not in partitions:
            continue
        total = 0
        for p in partitions[topic]:
            tp = TopicPartition(topic, p)
            last = end.get(tp, 0)
            done = committed.get(tp, -1)
            oldest = first.get(tp, 0)
            start = max(done, oldest) if done >= 0 else oldest
            total += max(last - start, 0)
        out.append(Lag(group, topic, total))
    return out


class BacklogExporter:
    """Polls lag and Redis memory while ``leading()`` says this tracker publishes."""

    def __init__(self, settings: Settings, redis: Redis, leading: Callable[[], bool]) -> None:
        self.settings = settings
        self.redis = redis
        self.leading = leading
        self.groups = consuming_groups()
        self.timeout_s = max(settings.kafka_request_timeout_s, 2.0)
        kwargs = redis.connection_pool.connection_kwargs
        self.redis_label = f"{kwargs.get('host', 'unix')}:{kwargs.get('port', '')}/{kwargs.get('db', 0)}"
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._exported = False
        self._failing: set[str] = set()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            if self.leading():
                try:
                    await self.poll()
                except Exception:  # metrics must never end the tracker's folding
                    log.exception("backlog metrics not read")
                    self.clear()
                    await self._close()
            elif self._exported:
                self.clear()
                await self._close()  # its connections are for the leader only
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.lag_poll_s)
        self.clear()
        await self._close()

    async def poll(self) -> None:
        """One look at the brokers and Redis; never raises (each part clears its gauges when it
        cannot be read, and logs once until it can again)."""
        self._exported = True
        try:
            found = await asyncio.wait_for(self.read_lags(), 3 * self.timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            self._failed("kafka", exc)
            CONSUMER_LAG.clear()
            QUEUE_LENGTH.clear()
            RETRIES_WAITING.clear()
            await self._close()  # a fresh connection next time
        else:
            self._recovered("kafka")
            self._set_lags(found)
        try:
            info = await asyncio.wait_for(self.redis.info("memory"), self.timeout_s)
            REDIS_MEMORY.labels(self.redis_label).set(float(info["used_memory"]))
            self._recovered("redis")
        except (RedisError, OSError, TimeoutError, KeyError, ValueError) as exc:
            self._failed("redis", exc)
            REDIS_MEMORY.clear()

    async def read_lags(self) -> list[Lag]:
        consumer, admin = await self._clients()
        existing = await consumer.topics()  # refreshes the metadata
        partitions = {t: sorted(consumer.partitions_for_topic(t) or []) for t in self.groups if t in existing}
        partitions = {t: ps for t, ps in partitions.items() if ps}
        tps = [TopicPartition(t, p) for t, ps in partitions.items() for p in ps]
        if not tps:
            return []
        end = await consumer.end_offsets(tps)
        first = await consumer.beginning_offsets(tps)
        committed: dict[TopicPartition, int] = {}
        by_group: dict[str, list[TopicPartition]] = {}
        for tp in tps:
            by_group.setdefault(self.groups[tp.topic], []).append(tp)
        unread: dict[str, Exception] = {}
        for group, wanted in by_group.items():
            try:
                offsets = await admin.list_consumer_group_offsets(group, partitions=wanted)
            except Exception as exc:  # noqa: BLE001 - this group only (a broker error, or the client's decoding)
                unread[group] = exc
                self._failed(f"group {group}", exc)
                continue
            self._recovered(f"group {group}")
            committed.update({tp: meta.offset for tp, meta in offsets.items()})
        if unread and len(unread) == len(by_group):
            raise next(iter(unread.values()))  # nothing read: as if the broker could not be asked
        # A group whose offsets could not be read: its topics are left out (their gauges cleared
        # by _set_lags), every other group's are exported.
        readable = {t: g for t, g in self.groups.items() if g not in unread}
        return lags(readable, partitions, first, end, committed)

    def _set_lags(self, found: list[Lag]) -> None:
        seen = {(lag.group, lag.topic) for lag in found}
        for labels in [tuple(s.labels.values()) for m in CONSUMER_LAG.collect() for s in m.samples]:
            if labels not in seen:  # a topic that disappeared (a broker restarted empty)
                with contextlib.suppress(KeyError):
                    CONSUMER_LAG.remove(*labels)
                with contextlib.suppress(KeyError):
                    (RETRIES_WAITING if is_retry_topic(labels[1]) else QUEUE_LENGTH).remove(labels[1])
        for lag in found:
            CONSUMER_LAG.labels(lag.group, lag.topic).set(lag.records)
            (RETRIES_WAITING if is_retry_topic(lag.topic) else QUEUE_LENGTH).labels(lag.topic).set(lag.records)

    def clear(self) -> None:
        CONSUMER_LAG.clear()
        QUEUE_LENGTH.clear()
        RETRIES_WAITING.clear()
        REDIS_MEMORY.clear()
        self._exported = False

    async def _clients(self) -> tuple[AIOKafkaConsumer, AIOKafkaAdminClient]:
        if self._consumer is None or self._admin is None:
            timeout_ms = int(self.settings.kafka_request_timeout_s * 1000)
            name = f"herald-{self.settings.service_name}-lag"
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.settings.bootstrap_servers, group_id=None, enable_auto_commit=False,
                request_timeout_ms=timeout_ms, client_id=name,
            )  # fmt: skip
            admin = AIOKafkaAdminClient(
                bootstrap_servers=self.settings.bootstrap_servers, request_timeout_ms=timeout_ms, client_id=name
            )
            self._consumer, self._admin = consumer, admin
            await consumer.start()
            await admin.start()
        return self._consumer, self._admin

    async def _close(self) -> None:
        consumer, admin = self._consumer, self._admin
        self._consumer = self._admin = None
        for client in (consumer, admin):
            if client is not None:
                with contextlib.suppress(KafkaError, OSError, TimeoutError):
                    await asyncio.wait_for(client.stop() if client is consumer else client.close(), 3)

    def _failed(self, what: str, exc: BaseException) -> None:
        if what not in self._failing:
            log.warning("%s not read for the backlog metrics (%s); their gauges are cleared", what,
                        exc.__class__.__name__)  # fmt: skip
            self._failing.add(what)

    def _recovered(self, what: str) -> None:
        if what in self._failing:
            log.info("%s read again for the backlog metrics", what)
            self._failing.discard(what)
