"""Status callbacks (issue 11) against a real PostgreSQL and a real HTTP receiver (aiohttp, in this
process): the fold enqueues in its transaction (and only events stored for the first time), the
cost of a batch whose tenant has no callbacks (remembered a few seconds), and the worker's tries,
retries, leases (a try cut at the timeout, a stale worker's outcome not recorded), pruning, the
masking of URLs' queries and the SSRF guard, without the rest of the pipeline."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from standardwebhooks.webhooks import Webhook

from services.tracker import callbacks
from services.tracker.callbacks import (
    CONFIG_CHANGED,
    NOTIFY_CHANNEL,
    CallbackWorker,
    endpoint_secret_purpose,
    new_signing_secret,
    tenant_secret_purpose,
)
from services.tracker.fold import fold_plan, write_fold
from shared.crypto import SecretBox
from shared.db import apply_migrations, create_pool
from shared.events import EventV1, MessageSnapshot, State, event_id
from shared.settings import Settings
from tests.callback_receiver import Receiver, receiving
from tests.conftest import TEST_ENCRYPTION_KEY, Backing

BOX = SecretBox.from_setting(TEST_ENCRYPTION_KEY)


@pytest.fixture(scope="module")
async def dsn(backing: Backing) -> str:
    """A database of this module's own on the suite's server: the session pipeline's trackers,
    when e2e tests started it, claim every due callback in their database, these tests' too."""
    name = f"callbacks_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(backing.dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    dsn = backing.dsn.rsplit("/", 1)[0] + "/" + name
    await asyncio.to_thread(apply_migrations, dsn)
    return dsn


@pytest.fixture(scope="module")
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(Settings(database_url=dsn, db_pool_min=1, db_pool_max=6))
    yield p
    await p.close()


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as rec:
        yield rec


def settings(dsn: str, **extra) -> Settings:
    values = {"database_url": dsn, "db_pool_min": 1, "db_pool_max": 4, "encryption_key": TEST_ENCRYPTION_KEY,
              "outbound_allow": "127.0.0.1/32", "callback_retry_delays_s": "0.2,0.2,0.2", "callback_timeout_s": 1.0,
              "callback_max_sleep_s": 0.5}  # fmt: skip
    return Settings(**(values | extra))


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


class Counting:
    """A connection that records the statements made through it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.statements: list[str] = []

    def __getattr__(self, name: str):
        attr = getattr(self.conn, name)
        if name not in ("execute", "fetch", "fetchval", "fetchrow"):
            return attr

        async def counted(query: str, *args, **kwargs):
            self.statements.append(query)
            return await attr(query, *args, **kwargs)

        return counted


async def test_a_tenant_without_callbacks_costs_one_cheap_statement(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 status events of a tenant without callbacks: the one cheap test (_LIVE_TENANTS, one
    row per tenant), no payload built, nothing inserted; then nothing at all while remembered."""
    built: list[EventV1] = []
    payload_of = callbacks.payload_of
    monkeypatch.setattr(callbacks, "payload_of", lambda e, *a: built.append(e) or payload_of(e, *a))
    tenant = await new_tenant(pool)
    batch = [e for _ in range(300) for e in lifecycle(tenant)]
    stored = [e for e in batch if e.state is State.SENT]
    async with pool.acquire() as conn:
        counting = Counting(conn)
        async with conn.transaction():
            await callbacks.enqueue(counting, stored)
        assert counting.statements == [callbacks._LIVE_TENANTS]
        # Remembered: the next batches cost no statement at all (for LIVE_TENANTS_TTL_S).
        for _ in range(5):
            async with conn.transaction():
                await callbacks.enqueue(counting, stored)
        assert counting.statements == [callbacks._LIVE_TENANTS]
    assert built == []
    await fold(pool, batch)
    assert await pool.fetchval("SELECT count(*) FROM callback_deliveries WHERE tenant_id = $1", tenant) == 0
    async with pool.acquire() as conn:  # no status change: no statement at all
        counting = Counting(conn)
        await callbacks.enqueue(counting, [e for e in batch if e.state not in (State.SENT, State.ACCEPTED)])
        assert counting.statements == []
    assert built == []


async def test_a_notification_while_the_tenants_are_asked_is_not_undone(pool: asyncpg.Pool, receiver: Receiver) -> None:
    """Ingest creates an endpoint and its notification reaches the tracker (which forgets) while
    a fold's _LIVE_TENANTS query runs, on a snapshot from before the endpoint: that older "no"
    serves its batch only and is not remembered; the next batch's status changes are enqueued."""
    tenant = await new_tenant(pool)

    class Racing(Counting):
        async def fetch(self, query: str, *args):
            rows = await self.conn.fetch(query, *args)
            if query == callbacks._LIVE_TENANTS:
                await add_endpoint(pool, tenant, receiver.url("/w/race"), ["sent"])
                callbacks.forget_live_tenants()  # what CallbackWorker.wake does on CONFIG_CHANGED
            return rows

    first = lifecycle(tenant)
    async with pool.acquire() as conn, conn.transaction():
        await callbacks.enqueue(Racing(conn), [e for e in first if e.state is State.SENT])
    assert await deliveries(pool, first[0].message_id) == []  # its snapshot had no endpoint yet
    assert tenant not in callbacks._live
    later = lifecycle(tenant)
    await fold(pool, later)
    assert [r["event_type"] for r in await deliveries(pool, later[0].message_id)] == ["message.sent"]
    await pool.execute("UPDATE callback_deliveries SET status = 'failed' WHERE tenant_id = $1", tenant)


async def test_which_tenants_have_callbacks_is_remembered_briefly(
    dsn: str, pool: asyncpg.Pool, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A "no" is remembered LIVE_TENANTS_TTL_S (a new endpoint takes effect within it, or at once
    when ingest's notification arrives); a message's own callback_url and a cancellation never
    depend on it."""
    monkeypatch.setattr(callbacks, "LIVE_TENANTS_TTL_S", 0.5)
    url = receiver.url("/w/cached")
    tenant = await new_tenant(pool)
    await fold(pool, lifecycle(tenant))  # no callbacks: remembered
    await add_endpoint(pool, tenant, url, ["sent", "cancelled"])  # behind the cache's back
    early = lifecycle(tenant)
    await fold(pool, early)
    assert await deliveries(pool, early[0].message_id) == []  # within the TTL
    await asyncio.sleep(0.6)
    late = lifecycle(tenant)
    await fold(pool, late)
    assert [r["event_type"] for r in await deliveries(pool, late[0].message_id)] == ["message.sent"]

    # Ingest's notification (an endpoint created or changed) makes a tracker forget at once.
    monkeypatch.setattr(callbacks, "LIVE_TENANTS_TTL_S", 60.0)
    notified = await new_tenant(pool)

    async def forgotten(tenant: str) -> bool:
        for _ in range(250):
            if tenant not in callbacks._live:
                return True
            await asyncio.sleep(0.02)
        return False

    worker = CallbackWorker(settings(dsn), pool, BOX)
    callbacks._live["sentinel"] = (False, time.monotonic() + 60)
    running = asyncio.create_task(worker.run())
    try:
        assert await forgotten("sentinel")  # listening (which forgets everything)
        await fold(pool, lifecycle(notified))
        assert callbacks._live[notified][0] is False
        await add_endpoint(pool, notified, url, ["sent"])
        await pool.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, CONFIG_CHANGED)
        assert await forgotten(notified)
    finally:
        worker.stop()
        await asyncio.wait_for(running, 5)
    after = lifecycle(notified)
    await fold(pool, after)
    assert [r["event_type"] for r in await deliveries(pool, after[0].message_id)] == ["message.sent"]

    # A message with its own callback_url: the tenant's signing secret was created after its "no"
    # was remembered; the message's 'accepted' event (folded first) makes it be asked again.
    own = await new_tenant(pool)
    await fold(pool, lifecycle(own))
    await pool.execute("INSERT INTO callback_signing_secrets (tenant_id, secret) VALUES ($1, $2)", own,
                       BOX.encrypt(new_signing_secret(), tenant_secret_purpose(own)))  # fmt: skip
    message = lifecycle(own, callback_url=url + "?ref=1")
    await fold(pool, message[:1])  # accepted
    await fold(pool, message[1:])  # sending, sent
    assert [(r["event_type"], r["url"]) for r in await deliveries(pool, message[0].message_id)] == [
        ("message.sent", url + "?ref=1")]  # fmt: skip

    # A cancellation (ingest's, no 'accepted' before it here) is asked afresh too.
    cancelled = await new_tenant(pool)
    await fold(pool, lifecycle(cancelled))
    await add_endpoint(pool, cancelled, url, ["cancelled"])
    mid = f"msg_20261202_{uuid.uuid4().hex[:12]}"
    event = EventV1(event_id=f"{mid}:0:cancelled", message_id=mid, tenant_id=cancelled, state=State.CANCELLED,
                    service="ingest", channel="email")  # fmt: skip
    async with pool.acquire() as conn, conn.transaction():
        await callbacks.enqueue(conn, [event])
    assert [r["event_type"] for r in await deliveries(pool, mid)] == ["message.cancelled"]
    await pool.execute("UPDATE callback_deliveries SET status = 'failed' WHERE tenant_id = ANY($1)",
                       [tenant, notified, own, cancelled])  # fmt: skip


async def test_worker_signs_retries_and_records_every_try(
    dsn: str, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    tenant = await new_tenant(pool)
    receiver.plan["/w/flaky"] = [500, 429]
    receiver.plan["/w/down"] = [502] * 10
    flaky, flaky_secret = await add_endpoint(pool, tenant, receiver.url("/w/flaky"), ["sent"])
    down, _ = await add_endpoint(pool, tenant, receiver.url("/w/down"), ["sent"])
    private, _ = await add_endpoint(pool, tenant, "http://10.0.0.1/hook", ["sent"])
    events = lifecycle(tenant)
    worker = CallbackWorker(settings(dsn), pool, BOX)
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
    assert len({g.headers["webhook-id"] for g in got}) == 1
    assert Webhook(flaky_secret).verify(got[-1].body, got[-1].headers)["data"]["message_id"] == events[0].message_id


async def test_two_workers_share_the_outbox_each_delivery_made_once(
    dsn: str, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """Two workers (two trackers) share the outbox: each delivery is claimed by one (SKIP LOCKED).
    The lease itself: test_a_try_is_cut_at_the_timeout_before_its_lease_ends."""
    tenant = await new_tenant(pool)
    receiver.slow["/w/slow"] = 0.3
    await add_endpoint(pool, tenant, receiver.url("/w/slow"), ["sent"])
    batch = [e for _ in range(6) for e in lifecycle(tenant)]
    workers = [CallbackWorker(settings(dsn, callback_concurrency=2), pool, BOX) for _ in range(2)]
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


async def claim(pool: asyncpg.Pool, message_id: str, lease: float) -> asyncpg.Record:
    """Claims what is due (as a worker's round does, without a share per target) and answers the
    message's delivery."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(callbacks._CLAIM, 100, lease, 100, [], [])
    (row,) = [r for r in rows if r["payload"]["data"]["message_id"] == message_id]
    return row


async def _settled(pool: asyncpg.Pool, message_id: str, timeout: float = 10) -> list[asyncpg.Record]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await deliveries(pool, message_id)
        if (rows and all(r["status"] != "pending" for r in rows)) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def test_a_try_is_cut_at_the_timeout_before_its_lease_ends(
    dsn: str, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """A receiver that trickles its answer (a byte every 0.1 s: httpx's per-read timeout never
    trips) for longer than the lease: the whole try is cut at HERALD_CALLBACK_TIMEOUT_S (1 s here),
    before its lease (1.6 s here; 30 s longer than the timeout in production) ends, so no worker
    claims it again meanwhile; it is recorded once, and the retry delivers."""
    tenant = await new_tenant(pool)
    path = "/w/trickle"
    receiver.trickle[path] = 3.0
    await add_endpoint(pool, tenant, receiver.url(path), ["sent"])
    events = lifecycle(tenant)
    workers = [CallbackWorker(settings(dsn, callback_concurrency=2), pool, BOX) for _ in range(2)]
    for w in workers:
        w.lease_s = 1.6
    running = [asyncio.create_task(w.run()) for w in workers]
    try:
        await fold(pool, events)
        (row,) = await _settled(pool, events[0].message_id)
        # Until the trickle's end and a little: a try not cut would end (and be recorded) then.
        first = receiver.at(path)[0].at
        await asyncio.sleep(max(0.0, first + 3.4 - time.time()))
    finally:
        for w in workers:
            w.stop()
        await asyncio.wait_for(asyncio.gather(*running), 5)
    (row,) = await deliveries(pool, events[0].message_id)
    assert row["status"] == "delivered" and row["attempts"] == 2 and row["last_status_code"] == 200
    tries = await pool.fetch("SELECT attempt, status_code, error, duration_ms FROM callback_attempts "
                             "WHERE delivery_id = $1 ORDER BY id", row["id"])  # fmt: skip
    assert [(t["attempt"], t["status_code"], t["error"]) for t in tries] == [
        (1, None, "timed out after 1 s"), (2, 200, None)]  # fmt: skip
    assert 900 <= tries[0]["duration_ms"] < 1500, tries[0]["duration_ms"]
    assert len(receiver.at(path)) == 2  # the first try once, not again when a lease ran out


async def test_a_stale_workers_outcome_is_not_recorded(
    dsn: str, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """A worker that outlived its lease (stalled) and another that claimed the delivery since:
    the stale one's outcome is not recorded, whether it ends before or after the owner's."""
    tenant = await new_tenant(pool)
    path = "/w/stale"
    await add_endpoint(pool, tenant, receiver.url(path), ["sent"])
    stale, owner = CallbackWorker(settings(dsn), pool, BOX), CallbackWorker(settings(dsn), pool, BOX)
    try:
        for stale_ends_first in (False, True):
            events = lifecycle(tenant)
            mid = events[0].message_id
            await fold(pool, events)
            old = await claim(pool, mid, 0.05)
            await asyncio.sleep(0.1)  # its lease ran out
            new = await claim(pool, mid, 30)
            if stale_ends_first:  # the stale try fails while the owner's is still out
                receiver.plan[path] = [500, 200]
                await stale._deliver(old)
                await owner._deliver(new)
            else:  # the owner delivered; the stale try ends after, failed
                receiver.plan[path] = [200, 500]
                await owner._deliver(new)
                await stale._deliver(old)
            (row,) = await deliveries(pool, mid)
            assert (row["status"], row["attempts"], row["last_status_code"]) == ("delivered", 1, 200), stale_ends_first
            tries = await pool.fetch("SELECT attempt, status_code FROM callback_attempts WHERE delivery_id = $1",
                                     row["id"])  # fmt: skip
            assert [(t["attempt"], t["status_code"]) for t in tries] == [(1, 200)], stale_ends_first
    finally:
        await stale.client.aclose()
        await owner.client.aclose()


async def test_pruning_goes_on_while_every_slot_is_taken(dsn: str, pool: asyncpg.Pool) -> None:
    """Under a backlog every slot stays taken and each round returns early: pruning runs on its
    timer all the same."""
    tenant = await new_tenant(pool)

    async def delivery(name: str, status: str, age_days: int) -> int:
        return await pool.fetchval(
            """INSERT INTO callback_deliveries (tenant_id, message_id, event_id, url, event_type, payload, status,
                   created_at)
               VALUES ($1, $2, $3, 'http://127.0.0.1/x', 'message.sent', '{}', $4,
                   now() - make_interval(days => $5)) RETURNING id""",
            tenant, f"msg_{name}", f"{tenant}:{name}", status, age_days,
        )  # fmt: skip

    old = await delivery("old", "delivered", 40)
    old_failed = await delivery("old-failed", "failed", 31)
    recent = await delivery("recent", "delivered", 1)
    waiting = await delivery("waiting", "pending", 40)
    await pool.execute("UPDATE callback_deliveries SET next_attempt_at = now() + interval '1 hour' WHERE id = $1",
                       waiting)  # fmt: skip
    await pool.execute("""INSERT INTO callback_attempts (delivery_id, attempt, attempted_at, url, duration_ms)
                          VALUES ($1, 1, now(), 'http://127.0.0.1/x', 1)""", old)  # fmt: skip
    worker = CallbackWorker(settings(dsn, callback_concurrency=1), pool, BOX)
    busy = asyncio.create_task(asyncio.sleep(30))
    worker._inflight.add(busy)  # every slot taken
    try:
        assert await worker._round() == worker.settings.callback_max_sleep_s
    finally:
        busy.cancel()
        await worker.client.aclose()
    left = await pool.fetch("SELECT id FROM callback_deliveries WHERE tenant_id = $1", tenant)
    assert sorted(r["id"] for r in left) == sorted([recent, waiting])
    assert await pool.fetchval("SELECT count(*) FROM callback_attempts WHERE delivery_id = $1", old) == 0
    assert old_failed not in {r["id"] for r in left}
    await pool.execute("UPDATE callback_deliveries SET status = 'failed' WHERE id = $1", waiting)


async def test_urls_are_whole_for_the_tries_and_masked_beside_them(
    dsn: str, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """A message's own callback_url with a query: every try (the retry too) goes to the whole
    URL; the tries' rows keep it with the query's values masked."""
    tenant = await new_tenant(pool)
    await pool.execute("INSERT INTO callback_signing_secrets (tenant_id, secret) VALUES ($1, $2)", tenant,
                       BOX.encrypt(new_signing_secret(), tenant_secret_purpose(tenant)))  # fmt: skip
    path = "/w/query"
    url = receiver.url(path) + "?token=s3cr3t-value&ref=42"
    receiver.plan[path] = [500]
    events = lifecycle(tenant, callback_url=url)
    worker = CallbackWorker(settings(dsn), pool, BOX)
    running = asyncio.create_task(worker.run())
    try:
        await fold(pool, events)
        (row,) = await _settled(pool, events[0].message_id)
    finally:
        worker.stop()
        await asyncio.wait_for(running, 5)
    assert row["status"] == "delivered" and row["attempts"] == 2 and row["url"] == url
    assert receiver.queries[path] == ["token=s3cr3t-value&ref=42"] * 2
    tries = await pool.fetch("SELECT url FROM callback_attempts WHERE delivery_id = $1", row["id"])
    assert [t["url"] for t in tries] == [receiver.url(path) + "?token=***&ref=***"] * 2


async def test_only_the_first_kilobytes_of_an_answer_are_read(
    dsn: str, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """An endpoint answering 200 with a body without end (64 KB chunks, as fast as they are read):
    the try reads ANSWER_READ_MAX_BYTES of it and hangs up, delivered at once; reading the whole
    answer would fill the tracker's memory, and be cut at the timeout (1 s here) as a failure."""
    tenant = await new_tenant(pool)
    path = "/w/flood"
    receiver.flood[path] = 5.0
    await add_endpoint(pool, tenant, receiver.url(path), ["sent"])
    events = lifecycle(tenant)
    worker = CallbackWorker(settings(dsn), pool, BOX)
    running = asyncio.create_task(worker.run())
    try:
        await fold(pool, events)
        (row,) = await _settled(pool, events[0].message_id)
    finally:
        worker.stop()
        await asyncio.wait_for(running, 5)
    assert (row["status"], row["attempts"], row["last_status_code"], row["last_error"]) == ("delivered", 1, 200, None)
    assert len(receiver.at(path)) == 1
    # What the receiver managed to write before the hang-up: the sockets' buffers, not the 5 s flood.
    assert receiver.flooded[path] < 64 * 2**20, receiver.flooded[path]


async def test_a_dead_endpoint_does_not_take_every_slot(
    dsn: str, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """A tenant's endpoint that never answers in time (each try cut at the 1 s timeout) with 2,500
    callbacks due (more than a claim looks at), another tenant's one callback due after them all, a
    worker of 4 slots: the dead endpoint gets its share (one slot) and the other callback is tried
    before any try of the dead endpoint ended (not after they have used every slot)."""
    dead, other = await new_tenant(pool), await new_tenant(pool)
    receiver.slow["/w/dead"] = 2.0
    dead_endpoint, _ = await add_endpoint(pool, dead, receiver.url("/w/dead"), ["sent"])
    await add_endpoint(pool, other, receiver.url("/w/prompt"), ["sent"])
    await pool.execute(
        """INSERT INTO callback_deliveries (tenant_id, message_id, event_id, endpoint_id, url, event_type, payload,
               next_attempt_at)
           SELECT $1::text, 'msg_dead_' || i, $1::text || ':' || i, $2, $3, 'message.sent', '{"type": "message.sent"}',
               now() - interval '1 hour' + i * interval '1 ms'
           FROM generate_series(1, 2500) AS i""",
        dead, dead_endpoint, receiver.url("/w/dead"),
    )  # fmt: skip
    mine = lifecycle(other)
    await fold(pool, mine)
    worker = CallbackWorker(settings(dsn, callback_concurrency=4), pool, BOX)
    assert worker.per_target == 1
    dead_tries = """SELECT a.attempted_at AS started, a.attempted_at + make_interval(secs => a.duration_ms / 1000)
                           AS ended, a.error
                    FROM callback_attempts a JOIN callback_deliveries d ON d.id = a.delivery_id
                    WHERE d.tenant_id = $1 ORDER BY a.attempted_at"""
    running = asyncio.create_task(worker.run())
    try:
        (row,) = await _settled(pool, mine[0].message_id)
        for _ in range(200):  # until the dead endpoint's first two tries have ended (timed out)
            tried = await pool.fetch(dead_tries, dead)
            if len(tried) >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await asyncio.wait_for(running, 5)
    assert row["status"] == "delivered" and row["attempts"] == 1
    prompt = await pool.fetchval("SELECT attempted_at FROM callback_attempts WHERE delivery_id = $1", row["id"])
    assert len(tried) >= 2 and all(t["error"] == "timed out after 1 s" for t in tried), tried
    assert prompt < tried[0]["ended"]
    # One slot at a time for the dead endpoint: each of its tries began after the one before ended.
    assert all(b["started"] >= a["ended"] for a, b in zip(tried, tried[1:], strict=False)), tried
    await pool.execute("UPDATE callback_deliveries SET status = 'failed' WHERE tenant_id = ANY($1)", [dead, other])


async def test_the_next_try_is_due_on_the_databases_clock(
    dsn: str, pool: asyncpg.Pool, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tracker whose clock is an hour ahead of the database's: its failed try's retry is due
    0.2 s after the database's now() (the clock the claim compares with), not an hour late."""

    class Ahead(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(hours=1)

    tenant = await new_tenant(pool)
    path = "/w/clock"
    receiver.plan[path] = [500]
    await add_endpoint(pool, tenant, receiver.url(path), ["sent"])
    events = lifecycle(tenant)
    await fold(pool, events)
    row = await claim(pool, events[0].message_id, 30)
    worker = CallbackWorker(settings(dsn), pool, BOX)
    monkeypatch.setattr(callbacks, "datetime", Ahead)
    try:
        await worker._deliver(row)
    finally:
        await worker.client.aclose()
    (row,) = await deliveries(pool, events[0].message_id)
    assert row["status"] == "pending" and row["attempts"] == 1 and row["last_status_code"] == 500
    due_in = await pool.fetchval("SELECT EXTRACT(EPOCH FROM next_attempt_at - now()) FROM callback_deliveries "
                                 "WHERE id = $1", row["id"])  # fmt: skip
    assert -5 < float(due_in) <= 0.2, due_in
    await pool.execute("UPDATE callback_deliveries SET status = 'failed' WHERE tenant_id = $1", tenant)


async def test_a_stale_tries_410_disables_nothing(dsn: str, pool: asyncpg.Pool, receiver: Receiver) -> None:
    """A try that no longer owns its delivery (its lease ran out, another worker claimed it) gets
    410 Gone: its outcome is not recorded, and the endpoint is not disabled either; the owner's
    try delivers."""
    tenant = await new_tenant(pool)
    path = "/w/stale-gone"
    endpoint, _ = await add_endpoint(pool, tenant, receiver.url(path), ["sent"])
    events = lifecycle(tenant)
    await fold(pool, events)
    old = await claim(pool, events[0].message_id, 0.05)
    await asyncio.sleep(0.1)  # its lease ran out
    new = await claim(pool, events[0].message_id, 30)
    stale, owner = CallbackWorker(settings(dsn), pool, BOX), CallbackWorker(settings(dsn), pool, BOX)
    receiver.plan[path] = [410, 200]
    try:
        await stale._deliver(old)
        endpoint_row = await pool.fetchrow("SELECT is_active, disabled_reason FROM webhook_configs WHERE id = $1",
                                           endpoint)  # fmt: skip
        assert (endpoint_row["is_active"], endpoint_row["disabled_reason"]) == (True, None)
        await owner._deliver(new)
    finally:
        await stale.client.aclose()
        await owner.client.aclose()
    (row,) = await deliveries(pool, events[0].message_id)
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("delivered", 1, 200)
    assert [g.path for g in receiver.got if g.path == path] == [path, path]
