"""Rollups kept by the tracker's fold, the statistics read from them, and retention, against a real
PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.ingest.statistics import PostgresStatistics, breakdown, parse_range, summary
from services.router.schedule import Scheduler
from services.tracker.fold import fold_plan, write_fold
from shared.db import apply_migrations, create_pool
from shared.events import EventV1, MessageSnapshot, State, event_id
from shared.retention import archive
from shared.settings import Settings
from tests.conftest import Backing

T0 = datetime(2026, 11, 20, 10, 0, 5, tzinfo=UTC)


@pytest.fixture(scope="module")
async def pool(backing: Backing) -> AsyncIterator[asyncpg.Pool]:
    await asyncio.to_thread(apply_migrations, backing.dsn)
    p = await create_pool(Settings(database_url=backing.dsn, db_pool_min=1, db_pool_max=6))
    yield p
    await p.close()


def tenant() -> str:
    return f"stats-{uuid.uuid4().hex[:10]}"


def lifecycle(
    tenant_id: str, mid: str, outcome: State, at: datetime, channel: str = "sms", took_ms: int = 800, **kw
) -> list[EventV1]:
    """A message accepted at ``at`` and ending in ``outcome`` took_ms later."""
    snapshot = MessageSnapshot(channel=channel, recipient="+8613800000000", accepted_at=at)
    common = {"message_id": mid, "tenant_id": tenant_id, "service": "test"}
    return [
        EventV1(event_id=event_id(mid, 0, State.ACCEPTED), state=State.ACCEPTED, attempt=0, occurred_at=at,
                message=snapshot, **common),
        EventV1(event_id=event_id(mid, 1, outcome), state=outcome, attempt=1, channel=channel,
                occurred_at=at + timedelta(milliseconds=took_ms), **common, **kw),
    ]  # fmt: skip


async def fold(pool: asyncpg.Pool, events: list[EventV1]) -> list:
    async with pool.acquire() as conn:
        return await write_fold(conn, fold_plan(events))


async def rows(pool: asyncpg.Pool, table: str, tenant_id: str) -> list[tuple]:
    got = await pool.fetch(
        f"""SELECT bucket_start, channel, provider, template_id, status, count, cost_sum, latency_sum_ms,
                   latency_buckets FROM {table} WHERE tenant_id = $1 ORDER BY 1, 2, 3, 5""",
        tenant_id,
    )
    return [tuple(r) for r in got]


async def test_each_outcome_is_counted_once_at_three_widths(pool: asyncpg.Pool) -> None:
    t = tenant()
    sent = {"provider_name": "aliyun-main", "cost": "0.035"}
    batch = [
        *lifecycle(t, f"{t}-a", State.SENT, T0, provider="aliyun", detail=sent),
        *lifecycle(t, f"{t}-b", State.SENT, T0 + timedelta(seconds=70), provider="aliyun", detail=sent, took_ms=3000),
        *lifecycle(t, f"{t}-c", State.DEAD, T0, provider="tencent", detail={"provider_name": "tencent"}),
        *lifecycle(t, f"{t}-d", State.SUPPRESSED, T0, channel="email"),
    ]
    counted = await fold(pool, batch)
    assert sorted(o.status for o in counted) == ["dead", "sent", "sent", "suppressed"]
    assert await fold(pool, batch) == []  # the same batch folded again counts nothing
    assert await fold(pool, batch[2:4]) == []

    minute = await rows(pool, "stats_minute", t)
    assert [(r[0].minute, r[1], r[2], r[4], r[5]) for r in minute] == [
        (0, "email", "", "suppressed", 1),
        (0, "sms", "aliyun-main", "sent", 1),
        (0, "sms", "tencent", "dead", 1),
        (1, "sms", "aliyun-main", "sent", 1),
    ]
    hour = await rows(pool, "stats_hour", t)
    sent_hour = next(r for r in hour if r[4] == "sent")
    assert sent_hour[0] == datetime(2026, 11, 20, 10, tzinfo=UTC)
    assert (sent_hour[5], str(sent_hour[6]), sent_hour[7]) == (2, "0.070000", 3800)
    assert sent_hour[8][3] == 1 and sent_hour[8][5] == 1  # 800 ms (<= 1 s bucket), 3 s (<= 5 s bucket)
    assert sum(sent_hour[8]) == 2
    day = await rows(pool, "stats_day", t)
    assert {(r[1], r[4], r[5]) for r in day} == {("email", "suppressed", 1), ("sms", "sent", 2), ("sms", "dead", 1)}

    # A delivery receipt later: an outcome of its own, the sent count unchanged.
    receipt = EventV1(event_id=event_id(f"{t}-a", 1, State.DELIVERED), message_id=f"{t}-a", tenant_id=t,
                      state=State.DELIVERED, attempt=1, channel="sms", provider="aliyun", service="test",
                      occurred_at=T0 + timedelta(seconds=5), detail={"provider_name": "aliyun-main"})  # fmt: skip
    await fold(pool, [receipt])
    day = await rows(pool, "stats_day", t)
    assert {(r[4], r[5]) for r in day if r[1] == "sms"} == {("sent", 2), ("dead", 1), ("delivered", 1)}


async def test_trackers_folding_at_once_add_up(pool: asyncpg.Pool) -> None:
    """Two trackers (two connections) adding to the same rows at the same moment: no update lost."""
    t = tenant()
    batches = [
        [e for i in range(40) for e in lifecycle(t, f"{t}-{k}-{i}", State.SENT, T0, provider="p",
                                                  detail={"cost": "0.01"})]  # fmt: skip
        for k in range(4)
    ]
    await asyncio.gather(*(fold(pool, b) for b in batches))
    day = await rows(pool, "stats_day", t)
    assert [(r[4], r[5], str(r[6])) for r in day] == [("sent", 160, "1.600000")]
    assert sum(day[0][8]) == 160 and day[0][7] == 160 * 800


async def test_summary_and_breakdowns_read_the_rollups(pool: asyncpg.Pool) -> None:
    t = tenant()
    day1, day2 = T0, T0 + timedelta(days=1, hours=3)
    template = await pool.fetchval(
        """INSERT INTO message_templates (tenant_id, template_name, content, variants)
           VALUES ($1, 'welcome', 'x', '[]') RETURNING id""",
        t,
    )
    events = []
    for i in range(6):  # day 1: 6 SMS, 5 sent (one via a template), 1 failed
        state = State.SENT if i < 5 else State.FAILED
        events += lifecycle(t, f"{t}-s{i}", state, day1, provider="aliyun",
                            detail={"provider_name": "aliyun-main", "cost": "0.03"} if state is State.SENT else None)
    for i in range(3):  # day 2: 3 emails sent, 1 dead
        events += lifecycle(t, f"{t}-e{i}", State.SENT, day2, channel="email", provider="smtp", took_ms=200)
    events += lifecycle(t, f"{t}-e9", State.DEAD, day2, channel="email", provider="smtp")
    events += lifecycle(t, f"{t}-x", State.SUPPRESSED, day2, channel="email")
    await fold(pool, events)
    await pool.execute("UPDATE message_records SET template_id = $2 WHERE message_id = $1", f"{t}-s0", template)
    await pool.execute("DELETE FROM stats_day WHERE tenant_id = $1", t)
    await pool.execute("DELETE FROM stats_hour WHERE tenant_id = $1", t)
    await pool.execute("DELETE FROM stats_minute WHERE tenant_id = $1", t)
    await pool.execute("DELETE FROM message_events WHERE tenant_id = $1", t)
    await fold(pool, events)  # counted again from scratch, now with the template known

    store = PostgresStatistics(pool)
    span = parse_range("2026-11-20", "2026-11-22")
    data = await summary(store, t, span, None)
    assert (data["total_sent"], data["success_count"], data["failed_count"], data["success_rate"]) == (
        10, 8, 2, 0.8)  # fmt: skip
    assert data["by_type"] == {"email": {"total": 4, "success": 3, "failed": 1},
                               "sms": {"total": 6, "success": 5, "failed": 1}}  # fmt: skip
    assert data["by_date"] == [
        {"date": "2026-11-20", "total": 6, "success": 5, "failed": 1},
        {"date": "2026-11-21", "total": 4, "success": 3, "failed": 1},
        {"date": "2026-11-22", "total": 0, "success": 0, "failed": 0},
    ]
    assert data["by_status"]["suppressed"] == 1 and data["cost"] == "0.15"
    only_sms = await summary(store, t, span, "sms")
    assert (only_sms["total_sent"], list(only_sms["by_type"])) == (6, ["sms"])

    by_provider = await breakdown(store, t, "provider", span, None)
    assert [(r["provider"], r["total"], r["success"], r["failed"], r["cost"]) for r in by_provider] == [
        ("aliyun-main", 5, 5, 0, "0.15"), ("smtp", 4, 3, 1, "0"), ("aliyun", 1, 0, 1, "0"),
        ("", 0, 0, 0, "0")]  # fmt: skip
    assert by_provider[3]["outcomes"]["suppressed"] == 1
    assert by_provider[1]["latency_avg_ms"] == round((3 * 200 + 800) / 4)
    by_template = await breakdown(store, t, "template", span, None)
    assert [(r["template"], r["template_name"], r["total"]) for r in by_template] == [
        (0, None, 9), (template, "welcome", 1)]  # fmt: skip
    by_hour = await breakdown(store, t, "hour", span, None)
    assert [(r["hour"], r["total"]) for r in by_hour] == [("2026-11-20T10:00:00Z", 6), ("2026-11-21T13:00:00Z", 4)]
    # A bound with a time reads the hourly rollups: just the second day's hour.
    narrow = await summary(store, t, parse_range("2026-11-21T13:20:00Z", "2026-11-21T13:40:00Z"), None)
    assert (narrow["total_sent"], narrow["by_type"]["email"]["total"]) == (4, 4)
    assert await breakdown(store, "another-tenant", "provider", span, None) == []


async def test_retention_archives_old_records_as_counts(pool: asyncpg.Pool) -> None:
    t, other = tenant(), tenant()
    now = datetime.now(UTC)
    old, older, recent = now - timedelta(days=40), now - timedelta(days=100), now - timedelta(days=2)
    events = [
        *lifecycle(t, f"{t}-old-sent", State.SENT, old),  # past 30 days: archived
        *lifecycle(t, f"{t}-old-failed", State.DEAD, old),  # failed, 40 days: kept (90)
        *lifecycle(t, f"{t}-older-failed", State.DEAD, older),  # failed, 100 days: archived
        *lifecycle(t, f"{t}-recent", State.SENT, recent),  # kept
        *lifecycle(other, f"{other}-old-sent", State.SENT, old),  # another tenant's: not in its run
    ]
    await fold(pool, events)
    # The fold itself marks a record's last change: its outcome's fold was just now.
    recent_row = await pool.fetchrow("SELECT updated_at FROM message_records WHERE message_id = $1", f"{t}-recent")
    assert recent_row["updated_at"] > now - timedelta(minutes=5)
    # Folded now: their last change as if it had happened when their outcome did.
    await pool.execute("UPDATE message_records SET updated_at = created_at + interval '1 second' "
                       "WHERE tenant_id = ANY($1)", [t, other])  # fmt: skip
    # A message accepted long ago and still waiting (scheduled far ahead): never deleted by age,
    # even with its last change as old as the oldest.
    await fold(pool, lifecycle(t, f"{t}-waiting", State.ROUTED, older)[:1])
    await pool.execute("UPDATE message_records SET updated_at = $2 WHERE message_id = $1", f"{t}-waiting", older)
    # Accepted 100 days ago for a time 98 days later, sent 2 days ago: as young as its delivery.
    await fold(pool, lifecycle(t, f"{t}-scheduled-sent", State.SENT, older, took_ms=98 * 86_400_000))
    await pool.execute("UPDATE message_records SET updated_at = $2 WHERE message_id = $1", f"{t}-scheduled-sent",
                       recent)  # fmt: skip
    settings = Settings(database_url="postgresql://unused", archive_batch=1)  # one record per transaction
    run = await archive(pool, settings, tenant_id=t, trigger="manual", now=now)
    assert (run.records, run.failed_records, run.events) == (2, 1, 4)
    left = {r["message_id"] for r in await pool.fetch("SELECT message_id FROM message_records WHERE tenant_id = $1", t)}
    assert left == {f"{t}-old-failed", f"{t}-recent", f"{t}-waiting", f"{t}-scheduled-sent"}
    assert await pool.fetchval("SELECT count(*) FROM message_events WHERE message_id = $1", f"{t}-old-sent") == 0
    archived = await pool.fetch("SELECT day, channel, status, count FROM message_archive WHERE tenant_id = $1 "
                                "ORDER BY day", t)  # fmt: skip
    assert [tuple(r) for r in archived] == [(older.date(), "sms", "failed", 1), (old.date(), "sms", "success", 1)]
    assert await pool.fetchval("SELECT count(*) FROM message_records WHERE tenant_id = $1", other) == 1
    # Statistics survive the records: the day rollups still count them.
    assert await pool.fetchval("SELECT sum(count) FROM stats_day WHERE tenant_id = $1", t) == 5
    assert (await archive(pool, settings, tenant_id=t, now=now)).records == 0  # nothing left to do

    # The periodic run (every tenant) trims the minute and hour rollups to their ages.
    await pool.execute(
        """INSERT INTO stats_minute (tenant_id, bucket_start, channel, status, count, latency_buckets)
           VALUES ($1, $2, 'sms', 'sent', 1, '{}'), ($1, $3, 'sms', 'sent', 1, '{}')""",
        other, now - timedelta(days=3), now - timedelta(hours=1),
    )  # fmt: skip
    run = await archive(pool, Settings(database_url="postgresql://unused"), now=now)
    assert run.records >= 1 and run.stats_rows >= 1
    assert await pool.fetchval("SELECT count(*) FROM stats_minute WHERE tenant_id = $1", other) == 1
    assert await pool.fetchval("SELECT count(*) FROM message_records WHERE tenant_id = $1", other) == 0
    kept = await pool.fetchrow("SELECT trigger, records FROM archive_runs WHERE tenant_id = $1 ORDER BY id LIMIT 1", t)
    assert tuple(kept) == ("manual", 2)


async def test_a_scheduled_message_the_broker_refuses_is_counted_and_called_back(pool: asyncpg.Pool) -> None:
    """The scheduler rejects a released message the broker can never take (too large): a status
    change no fold sees, counted (and its callbacks enqueued) in the rejecting transaction."""
    t = tenant()
    now = datetime.now(UTC)
    await fold(pool, lifecycle(t, f"{t}-big", State.ACCEPTED, now)[:1])
    scheduler = Scheduler(Settings(database_url="postgresql://unused"), pool, None)  # type: ignore[arg-type]
    await scheduler._reject([{"message_id": f"{t}-big"}])
    await scheduler._reject([{"message_id": f"{t}-big"}])  # again: nothing moves, nothing counted
    row = await pool.fetchrow("SELECT state, error_code FROM message_records WHERE message_id = $1", f"{t}-big")
    assert tuple(row) == ("rejected", 1001)
    day = await rows(pool, "stats_day", t)
    assert [(r[1], r[4], r[5]) for r in day] == [("sms", "rejected", 1)]
