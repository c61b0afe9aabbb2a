"""Readiness follows the backing servers: Redis stopped → 503 naming it; back → 200."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.conftest import Pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]


async def _ready(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as c:
        return await c.get(f"{url}/health/ready")


async def _until(url: str, status: int, timeout: float = 20) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = await _ready(url)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.2)


async def test_ready_is_503_naming_redis_while_it_is_down(pipeline: Pipeline) -> None:
    """The sender needs Redis: 503 naming it. Ingest runs with HERALD_DEDUP_FAIL_OPEN and
    HERALD_RATE_LIMIT_FAIL_OPEN on (the defaults), so it keeps serving without Redis: it stays
    ready and reports Redis as degraded (a fail-closed ingest: tests/unit/test_ingest_readiness.py)."""
    ingest = pipeline.ingest_url
    sender = f"http://127.0.0.1:{pipeline.services['sender-email'].port}"
    assert (await _ready(ingest)).status_code == 200
    pipeline.backing.redis.stop()
    try:
        r = await _until(sender, 503)
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["status"] == "not_ready"
        assert body["failed"] == ["redis"]
        assert body["components"]["redis"].startswith("error")
        deadline = time.monotonic() + 20
        while True:
            r = await _ready(ingest)
            body = r.json()
            if body["components"]["redis"].startswith("error") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert r.status_code == 200, r.text
        assert body["status"] == "ready"
        assert body["components"]["redis"].startswith("error")
        assert body["degraded"] == ["redis"] and body["failed"] == []
        assert body["components"]["database"] == "ok"
    finally:
        pipeline.backing.restart_redis()
    for url in (ingest, sender):
        r = await _until(url, 200)
        assert r.status_code == 200, r.text
        assert r.json()["components"]["redis"] == "ok"
