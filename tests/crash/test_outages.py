"""Backing servers going away under the services: PostgreSQL stopped while events flow (nothing
lost, everything caught up), the broker restarted without its data (the records in PostgreSQL
and the sweeper still get every accepted message delivered, none twice), then the broker
stopped (every service still shuts down within 10 s, and ingest answers quickly and never 2xx
for what it could not publish).

The broker test runs last: Tansu keeps its data in memory, so the stack is not usable after it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest

from devstack import servers
from tests.crash.conftest import Stack
from tests.crash.load import (
    SEND,
    HttpLoad,
    new_tag,
    paced_http,
    produce,
    sink_counts,
    tally,
    token,
    wait_count,
    wait_delivered,
    wait_states,
)

pytestmark = pytest.mark.e2e


async def _probe(client: httpx.AsyncClient, tag: str, i: int) -> tuple[int | str, object, float]:
    """One email through the API: (status, envelope code, seconds)."""
    started = time.monotonic()
    try:
        r = await client.post(SEND, json={"to": "probe@example.com", "subject": token(tag, i), "content": "probe"})
        code = r.json().get("code") if r.headers.get("content-type", "").startswith("application/json") else None
        return r.status_code, code, time.monotonic() - started
    except httpx.HTTPError as exc:
        return exc.__class__.__name__, None, time.monotonic() - started


def _summary(probes: list[tuple[int | str, object, float]]) -> str:
    kinds = Counter(f"{s}/{c}" for s, c, _ in probes)
    worst = max(t for _, _, t in probes)
    return f"{dict(kinds)} max_latency_s={worst:.2f}"


async def test_postgres_down_while_events_flow(stack: Stack) -> None:
    tag = new_tag("pg-down")
    t0 = time.monotonic()
    accepted = await produce(stack.bootstrap, tag, 600)
    await wait_count(stack.smtp, tag, 150, timeout=60)
    stack.stop_postgres()
    down_at = time.monotonic()
    # More requests while the database is away, straight to Kafka (ingest needs the database).
    accepted |= await produce(stack.bootstrap, tag, 400, start=600)
    probes = []
    async with httpx.AsyncClient(base_url=stack.ingest_url, timeout=30, headers=stack.headers) as client:
        for i in range(5):
            probes.append(await _probe(client, tag, 10_000 + i))
            await asyncio.sleep(1)
        await asyncio.sleep(max(0.0, 12 - (time.monotonic() - down_at)))
        await asyncio.to_thread(stack.start_postgres)
        down_s = time.monotonic() - down_at
        after = [await _probe(client, tag, 20_000 + i) for i in range(5)]  # first requests after
    # A probe answered 202 would be a message accepted without its record: it must arrive too.
    accepted |= {token(tag, 10_000 + i) for i, (s, _, _) in enumerate(probes) if s == 202}
    accepted |= {token(tag, 20_000 + i) for i, (s, _, _) in enumerate(after) if s == 202}
    counts = await wait_delivered(stack.smtp, tag, accepted, timeout=90)
    t = tally(accepted, counts)
    states = await wait_states(stack.dsn, tag, len(accepted), timeout=60)
    print(
        t.line(
            "postgres down",
            down_s=round(down_s, 1),
            states=states,
            ingest_while_down=_summary(probes),
            ingest_right_after=_summary(after),
            total_s=round(time.monotonic() - t0, 1),
        )
    )
    assert t.lost == 0, t.lost_tokens
    assert t.duplicated == 0, t.duplicated_tokens
    assert states == {"sent": len(accepted)}
    assert all(s != 202 for s, _, _ in probes), probes


async def test_broker_restart_mid_flow_loses_nothing(stack: Stack) -> None:
    """Tansu keeps everything in memory: restarted, it has no topics, no offsets, no records.
    The services create the topics again, ingest's 503s during the gap are retried by the
    client with their idempotency keys, and the sweeper publishes again whatever was accepted
    or routed but lost with the broker."""
    tag = new_tag("broker-restart")
    load, stop = HttpLoad(), asyncio.Event()
    t0 = time.monotonic()
    sending = asyncio.create_task(paced_http(stack.ingest_url, tag, load, stop, rate=60, headers=stack.headers))
    await asyncio.sleep(3)
    before = sum(sink_counts(stack.smtp, tag).values())
    port = stack.tansu.port
    stack.tansu.stop()
    stack.tansu = await asyncio.to_thread(servers.start_tansu, port, stack.tmp / "tansu.log")
    await asyncio.sleep(4)
    stop.set()
    await sending
    counts = await wait_delivered(stack.smtp, tag, load.accepted, timeout=120)
    t = tally(load.accepted, counts)
    states = await wait_states(stack.dsn, tag, len(load.accepted), timeout=60)
    print(t.line("broker restart", delivered_before_restart=before, statuses=dict(load.statuses),
                 states=states, total_s=round(time.monotonic() - t0, 1)))  # fmt: skip
    assert before > 0 and t.sent > before  # the restart happened mid-flow
    assert t.lost == 0, t.lost_tokens
    assert t.duplicated == 0, t.duplicated_tokens
    assert states == {"sent": len(load.accepted)}


async def test_broker_down_ingest_answers_and_every_service_stops_in_time(stack: Stack) -> None:
    tag = new_tag("broker-down")
    await produce(stack.bootstrap, tag, 300)  # the services are busy when the broker goes
    await wait_count(stack.smtp, tag, 50, timeout=60)
    stack.tansu.stop()
    probes = []
    async with httpx.AsyncClient(base_url=stack.ingest_url, timeout=30, headers=stack.headers) as client:
        probes = list(await asyncio.gather(*(_probe(client, tag, 10_000 + i) for i in range(5))))
        probes.append(await _probe(client, tag, 10_005))
    exits = dict(
        zip(
            stack.services,
            await asyncio.gather(*(asyncio.to_thread(stack.terminate, name, 30) for name in stack.services)),
            strict=True,
        )
    )
    print(f"broker down: ingest={_summary(probes)} exit_s={ {k: round(v, 1) for k, v in exits.items()} }")
    assert all(isinstance(s, int) and not 200 <= s < 300 for s, _, _ in probes), probes
    assert all(s == 503 for s, _, _ in probes), probes
    assert all(t < 5 for _, _, t in probes), probes
    assert all(v < 10 for v in exits.values()), exits
