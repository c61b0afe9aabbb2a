"""Local emulations of the vendors' HTTP APIs, for the provider tests and the pipeline tests.

Each emulator is an aiohttp server on 127.0.0.1 that implements one vendor's documented
endpoint: it checks what the real service checks (method and path, required headers, body
fields, the signature or token) and answers as the vendor documents, success or error. It
records every request it received (``calls``) so tests can assert the exact wire format, and
it can be told to misbehave like the real service does (``fail``, ``slow``), which the routing
tests (issue 10) use to make a provider fail, slow down and recover.

Writing one: subclass :class:`Emulator`, set ``routes`` (method, path pattern, handler) and
implement the handlers ``async def handler(self, request, call) -> web.StreamResponse``. A
handler verifies the request first (``self.reject(call, why, ...)`` on a failed check, answered
as the vendor answers it), then, once it is valid, sets ``call.verified = True`` and returns
``self.injected_answer(call)`` when that is not None (a failure a test injected, answered with
the vendor's own error body by ``failure``), else the vendor's success answer. A token endpoint
(OAuth) does not consume injected failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

FailureKind = Literal["rate_limited", "auth", "invalid_recipient", "server_error", "quota"]


@dataclass(slots=True)
class Call:
    """One request as the emulator received it, and what it concluded."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    verified: bool = False  # the signature / token check passed
    problems: list[str] = field(default_factory=list)  # why a check failed
    status: int = 0  # what the emulator answered
    injected: FailureKind | None = None  # the failure a test injected, if this call got one
    at: float = field(default_factory=time.time)  # when it arrived (epoch seconds)

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(slots=True)
class _Injected:
    kind: FailureKind
    remaining: int  # -1: until cleared


Handler = Callable[[web.Request, Call], Awaitable[web.StreamResponse]]


class Emulator:
    """Base of every vendor emulation. ``async with Emulator() as emu:`` starts it on a free
    port; ``emu.url`` is its base URL."""

    name = "emulator"
    routes: list[tuple[str, str, str]] = []  # (method, path, handler method name)

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.delay_s = 0.0
        self._injected: list[_Injected] = []
        self._ratio: tuple[FailureKind, float] | None = None
        self._owed = 0.0  # failures due under fail_ratio (error diffusion: exact over any run)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        for method, path, handler in self.routes:
            app.router.add_route(method, path, self._wrap(getattr(self, handler)))
        return app

    async def start(self, port: int = 0) -> Emulator:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Emulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- behaviour control ------------------------------------------------------------------

    def fail(self, kind: FailureKind, times: int = 1) -> None:
        """The next ``times`` requests (-1: all until :meth:`recover`) fail as ``kind``."""
        self._injected.append(_Injected(kind, times))

    def fail_ratio(self, kind: FailureKind, ratio: float) -> None:
        """From now on, ``ratio`` of the requests (0.3: 3 in every 10, spread evenly, the first
        among them) fail as ``kind`` until :meth:`recover`."""
        self._ratio = (kind, ratio)
        self._owed = 1.0 - ratio  # so the first request fails

    def recover(self) -> None:
        self._injected.clear()
        self._ratio = None
        self.delay_s = 0.0

    def slow(self, seconds: float) -> None:
        self.delay_s = seconds

    def injected(self) -> FailureKind | None:
        """The failure to answer this request with, if one was injected (consumes one)."""
        if not self._injected:
            if self._ratio is None:
                return None
            kind, ratio = self._ratio
            self._owed += ratio
            if self._owed >= 1.0 - 1e-9:
                self._owed -= 1.0
                return kind
            return None
        first = self._injected[0]
        if first.remaining > 0:
            first.remaining -= 1
            if first.remaining == 0:
                self._injected.pop(0)
        return first.kind

    # --- what subclasses use ----------------------------------------------------------------

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        """The vendor's own answer for an injected failure (subclasses override)."""
        status = {"rate_limited": 429, "auth": 401, "invalid_recipient": 400, "server_error": 500, "quota": 403}[kind]
        return web.json_response({"error": kind}, status=status)

    @staticmethod
    def reject(call: Call, problem: str, status: int = 400, body: Any = None) -> web.StreamResponse:
        """A request that fails a check: recorded with why, answered as the vendor would."""
        call.problems.append(problem)
        return web.json_response(body if body is not None else {"error": problem}, status=status)

    def injected_answer(self, call: Call) -> web.StreamResponse | None:
        """The injected failure's answer for a verified request, or None to answer normally."""
        kind = self.injected()
        if kind is None:
            return None
        call.injected = kind
        return self.failure(kind, call)

    def verified(self) -> list[Call]:
        return [c for c in self.calls if c.verified]

    def _wrap(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            call = Call(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
            )
            self.calls.append(call)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            response = await handler(request, call)
            call.status = response.status
            return response

        return handle


def texts(value: Any, skip: frozenset[str]) -> Iterator[str]:
    """Every string of a JSON body outside the keys in ``skip`` (URLs, ids, types): what a bot's
    keyword filter reads (DingTalk, Feishu)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in skip:
                yield from texts(v, skip)
    elif isinstance(value, list):
        for v in value:
            yield from texts(v, skip)
    elif isinstance(value, str):
        yield value


@contextlib.asynccontextmanager
async def running(*emulators: Emulator):
    """Start several emulators for the duration of a block."""
    for e in emulators:
        await e.start()
    try:
        yield emulators
    finally:
        for e in emulators:
            await e.stop()
