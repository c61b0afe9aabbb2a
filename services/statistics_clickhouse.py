"""ClickHouse as the statistics backend (``HERALD_STATS_BACKEND=clickhouse``; docs/clickhouse.md).

The tracker hands :meth:`ClickHouseStatistics.record` the outcome events of each batch it folded
(the same outcomes PostgreSQL's rollups count: shared/statistics.py). One row per event in
``<database>.outcome_events``, a ReplacingMergeTree whose sorting key ends with the event's id: a
batch recorded twice (a tracker re-reads a batch after a crash) leaves two rows with the same key
until a merge keeps one, and every query reads ``FINAL``, so each event counts once either way.

Queries answer what :class:`services.ingest.statistics.StatisticsStore` asks for (``rows``), so
``GET /api/v1/statistics/summary`` and ``/breakdown`` give the same answer, field for field, from
either backend; :meth:`summary` and :meth:`breakdown` here are the same calls for whole days.

Written for, and tested against, the oldest server a user may have: Debian bookworm's ClickHouse
18.16.1, with clickhouse-connect 1.6 (the last release that still reads an 18.x server's
``system.settings``). Hence: no compression of requests (18.16 knows no ``lz4`` request body),
column types given on insert (18.16's ``DESCRIBE TABLE`` has columns newer clients do not expect),
values bound on the client (18.16 has no ``{name:Type}`` parameters), no TTL (19.6+), and second
precision times (no DateTime64 before 20.1).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, is_dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import unquote, urlsplit

from services.ingest.statistics import Range
from services.ingest.statistics import breakdown as _breakdown
from services.ingest.statistics import summary as _summary
from shared.statistics import LATENCY_BOUNDS_MS

TABLE = "outcome_events"
DEFAULT_DATABASE = "herald"

# (name, ClickHouse type): the table's columns, in the order :meth:`record` inserts them.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("event_id", "String"),
    ("tenant_id", "String"),
    ("occurred_at", "DateTime('UTC')"),
    ("channel", "String"),
    ("provider", "String"),
    ("template_id", "Int64"),
    ("status", "String"),
    ("cost", "Decimal(18, 6)"),
    ("latency_ms", "Nullable(UInt32)"),
    ("recorded_at", "DateTime('UTC')"),
)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# The key of each breakdown, as PostgreSQL's store answers it (services/ingest/statistics._KEYS).
_KEYS = {
    "date": "toDate(occurred_at)",
    "hour": "toStartOfHour(occurred_at)",
    "channel": "channel",
    "provider": "provider",
    "template": "template_id",
    "status": "status",
}

_MAX_LATENCY_MS = 2**32 - 1
_COST_QUANTUM = Decimal("0.000001")


def schema_statements(database: str = DEFAULT_DATABASE) -> list[str]:
    """The statements that create the database and the table when missing."""
    if not _NAME.match(database):
        raise ValueError(f"not a plain ClickHouse database name: {database!r}")
    columns = ",\n    ".join(f"{name} {kind}" for name, kind in COLUMNS)
    return [
        f"CREATE DATABASE IF NOT EXISTS {database}",
        # Partitions by month, so old months can be dropped whole (18.16 has no TTL). Duplicates
        # share the whole sorting key, so they always meet in one partition; the last one
        # recorded (the highest recorded_at) is the one a merge keeps.
        f"""CREATE TABLE IF NOT EXISTS {database}.{TABLE} (
    {columns}
) ENGINE = ReplacingMergeTree(recorded_at)
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, occurred_at, event_id)""",
    ]


def ensure_schema(client: Any, database: str = DEFAULT_DATABASE) -> None:
    """Create the database and the table if missing, with a synchronous clickhouse-connect client
    (``clickhouse_connect.get_client``): for operators and scripts. The backend itself runs the same
    statements with its async client on first use."""
    for statement in schema_statements(database):
        client.command(statement)


def parse_url(url: str) -> dict[str, Any]:
    """``http[s]://user:password@host:port/database`` -> clickhouse-connect's connection arguments
    and the database (default ``herald``). The database is not the connection's default: it may
    not exist yet, and every statement names it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("HERALD_CLICKHOUSE_URL: expected http://user:password@host:port/database (or https)")
    secure = parts.scheme == "https"
    database = parts.path.strip("/") or DEFAULT_DATABASE
    if not _NAME.match(database):
        raise ValueError(f"HERALD_CLICKHOUSE_URL: not a plain database name: {database!r}")
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or (8443 if secure else 8123),
        "username": unquote(parts.username) if parts.username else "default",
        "password": unquote(parts.password) if parts.password else "",
        "secure": secure,
        "database": database,
    }


def _field(event: Any, name: str) -> Any:
    if isinstance(event, Mapping):
        return event.get(name)
    return getattr(event, name, None)


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _row(event: Any, now: datetime) -> list[Any]:
    """One event (a dict, or shared.statistics.Outcome) as a row of the table."""
    if is_dataclass(event) and not isinstance(event, type):
        event = asdict(event)
    occurred = _field(event, "occurred_at")
    if not isinstance(occurred, datetime):
        raise ValueError(f"event {_field(event, 'event_id')!r}: occurred_at must be a datetime")
    event_id = str(_field(event, "event_id") or "")
    if not event_id:
        raise ValueError("an event without event_id cannot be deduplicated")
    cost = _field(event, "cost")
    latency = _field(event, "latency_ms")
    return [
        event_id,
        str(_field(event, "tenant_id") or ""),
        _utc(occurred),
        str(_field(event, "channel") or ""),
        str(_field(event, "provider") or ""),
        int(_field(event, "template_id") or 0),
        str(_field(event, "status") or ""),
        Decimal(str(cost)).quantize(_COST_QUANTUM) if cost is not None else Decimal(0),
        None if latency is None else min(max(int(latency), 0), _MAX_LATENCY_MS),
        now,
    ]


def _latency_buckets() -> str:
    """Counts of latencies per bucket of shared.statistics.LATENCY_BOUNDS_MS (the last: above the
    last bound), as one array: what PostgreSQL's rollups keep in ``latency_buckets``. ``ifNull``:
    18.16 makes countIf of a Nullable condition Nullable, NULL in a group without latencies."""
    parts = []
    lower: int | None = None
    for bound in LATENCY_BOUNDS_MS:
        low = f"latency_ms > {lower} AND " if lower is not None else ""
        parts.append(f"countIf(ifNull({low}latency_ms <= {bound}, 0))")
        lower = bound
    parts.append(f"countIf(ifNull(latency_ms > {lower}, 0))")
    return "[" + ", ".join(parts) + "]"


def _epoch(at: datetime) -> int:
    return int(_utc(at).timestamp())


class ClickHouseStatistics:
    """Outcome events in ClickHouse; a :class:`services.ingest.statistics.StatisticsStore`.

    ``pool`` (asyncpg, optional): where template names are read for the ``template`` breakdown
    (``message_templates``); without it, ``template_name`` is null."""

    def __init__(
        self,
        url: str,
        *,
        pool: Any = None,
        connect_timeout: float = 10,
        query_timeout: float = 60,
    ) -> None:
        params = parse_url(url)
        self.database: str = params.pop("database")
        self.table = f"{self.database}.{TABLE}"
        self._params = params
        self._pool = pool
        self._connect_timeout = connect_timeout
        self._query_timeout = query_timeout
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def client(self) -> Any:
        """The async client, connected and with the schema ensured on first use."""
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                import clickhouse_connect  # the optional extra: pip install 'herald[clickhouse]'

                client = await clickhouse_connect.create_async_client(
                    **self._params,
                    compress=False,
                    connect_timeout=self._connect_timeout,
                    send_receive_timeout=self._query_timeout,
                    client_name="herald",
                )
                try:
                    for statement in schema_statements(self.database):
                        await client.command(statement)
                except BaseException:
                    await client.close()
                    raise
                self._client = client
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def record(self, events: Iterable[Any]) -> None:
        """Store outcome events (dicts or shared.statistics.Outcome: event_id, tenant_id,
        occurred_at, channel, provider, template_id, status, cost, latency_ms). Events already
        recorded may come again: each counts once."""
        now = datetime.now(UTC).replace(microsecond=0)
        rows = [_row(e, now) for e in events]
        if not rows:
            return
        client = await self.client()
        await client.insert(
            self.table,
            rows,
            column_names=[name for name, _ in COLUMNS],
            column_type_names=[kind for _, kind in COLUMNS],
        )

    async def rows(self, tenant_id: str, by: str, span: Range, channel: str | None) -> list[dict[str, Any]]:
        """Counts, cost, latency sum and latency buckets by (key, status), for ``by`` in
        services.ingest.statistics.DIMENSIONS, of events in [span.start, span.end): the rows
        PostgresStatistics.rows answers (``lb``: a list of bucket counts joined by commas)."""
        key = _KEYS[by]
        where = "tenant_id = %(tenant)s AND occurred_at >= toDateTime(%(start)s) AND occurred_at < toDateTime(%(end)s)"
        params: dict[str, Any] = {"tenant": tenant_id, "start": _epoch(span.start), "end": _epoch(span.end)}
        if channel:
            where += " AND channel = %(channel)s"
            params["channel"] = channel
        sql = f"""SELECT {key} AS key, status, count() AS n, sum(cost) AS cost,
                         sum(ifNull(latency_ms, 0)) AS ls, {_latency_buckets()} AS lb
                  FROM {self.table} FINAL
                  WHERE {where}
                  GROUP BY key, status
                  ORDER BY key, status"""
        client = await self.client()
        result = await client.query(sql, parameters=params)
        out = []
        for k, status, n, cost, ls, lb in result.result_rows:
            if by == "hour" and isinstance(k, datetime):
                k = _utc(k)
            out.append({"key": k, "status": status, "n": int(n), "cost": Decimal(cost or 0), "ls": int(ls or 0),
                        "lb": [",".join(map(str, lb))]})  # fmt: skip
        if by == "template" and out:
            names = await self._template_names(tenant_id, sorted({r["key"] for r in out}))
            for r in out:
                r["label"] = names.get(r["key"])
        return out

    async def _template_names(self, tenant_id: str, ids: list[int]) -> dict[int, str]:
        if self._pool is None:
            return {}
        rows = await self._pool.fetch(
            "SELECT id, template_name FROM message_templates WHERE tenant_id = $1 AND id = ANY($2::bigint[])",
            tenant_id,
            ids,
        )
        return {r["id"]: r["template_name"] for r in rows}

    async def summary(self, tenant_id: str, start: date, end: date, channel: str | None = None) -> dict[str, Any]:
        """Seed 004 §4.2.4's ``data`` for the whole days start..end (UTC, both included)."""
        return await _summary(self, tenant_id, _days(start, end), channel)

    async def breakdown(
        self, tenant_id: str, by: str, start: date, end: date, channel: str | None = None
    ) -> list[dict[str, Any]]:
        """One row per value of ``by`` (date, hour, channel, provider, template, status) for the
        whole days start..end (UTC, both included), as ``GET /api/v1/statistics/breakdown``."""
        return await _breakdown(self, tenant_id, by, _days(start, end), channel)


def _days(start: date, end: date) -> Range:
    if isinstance(start, datetime) or isinstance(end, datetime):
        raise TypeError("start and end are dates (whole UTC days, both included)")
    first = datetime.combine(start, time.min, tzinfo=UTC)
    last = datetime.combine(end, time.min, tzinfo=UTC) + timedelta(days=1)
    if first >= last:
        raise ValueError("end must not be before start")
    return Range(first, last, whole_days=True)


def from_settings(settings: Any, *, pool: Any = None) -> ClickHouseStatistics | None:
    """The backend the settings choose: a ClickHouse store when ``stats_backend`` is
    ``clickhouse``, else None (PostgreSQL's rollups)."""
    if getattr(settings, "stats_backend", "postgres") != "clickhouse":
        return None
    url = settings.clickhouse_url
    url = url.get_secret_value() if hasattr(url, "get_secret_value") else str(url)
    return ClickHouseStatistics(url, pool=pool)
