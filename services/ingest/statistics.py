"""Statistics read from the tracker's rollups (shared/statistics.py): the seed's summary, breakdowns
by any dimension, and their CSV. Never a scan of message records.

Ranges are UTC. Whole days (``YYYY-MM-DD``, inclusive) are read from ``stats_day``; a bound with a
time is read from ``stats_hour`` (to the hour: a bound inside an hour takes that whole hour), as is
the ``hour`` breakdown. Hourly rows are kept 90 days, daily rows as long as the database keeps them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Protocol

import asyncpg

from shared.errors import ErrorCode, HeraldError
from shared.statistics import FAILURE, LATENCY_BOUNDS_MS, OUTCOMES, SUCCESS, percentile_ms

DIMENSIONS = ("date", "hour", "channel", "provider", "template", "status")
STATUSES = tuple(sorted(s.value for s in OUTCOMES))
MAX_DAYS = 366
MAX_HOURS_DAYS = 31  # an hourly breakdown: at most 31 days (744 rows)


@dataclass(frozen=True, slots=True)
class Range:
    """[start, end) in UTC, and whether both ends fall on whole days."""

    start: datetime
    end: datetime
    whole_days: bool

    @property
    def days(self) -> list[date]:
        first, last = self.start.date(), (self.end - timedelta(microseconds=1)).date()
        return [first + timedelta(days=i) for i in range((last - first).days + 1)]

    def label(self) -> tuple[str, str]:
        if self.whole_days:
            return self.start.date().isoformat(), (self.end - timedelta(days=1)).date().isoformat()
        return _iso(self.start), _iso(self.end)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _bound(value: str, field: str, *, end: bool) -> tuple[datetime, bool]:
    try:
        if len(value) == 10:
            moment = datetime.combine(date.fromisoformat(value), time.min, tzinfo=UTC)
            return (moment + timedelta(days=1) if end else moment), True
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        message = "expected YYYY-MM-DD or an ISO 8601 datetime"
        raise HeraldError(ErrorCode.INVALID_PARAMS, message, field=field) from None
    moment = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    # To the hour: the start's hour is taken whole, as is the end's when it falls inside one.
    hour = moment.replace(minute=0, second=0, microsecond=0)
    return (hour + timedelta(hours=1) if end and hour != moment else hour), False


def parse_range(start_date: str | None, end_date: str | None, *, now: datetime | None = None) -> Range:
    """The range asked for; by default the last 30 days, today included."""
    today = (now or datetime.now(UTC)).date()
    start, start_days = _bound(start_date, "start_date", end=False) if start_date else (None, True)
    end, end_days = _bound(end_date, "end_date", end=True) if end_date else (None, True)
    if end is None:
        end = datetime.combine(today + timedelta(days=1), time.min, tzinfo=UTC)
    if start is None:
        last_day = (end - timedelta(microseconds=1)).date()
        start = datetime.combine(last_day - timedelta(days=29), time.min, tzinfo=UTC)
    if start >= end:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "must be after start_date", field="end_date")
    if end - start > timedelta(days=MAX_DAYS):
        raise HeraldError(ErrorCode.INVALID_PARAMS, f"a range of at most {MAX_DAYS} days", field="end_date")
    return Range(start, end, start_days and end_days)


def check_hourly(span: Range, by: str | None, keep_days: int, now: datetime | None = None) -> None:
    """A range read by the hour (a bound with a time, or the hourly breakdown) must lie within the
    days hourly rollups are kept: older hours are gone, and an answer of zeros would be wrong."""
    if span.whole_days and by != "hour":
        return
    # Retention deletes hours that start before now - keep_days: the oldest whole hour kept is the
    # next one.
    cut = (now or datetime.now(UTC)) - timedelta(days=keep_days)
    oldest = cut.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    if span.start < oldest:
        raise HeraldError(
            ErrorCode.INVALID_PARAMS,
            f"hours are kept {keep_days} days (from {_iso(oldest)}): ask older ranges in whole days (YYYY-MM-DD)",
            field="start_date",
        )


class StatisticsStore(Protocol):
    """Where statistics are read: :class:`PostgresStatistics` or ClickHouse's. ``rows`` answers, per
    key of the dimension ``by`` and outcome, dicts of ``key`` (a date for ``date``, an aware UTC
    datetime for ``hour``, the template's id for ``template``, else text), ``status`` (the outcome),
    ``n`` (count), ``cost``, ``ls`` (latency sum, ms), ``lb`` (a list of texts, each a row's latency
    counts per bucket of LATENCY_BOUNDS_MS, comma-separated) and, for ``template``, ``label`` (its
    name, or None)."""

    async def rows(
        self, tenant_id: str, by: str, span: Range, channel: str | None
    ) -> list[dict[str, Any]]: ...


@dataclass(slots=True)
class Line:
    """One breakdown row: counts by outcome, cost, latency."""

    key: Any
    counts: dict[str, int]
    cost: Decimal
    latency_sum_ms: int
    buckets: list[int]
    label: str | None = None

    @property
    def success(self) -> int:
        return sum(self.counts.get(s, 0) for s in SUCCESS)

    @property
    def failed(self) -> int:
        return sum(self.counts.get(s, 0) for s in FAILURE)

    @property
    def total(self) -> int:
        return self.success + self.failed

    def as_dict(self, by: str) -> dict[str, Any]:
        timed = sum(self.buckets)
        out: dict[str, Any] = {by: self.key}
        if by == "template":
            out["template_name"] = self.label
        out.update(
            total=self.total,
            success=self.success,
            failed=self.failed,
            success_rate=round(self.success / self.total, 4) if self.total else None,
            outcomes={s: self.counts.get(s, 0) for s in STATUSES},
            cost=format(self.cost.normalize(), "f") if self.cost else "0",
            latency_avg_ms=round(self.latency_sum_ms / timed) if timed else None,
            latency_p50_ms=percentile_ms(self.buckets, 0.5),
            latency_p95_ms=percentile_ms(self.buckets, 0.95),
        )
        return out


def _lines(rows: Sequence[Any]) -> dict[Any, Line]:
    lines: dict[Any, Line] = {}
    for r in rows:
        line = lines.setdefault(r["key"], Line(r["key"], {}, Decimal(0), 0, [0] * (len(LATENCY_BOUNDS_MS) + 1)))
        line.counts[r["status"]] = line.counts.get(r["status"], 0) + int(r["n"])
        line.cost += Decimal(r["cost"] or 0)
        line.latency_sum_ms += int(r["ls"] or 0)
        for text in r["lb"] or []:  # each row's counts as text: rows of another bucket count still add up
            for i, v in enumerate(text.split(",")[: len(line.buckets)] if text else []):
                line.buckets[i] += int(v)
        if r.get("label") is not None:
            line.label = r["label"]
    return lines


_KEYS = {
    "date": "(s.bucket_start AT TIME ZONE 'UTC')::date",
    "hour": "s.bucket_start",
    "channel": "s.channel",
    "provider": "s.provider",
    "template": "s.template_id",
    "status": "s.status",
}


class PostgresStatistics:
    """The rollups in PostgreSQL (the default backend)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def rows(self, tenant_id: str, by: str, span: Range, channel: str | None) -> list[dict[str, Any]]:
        table = "stats_day" if span.whole_days and by != "hour" else "stats_hour"
        args: list[Any] = [tenant_id, span.start, span.end]
        where = "s.tenant_id = $1 AND s.bucket_start >= $2 AND s.bucket_start < $3"
        if channel:
            args.append(channel)
            where += " AND s.channel = $4"
        label = ", min(t.template_name) AS label" if by == "template" else ""
        join = (
            " LEFT JOIN message_templates t ON t.id = s.template_id AND t.tenant_id = s.tenant_id"
            if by == "template" else ""
        )  # fmt: skip
        sql = f"""SELECT {_KEYS[by]} AS key, s.status, sum(s.count) AS n, sum(s.cost_sum) AS cost,
                         sum(s.latency_sum_ms) AS ls,
                         array_agg(array_to_string(s.latency_buckets, ',')) AS lb{label}
                  FROM {table} s{join} WHERE {where} GROUP BY 1, 2 ORDER BY 1, 2"""
        return [dict(r) for r in await self.pool.fetch(sql, *args)]


async def breakdown(
    store: StatisticsStore, tenant_id: str, by: str | None, span: Range, channel: str | None
) -> list[dict]:
    if by not in DIMENSIONS:
        raise HeraldError(ErrorCode.INVALID_PARAMS, f"one of {', '.join(DIMENSIONS)}", field="by")
    if by == "hour" and span.end - span.start > timedelta(days=MAX_HOURS_DAYS):
        raise HeraldError(
            ErrorCode.INVALID_PARAMS, f"an hourly breakdown covers at most {MAX_HOURS_DAYS} days", field="end_date"
        )
    lines = _lines(await store.rows(tenant_id, by, span, channel))
    out = []
    for key, line in sorted(lines.items(), key=lambda kv: _order(by, kv[0], kv[1])):
        row = line.as_dict(by)
        if by in ("date", "hour"):
            row[by] = key.isoformat() if by == "date" else _iso(key)
        out.append(row)
    return out


def _order(by: str, key: Any, line: Line) -> Any:
    if by in ("date", "hour"):
        return (key,)
    return (-line.total, -sum(line.counts.values()), str(key))


async def summary(store: StatisticsStore, tenant_id: str, span: Range, channel: str | None) -> dict[str, Any]:
    """Seed 004 §4.2.4's answer, and the range it covers, cost, latency and the other outcomes."""
    by_channel = _lines(await store.rows(tenant_id, "channel", span, channel))
    by_date = _lines(await store.rows(tenant_id, "date", span, channel))
    whole = Line("all", {}, Decimal(0), 0, [0] * (len(LATENCY_BOUNDS_MS) + 1))
    for line in by_channel.values():
        for status, n in line.counts.items():
            whole.counts[status] = whole.counts.get(status, 0) + n
        whole.cost += line.cost
        whole.latency_sum_ms += line.latency_sum_ms
        whole.buckets = [a + b for a, b in zip(whole.buckets, line.buckets, strict=True)]
    dates = []
    for day in span.days:
        line = by_date.get(day)
        dates.append(
            {"date": day.isoformat(), "total": line.total if line else 0, "success": line.success if line else 0,
             "failed": line.failed if line else 0}
        )  # fmt: skip
    first, last = span.label()
    whole_dict = whole.as_dict("all")
    return {
        "total_sent": whole.total,
        "success_count": whole.success,
        "failed_count": whole.failed,
        "success_rate": round(whole.success / whole.total, 4) if whole.total else 0.0,
        "by_type": {
            str(key): {"total": line.total, "success": line.success, "failed": line.failed}
            for key, line in sorted(by_channel.items())
        },
        "by_date": dates,
        "start_date": first,
        "end_date": last,
        "by_status": {s: whole.counts.get(s, 0) for s in STATUSES},
        "cost": whole_dict["cost"],
        "latency_ms": {k: whole_dict[f"latency_{k}_ms"] for k in ("avg", "p50", "p95")},
    }


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """Names a user chose (providers, templates) are never read as formulas by a spreadsheet."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return "" if value is None else value


def to_csv(rows: list[dict[str, Any]], by: str) -> str:
    """One line per row; each outcome's count in a column of its own (``state_<outcome>``)."""
    named = [by, *(["template_name"] if by == "template" else [])]
    columns = [*named, "total", "success", "failed", "success_rate", *(f"state_{s}" for s in STATUSES), "cost",
               *(f"latency_{q}_ms" for q in ("avg", "p50", "p95"))]  # fmt: skip
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        flat = {**row, **{f"state_{s}": n for s, n in row["outcomes"].items()}}
        writer.writerow([_cell(flat.get(c)) for c in columns])
    return out.getvalue()
