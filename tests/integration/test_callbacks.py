"""Status callbacks (issue 11) against a real PostgreSQL and a real HTTP receiver (aiohttp, in this
process): the fold enqueues in its transaction (and only events stored for the first time), the
cost of a batch whose tenant has no callbacks, and the worker's tries, retries, leases and
SSRF guard, without the rest of the pipeline."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from devstack import servers
from services.tracker import callbacks
from services.tracker.callbacks import CallbackWorker, endpoint_secret_purpose, new_signing_secret
from services.tracker.fold import fold_plan, write_fold
from shared.crypto import SecretBox
from shared.db import apply_migrations, create_pool
from shared.events import EventV1, MessageSnapshot, State, event_id
from shared.settings import Settings
from tests.conftest import TEST_ENCRYPTION_KEY, Backing

BOX = SecretBox.from_setting(TEST_ENCRYPTION_KEY)


@pytest.fixture(scope="module")
async def pool(backing: Backing) -> AsyncIterator[asyncpg.Pool]:
    await asyncio.to_thread(apply_migrations, backing.dsn)
    p = await create_pool(Settings(database_url=backing.dsn, db_pool_min=1, db_pool_max=6))
    yield p
    await p.close()


class Receiver:
    def __init__(self) -> None:
        self.port = servers.free_port()
        self.got: list[tuple[str, dict[str, str], bytes, float]] = []
        self.plan: dict[str, list[int]] = {}
        self.slow: dict[str, float] = {}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append((request.path, {k.lower(): v for k, v in request.headers.items()}, body, time.time()))
        if request.path in self.slow:
            await asyncio.sleep(self.slow[request.path])
        planned = self.plan.get(request.path)
        return web.Response(status=planned.pop(0) if planned else 200)

    def at(self, path: str) -> list[tuple[str, dict[str, str], bytes, float]]:
        return [g for g in self.got if g[0] == path]


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", rec.port).start()
    yield rec
    await runner.cleanup()


def settings(backing: Backing, **extra) -> Settings:
    return Settings(database_url=backing.dsn, db_pool_min=1, db_pool_max=4, encryption_key=TEST_ENCRYPTION_KEY,
                    outbound_allow="127.0.0.1/32", callback_retry_delays_s="0.2,0.2,0.2", callback_timeout_s=1.0,
                    callback_max_sleep_s=0.5, **extra)  # fmt: skip


async def new_tenant(pool: asyncpg.Pool) -> str:
    tenant = f"cb-{uuid.uuid4().hex[:10]}"
    await pool.execute("INSERT INTO tenants (tenant_key, tenant_name) VALUES ($1, $1)", tenant)
    return tenant


async def add_endpoint(pool: asyncpg.Pool, tenant: str, url: str, events: list[str]) -> tuple[int, str]:
    endpoint_id = await pool.fetchval("SELECT nextval('webhook_configs_id_seq')")
    secret = new_signing_secret()
    await pool.execute(
        """INSERT INTO webhook_configs (id, tenant_id, callback_url, events, signing_secret)
           VALUES ($1, $2, $3, $4, $5)""",
        endpoint_id, tenant, url, events, BOX.encrypt(secret, endpoint_secret_purpose(endpoint_id)),
    )  # fmt: skip
    return endpoint_id, secret


def lifecycle(tenant: str, outcome: State = State.SENT, callback_url: str | None = None) -> list[EventV1]:
    mid = f"msg_20261202_{uuid.uuid4().hex[:12]}"
    at = datetime.now(UTC)
    snapshot = MessageSnapshot(channel="sms", recipient="+8613800000000", accepted_at=at, category="otp",
                               callback_url=callback_url)  # fmt: skip
    common = {"message_id": mid, "tenant_id": tenant, "service": "test"}
    return [
        EventV1(event_id=event_id(mid, 0, State.ACCEPTED), state=State.ACCEPTED, occurred_at=at, message=snapshot,
                **common),
        EventV1(event_id=event_id(mid, 1, State.SENDING), state=State.SENDING, attempt=1, channel="sms",
                occurred_at=at + timedelta(milliseconds=5), **common),
        EventV1(event_id=event_id(mid, 1, outcome), state=outcome, attempt=1, channel="sms", provider="aliyun",
                occurred_at=at + timedelta(milliseconds=10), **common),
    ]  # fmt: skip


async def fold(pool: asyncpg.Pool, events: list[EventV1]) -> None:
    async with pool.acquire() as conn:
        await write_fold(conn, fold_plan(events))


async def deliveries(pool: asyncpg.Pool, message_id: str) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM callback_deliveries WHERE message_id = $1 ORDER BY id", message_id)


async def test_the_fold_enqueues_status_changes_once_per_target(pool: asyncpg.Pool, receiver: Receiver) -> None:
    tenant = await new_tenant(pool)
    every, _ = await add_endpoint(pool, tenant, receiver.url("/every"), ["*"])
    failures, _ = await add_endpoint(pool, tenant, receiver.url("/failures"), ["failed", "dead"])
    await pool.execute("INSERT INTO callback_signing_secrets (tenant_id, secret) VALUES ($1, $2)", tenant,
                       BOX.encrypt(new_signing_secret(), f"callback_signing_secrets:{tenant}"))  # fmt: skip
    sent = lifecycle(tenant, callback_url=receiver.url("/own"))
    dead = lifecycle(tenant, State.DEAD)
    await fold(pool, sent + dead)
    await fold(pool, sent + dead)  # redelivered: nothing new
    rows = await deliveries(pool, sent[0].message_id)
    assert sorted((r["endpoint_id"] or 0, r["url"], r["event_type"]) for r in rows) == [
        (0, receiver.url("/own"), "message.sent"),
        (every, receiver.url("/every"), "message.sent"),
    ]
    assert all(r["status"] == "pending" and r["attempts"] == 0 for r in rows)
    payload = rows[0]["payload"]
    assert payload["data"]["category"] == "otp" and payload["data"]["provider"] == "aliyun"
    # The direct publisher's URL reached the record from the 'accepted' snapshot.
    assert await pool.fetchval("SELECT callback_url FROM message_records WHERE message_id = $1",
                               sent[0].message_id) == receiver.url("/own")  # fmt: skip
    rows = await deliveries(pool, dead[0].message_id)
    assert sorted(r["endpoint_id"] for r in rows) == sorted([every, failures])
    await pool.execute("UPDATE callback_deliveries SET status = 'failed' WHERE tenant_id = $1", tenant)


async def test_a_tenant_without_callbacks_costs_one_cheap_statement(pool: asyncpg.Pool) -> None:
    tenant = await new_tenant(pool)
    batch = [e for _ in range(300) for e in lifecycle(tenant)]
    await fold(pool, batch)
    assert await pool.fetchval("SELECT count(*) FROM callback_deliveries WHERE tenant_id = $1", tenant) == 0
    stored = [e for e in batch if e.state is State.SENT]
    async with pool.acquire() as conn:
        started = time.perf_counter()
        for _ in range(5):
            async with conn.transaction():
                await callbacks.enqueue(conn, stored)
        took = (time.perf_counter() - started) / 5
    print(f"\nenqueue of 300 status events of a tenant without callbacks: {took * 1000:.2f} ms")
    assert took < 0.05
    async with pool.acquire() as conn:  # no status change: no statement at all
        await callbacks.enqueue(conn, [e for e in batch if e.state is not State.SENT])


async def test_worker_signs_retries_and_records_every_try(
    backing: Backing, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    tenant = await new_tenant(pool)
    receiver.plan["/w/flaky"] = [500, 429]
    receiver.plan["/w/down"] = [502] * 10
    flaky, flaky_secret = await add_endpoint(pool, tenant, receiver.url("/w/flaky"), ["sent"])
    down, _ = await add_endpoint(pool, tenant, receiver.url("/w/down"), ["sent"])
    private, _ = await add_endpoint(pool, tenant, "http://10.0.0.1/hook", ["sent"])
    events = lifecycle(tenant)
    worker = CallbackWorker(settings(backing), pool, BOX)
    running = asyncio.create_task(worker.run())
    try:
        await fold(pool, events)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = await deliveries(pool, events[0].message_id)
            if rows and all(r["status"] != "pending" for r in rows):
                break
            await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await asyncio.wait_for(running, 5)
    by = {r["endpoint_id"]: r for r in rows}
    assert by[flaky]["status"] == "delivered" and by[flaky]["attempts"] == 3
    assert by[down]["status"] == "failed" and by[down]["attempts"] == 4 and by[down]["last_status_code"] == 502
    assert by[private]["status"] == "failed" and by[private]["attempts"] == 1
    assert "10.0.0.1" in by[private]["last_error"] and by[private]["last_error"].startswith("refused")
    tries = await pool.fetch(
        "SELECT delivery_id, attempt, status_code, error FROM callback_attempts WHERE delivery_id = ANY($1) "
        "ORDER BY delivery_id, attempt",
        [r["id"] for r in rows],
    )
    assert [(t["attempt"], t["status_code"]) for t in tries if t["delivery_id"] == by[flaky]["id"]] == [
        (1, 500), (2, 429), (3, 200)]  # fmt: skip
    assert len([t for t in tries if t["delivery_id"] == by[down]["id"]]) == 4
    got = receiver.at("/w/flaky")
    assert len({g[1]["webhook-id"] for g in got}) == 1
    assert Webhook(flaky_secret).verify(got[-1][2], got[-1][1])["data"]["message_id"] == events[0].message_id


async def test_a_lease_keeps_a_slow_try_from_being_made_twice(
    backing: Backing, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """Two workers (two trackers) share the outbox: each delivery is claimed by one."""
    tenant = await new_tenant(pool)
    receiver.slow["/w/slow"] = 0.3
    await add_endpoint(pool, tenant, receiver.url("/w/slow"), ["sent"])
    batch = [e for _ in range(6) for e in lifecycle(tenant)]
    workers = [CallbackWorker(settings(backing, callback_concurrency=2), pool, BOX) for _ in range(2)]
    running = [asyncio.create_task(w.run()) for w in workers]
    try:
        await fold(pool, batch)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = await pool.fetchval(
                "SELECT count(*) FROM callback_deliveries WHERE tenant_id = $1 AND status <> 'delivered'", tenant
            )
            if left == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        for w in workers:
            w.stop()
        await asyncio.wait_for(asyncio.gather(*running), 5)
    assert left == 0
    assert len(receiver.at("/w/slow")) == 6  # each once
