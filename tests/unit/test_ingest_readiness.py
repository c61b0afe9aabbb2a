"""Ingest's /health/ready and Redis: required only when a Redis-backed check is fail-closed
(HERALD_DEDUP_FAIL_OPEN / HERALD_RATE_LIMIT_FAIL_OPEN); otherwise reported, never failing."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI

from services.ingest.routes.health import router
from shared.settings import Settings


class _Conn:
    async def fetchval(self, _query: str) -> int:
        return 1


class _Pool:
    @contextlib.asynccontextmanager
    async def acquire(self, timeout: float | None = None):
        yield _Conn()


class _DownRedis:
    async def ping(self) -> None:
        raise ConnectionError("redis is down")


class _Client:
    async def fetch_all_metadata(self) -> None:
        return None


async def _ready(**settings: bool) -> httpx.Response:
    app = FastAPI()
    app.include_router(router)
    app.state.services = SimpleNamespace(
        settings=Settings.model_construct(**settings),
        pool=_Pool(),
        redis=_DownRedis(),
        producer=SimpleNamespace(client=_Client()),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as c:
        return await c.get("/health/ready")


async def test_redis_down_with_both_fail_open_stays_ready() -> None:
    r = await _ready(dedup_fail_open=True, rate_limit_fail_open=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready" and body["failed"] == [] and body["degraded"] == ["redis"]
    assert body["components"]["redis"].startswith("error")


@pytest.mark.parametrize("setting", ["dedup_fail_open", "rate_limit_fail_open"])
async def test_redis_down_with_a_fail_closed_setting_is_not_ready(setting: str) -> None:
    r = await _ready(**{"dedup_fail_open": True, "rate_limit_fail_open": True, setting: False})
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["status"] == "not_ready" and body["failed"] == ["redis"] and "degraded" not in body
