"""Retention (seed 004 §3.1.5): message records whose last change (their outcome) is older than
``retention_days`` (failed ones: ``retention_failed_days``) are deleted with their timelines and
scheduled tasks, and what they were is kept in ``message_archive`` as counts per day, tenant,
channel and status. Rollups by
minute and by hour are trimmed to their own ages.

Each transaction deletes at most ``archive_batch`` records, counts them into the archive in the
same statement, and commits: a run stopped halfway has archived exactly what it deleted. The
periodic run (in the tracker) holds a PostgreSQL advisory lock, so one tracker at a time does it;
a tenant's manual run (``POST /api/v1/statistics/archive``) covers its own records only.

Age is counted from a record's last change, not its creation: a message scheduled 35 days ahead
is kept 30 days after it is sent. Records still on their way (pending, sending) are never deleted
by age, and a stuck one is the sweeper's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from shared.settings import Settings

log = logging.getLogger("herald.retention")

LOCK_KEY = 0x48455241_4C440B  # "HERALD" 11: the periodic archive's advisory lock

# The records to go, their events and scheduled tasks, counted into the archive: one statement.
_ARCHIVE = """
WITH doomed AS (
    SELECT id FROM message_records
    WHERE updated_at < $1 AND status = $2 AND ($4::text IS NULL OR tenant_id = $4)
    ORDER BY updated_at LIMIT $3
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM message_records m USING doomed d WHERE m.id = d.id
    RETURNING m.message_id, m.tenant_id, m.message_type, m.status, m.created_at
), events AS (
    DELETE FROM message_events e USING gone g WHERE e.message_id = g.message_id AND e.tenant_id = g.tenant_id
    RETURNING 1
), tasks AS (
    DELETE FROM scheduled_tasks t USING gone g WHERE t.message_id = g.message_id AND t.tenant_id = g.tenant_id
    RETURNING 1
), counted AS (
    INSERT INTO message_archive AS a (day, tenant_id, channel, status, count)
    SELECT (created_at AT TIME ZONE 'UTC')::date, tenant_id, message_type, status, count(*)
    FROM gone GROUP BY 1, 2, 3, 4
    ORDER BY 2, 1, 3, 4
    ON CONFLICT (tenant_id, day, channel, status) DO UPDATE SET count = a.count + EXCLUDED.count, archived_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS records, (SELECT count(*) FROM events) AS events,
       (SELECT count(*) FROM counted) AS archive_rows
"""


@dataclass(slots=True)
class ArchiveRun:
    records: int = 0
    failed_records: int = 0
    events: int = 0
    stats_rows: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


async def archive(
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    tenant_id: str | None = None,
    trigger: str = "schedule",
    now: datetime | None = None,
) -> ArchiveRun:
    """Archive what is past its age (one tenant's, or everyone's); answers what was done, which
    is also kept in ``archive_runs``."""
    now = now or datetime.now(UTC)
    run = ArchiveRun()
    run_id = await pool.fetchval(
        "INSERT INTO archive_runs (tenant_id, trigger) VALUES ($1, $2) RETURNING id", tenant_id, trigger
    )
    for status, days in (("success", settings.retention_days), ("failed", settings.retention_failed_days)):
        cut = now - timedelta(days=days)
        while True:
            async with pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(_ARCHIVE, cut, status, settings.archive_batch, tenant_id)
            run.records += row["records"]
            run.events += row["events"]
            if status == "failed":
                run.failed_records += row["records"]
            if row["records"] < settings.archive_batch:
                break
    if tenant_id is None:  # the rollups are everyone's: only the periodic run trims them
        for table, days in (("stats_minute", settings.stats_minute_days), ("stats_hour", settings.stats_hour_days)):
            result = await pool.execute(f"DELETE FROM {table} WHERE bucket_start < $1", now - timedelta(days=days))
            run.stats_rows += int(result.split()[-1])
    await pool.execute(
        """UPDATE archive_runs SET finished_at = now(), records = $2, failed_records = $3, events = $4,
               stats_rows = $5 WHERE id = $1""",
        run_id, run.records, run.failed_records, run.events, run.stats_rows,
    )  # fmt: skip
    return run


async def archive_periodically(pool: asyncpg.Pool, settings: Settings, stopping: asyncio.Event) -> None:
    """The tracker's periodic run: every ``archive_interval_s``, by whichever tracker takes the
    advisory lock (the others skip that round). Errors are logged and the next round tries again."""
    while not stopping.is_set():
        try:
            async with pool.acquire() as conn:
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
                    try:
                        run = await archive(pool, settings)
                        if run.records or run.stats_rows:
                            log.info("archived %s", run.as_dict())
                    finally:
                        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("archive run failed (%s); trying again next round", exc.__class__.__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), settings.archive_interval_s)
