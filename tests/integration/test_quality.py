"""Provider quality on a real Redis (and a real Tansu for the records): tries counted once per
event, the window's statistics, the breaker opening, closing and opening again across ticks, one
publisher at a time, and the tracker counting what it folds (services/tracker/quality.py).

Each test has its own key prefix and provider ids; times are explicit (``tick(now=...)``)."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord
from redis.asyncio import Redis

from services.tracker.app import Tracker
from services.tracker.quality import QualityBook, QualityKeys, QualityPublisher
from shared.db import apply_migrations, create_pool
from shared.events import EventV1, ProviderHealthV1, State
from shared.kafka import Topics
from shared.routing import health_identity
from shared.settings import Settings
from tests.conftest import Backing

SETTINGS = Settings(
    quality_window_s=30,
    quality_bucket_s=1,
    quality_tick_s=0.2,
    quality_refresh_s=5,
    breaker_failures=5,
    breaker_error_rate=0.5,
    breaker_min_samples=10,
    breaker_cooldown_s=3,
)
_ids = itertools.count(int(uuid.uuid4().int % 10**9) * 1000)


@pytest.fixture
async def redis(backing: Backing) -> AsyncIterator[Redis]:
    client = Redis.from_url(backing.redis_url)
    yield client
    await client.aclose()


class Captured:
    """A publish callable that keeps what it is given (key, record), as the broker would."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes, ProviderHealthV1]] = []

    async def __call__(self, key: bytes, value: bytes) -> None:
        self.records.append((key, ProviderHealthV1.model_validate(orjson.loads(value))))

    def of(self, provider_id: int) -> list[ProviderHealthV1]:
        return [r for k, r in self.records if k == health_identity(provider_id).encode()]


def utcnow() -> datetime:
    """Now to the millisecond, as breakers are stored."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def keys() -> QualityKeys:
    return QualityKeys(prefix=f"test-{uuid.uuid4().hex[:10]}")


def try_event(provider_id: int, ok: bool, at: datetime, *, ms: float | None = 120.0, **detail: Any) -> EventV1:
    """A sender's event of one try (the senders' contract)."""
    info: dict[str, Any] = {"provider_id": provider_id, **detail}
    if ok and ms is not None:
        info["provider_ms"] = ms
    if not ok:
        info.setdefault("provider_fault", True)
    return EventV1(
        event_id=f"msg_{uuid.uuid4().hex[:12]}:1:{'sent' if ok else 'retrying'}",
        message_id=f"msg_{uuid.uuid4().hex[:12]}",
        tenant_id="acme",
        state=State.SENT if ok else State.RETRYING,
        attempt=1,
        occurred_at=at,
        service="sender-sms",
        channel="sms",
        provider="aliyun",
        detail=info,
    )


async def test_ten_successes_make_a_healthy_provider_and_redelivery_counts_once(redis: Redis) -> None:
    k, pid, now = keys(), next(_ids), utcnow()
    book = QualityBook(redis, SETTINGS, k)
    events = [try_event(pid, True, now - timedelta(seconds=10 - i), ms=40.0 + 20 * i) for i in range(10)]
    assert await book.record(events) == 10
    # The same batch again (a redelivery), and the same events within another batch.
    assert await book.record(events) == 0
    assert await book.record([*events[:3], try_event(pid, True, now, ms=45.0)]) == 1

    sent = Captured()
    publisher = QualityPublisher(redis, SETTINGS, sent, owner="a", keys=k)
    [record] = await publisher.tick(now=now + timedelta(seconds=0.5))
    assert sent.of(pid) == [record]
    assert (record.provider_id, record.identity, record.provider, record.channel) == (pid, f"provider:{pid}",
                                                                                      "aliyun", "sms")  # fmt: skip
    assert (record.tenant_id, record.state, record.breaker, record.failures) == ("acme", "healthy", "closed", 0)
    assert (record.samples, record.success_rate) == (11, 1.0)
    # 11 answers of 40..220 ms: the 95th percentile is in the bucket up to 300 ms.
    assert record.p95_ms == 300.0
    assert (record.cooldown_s, record.window_s) == (3.0, 30.0)


async def test_nothing_changed_is_published_again_only_after_the_refresh(redis: Redis) -> None:
    k, pid, now = keys(), next(_ids), utcnow()
    await QualityBook(redis, SETTINGS, k).record([try_event(pid, True, now)])
    sent = Captured()
    publisher = QualityPublisher(redis, SETTINGS, sent, owner="a", keys=k)
    assert len(await publisher.tick(now=now)) == 1
    assert await publisher.tick(now=now + timedelta(seconds=1)) == []
    assert await publisher.tick(now=now + timedelta(seconds=4.7)) == []
    # Refreshed by the last tick before the record would be older than the refresh (5 s).
    assert len(await publisher.tick(now=now + timedelta(seconds=4.9))) == 1
    assert await publisher.tick(now=now + timedelta(seconds=5)) == []
    # Out of the window: its samples drop to 0 (a change, published), then no more refreshes.
    [gone] = await publisher.tick(now=now + timedelta(seconds=32))
    assert gone.samples == 0 and gone.success_rate is None
    assert await publisher.tick(now=now + timedelta(seconds=45)) == []
    # Two windows without a try: forgotten.
    assert await publisher.tick(now=now + timedelta(seconds=61)) == []
    assert await redis.zscore(k.index, str(pid)) is None


async def test_the_breaker_opens_closes_and_opens_again(redis: Redis) -> None:
    k, pid, now = keys(), next(_ids), utcnow() - timedelta(seconds=20)
    book = QualityBook(redis, SETTINGS, k)
    sent = Captured()
    publisher = QualityPublisher(redis, SETTINGS, sent, owner="a", keys=k)

    # Three successes, then four faults: not yet.
    await book.record([try_event(pid, True, now + timedelta(seconds=i * 0.1)) for i in range(3)])
    await book.record([try_event(pid, False, now + timedelta(seconds=1 + i * 0.1)) for i in range(4)])
    [record] = await publisher.tick(now=now + timedelta(seconds=2))
    assert (record.breaker, record.failures, record.samples, record.success_rate) == ("closed", 4, 7, 0.4286)

    # The fifth in a row opens it.
    await book.record([try_event(pid, False, now + timedelta(seconds=2.5))])
    opened_at = now + timedelta(seconds=3)
    [record] = await publisher.tick(now=opened_at)
    assert (record.breaker, record.state, record.opened_at) == ("open", "disabled", opened_at)
    assert record.reason == "5 consecutive failures" and record.failures == 5

    # A fault that was on its way (within the cooldown) changes nothing but the count.
    await book.record([try_event(pid, False, opened_at + timedelta(seconds=1))])
    [record] = await publisher.tick(now=opened_at + timedelta(seconds=2))
    assert (record.breaker, record.opened_at, record.failures) == ("open", opened_at, 6)

    # Nor does a success that was on its way: only a probe (after the cooldown) closes it.
    await book.record([try_event(pid, True, opened_at + timedelta(seconds=1.5))])
    [record] = await publisher.tick(now=opened_at + timedelta(seconds=2.5))
    assert (record.breaker, record.opened_at, record.failures) == ("open", opened_at, 0)
    await book.record([try_event(pid, False, opened_at + timedelta(seconds=2.6))])
    [record] = await publisher.tick(now=opened_at + timedelta(seconds=2.8))
    assert (record.breaker, record.opened_at, record.failures) == ("open", opened_at, 1)

    # A failed probe after the cooldown opens it again from now.
    await book.record([try_event(pid, False, opened_at + timedelta(seconds=3.5))])
    reopened_at = opened_at + timedelta(seconds=4)
    [record] = await publisher.tick(now=reopened_at)
    assert (record.breaker, record.opened_at) == ("open", reopened_at)
    assert record.reason == "probe failed; 2 consecutive failures"

    # A probe that gets through closes it; the statistics start afresh.
    await book.record([try_event(pid, True, reopened_at + timedelta(seconds=3.5), ms=80.0)])
    closed_at = reopened_at + timedelta(seconds=4)
    [record] = await publisher.tick(now=closed_at)
    assert (record.breaker, record.state, record.opened_at, record.reason) == ("closed", "healthy", None, None)
    assert (record.samples, record.success_rate, record.failures) == (0, None, 0)

    # Tries after the close are counted from the next bucket on; the old faults are not.
    later = closed_at + timedelta(seconds=2)
    await book.record([try_event(pid, True, later + timedelta(seconds=i * 0.05)) for i in range(4)])
    [record] = await publisher.tick(now=later + timedelta(seconds=1))
    assert (record.breaker, record.samples, record.success_rate) == ("closed", 4, 1.0)

    # The breaker lives in Redis: another publisher (the next leader) continues it.
    await publisher.release()
    other = Captured()
    successor = QualityPublisher(redis, SETTINGS, other, owner="b", keys=k)
    [record] = await successor.tick(now=later + timedelta(seconds=1.5))
    assert (record.breaker, record.samples) == ("closed", 4)


async def test_an_open_breaker_is_refreshed_while_its_provider_gets_no_tries(redis: Redis) -> None:
    # Routers take a record older than 4 x quality_refresh_s for unknown (and route to it as to a
    # provider without data): an open breaker's record must not age, however long it gets no try.
    k, now = keys(), utcnow()
    broken, idle = next(_ids), next(_ids)
    book = QualityBook(redis, SETTINGS, k)
    await book.record([*(try_event(broken, False, now) for _ in range(5)), try_event(idle, True, now)])
    sent = Captured()
    publisher = QualityPublisher(redis, SETTINGS, sent, owner="a", keys=k)
    assert {r.provider_id: r.breaker for r in await publisher.tick(now=now)} == {broken: "open", idle: "closed"}
    for second in range(5, 180, 5):
        await publisher.tick(now=now + timedelta(seconds=second))
    # Two windows (60 s) without a try: the idle one is forgotten, the broken one is not.
    assert await redis.zscore(k.index, str(idle)) is None
    assert await redis.zscore(k.index, str(broken)) is not None
    times = [r.occurred_at for r in sent.of(broken)]
    assert all(r.breaker == "open" and r.opened_at == now for r in sent.of(broken))
    assert times[-1] >= now + timedelta(seconds=170)
    assert max((b - a).total_seconds() for a, b in itertools.pairwise(times)) <= SETTINGS.quality_refresh_s
    # Its first try in a while, a failed probe, opens it again (its breaker was kept).
    await book.record([try_event(broken, False, now + timedelta(seconds=180))], now=now + timedelta(seconds=180))
    [record] = await publisher.tick(now=now + timedelta(seconds=181))
    assert (record.breaker, record.opened_at) == ("open", now + timedelta(seconds=181))


async def test_a_provider_whose_facts_expired_is_forgotten_even_with_an_open_breaker(redis: Redis) -> None:
    k, pid, now = keys(), next(_ids), utcnow()
    await QualityBook(redis, SETTINGS, k).record([try_event(pid, False, now) for _ in range(5)])
    publisher = QualityPublisher(redis, SETTINGS, Captured(), owner="a", keys=k)
    [record] = await publisher.tick(now=now)
    assert record.breaker == "open"
    await redis.delete(k.facts(pid))  # a week without a try: nothing left to name it by
    assert await publisher.tick(now=now + timedelta(seconds=61)) == []
    assert await redis.zscore(k.index, str(pid)) is None
    assert await redis.hexists(k.breakers, str(pid))  # kept: a try that brings it back finds it


async def test_an_error_rate_over_enough_tries_opens_it(redis: Redis) -> None:
    k, pid, now = keys(), next(_ids), utcnow() - timedelta(seconds=5)
    book = QualityBook(redis, SETTINGS, k)
    # Alternating: never 5 faults in a row, but 6 of 12 tries fail.
    events = [try_event(pid, i % 2 == 1, now + timedelta(seconds=i * 0.1)) for i in range(12)]
    assert await book.record(events) == 12
    publisher = QualityPublisher(redis, SETTINGS, Captured(), owner="a", keys=k)
    [record] = await publisher.tick(now=now + timedelta(seconds=2))
    assert (record.breaker, record.samples, record.success_rate) == ("open", 12, 0.5)
    assert record.reason == "error rate 50% over 12 tries"


async def test_failures_that_are_not_the_providers_and_waits_are_not_counted(redis: Redis) -> None:
    k, pid, now = keys(), next(_ids), utcnow()
    book = QualityBook(redis, SETTINGS, k)
    events = [
        try_event(pid, False, now, provider_fault=False),  # a refused recipient
        try_event(pid, False, now, deferred=True),  # a rate-limit wait
        try_event(pid, True, now - timedelta(seconds=31)),  # older than the window
        try_event(pid, True, now, ms=None),  # counted, but not timed
    ]
    assert await book.record(events) == 1
    [record] = await QualityPublisher(redis, SETTINGS, Captured(), owner="a", keys=k).tick(now=now)
    assert (record.samples, record.success_rate, record.p95_ms, record.failures) == (1, 1.0, None, 0)


async def test_only_the_lease_holder_publishes(redis: Redis) -> None:
    k, now = keys(), utcnow()
    pids = [next(_ids) for _ in range(3)]
    await QualityBook(redis, SETTINGS, k).record([try_event(p, True, now) for p in pids])
    first_sent, second_sent = Captured(), Captured()
    first = QualityPublisher(redis, SETTINGS, first_sent, owner="tracker-1", keys=k)
    second = QualityPublisher(redis, SETTINGS, second_sent, owner="tracker-2", keys=k)
    for _ in range(3):
        await asyncio.gather(first.tick(now=now), second.tick(now=now))
    assert sorted(r.provider_id for _, r in first_sent.records) == sorted(pids)
    assert second_sent.records == [] and first.leading and not second.leading
    assert await redis.get(k.leader) == b"tracker-1"

    # The leader stops (gives the lease up): the other takes over and publishes everything once.
    await first.release()
    assert len(await second.tick(now=now + timedelta(seconds=1))) == 3
    assert await first.tick(now=now + timedelta(seconds=1)) == []
    # A leader that stops renewing loses the lease when it runs out.
    await redis.pexpire(k.leader, 1)
    await asyncio.sleep(0.05)
    assert len(await first.tick(now=now + timedelta(seconds=2))) == 3
    assert await second.tick(now=now + timedelta(seconds=2)) == [] and not second.leading


async def test_the_loop_publishes_and_gives_the_lease_up_when_stopped(redis: Redis) -> None:
    k, pid = keys(), next(_ids)
    await QualityBook(redis, SETTINGS, k).record([try_event(pid, True, utcnow())])
    sent = Captured()
    publisher = QualityPublisher(redis, SETTINGS, sent, owner="loop", keys=k)
    task = asyncio.create_task(publisher.run())
    for _ in range(50):
        if sent.records:
            break
        await asyncio.sleep(0.05)
    publisher.stop()
    await asyncio.wait_for(task, 3)
    assert [r.provider_id for r in sent.of(pid)] == [pid]
    assert await redis.get(k.leader) is None and not publisher.leading


async def test_records_reach_a_compacted_topic_keyed_by_identity(backing: Backing, redis: Redis) -> None:
    topic = f"health-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=backing.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=backing.bootstrap, acks="all")
    await producer.start()

    async def publish(key: bytes, value: bytes) -> None:  # as the tracker's, on a topic of this test
        await asyncio.wait_for(producer.send_and_wait(topic, value, key=key), 10)

    k, pid, now = keys(), next(_ids), utcnow()
    try:
        await QualityBook(redis, SETTINGS, k).record([try_event(pid, False, now) for _ in range(5)])
        [record] = await QualityPublisher(redis, SETTINGS, publish, owner="a", keys=k).tick(now=now)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=backing.bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        found = []
        for _ in range(20):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found.extend(records)
            if found:
                break
    finally:
        await consumer.stop()
    [message] = found
    assert message.key == f"provider:{pid}".encode()
    read = ProviderHealthV1.model_validate_json(message.value)
    assert read == record and read.breaker == "open" and read.reason == "5 consecutive failures"


async def test_redis_away_does_not_stop_the_counting_caller(backing: Backing) -> None:
    from devstack import servers

    away = Redis.from_url(f"redis://127.0.0.1:{servers.free_port()}/0", socket_connect_timeout=0.5)
    try:
        assert await QualityBook(away, SETTINGS).record([try_event(next(_ids), True, utcnow())]) == 0
    finally:
        await away.aclose()


async def test_the_tracker_counts_the_tries_it_folds(backing: Backing, redis: Redis) -> None:
    await asyncio.to_thread(apply_migrations, backing.dsn)
    pool: asyncpg.Pool = await create_pool(Settings(database_url=backing.dsn, db_pool_min=1, db_pool_max=2))
    k, pid, now = keys(), next(_ids), utcnow()
    tracker = Tracker(SETTINGS, pool, None, None, QualityBook(redis, SETTINGS, k))  # type: ignore[arg-type]
    events = [try_event(pid, True, now), try_event(pid, False, now), try_event(pid, False, now, provider_fault=False)]
    records = [
        ConsumerRecord(Topics.EVENTS, 0, i, 0, 0, e.message_id.encode(), e.to_bytes(), None, 0, 0, [])
        for i, e in enumerate(events)
    ]
    try:
        await tracker.fold(records)
        await tracker.fold(records)  # the batch read again
        stored = await pool.fetchval("SELECT count(*) FROM message_events WHERE event_id = ANY($1)",
                                     [e.event_id for e in events])  # fmt: skip
    finally:
        await pool.close()
    assert stored == 3
    [record] = await QualityPublisher(redis, SETTINGS, Captured(), owner="a", keys=k).tick(now=now)
    assert (record.samples, record.success_rate, record.failures) == (2, 0.5, 1)
