"""The retry relay on a real broker: a partition whose head record is not due yet waits without
holding back the other partitions, nothing is relayed before its time, and a relay restarted
while waiting relays the waiting record once, when due."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import timedelta

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.router.retry import RetryRelay
from shared.events import DispatchV1, utcnow
from tests.conftest import Backing


def _attempt(message_id: str, due_in: float) -> bytes:
    return DispatchV1(
        dispatch_id=f"{message_id}:2",
        message_id=message_id,
        tenant_id="default",
        channel="email",
        attempt=2,
        to=["retry@example.com"],
        subject="s",
        content="c",
        not_before=utcnow() + timedelta(seconds=due_in),
    ).to_bytes()


def _consumer(backing: Backing, topic: str, group: str | None) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=backing.bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        rebalance_timeout_ms=2000,
        heartbeat_interval_ms=500,
    )


async def _relaying(relay: RetryRelay) -> asyncio.Task:
    await relay.consumer.start()
    return asyncio.create_task(relay.run())


async def _stop(relay: RetryRelay, task: asyncio.Task) -> None:
    relay.stop()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    await relay.consumer.stop()


async def test_a_waiting_partition_holds_back_no_other_and_survives_a_restart(backing: Backing) -> None:
    run = uuid.uuid4().hex[:8]
    source, out, group = f"retry-{run}", f"relayed-{run}", f"relay-{run}"
    admin = AIOKafkaAdminClient(bootstrap_servers=backing.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(source, 2, 1), NewTopic(out, 1, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=backing.bootstrap, acks="all")
    await producer.start()
    # Partition 0: its head is due in 12 s, and a record behind it that is due at once must wait
    # for it (due order within a tier).
    await producer.send_and_wait(source, _attempt(f"late-{run}", 12), partition=0)
    await producer.send_and_wait(source, _attempt(f"behind-{run}", 0), partition=0)
    # Partition 1: a malformed record (to the dead-letter topic, not in the way), then one due.
    await producer.send_and_wait(source, b"{not a dispatch", partition=1)
    await producer.send_and_wait(source, _attempt(f"now-{run}", 0), partition=1)
    started = time.monotonic()

    reader = _consumer(backing, out, None)
    await reader.start()
    seen: dict[str, float] = {}

    async def read_until(count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(seen) < count and time.monotonic() < deadline:
            for records in (await reader.getmany(timeout_ms=300)).values():
                for r in records:
                    mid = orjson.loads(r.value)["message_id"]
                    assert mid not in seen, f"{mid} relayed twice"
                    seen[mid] = time.time()

    first = RetryRelay(_consumer(backing, source, group), producer, target=lambda channel: out)
    task = await _relaying(first)
    await read_until(1, 10)
    assert list(seen) == [f"now-{run}"], seen  # partition 1 went ahead of partition 0's wait
    # Partition 0 may come in a later fetch than partition 1: wait for the relay to reach it.
    for _ in range(100):
        if first.waiting:
            break
        await asyncio.sleep(0.05)
    assert first.waiting and all(tp.partition == 0 for tp in first.waiting)
    # Stopped while partition 0 waits; another relay of the group takes over.
    await _stop(first, task)
    second = RetryRelay(_consumer(backing, source, group), producer, target=lambda channel: out)
    task = await _relaying(second)
    try:
        await read_until(3, 30)
    finally:
        await _stop(second, task)
        await reader.stop()
        await producer.stop()
    assert list(seen) == [f"now-{run}", f"late-{run}", f"behind-{run}"]
    assert seen[f"late-{run}"] - started >= 12 - 0.5  # not before it was due (clock granularity)
