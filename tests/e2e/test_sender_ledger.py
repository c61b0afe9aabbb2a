"""What the sender does with a dispatch whose progress a previous sender left in Redis
(``herald:done:<dispatch_id>``, see services/senders/runner.py): each state a crash can leave
behind, set by hand, then the command delivered again."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from tests.conftest import Pipeline
from tests.e2e.helpers import by_message_id, dispatch_command, wait_for_mail

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

DEAD_OWNER = "gone-host:1:0000dead"  # no herald:sender:alive:<owner> key: a dead sender


def _command(message_id: str, marker: str) -> bytes:
    command = dispatch_command(message_id, "ledger@example.com", f"ledger {marker}", "left behind by a crash")
    return orjson.dumps(command)


async def _event(db: asyncpg.Pool, event_id: str, timeout: float = 20) -> asyncpg.Record:
    deadline = time.monotonic() + timeout
    while True:
        row = await db.fetchrow("SELECT * FROM message_events WHERE event_id = $1", event_id)
        if row is not None or time.monotonic() > deadline:
            assert row is not None, f"no event {event_id}"
            return row
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("left", "sent_again", "detail"),
    [
        pytest.param(b"claim:" + DEAD_OWNER.encode(), True, None, id="claimed-by-a-dead-sender"),
        pytest.param(b"handed:" + DEAD_OWNER.encode(), False, "unconfirmed", id="handed-over-by-a-dead-sender"),
        pytest.param(b"1:sent", False, "replayed", id="done-and-committed"),
    ],
)
async def test_state_left_by_a_crash(
    pipeline: Pipeline, db: asyncpg.Pool, producer: AIOKafkaProducer, left: bytes, sent_again: bool, detail: str
) -> None:
    marker = uuid.uuid4().hex[:16]
    message_id = f"msg_{time.strftime('%Y%m%d', time.gmtime())}_{marker}"
    redis = Redis.from_url(pipeline.backing.redis_url)
    try:
        await redis.set(f"herald:done:{message_id}:1", left, ex=600)
    finally:
        await redis.aclose()
    key = b"default:ledger@example.com"
    await producer.send_and_wait("notify.dispatch.email", _command(message_id, marker), key=key)
    # A canary on the same partition, after it: once the canary arrives, the first was handled.
    canary = f"msg_{time.strftime('%Y%m%d', time.gmtime())}_{uuid.uuid4().hex[:16]}"
    await producer.send_and_wait("notify.dispatch.email", _command(canary, f"canary {marker}"), key=key)
    await wait_for_mail(pipeline, by_message_id(canary))
    event = await _event(db, f"{message_id}:1:sent")
    await asyncio.sleep(0.5)
    copies = sum(1 for m in list(pipeline.backing.smtp.messages) if by_message_id(message_id)(m))
    assert copies == (1 if sent_again else 0)
    if detail:
        assert orjson.loads(event["detail"])[detail] is True
