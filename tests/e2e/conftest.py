"""Fixtures every end-to-end module uses: an HTTP client on ingest, a PostgreSQL pool and a
plain Kafka producer, all against the session's pipeline."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from tests.conftest import Pipeline


@pytest.fixture(scope="session")
async def client(pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=pipeline.ingest_url, timeout=30, headers=pipeline.headers) as c:
        yield c


@pytest.fixture(scope="session")
async def db(pipeline: Pipeline) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(pipeline.backing.dsn, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def producer(pipeline: Pipeline) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=pipeline.backing.bootstrap, acks="all", enable_idempotence=False)
    await p.start()
    yield p
    await p.stop()
