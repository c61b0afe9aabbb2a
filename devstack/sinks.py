"""Local sinks that show a new user what Herald delivers: an SMTP server that keeps every
message (real SMTP, aiosmtpd) and prints a line for each."""

from __future__ import annotations

import asyncio
import email
import email.policy
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    received_at: float = field(default_factory=time.time)  # wall clock, seconds
    _parsed: email.message.EmailMessage | None = field(default=None, repr=False, compare=False)

    def parsed(self) -> email.message.EmailMessage:
        """The message, parsed once (tests look through every message received many times)."""
        if self._parsed is None:
            self._parsed = email.message_from_bytes(self.data, policy=email.policy.default)  # type: ignore[assignment]
        return self._parsed  # type: ignore[return-value]


class SinkHandler:
    """Keeps every message in memory (tests) and optionally writes it to ``directory``."""

    def __init__(self, directory: Path | None = None, echo: bool = False) -> None:
        self.directory = directory
        self.echo = echo
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        if directory:
            directory.mkdir(parents=True, exist_ok=True)

    async def handle_RCPT(
        self, server: object, session: Session, envelope: Envelope, address: str, rcpt_options: list
    ) -> str:
        """Like a real server, refuses some mailboxes: ``bounce*@`` does not exist (550) and
        ``full*@`` is over quota for now (452), so permanent and transient refusals can be seen."""
        local = address.partition("@")[0].lower()
        if local.startswith("bounce"):
            return "550 5.1.1 mailbox does not exist"
        if local.startswith("full"):
            return "452 4.2.2 mailbox full, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: object, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or envelope.content or b""
        if isinstance(data, str):
            data = data.encode()
        item = Received(envelope.mail_from or "", list(envelope.rcpt_tos), data)
        with self._arrived:
            self.messages.append(item)
            count = len(self.messages)
            self._arrived.notify_all()
        if self.directory:
            name = f"{time.strftime('%Y%m%dT%H%M%S')}-{count:06d}.eml"
            await asyncio.to_thread((self.directory / name).write_bytes, data)
        if self.echo:
            msg = item.parsed()
            sys.stdout.write(
                f"[smtp-sink] #{count} from={item.mail_from} to={','.join(item.rcpt_tos)} subject={msg['subject']!s}\n"
            )
            sys.stdout.flush()
        return "250 OK: queued"

    def wait_for(self, count: int, timeout: float) -> list[Received]:
        """Block until at least ``count`` messages arrived (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.wait(remaining)
            return list(self.messages)


def start_smtp_sink(port: int, directory: Path | None = None, echo: bool = False) -> tuple[Controller, SinkHandler]:
    """A real SMTP server on 127.0.0.1:port, running in a thread."""
    handler = SinkHandler(directory, echo)
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        data_size_limit=50 * 1024 * 1024,
        decode_data=False,
        ready_timeout=10,
    )
    controller.start()
    return controller, handler


def run_webhook_sink(port: int, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve_webhook_sink(port, directory, len(list(directory.glob("*.json")))))


async def serve_webhook_sink(port: int, directory: Path, saved: int = 0) -> None:
    """A local endpoint for the ``webhook`` channel (and bots pointed at it): every request is
    printed (Standard Webhooks headers and the body) and saved as ``<n>.json`` in ``directory``;
    answers 200. Runs until cancelled."""
    import json

    from aiohttp import web

    counter = {"n": saved}

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        counter["n"] += 1
        signed = {k: v for k, v in request.headers.items() if k.lower().startswith("webhook-")}
        entry = {"method": request.method, "path": request.path_qs, "headers": dict(request.headers),
                 "body": body.decode("utf-8", "replace")}  # fmt: skip
        (directory / f"{counter['n']:06d}.json").write_text(  # noqa: ASYNC240 - a small local file
            json.dumps(entry, indent=2, ensure_ascii=False)
        )
        print(f"[webhook-sink] {request.method} {request.path} {signed} {body[:500].decode('utf-8', 'replace')}",
              flush=True)  # fmt: skip
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=2 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
