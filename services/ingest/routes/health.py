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
    """200 when PostgreSQL, Redis and Kafka all answer; 503 naming the ones that do not."""
    services = services_of(request)

    async def database() -> None:
        async with services.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")

    async def redis() -> None:
        await services.redis.ping()

    async def kafka() -> None:
        await services.producer.client.fetch_all_metadata()

    ok, components = await run_checks({"database": database, "redis": redis, "kafka": kafka})
    return JSONResponse(readiness_body(ok, components), status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics() -> Response:
    body, content_type = render_latest()
    return Response(body, media_type=content_type)
