"""Health endpoints (seed 004 §3.4.3) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from services.ingest.deps import services_of
from services.ingest.http import JSONResponse
from shared.health import readiness_body, run_checks
from shared.metrics import render_latest

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> JSONResponse:
    return JSONResponse({"status": "healthy"})


@router.get("/health/live")
async def live() -> JSONResponse:
    return JSONResponse({"status": "alive"})


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    """200 when PostgreSQL, Kafka and (see below) Redis answer; 503 naming the ones that do not.

    Redis is required only when ingest refuses requests without it: with both
    ``HERALD_DEDUP_FAIL_OPEN`` and ``HERALD_RATE_LIMIT_FAIL_OPEN`` on (the defaults), ingest
    accepts requests with Redis down, so a Redis outage must not take every replica out of the
    Service (Kubernetes readiness). Its status is still reported (``components.redis``, and
    ``degraded: ["redis"]`` while it fails); with either setting off it fails readiness."""
    services = services_of(request)
    settings = services.settings
    redis_required = not (settings.dedup_fail_open and settings.rate_limit_fail_open)

    async def database() -> None:
        async with services.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")

    async def redis() -> None:
        await services.redis.ping()

    async def kafka() -> None:
        await services.producer.client.fetch_all_metadata()

    _, components = await run_checks({"database": database, "redis": redis, "kafka": kafka})
    optional = set() if redis_required else {"redis"}
    ok = all(result == "ok" for name, result in components.items() if name not in optional)
    body = readiness_body(ok, components)
    degraded = [name for name in body["failed"] if name in optional]
    if degraded:
        body["failed"] = [name for name in body["failed"] if name not in optional]
        body["degraded"] = degraded
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics() -> Response:
    body, content_type = render_latest()
    return Response(body, media_type=content_type)
