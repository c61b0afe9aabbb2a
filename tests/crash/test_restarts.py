"""Crashes and restarts under load: ``kill -9`` of the sender and the router, SIGTERM of each
service. Whatever happens, every accepted message reaches the SMTP sink exactly once."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from devstack import servers
from shared.ids import new_message_id
from tests.crash.conftest import Stack
from tests.crash.load import (
    SEND,
    HttpLoad,
    new_tag,
    paced_http,
    produce,
    record_states,
    sink_counts,
    subject_of,
    tally,
    token,
    wait_count,
    wait_delivered,
    wait_states,
)

pytestmark = pytest.mark.e2e


async def _kill_mid_flow(stack: Stack, service: str, tag: str, accepted: set[str], after: int) -> None:
    """Once ``after`` emails of ``tag`` arrived, ``kill -9`` the service and start it again;
    every accepted email must arrive exactly once and every record end 'sent'."""
    t0 = time.monotonic()
    await wait_count(stack.smtp, tag, after, timeout=60)
    stack.kill(service)
    at_kill = sum(sink_counts(stack.smtp, tag).values())
    t_kill = time.monotonic()
    await asyncio.to_thread(stack.restart, service)
    t_ready = time.monotonic()
    counts = await wait_delivered(stack.smtp, tag, accepted, timeout=120)
    t = tally(accepted, counts)
    states = await wait_states(stack.dsn, tag, len(accepted))
    print(
        t.line(
            f"kill -9 {service}",
            delivered_before_kill=at_kill,
            restart_s=round(t_ready - t_kill, 1),
            total_s=round(time.monotonic() - t0, 1),
            states=states,
        )
    )
    assert t.lost == 0, t.lost_tokens
    assert t.duplicated == 0, t.duplicated_tokens
    assert states == {"sent": len(accepted)}


async def test_kill_9_sender_mid_flow(stack: Stack) -> None:
    tag = new_tag("kill9-sender")
    accepted = await produce(stack.bootstrap, tag, 2000)
    await _kill_mid_flow(stack, "sender-email", tag, accepted, after=400)


async def test_kill_9_router_mid_flow(stack: Stack) -> None:
    """Half the requests carry their own message id, half leave it to the router (a direct
    publisher's choice): a request routed again after the crash must not become a second
    message."""
    tag = new_tag("kill9-router")
    accepted = await produce(stack.bootstrap, tag, 1000)
    accepted |= await produce(stack.bootstrap, tag, 1000, with_id=False, start=1000)
    await _kill_mid_flow(stack, "router", tag, accepted, after=300)


async def test_sigterm_each_service_under_load(stack: Stack) -> None:
    """Emails keep arriving through the API while each service in turn gets SIGTERM: each
    exits within 10 s, comes back, and every email the API accepted is delivered once."""
    tag = new_tag("sigterm")
    t0 = time.monotonic()
    load, stop = HttpLoad(), asyncio.Event()
    sending = asyncio.create_task(paced_http(stack.ingest_url, tag, load, stop, rate=50, headers=stack.headers))
    exits: dict[str, float] = {}
    restarts: dict[str, float] = {}
    try:
        for name in ("router", "sender-email", "tracker", "ingest"):
            await asyncio.sleep(2)  # load flowing through every service
            exits[name] = await asyncio.to_thread(stack.terminate, name)
            started = time.monotonic()
            await asyncio.to_thread(stack.restart, name)
            restarts[name] = time.monotonic() - started
        await asyncio.sleep(2)
    finally:
        stop.set()
        await sending
    counts = await wait_delivered(stack.smtp, tag, load.accepted, timeout=90)
    t = tally(load.accepted, counts)
    states = await wait_states(stack.dsn, tag, len(load.accepted))
    print(
        t.line(
            "SIGTERM each service",
            exit_s={k: round(v, 1) for k, v in exits.items()},
            restart_s={k: round(v, 1) for k, v in restarts.items()},
            http=dict(load.statuses),
            client_errors=dict(load.errors),
            unacknowledged_but_delivered=t.unexpected,
            total_s=round(time.monotonic() - t0, 1),
        )
    )
    assert all(v < 10 for v in exits.values()), exits
    assert t.lost == 0, t.lost_tokens
    assert t.duplicated == 0, t.duplicated_tokens
    assert states.get("sent") == len(load.accepted), states


async def test_a_restarted_router_renders_templates_from_the_config_topic(stack: Stack) -> None:
    """The router keeps templates only in memory, read from notify.config: killed and started
    again, it rebuilds them from the topic (it has no database access to fall back on)."""
    tag = new_tag("template-restart")
    async with httpx.AsyncClient(base_url=stack.ingest_url, timeout=30, headers=stack.headers) as client:
        created = await client.post("/api/v1/templates", json={
            "template_name": tag, "subject": "code {{ code }}", "content": "<p>{{ code }}</p>",
            "variables": ["code"]})  # fmt: skip
        assert created.status_code == 201, created.text
        template_id = created.json()["data"]["id"]
        stack.kill("router")
        await asyncio.to_thread(stack.restart, "router")
        sent = await client.post(SEND, json={"to": "restart@example.com", "template_id": template_id,
                                             "template_vars": {"code": tag}})  # fmt: skip
        assert sent.status_code == 202, sent.text
        message_id = sent.json()["data"]["message_id"]
    deadline = time.monotonic() + 60
    while not (found := [m for m in list(stack.smtp.messages) if m.parsed()["X-Herald-Message-ID"] == message_id]):
        assert time.monotonic() < deadline, "the templated message was not delivered"
        await asyncio.sleep(0.2)
    assert found[0].parsed()["Subject"] == f"code {tag}" and f"<p>{tag}</p>" in found[0].data.decode()


async def test_scheduled_messages_survive_restarts_of_the_router_and_the_broker(stack: Stack) -> None:
    """A hundred messages scheduled half through the API and half straight through Kafka wait
    while the router is killed and started again and the broker restarts empty (Tansu keeps
    nothing): they live in PostgreSQL, so each goes out once, and none before its time."""
    tag = new_tag("sched-restart")
    due = datetime.now(UTC) + timedelta(seconds=45)
    stamp = due.isoformat().replace("+00:00", "Z")
    accepted: set[str] = set()
    async with httpx.AsyncClient(base_url=stack.ingest_url, timeout=30, headers=stack.headers) as client:
        for i in range(50):
            r = await client.post(SEND, json={"to": f"user{i}@example.com", "subject": token(tag, i),
                                              "content": "<p>later</p>", "scheduled_time": stamp})  # fmt: skip
            assert r.status_code == 202 and r.json()["data"]["state"] == "scheduled", r.text
            accepted.add(token(tag, i))
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        for i in range(50, 100):
            body = {"channel": "email", "message_id": new_message_id(), "to": [f"user{i}@example.com"],
                    "subject": token(tag, i), "content": "<p>later</p>", "scheduled_at": stamp}  # fmt: skip
            await producer.send_and_wait("notify.requests", orjson.dumps(body), key=f"default:user{i}".encode())
            accepted.add(token(tag, i))
    finally:
        await producer.stop()
    # The direct ones are parked by the router and recorded by the tracker before anything restarts.
    for _ in range(120):
        if (scheduled := await record_states(stack.dsn, tag)) == {"scheduled": 100}:
            break
        await asyncio.sleep(0.5)
    assert scheduled == {"scheduled": 100}, scheduled
    t0 = time.monotonic()
    stack.kill("router")
    await asyncio.to_thread(stack.restart, "router")
    port = stack.tansu.port
    stack.tansu.stop()
    stack.tansu = await asyncio.to_thread(servers.start_tansu, port, stack.tmp / "tansu.log")
    restarts_s = time.monotonic() - t0
    assert datetime.now(UTC) < due, "the restarts took longer than the wait: the test proves nothing"
    assert sum(sink_counts(stack.smtp, tag).values()) == 0
    counts = await wait_delivered(stack.smtp, tag, accepted, timeout=120)
    early = [subject_of(m.data) for m in list(stack.smtp.messages)
             if (subject_of(m.data) or "").startswith(tag) and m.received_at < due.timestamp()]  # fmt: skip
    t = tally(accepted, counts)
    states = await wait_states(stack.dsn, tag, 100, timeout=60)
    last = max(m.received_at for m in list(stack.smtp.messages) if (subject_of(m.data) or "").startswith(tag))
    print(t.line("scheduled across restarts", restarts_s=round(restarts_s, 1), early=len(early),
                 last_delivered_after_due_s=round(last - due.timestamp(), 1), states=states))  # fmt: skip
    assert not early, early
    assert t.lost == 0, t.lost_tokens
    assert t.duplicated == 0, t.duplicated_tokens
    assert states == {"sent": 100}, states


async def test_frequency_windows_survive_a_router_restart(stack: Stack) -> None:
    """A cap's window is counted in Redis, not in the router: three messages before a kill -9
    and three after make six in the window, and the sixth is suppressed by the new router (which
    read the cap back from notify.config)."""
    tag = new_tag("cap-restart")
    to = f"{tag}@example.com"
    async with httpx.AsyncClient(base_url=stack.ingest_url, timeout=30, headers=stack.headers) as client:
        r = await client.post("/api/v1/frequency-caps", json={"category": tag, "max_count": 5, "window_s": 3600,
                                                                "action": "suppress"})  # fmt: skip
        assert r.status_code == 201, r.text
        revision = r.json()["data"]["revision"]

        async def applied() -> None:
            async with httpx.AsyncClient(base_url=stack.services["router"].url, timeout=5) as router:
                for _ in range(300):
                    for line in (await router.get("/metrics")).text.splitlines():
                        if line.startswith("herald_frequency_rule_revision ") and float(line.split()[1]) >= revision:
                            return
                    await asyncio.sleep(0.1)
            raise AssertionError("the router never applied the cap")

        async def send(i: int) -> str:
            r = await client.post(SEND, json={"to": to, "subject": token(tag, i), "content": "x", "category": tag})
            assert r.status_code == 202, r.text
            return r.json()["data"]["message_id"]

        async def state_of(message_id: str, wanted: str) -> str:
            for _ in range(300):
                state = (await client.get(f"/api/v1/messages/{message_id}")).json()["data"]["state"]
                if state == wanted:
                    return state
                await asyncio.sleep(0.1)
            return state

        await applied()
        before = [await send(i) for i in range(3)]
        assert [await state_of(m, "sent") for m in before] == ["sent"] * 3
        stack.kill("router")
        await asyncio.to_thread(stack.restart, "router")
        after = [await send(i) for i in range(3, 6)]
        states = [await state_of(m, w) for m, w in zip(after, ("sent", "sent", "suppressed"), strict=True)]
    print(f"cap across a router restart: states after the restart {states}")
    assert states == ["sent", "sent", "suppressed"]
    assert sum(sink_counts(stack.smtp, tag).values()) == 5
