"""A small HTTP server for the workers: /health, /health/live, /health/ready, /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import orjson
from aiohttp import web

from shared.metrics import render_latest

Check = Callable[[], Awaitable[None]]


async def run_checks(checks: dict[str, Check], timeout: float = 2.0) -> tuple[bool, dict[str, str]]:
    """Run every check concurrently; a check passes when it returns without raising."""

    async def one(check: Check) -> str:
        try:
            await asyncio.wait_for(check(), timeout)
            return "ok"
        except TimeoutError:
            return "error: timed out"
        except Exception as exc:  # a check reports any failure, it never raises
            return f"error: {exc.__class__.__name__}: {exc}"[:200]

    results = await asyncio.gather(*(one(c) for c in checks.values()))
    components = dict(zip(checks, results, strict=True))
    return all(r == "ok" for r in results), components


def readiness_body(ok: bool, components: dict[str, str]) -> dict:
    return {
        "status": "ready" if ok else "not_ready",
        "components": components,
        "failed": [name for name, r in components.items() if r != "ok"],
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


class HealthServer:
    """Serves the health endpoints of a worker on its own port."""

    def __init__(self, host: str, port: int, checks: dict[str, Check]) -> None:
        self.host, self.port, self.checks = host, port, checks
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/health/live", self._live)
        app.router.add_get("/health/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    @staticmethod
    def _json(body: dict, status: int = 200) -> web.Response:
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")

    async def _health(self, _: web.Request) -> web.Response:
        return self._json({"status": "healthy"})

    async def _live(self, _: web.Request) -> web.Response:
        return self._json({"status": "alive"})

    async def _ready(self, _: web.Request) -> web.Response:
        ok, components = await run_checks(self.checks)
        return self._json(readiness_body(ok, components), 200 if ok else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        body, content_type = render_latest()
        return web.Response(body=body, headers={"Content-Type": content_type})
