"""Crashes and restarts under load: ``kill -9`` of the sender and the router, SIGTERM of each
service. Whatever happens, every accepted message reaches the SMTP sink exactly once."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.crash.conftest import Stack
from tests.crash.load import (
    SEND,
    HttpLoad,
    new_tag,
    paced_http,
    produce,
    sink_counts,
    tally,
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
