"""The Lua scripts shared by services (shared/redis_scripts.py), on a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from shared.redis_scripts import RELEASE_IF_OWNER
from tests.conftest import Backing


@pytest.fixture
async def redis(backing: Backing) -> AsyncIterator[Redis]:
    client = Redis.from_url(backing.redis_url)
    yield client
    await client.aclose()


async def test_release_if_owner_drops_a_key_only_while_it_holds_our_value(redis: Redis) -> None:
    key = f"test-{uuid.uuid4().hex[:10]}:lease"
    release = redis.register_script(RELEASE_IF_OWNER)
    await redis.set(key, "tracker-2", px=10_000)
    assert await release(keys=[key], args=["tracker-1"]) == 0  # someone else's now: kept
    assert await redis.get(key) == b"tracker-2"
    assert await release(keys=[key], args=["tracker-2"]) == 1
    assert await redis.get(key) is None
    assert await release(keys=[key], args=["tracker-2"]) == 0  # gone already
