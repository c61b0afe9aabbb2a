"""The dispatch ledger's fast lane: ``SET`` commands to Redis written synchronously.

The sender keeps each dispatch's progress in Redis (:mod:`services.senders.runner`) and writes
it several times per email: claimed, handed over, done. Two needs that redis-py's client
cannot meet:

* **The hand-off mark must leave with the message.** It has to reach Redis if and only if the
  message reached the provider. Written before the message, a crash in between marks a
  message the provider never got (the runner would not send it again: lost); written after it
  but a loop turn later (redis-py writes from inside a coroutine), a crash in between leaves a
  sent message unmarked (sent twice). Here the ``SET`` is written synchronously, right after
  the message's own synchronous write: a crash leaves both or neither, short of the
  microseconds between the two system calls.
* **Cost.** Three commands per email through redis-py took a quarter of the sender's
  throughput; a pipelined connection of our own costs a few microseconds per command.

Commands go out in order on one connection, so Redis applies them in the order written;
commands issued within one turn of the event loop leave in one write (a system call per turn,
not per command), except a prepared one, which leaves when called, with those before it. Only
``SET`` is sent, whose replies are one line (``+OK``, ``$-1`` when NX did not set, ``-ERR``);
a background task reads them and resolves each command's future. When not connected a command
is not written (the caller gets None and treats Redis as unavailable); the connection is made
again in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Callable

from redis.connection import SSLConnection, parse_url

log = logging.getLogger("herald.sender.ledger")


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


class Ledger:
    """One Redis connection of its own for synchronous ``SET key value EX ttl [NX]`` writes."""

    def __init__(self, url: str, *, connect_timeout: float = 2.0) -> None:
        # The URL means what it means to redis-py (the sender's other client).
        options = parse_url(url)
        self._path = options.get("path")
        self._host = options.get("host") or "127.0.0.1"
        self._port = int(options.get("port") or 6379)
        self._ssl = ssl.create_default_context() if options.get("connection_class") is SSLConnection else None
        self._username = options.get("username")
        self._password = options.get("password")
        self._db = int(options.get("db") or 0)
        self._timeout = connect_timeout
        self._writer: asyncio.StreamWriter | None = None
        self._pending: deque[asyncio.Future[bool]] = deque()
        self._outgoing: list[bytes] = []
        self._task: asyncio.Task | None = None
        self._connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dispatch-ledger")

    async def wait_connected(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self._connected.is_set()

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._disconnect(ConnectionError("closed"))

    def set(self, key: str, value: bytes, ttl: int, *, only_new: bool = False) -> asyncio.Future[bool] | None:
        """Queue ``SET`` (written at the end of this loop turn). The future answers whether it
        was set (False: ``only_new`` and the key existed) or fails with Redis's error. None
        when there is no connection."""
        parts = [b"SET", key.encode(), value, b"EX", str(ttl).encode()]
        if only_new:
            parts.append(b"NX")
        return self._send(_command(*parts), immediate=False)

    def prepare(self, key: str, value: bytes, ttl: int) -> Callable[[], asyncio.Future[bool] | None]:
        """A ``SET`` built now and written, with whatever is queued before it, when the answer
        is called: the call does little more than the system call (see the module's
        docstring)."""
        command = _command(b"SET", key.encode(), value, b"EX", str(ttl).encode())
        return lambda: self._send(command, immediate=True)

    def _send(self, command: bytes, *, immediate: bool) -> asyncio.Future[bool] | None:
        writer = self._writer
        if writer is None or writer.is_closing():
            return None
        if immediate:
            self._outgoing.append(command)
            self._flush()
        else:
            if not self._outgoing:
                asyncio.get_running_loop().call_soon(self._flush)
            self._outgoing.append(command)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        return future

    def _flush(self) -> None:
        if not self._outgoing:
            return
        data, self._outgoing = b"".join(self._outgoing), []
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(data)
        # else: the connection went away; _disconnect fails the pending futures

    async def _run(self) -> None:
        while True:
            writer = None
            try:
                reader, writer = await asyncio.wait_for(self._open(), self._timeout)
                if self._password is not None:
                    auth = [self._username.encode()] if self._username else []
                    await self._setup(reader, writer, b"AUTH", *auth, self._password.encode())
                if self._db:
                    await self._setup(reader, writer, b"SELECT", str(self._db).encode())
                self._writer = writer
                self._connected.set()
                while True:
                    line = await reader.readline()
                    if not line:
                        raise ConnectionError("redis closed the connection")
                    future = self._pending.popleft() if self._pending else None
                    if future is None or future.done():
                        continue
                    if line.startswith(b"+"):
                        future.set_result(True)
                    elif line.startswith(b"$-1"):
                        future.set_result(False)
                    else:
                        future.set_exception(ConnectionError(line.decode(errors="replace").strip()))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnect whatever happened; callers see None meanwhile
                if writer is not None:
                    writer.close()
                self._disconnect(exc)
                log.debug("ledger connection lost (%s); reconnecting", exc.__class__.__name__)
                await asyncio.sleep(1)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._path:
            return await asyncio.open_unix_connection(self._path)
        return await asyncio.open_connection(self._host, self._port, ssl=self._ssl)

    async def _setup(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *parts: bytes) -> None:
        writer.write(_command(*parts))
        line = await asyncio.wait_for(reader.readline(), self._timeout)
        if not line.startswith(b"+"):
            raise ConnectionError(f"{parts[0].decode()} refused: {line.decode(errors='replace').strip()}")

    def _disconnect(self, exc: BaseException) -> None:
        self._connected.clear()
        self._outgoing = []
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(ConnectionError(str(exc) or exc.__class__.__name__))
