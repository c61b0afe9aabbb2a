"""Canary for a Tansu hazard (DESIGN.md): a fetch starting inside a record batch could skip the
batch in older builds. Commit mid-batch, restart the consumer, expect every later record."""

from __future__ import annotations

import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.conftest import Backing


async def test_resume_from_an_offset_inside_a_batch_loses_nothing(backing: Backing) -> None:
    topic = f"canary-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=backing.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 1, 1)])
    await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=backing.bootstrap, acks="all", linger_ms=50)
    await producer.start()
    futures = [await producer.send(topic, f"r{i}".encode()) for i in range(100)]  # one or a few batches
    await producer.flush()
    offsets = [(await f).offset for f in futures]
    await producer.stop()
    assert offsets == list(range(100))

    group = f"canary-{uuid.uuid4().hex[:8]}"
    tp = TopicPartition(topic, 0)
    common = dict(
        bootstrap_servers=backing.bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        rebalance_timeout_ms=3000,
        heartbeat_interval_ms=1000,
    )
    first = AIOKafkaConsumer(topic, **common)
    await first.start()
    seen: list[bytes] = []
    while len(seen) < 37:
        for records in (await first.getmany(timeout_ms=1000, max_records=37 - len(seen))).values():
            seen.extend(r.value for r in records)
    await first.commit({tp: 37})
    await first.stop()

    second = AIOKafkaConsumer(topic, **common)
    await second.start()
    rest: list[bytes] = []
    for _ in range(60):
        for records in (await second.getmany(timeout_ms=500)).values():
            rest.extend(r.value for r in records)
        if len(rest) >= 63:
            break
    await second.stop()
    assert rest == [f"r{i}".encode() for i in range(37, 100)]
