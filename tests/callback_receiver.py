"""The HTTP receiver of the status callback tests (tests/integration/test_callbacks.py,
tests/e2e/test_callbacks.py): a real aiohttp server in the test's process, on the loopback, that
records every request and answers as a test planned for the path: statuses in turn, slowly, a body
trickled or flooded, a redirect."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from devstack import servers


@dataclass
class Got:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float  # time.time() when it arrived

    @property
    def json(self) -> dict:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """Answers ``ok`` (200 or 204), unless the path is planned otherwise."""

    ok: int = 200
    port: int = field(default_factory=servers.free_port)
    got: list[Got] = field(default_factory=list)
    queries: dict[str, list[str]] = field(default_factory=dict)  # path -> each request's query string
    # path -> the statuses of its next requests, one each
    plan: dict[str, list[int]] = field(default_factory=dict)
    # path -> seconds to wait before answering
    slow: dict[str, float] = field(default_factory=dict)
    # path -> the next request answers 200 at once, then trickles its body, a byte every 0.1 s, for
    # this many seconds: no read of it ever waits long (httpx's own timeouts never trip)
    trickle: dict[str, float] = field(default_factory=dict)
    # path -> its requests answer 200 and a body of 64 KB chunks, as fast as it is read, for this
    # many seconds or until the client hangs up; flooded[path] counts the bytes written
    flood: dict[str, float] = field(default_factory=dict)
    flooded: dict[str, int] = field(default_factory=dict)
    # path -> its requests answer 302 to this location
    redirect: dict[str, str] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str, message_id: str | None = None) -> list[Got]:
        return [
            g for g in self.got if g.path == path and (message_id is None or g.json["data"]["message_id"] == message_id)
        ]

    async def wait(self, path: str, message_id: str, count: int = 1, timeout: float = 20) -> list[Got]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.at(path, message_id)
            if len(found) >= count:
                return found
            await asyncio.sleep(0.05)
        raise AssertionError(f"{path} got {len(self.at(path, message_id))} callbacks of {message_id}, not {count}")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        body = await request.read()
        self.got.append(Got(path, {k.lower(): v for k, v in request.headers.items()}, body, time.time()))
        self.queries.setdefault(path, []).append(request.query_string)
        if path in self.trickle:
            return await self._stream(request, path, self.trickle.pop(path), b" ", 0.1)
        if path in self.flood:
            return await self._stream(request, path, self.flood[path], b"x" * 65536, 0.0)
        if path in self.redirect:
            return web.Response(status=302, headers={"Location": self.redirect[path]})
        if path in self.slow:
            await asyncio.sleep(self.slow[path])
        planned = self.plan.get(path)
        return web.Response(status=planned.pop(0) if planned else self.ok)

    async def _stream(self, request: web.Request, path: str, seconds: float, chunk: bytes,
                      pause: float) -> web.StreamResponse:  # fmt: skip
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        end = time.monotonic() + seconds
        with contextlib.suppress(ConnectionError):  # the client hung up
            while time.monotonic() < end:
                await response.write(chunk)
                self.flooded[path] = self.flooded.get(path, 0) + len(chunk)
                await asyncio.sleep(pause)
            await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def receiving(ok: int = 200) -> AsyncIterator[Receiver]:
    """A :class:`Receiver` listening on 127.0.0.1 (every path, every method: a redirect followed
    as a GET would be heard too) for the block's length."""
    receiver = Receiver(ok=ok)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", receiver.port).start()
    try:
        yield receiver
    finally:
        await runner.cleanup()
