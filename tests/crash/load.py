"""Load for the crash tests, and the bookkeeping of what came out at the SMTP sink.

Every message of a run carries a token in its subject (``<tag>-<n>``), so a run counts its own
messages whether they entered through HTTP or straight through Kafka. A token the pipeline
accepted and the sink never saw is lost; a token the sink saw more than once is duplicated.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import httpx
import orjson
from aiokafka import AIOKafkaProducer

from devstack.sinks import SinkHandler
from shared.ids import new_message_id

SEND = "/api/v1/messages/email/send"

_SUBJECT = re.compile(rb"^Subject: (.*?)\r?$", re.MULTILINE)


def new_tag(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def token(tag: str, i: int) -> str:
    return f"{tag}-{i:05d}"


def subject_of(data: bytes) -> str | None:
    head = data.split(b"\r\n\r\n", 1)[0]
    m = _SUBJECT.search(head)
    return m.group(1).decode("ascii", "replace") if m else None


def sink_counts(sink: SinkHandler, tag: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for item in list(sink.messages):
        subject = subject_of(item.data)
        if subject and subject.startswith(tag):
            counts[subject] += 1
    return counts


@dataclass
class Tally:
    sent: int
    delivered: int
    lost: int
    duplicated: int
    lost_tokens: list[str] = field(default_factory=list)
    duplicated_tokens: list[str] = field(default_factory=list)
    unexpected: int = 0  # delivered but never acknowledged to the client (indeterminate requests)

    def line(self, what: str, **extra: object) -> str:
        more = "".join(f" {k}={v}" for k, v in extra.items())
        return (
            f"{what}: sent={self.sent} delivered={self.delivered} lost={self.lost} duplicated={self.duplicated}{more}"
        )


def tally(accepted: set[str], counts: Counter[str]) -> Tally:
    lost = sorted(t for t in accepted if counts[t] == 0)
    dup = sorted(t for t, c in counts.items() if c > 1)
    return Tally(
        sent=len(accepted),
        delivered=sum(1 for t in accepted if counts[t] > 0),
        lost=len(lost),
        duplicated=sum(counts[t] - 1 for t in dup),
        lost_tokens=lost[:10],
        duplicated_tokens=dup[:10],
        unexpected=sum(1 for t in counts if t not in accepted),
    )


async def wait_delivered(
    sink: SinkHandler, tag: str, accepted: set[str], timeout: float, settle: float = 3.0
) -> Counter[str]:
    """Wait until every accepted token reached the sink, then ``settle`` seconds more, so a
    late duplicate (a redelivery still on its way) is counted too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = sink_counts(sink, tag)
        if all(counts[t] for t in accepted):
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(settle)
    return sink_counts(sink, tag)


async def wait_count(sink: SinkHandler, tag: str, count: int, timeout: float) -> int:
    """Wait until at least ``count`` messages of ``tag`` reached the sink."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = sum(sink_counts(sink, tag).values())
        if seen >= count:
            return seen
        await asyncio.sleep(0.02)
    raise AssertionError(f"only {sum(sink_counts(sink, tag).values())} of {count} messages of {tag} arrived")


# --- straight to Kafka -------------------------------------------------------------------------


def request_bytes(tag: str, i: int, *, with_id: bool = True) -> tuple[bytes, bytes]:
    """A ``notify.request.v1`` record (value, key) as an internal service would publish it."""
    recipient = f"user{i % 50}@example.com"
    body: dict = {
        "schema": "notify.request.v1",
        "channel": "email",
        "to": [recipient],
        "subject": token(tag, i),
        "content": f"<p>crash test {i}</p>",
    }
    if with_id:
        body["message_id"] = new_message_id()
    return orjson.dumps(body), f"default:{recipient}".encode()


async def produce(bootstrap: str, tag: str, n: int, *, with_id: bool = True, start: int = 0) -> set[str]:
    """Publish ``n`` requests to ``notify.requests`` (tokens ``start`` to ``start + n - 1``);
    answers their tokens (all acknowledged)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=5)
    await producer.start()
    try:
        futures = []
        for i in range(start, start + n):
            value, key = request_bytes(tag, i, with_id=with_id)
            futures.append(await producer.send("notify.requests", value, key=key))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return {token(tag, i) for i in range(start, start + n)}


# --- through ingest's HTTP API ----------------------------------------------------------------


@dataclass
class HttpLoad:
    """What a client saw sending through ingest: tokens acknowledged with 202, statuses."""

    accepted: set[str] = field(default_factory=set)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    attempted: int = 0


async def send_http(
    url: str,
    tag: str,
    indexes: range,
    load: HttpLoad,
    *,
    concurrency: int = 16,
    retry_for: float = 60.0,
    stop: asyncio.Event | None = None,
    headers: dict[str, str] | None = None,
) -> HttpLoad:
    """POST one email per index with bounded concurrency. Each carries its token as its
    idempotency key, so a request whose answer was lost (ingest stopped mid-request) can be
    sent again without making a second message: a well-behaved client's retry. Connection
    failures and 5xx are retried for ``retry_for`` seconds."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in indexes:
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            if stop is not None and stop.is_set():
                return
            await _post(client, tag, queue.get_nowait(), load, retry_for)

    async with httpx.AsyncClient(base_url=url, timeout=15, headers=headers) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return load


async def _post(client: httpx.AsyncClient, tag: str, i: int, load: HttpLoad, retry_for: float) -> None:
    t = token(tag, i)
    body = {
        "to": f"user{i % 50}@example.com",
        "subject": t,
        "content": f"<p>crash test {i}</p>",
        "idempotency_key": t,
    }
    deadline = time.monotonic() + retry_for
    while True:
        try:
            r = await client.post(SEND, json=body)
            load.statuses[str(r.status_code)] += 1
            if r.status_code == 202:
                # A replay of a request the broker never took is answered 202 with its first
                # outcome: only an accepted one counts.
                if r.json()["data"].get("state") != "rejected":
                    load.accepted.add(t)
                return
            if r.status_code < 500:
                load.errors[f"{r.status_code}: {r.text[:120]}"] += 1
                return
        except httpx.HTTPError as exc:
            load.errors[exc.__class__.__name__] += 1
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.2)


async def paced_http(
    url: str,
    tag: str,
    load: HttpLoad,
    stop: asyncio.Event,
    *,
    rate: float = 50,
    in_flight: int = 16,
    headers: dict[str, str] | None = None,
) -> HttpLoad:
    """Send emails at about ``rate`` a second until ``stop`` is set (then wait for the ones in
    flight, retrying those that met a stopped ingest)."""
    slots = asyncio.Semaphore(in_flight)
    tasks: set[asyncio.Task] = set()

    async with httpx.AsyncClient(base_url=url, timeout=15, headers=headers) as client:

        async def one(i: int) -> None:
            try:
                await _post(client, tag, i, load, retry_for=60)
            finally:
                slots.release()

        i = 0
        while not stop.is_set():
            await slots.acquire()
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            await asyncio.sleep(1 / rate)
        if tasks:
            await asyncio.gather(*tasks)
    load.attempted = i
    return load


# --- what the tracker recorded -------------------------------------------------------------------


async def record_states(dsn: str, tag: str) -> dict[str, int]:
    """How many message records of this run are in each state."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT state, count(*) AS n FROM message_records WHERE subject LIKE $1 GROUP BY state", f"{tag}-%"
        )
    finally:
        await conn.close()
    return {r["state"]: r["n"] for r in rows}


async def wait_states(dsn: str, tag: str, n: int, timeout: float = 30) -> dict[str, int]:
    """Wait until ``n`` records of this run are 'sent' (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        states = await record_states(dsn, tag)
        if states.get("sent", 0) >= n or time.monotonic() > deadline:
            return states
        await asyncio.sleep(0.5)
