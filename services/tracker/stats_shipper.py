"""Shipping the statistics outbox to ClickHouse (HERALD_STATS_BACKEND=clickhouse).

With ClickHouse keeping the statistics, every outcome is written to ``stats_outbox`` in the
transaction that makes it (the tracker's fold, ingest's cancellations, the scheduler's rejections:
shared/statistics.py count_outcomes), and the trackers ship it: each round claims the oldest rows
(``FOR UPDATE SKIP LOCKED``, so trackers share the work), inserts them into ClickHouse and deletes
them in the same transaction. Rows shipped and then not deleted (a crash between the two) are
shipped again: ClickHouse keeps one row per event id (``ReplacingMergeTree``, read with ``FINAL``).

ClickHouse being away, slow or overloaded never holds the ledger: the folds go on, the outbox grows,
and it is shipped when ClickHouse answers again. A batch ClickHouse refuses for its data (a type,
a value out of range) is split until the rows it refuses are found; those are kept in the outbox
with ``failed_at`` and the reason (counted in ``herald_statistics_dropped_total``), the others
shipped. An unknown table or database (dropped by hand) makes the next round create them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

import asyncpg

from services.statistics_clickhouse import ClickHouseStatistics
from shared.db import DB_UNAVAILABLE
from shared.logging import log_event
from shared.metrics import STATISTICS_DROPPED
from shared.settings import Settings

log = logging.getLogger("herald.tracker.stats")

_CLAIM = """
SELECT id, event_id, tenant_id, occurred_at, channel, provider, template_id, status, cost, latency_ms
FROM stats_outbox WHERE failed_at IS NULL ORDER BY id LIMIT $1
FOR UPDATE SKIP LOCKED
"""
_DELETE = "DELETE FROM stats_outbox WHERE id = ANY($1::bigint[])"
_REFUSE = "UPDATE stats_outbox SET failed_at = now(), last_error = $2 WHERE id = $1"

# ClickHouse's error codes for data it cannot take (waiting does not mend them): CANNOT_PARSE_TEXT,
# CANNOT_PARSE_INPUT_ASSERTION_FAILED, TYPE_MISMATCH, ARGUMENT_OUT_OF_BOUND, CANNOT_CONVERT_TYPE,
# CANNOT_PARSE_NUMBER, DECIMAL_OVERFLOW. Every other server error (too many parts, memory limit,
# read-only, timeouts, too many queries) is waited out.
DATA_ERRORS = frozenset({6, 27, 53, 69, 70, 72, 407})
# UNKNOWN_TABLE, UNKNOWN_DATABASE: the schema is made again by the next connection.
SCHEMA_ERRORS = frozenset({60, 81})
_CODE = re.compile(r"Code: (\d+)")


class _Refused(Exception):
    """ClickHouse refuses these rows for their data."""


def error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if code is None and (found := _CODE.search(str(exc))):
        code = int(found.group(1))
    return code


def kind_of(exc: BaseException) -> str:
    """``data`` (refused for good), ``schema`` (make the table again), else ``wait``."""
    from clickhouse_connect.driver import exceptions as ch  # the optional extra

    if isinstance(exc, ch.OperationalError | OSError | TimeoutError):
        return "wait"
    code = error_code(exc)
    if code in SCHEMA_ERRORS:
        return "schema"
    if code in DATA_ERRORS or isinstance(exc, ch.DataError | ch.ProgrammingError | ValueError | TypeError):
        return "data"
    return "wait"


class StatsShipper:
    def __init__(
        self, pool: asyncpg.Pool, store: ClickHouseStatistics, settings: Settings, *, batch: int = 1000,
        idle_s: float = 1.0,
    ) -> None:  # fmt: skip
        self.pool = pool
        self.store = store
        self.settings = settings
        self.batch = batch
        self.idle_s = idle_s

    async def run(self, stopping: asyncio.Event) -> None:
        delay = 0.5
        while not stopping.is_set():
            try:
                shipped = await self.ship_once()
                delay = 0.5
                wait = 0.0 if shipped >= self.batch else self.idle_s
            except (*DB_UNAVAILABLE, OSError) as exc:
                log.warning("statistics outbox unreadable (%s); next round in %.1fs", exc.__class__.__name__, delay)
                wait, delay = delay, min(delay * 2, 30.0)
            except Exception as exc:  # noqa: BLE001 - ClickHouse away or overloaded: the outbox waits
                if kind_of(exc) == "schema":
                    await self.store.close()  # the next connection makes the table again
                log.warning("statistics not shipped to ClickHouse (%s: %s); next round in %.1fs",
                            exc.__class__.__name__, str(exc)[:200], delay)  # fmt: skip
                wait, delay = delay, min(delay * 2, 30.0)
            if wait:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), wait)

    async def ship_once(self) -> int:
        """One round: answers the rows claimed (shipped or set aside as refused)."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, self.batch)
            if not rows:
                return 0
            refused = await self._send([dict(r) for r in rows])
            for row, reason in refused:
                await conn.execute(_REFUSE, row["id"], reason[:1000])
            gone = {row["id"] for row, _ in refused}
            await conn.execute(_DELETE, [r["id"] for r in rows if r["id"] not in gone])
        if refused:
            STATISTICS_DROPPED.inc(len(refused))
            log_event(log, logging.ERROR, "ClickHouse refused outcomes for their data; kept in stats_outbox",
                      rows=len(refused), error=refused[0][1][:300])  # fmt: skip
        return len(rows)

    async def _send(self, rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
        """Insert ``rows``; answers those refused for their data, each with the reason (the
        others are in ClickHouse). Raises when ClickHouse should be waited for."""
        try:
            await self.store.record(rows)
            return []
        except Exception as exc:
            if kind_of(exc) != "data":
                raise
            if len(rows) == 1:
                return [(rows[0], f"{exc.__class__.__name__}: {exc}")]
        half = len(rows) // 2
        return [*await self._send(rows[:half]), *await self._send(rows[half:])]
