"""The benchmark's receiving end, in its own process: an SMTP sink (aiosmtpd) and a webhook
sink (aiohttp) that count what arrives by id, so lost and duplicated deliveries can be told.

``python -m bench.sinks --smtp-port P --http-port Q``; ``GET /stats`` answers the counts and
``POST /reset`` clears them.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import threading
import time
from collections import Counter

import orjson
from aiohttp import web
from aiosmtpd.controller import Controller

_HERALD_ID = re.compile(rb"^X-Herald-Message-ID:\s*(\S+)", re.MULTILINE | re.IGNORECASE)


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.first: float | None = None
        self.last: float | None = None

    def add(self, key: str) -> None:
        now = time.time()
        with self.lock:
            self.counts[key] += 1
            self.first = self.first or now
            self.last = now

    def stats(self) -> dict:
        with self.lock:
            return {
                "received": sum(self.counts.values()),
                "unique": len(self.counts),
                "duplicates": sum(c - 1 for c in self.counts.values() if c > 1),
                "ids": list(self.counts),
                "first": self.first,
                "last": self.last,
            }

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.first = self.last = None


class SmtpHandler:
    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: ANN001
        data = envelope.original_content or b""
        head = data.split(b"\r\n\r\n", 1)[0]
        match = _HERALD_ID.search(head)
        self.tally.add(match.group(1).decode() if match else f"unknown-{time.time_ns()}")
        return "250 OK"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    args = parser.parse_args()
    smtp, hooks = Tally(), Tally()
    controller = Controller(SmtpHandler(smtp), hostname="127.0.0.1", port=args.smtp_port)
    controller.start()

    async def hook(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        hooks.add(str(body.get("title") or body.get("message_id") or time.time_ns()))
        return web.Response(status=200, text="ok")

    async def stats(_: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps({"smtp": smtp.stats(), "webhook": hooks.stats()}), content_type="application/json"
        )

    async def reset(_: web.Request) -> web.Response:
        smtp.reset()
        hooks.reset()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    try:
        web.run_app(app, host="127.0.0.1", port=args.http_port, access_log=None, print=None)
    finally:
        controller.stop()
        _ = asyncio


if __name__ == "__main__":
    main()
