"""Providers' rate limits on a real Redis: messages over a limit are given later slots (waited
for, never dropped), exactly "count per window" however the messages arrive, per provider or per
recipient, shared by every sender that uses the same Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from redis.asyncio import Redis

from services.senders.base import Deferred
from services.senders.feishu.bot import FeishuBot
from services.senders.pacing import Pacer, limit_key
from services.senders.plugins.base import Costs, RateLimit
from services.senders.plugins.config import Configured
from services.senders.webhook.standard import StandardWebhook
from tests.conftest import Backing


@pytest.fixture
async def redis(backing: Backing) -> AsyncIterator[Redis]:
    client = Redis.from_url(backing.redis_url)
    yield client
    await client.aclose()


def _entry(limit: RateLimit | None, channel: str = "webhook") -> Configured:
    """A configured provider with the tenant's own ``limit`` on top of the vendor's (a webhook:
    the vendor sets none; Feishu: 100 a minute and 5 a second)."""
    if channel == "feishu":
        config = FeishuBot.Config.model_validate(
            {"webhook_url": "https://open.feishu.cn/open-apis/bot/v2/hook/0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e"}
        )
    else:
        config = StandardWebhook.Config.model_validate(
            {"url": "https://hooks.example.org/in", "secret": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
        )
    return Configured(
        id=int(uuid.uuid4().int % 1_000_000_000),
        tenant_id="default",
        channel=channel,
        provider=channel,
        name="hook",
        config=config,
        priority=1,
        weight=1,
        costs=Costs(default=Decimal("0.001")),
        rate_limit=limit,
        is_active=True,
        revision=1,
    )


async def _slot(pacer: Pacer, entry: Configured, to: str = "hook") -> float:
    """The moment (epoch seconds, local clock) of the slot one message is given."""
    return time.time() + await pacer.reserve(entry, to)


async def _reserve(pacer: Pacer, entry: Configured, to: str = "hook") -> float:
    """The wait one message is given, reserved without sleeping it."""
    return await pacer.reserve(entry, to)


async def test_a_burst_gets_count_slots_per_window_in_order(redis: Redis) -> None:
    pacer = Pacer(redis)
    entry = _entry(RateLimit(3, 2.0))
    waits = [await _reserve(pacer, entry) for _ in range(8)]
    # 3 at once, the next 3 when the first leave the 2 s window, then 2 more after another 2 s.
    assert waits[:3] == [0, 0, 0]
    assert all(1.9 <= w <= 2.0 for w in waits[3:6]), waits
    assert all(3.9 <= w <= 4.0 for w in waits[6:]), waits


async def test_no_window_ever_holds_more_than_count(redis: Redis) -> None:
    """Reserved times from two 'senders' (two Pacers on one Redis), arriving in waves."""
    a, b = Pacer(redis), Pacer(redis)
    entry = _entry(RateLimit(5, 1.0))
    slots = []
    for wave in range(4):
        slots += await asyncio.gather(*(_slot(p, entry) for p in [a, b] * 4))
        await asyncio.sleep(0.3 * wave)
    slots.sort()
    assert len(slots) == 32  # every message has a slot: none dropped
    for i in range(len(slots) - 5):  # (a few ms of slack: the local clock reads the answers)
        assert slots[i + 5] - slots[i] >= 0.98, (i, slots[i : i + 6])
    assert slots[-1] - slots[0] < 32 / 5 + 0.1  # and none later than needed


async def test_recipient_limits_are_separate_per_recipient(redis: Redis) -> None:
    pacer = Pacer(redis)
    entry = _entry(RateLimit(1, 1.0, scope="recipient"))
    first = [await _reserve(pacer, entry, to) for to in ("chat-a", "chat-b", "chat-c")]
    again = await _reserve(pacer, entry, "chat-a")
    assert first == [0, 0, 0]
    assert 0.9 <= again <= 1.0


async def test_wait_sleeps_until_the_slot(redis: Redis) -> None:
    pacer = Pacer(redis)
    entry = _entry(RateLimit(1, 0.4))
    started = time.monotonic()
    waited = [await pacer.wait(entry, "hook") for _ in range(3)]
    elapsed = time.monotonic() - started
    assert waited[0] == 0
    assert 0.3 <= waited[1] <= 0.4 and 0.3 <= waited[2] <= 0.4
    assert elapsed >= 0.7


async def test_without_redis_messages_go_at_once() -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        assert await Pacer(dead).wait(_entry(RateLimit(1, 60)), "hook") == 0
    finally:
        await dead.aclose()


async def test_a_wait_longer_than_the_maximum_is_retried_later_not_held(redis: Redis) -> None:
    pacer = Pacer(redis, max_wait_s=1.0)
    entry = _entry(RateLimit(1, 60.0))
    assert await pacer.wait(entry, "hook") == 0
    with pytest.raises(Deferred) as caught:
        await pacer.wait(entry, "hook")
    assert caught.value.code == 1007 and 58 <= caught.value.retry_after <= 60, caught.value.message
    # Nothing was reserved for it: the next message is told the same, not a minute later still.
    with pytest.raises(Deferred) as again:
        await pacer.wait(entry, "hook")
    assert again.value.retry_after <= caught.value.retry_after


async def test_several_limits_are_reserved_together_and_each_holds(redis: Redis) -> None:
    """Feishu's 100 a minute and 5 a second: 120 messages at once get times (reserved, not
    slept) that keep both, each at the latest time its limits allow and in both logs."""
    pacer = Pacer(redis, max_wait_s=120)
    entry = _entry(None, "feishu")
    slots = sorted([await _slot(pacer, entry) for _ in range(120)])
    for i in range(len(slots) - 5):
        assert slots[i + 5] - slots[i] >= 0.99, (i, slots[i : i + 6])
    for i in range(len(slots) - 100):
        assert slots[i + 100] - slots[i] >= 59.9, i
    assert 19 <= slots[99] - slots[0] <= 20.5  # 5 a second: the 100th after ~19 s, not later


async def test_a_deferred_message_reserves_in_no_log(redis: Redis) -> None:
    pacer = Pacer(redis, max_wait_s=0.5)
    entry = _entry(RateLimit(2, 60.0), "feishu")  # Feishu's two limits and the tenant's 2 a minute
    assert [await pacer.reserve(entry, "bot") for _ in range(2)] == [0, 0]
    with pytest.raises(Deferred):
        await pacer.reserve(entry, "bot")  # the tenant's limit has no slot within 0.5 s
    logs = [limit_key(entry, limit, i, "bot") for i, limit in enumerate(entry.limits())]
    assert [await redis.zcard(key) for key in logs] == [2, 2, 2]
