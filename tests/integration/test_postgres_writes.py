"""The batched writes of ingest and tracker against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.ingest.publish import NewRecord, RecordBatcher
from services.tracker.fold import fold_plan, write_fold
from shared.db import apply_migrations, create_pool
from shared.events import Channel, EventV1, MessageSnapshot, RequestV1, State, event_id
from shared.ids import new_message_id
from shared.settings import Settings
from tests.conftest import Backing


@pytest.fixture(scope="module")
async def pool(backing: Backing) -> AsyncIterator[asyncpg.Pool]:
    await asyncio.to_thread(apply_migrations, backing.dsn)
    p = await create_pool(Settings(database_url=backing.dsn, db_pool_min=1, db_pool_max=4))
    yield p
    await p.close()


def new_record(key: str | None = None, to: str = "a@example.com") -> NewRecord:
    now = datetime.now(UTC)
    req = RequestV1(
        message_id=new_message_id(now),
        channel=Channel.EMAIL,
        to=[to],
        subject="s",
        content="c",
        idempotency_key=key,
        accepted_at=now,
        recorded=True,
    )
    return NewRecord(req, {"to": [to], "cc": [], "bcc": []}, now)


async def test_concurrent_requests_are_written_in_few_statements(pool: asyncpg.Pool) -> None:
    batcher = RecordBatcher(pool, max_batch=64, max_wait_ms=5)
    batcher.start()
    try:
        records = [new_record(to=f"u{i}@example.com") for i in range(200)]
        outcomes = await asyncio.gather(*(batcher.insert(r) for r in records))
    finally:
        await batcher.stop()
    assert all(o.created for o in outcomes)
    ids = [r.request.message_id for r in records]
    assert [o.message_id for o in outcomes] == ids
    rows = await pool.fetch(
        "SELECT m.message_id, m.state, m.recipients, e.state AS ev FROM message_records m "
        "JOIN message_events e USING (message_id) WHERE m.message_id = ANY($1)",
        ids,
    )
    assert len(rows) == 200
    assert {(r["state"], r["ev"]) for r in rows} == {("accepted", "accepted")}
    assert rows[0]["recipients"]["to"] == [rows[0]["recipients"]["to"][0]]


async def test_one_idempotency_key_yields_one_message_even_within_a_batch(pool: asyncpg.Pool) -> None:
    batcher = RecordBatcher(pool, max_batch=64, max_wait_ms=20)
    batcher.start()
    key = f"k-{uuid.uuid4().hex}"
    try:
        outcomes = await asyncio.gather(*(batcher.insert(new_record(key)) for _ in range(5)))
        later = await batcher.insert(new_record(key))
    finally:
        await batcher.stop()
    winners = {o.message_id for o in outcomes}
    assert len(winners) == 1 and later.message_id in winners
    assert sum(o.created for o in outcomes) == 1 and not later.created
    assert await pool.fetchval("SELECT count(*) FROM message_records WHERE idempotency_key=$1", key) == 1


def event(message_id: str, state: State, attempt: int, at: datetime, **kw) -> EventV1:
    return EventV1(
        event_id=event_id(message_id, attempt, state),
        message_id=message_id,
        state=state,
        attempt=attempt,
        occurred_at=at,
        service="test",
        **kw,
    )


async def test_fold_is_idempotent_and_never_moves_a_state_back(pool: asyncpg.Pool) -> None:
    t0 = datetime.now(UTC)
    mid = new_message_id(t0)
    snapshot = MessageSnapshot(
        channel="email",
        recipient="z@example.com",
        recipients={"to": ["z@example.com"]},
        subject="direct",
        accepted_at=t0,
    )
    first = [
        event(mid, State.ACCEPTED, 0, t0, message=snapshot),
        event(mid, State.ROUTED, 0, t0 + timedelta(milliseconds=1), message=snapshot),
        event(mid, State.SENDING, 1, t0 + timedelta(milliseconds=2)),
        event(
            mid,
            State.SENT,
            1,
            t0 + timedelta(milliseconds=3),
            provider="smtp",
            detail={"account": "a@example.org", "provider_message_id": "<x@y>"},
        ),
    ]
    async with pool.acquire() as conn:
        await write_fold(conn, fold_plan(first))
        await write_fold(conn, fold_plan(first))  # redelivered batch
        # A late 'sending' of the same attempt arrives on its own: no regression.
        await write_fold(conn, fold_plan([first[2]]))
    row = await pool.fetchrow("SELECT * FROM message_records WHERE message_id=$1", mid)
    assert (row["state"], row["status"], row["attempt"]) == ("sent", "success", 1)
    assert row["sent_at"] == t0 + timedelta(milliseconds=3)
    assert row["sender_info"] == {"provider": "smtp", "account": "a@example.org", "provider_message_id": "<x@y>"}
    assert row["subject"] == "direct" and row["recipient"] == "z@example.com"
    states = await pool.fetch("SELECT state FROM message_events WHERE message_id=$1 ORDER BY occurred_at", mid)
    assert [s["state"] for s in states] == ["accepted", "routed", "sending", "sent"]


async def test_a_later_attempt_moves_past_an_earlier_failure(pool: asyncpg.Pool) -> None:
    t0 = datetime.now(UTC)
    mid = new_message_id(t0)
    snapshot = MessageSnapshot(channel="email", recipient="y@example.com")
    async with pool.acquire() as conn:
        await write_fold(
            conn,
            fold_plan(
                [
                    event(mid, State.ACCEPTED, 0, t0, message=snapshot),
                    event(mid, State.FAILED, 1, t0, error_code=2009, error="SMTP connection failed"),
                ]
            ),
        )
        row = await conn.fetchrow("SELECT state, status, error_code FROM message_records WHERE message_id=$1", mid)
        assert tuple(row) == ("failed", "failed", 2009)
        await write_fold(conn, fold_plan([event(mid, State.SENDING, 2, t0 + timedelta(seconds=60))]))
        row = await conn.fetchrow("SELECT state, status, retry_count FROM message_records WHERE message_id=$1", mid)
        assert tuple(row) == ("sending", "sending", 1)


async def test_a_record_created_after_its_outcome_catches_up(pool: asyncpg.Pool) -> None:
    """After a router crash its 'accepted'/'routed' events may be lost while the dispatch was
    delivered: the sender's events arrive first, the router's replay creates the record later."""
    t0 = datetime.now(UTC)
    mid = new_message_id(t0)
    snapshot = MessageSnapshot(channel="email", recipient="late@example.com", accepted_at=t0)
    sent = event(mid, State.SENT, 1, t0 + timedelta(milliseconds=3), provider="smtp", detail={"account": "a@x.org"})
    async with pool.acquire() as conn:
        await write_fold(conn, fold_plan([event(mid, State.SENDING, 1, t0 + timedelta(milliseconds=2)), sent]))
        assert await conn.fetchval("SELECT count(*) FROM message_records WHERE message_id=$1", mid) == 0
        replay = [
            event(mid, State.ACCEPTED, 0, t0 + timedelta(seconds=20), message=snapshot),
            event(mid, State.ROUTED, 0, t0 + timedelta(seconds=20), message=snapshot),
        ]
        await write_fold(conn, fold_plan(replay))
        row = await conn.fetchrow(
            "SELECT state, status, sent_at, sender_info FROM message_records WHERE message_id=$1", mid
        )
    assert (row["state"], row["status"], row["sent_at"]) == ("sent", "success", sent.occurred_at)
    assert row["sender_info"] == {"provider": "smtp", "account": "a@x.org"}


async def test_parkings_are_stored_once_and_never_pull_back_a_message_on_its_way(pool: asyncpg.Pool) -> None:
    """The tracker's parking statement: a direct publisher's message is created and parked in one
    fold; a deferral parks it again after its release; a parking redelivered after the message
    moved on (routed and sent in the same batch) changes neither its state nor its task."""
    from services.router.routing import park

    now = datetime.now(UTC)
    request = RequestV1(message_id=new_message_id(now), channel=Channel.EMAIL, to=["p@example.com"], subject="s",
                        content="c", accepted_at=now, category="news")  # fmt: skip
    message_id = request.message_id
    first = park(request, now + timedelta(hours=1), "scheduled", now)
    async with pool.acquire() as conn:
        await write_fold(conn, fold_plan(first.events))
        await write_fold(conn, fold_plan(first.events))  # redelivered: the same
    task = "SELECT status, seq, reason FROM scheduled_tasks WHERE message_id=$1"
    record = "SELECT state, category, request->>'scheduled_at' AS at FROM message_records WHERE message_id=$1"
    assert dict(await pool.fetchrow(task, message_id)) == {"status": "pending", "seq": 0, "reason": "scheduled"}
    row = await pool.fetchrow(record, message_id)
    assert row["state"] == "scheduled" and row["category"] == "news" and row["at"] is not None
    # Released (as the scheduler does), then deferred by a cap: parked again, number 1.
    await pool.execute("UPDATE scheduled_tasks SET status='executed' WHERE message_id=$1", message_id)
    await pool.execute("UPDATE message_records SET state='accepted', state_rank=0 WHERE message_id=$1", message_id)
    deferred = park(first.request.model_copy(update={"scheduled_at": None}), now + timedelta(minutes=5),
                    "deferred", now)  # fmt: skip
    async with pool.acquire() as conn:
        await write_fold(conn, fold_plan(deferred.events))
    assert dict(await pool.fetchrow(task, message_id)) == {"status": "pending", "seq": 1, "reason": "deferred"}
    assert (await pool.fetchrow(record, message_id))["state"] == "scheduled"
    # Released again and sent; a later deferral's event arrives in the batch with the routed and
    # sent ones (a router replay): the message stays sent and its task is not made pending.
    await pool.execute("UPDATE scheduled_tasks SET status='executed' WHERE message_id=$1", message_id)
    await pool.execute("UPDATE message_records SET state='accepted', state_rank=0 WHERE message_id=$1", message_id)
    late = park(deferred.request.model_copy(update={"scheduled_at": None}), now + timedelta(minutes=9),
                "deferred", now)  # fmt: skip

    def event(state: State, attempt: int) -> EventV1:
        return EventV1(event_id=event_id(message_id, attempt, state), message_id=message_id, state=state,
                       attempt=attempt, service="test", channel="email")  # fmt: skip

    async with pool.acquire() as conn:
        await write_fold(conn, fold_plan([*late.events, event(State.ROUTED, 0), event(State.SENT, 1)]))
    assert dict(await pool.fetchrow(task, message_id)) == {"status": "executed", "seq": 1, "reason": "deferred"}
    assert (await pool.fetchrow(record, message_id))["state"] == "sent"
