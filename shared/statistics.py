"""Delivery statistics: what the tracker counts as it folds events, and the rollup rows it keeps.

Each message's outcome is counted once, when its outcome event is stored for the first time (an
event's id is unique: a batch folded again stores nothing again, so counts nothing again), in the
bucket of the outcome's time at three widths (``stats_minute``, ``stats_hour``, ``stats_day``,
migrations/0015.statistics.sql). The queries of ``GET /api/v1/statistics/...`` read the rollups,
never the message records.

What counts: the states that end an attempt for good (:data:`OUTCOMES`) and a delivery receipt.
A message replayed from the dead letters after it failed counts again when it is sent: the rollups
count outcomes, not messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from shared.events import EventV1, State

# The outcomes counted, and how the seed's summary (success / failed) sees them.
OUTCOMES = frozenset(
    {State.SENT, State.DELIVERED, State.FAILED, State.DEAD, State.REJECTED, State.CANCELLED, State.SUPPRESSED,
     State.DIGESTED}
)  # fmt: skip
SUCCESS = frozenset({State.SENT.value})
FAILURE = frozenset({State.FAILED.value, State.DEAD.value, State.REJECTED.value})

# Latency buckets, in milliseconds from acceptance to the outcome: counts of latencies up to each
# bound, and a last count of those above the last bound.
LATENCY_BOUNDS_MS: tuple[int, ...] = (100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000, 3_600_000)

WIDTHS: dict[str, str] = {"minute": "stats_minute", "hour": "stats_hour", "day": "stats_day"}


def bucket_of(at: datetime, width: str) -> datetime:
    at = at.astimezone(UTC)
    if width == "minute":
        return at.replace(second=0, microsecond=0)
    if width == "hour":
        return at.replace(minute=0, second=0, microsecond=0)
    return at.replace(hour=0, minute=0, second=0, microsecond=0)


def latency_bucket(ms: int) -> int:
    for i, bound in enumerate(LATENCY_BOUNDS_MS):
        if ms <= bound:
            return i
    return len(LATENCY_BOUNDS_MS)


def percentile_ms(buckets: list[int], q: float) -> int | None:
    """The bound of the bucket holding the q-th latency (an upper estimate, as Prometheus's
    histogram_quantile is not: no interpolation, so the answer is a bound that was configured);
    None without latencies. Above the last bound: the last bound."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= rank and n:
            return LATENCY_BOUNDS_MS[min(i, len(LATENCY_BOUNDS_MS) - 1)]
    return LATENCY_BOUNDS_MS[-1]


@dataclass(frozen=True, slots=True)
class Outcome:
    """One counted outcome, with what the tracker knows of its message."""

    tenant_id: str
    occurred_at: datetime
    channel: str
    provider: str
    template_id: int
    status: str
    cost: Decimal
    latency_ms: int | None
    event_id: str = ""


@dataclass(slots=True)
class Rollup:
    count: int = 0
    cost: Decimal = Decimal(0)
    latency_sum_ms: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))

    def add(self, outcome: Outcome) -> None:
        self.count += 1
        self.cost += outcome.cost
        if outcome.latency_ms is not None:
            self.latency_sum_ms += outcome.latency_ms
            self.buckets[latency_bucket(outcome.latency_ms)] += 1


Key = tuple[str, datetime, str, str, int, str]  # the rollup tables' primary key, in its order


def rollups(outcomes: Iterable[Outcome]) -> dict[str, dict[Key, Rollup]]:
    """The rows to add to each table, keyed by their primary key."""
    out: dict[str, dict[Key, Rollup]] = {width: {} for width in WIDTHS}
    for o in outcomes:
        for width, rows in out.items():
            key = (o.tenant_id, bucket_of(o.occurred_at, width), o.channel, o.provider, o.template_id, o.status)
            rows.setdefault(key, Rollup()).add(o)
    return out


def _cost(detail: Mapping[str, Any]) -> Decimal:
    try:
        return Decimal(str(detail.get("cost") or 0))
    except InvalidOperation:
        return Decimal(0)


def outcomes_of(events: Iterable[EventV1], records: Mapping[str, Mapping[str, Any]]) -> list[Outcome]:
    """The counted outcomes among ``events`` (events stored for the first time), with their
    message's template, channel and start from ``records`` (message_id -> row of
    message_records: template_id, message_type, created_at, scheduled_at; missing when the
    record does not exist yet: no template, no latency)."""
    out = []
    for e in events:
        if e.state not in OUTCOMES:
            continue
        record = records.get(e.message_id) or {}
        if record.get("tenant_id", e.tenant_id) != e.tenant_id:
            record = {}  # message ids are unique, but a record is only ever read within its tenant
        detail = e.detail or {}
        started = record.get("created_at")
        if started is not None and record.get("scheduled_at") is not None:
            started = max(started, record["scheduled_at"])
        latency = None
        if started is not None:
            latency = max(0, int((e.occurred_at - started) / timedelta(milliseconds=1)))
        out.append(
            Outcome(
                tenant_id=e.tenant_id,
                occurred_at=e.occurred_at,
                channel=(e.channel or record.get("message_type") or (e.message.channel if e.message else ""))[:20],
                provider=str(detail.get("provider_name") or e.provider or "")[:100],
                template_id=int(record.get("template_id") or 0),
                status=e.state.value,
                cost=_cost(detail),
                latency_ms=latency,
                event_id=e.event_id,
            )
        )
    return out


_RECORDS = """
SELECT message_id, tenant_id, template_id, message_type, created_at, scheduled_at
FROM message_records WHERE message_id = ANY($1::text[])
"""

# One statement adds a batch's rows to the three tables. Rows are added in their key's order, so two
# trackers adding to the same rows lock them in the same order (no deadlock between them).
_INSERT = """
{name} AS (
    INSERT INTO {table} AS s (tenant_id, bucket_start, channel, provider, template_id, status, count, cost_sum,
        latency_sum_ms, latency_buckets)
    SELECT u.t, u.b, u.c, u.p, u.tp, u.st, u.n, u.cost, u.ls, u.lb::bigint[] FROM u WHERE u.w = '{width}' ORDER BY u.i
    ON CONFLICT (tenant_id, bucket_start, channel, provider, template_id, status) DO UPDATE SET
        count = s.count + EXCLUDED.count,
        cost_sum = s.cost_sum + EXCLUDED.cost_sum,
        latency_sum_ms = s.latency_sum_ms + EXCLUDED.latency_sum_ms,
        latency_buckets = (SELECT array_agg(COALESCE(a, 0) + COALESCE(b, 0) ORDER BY i)
                           FROM unnest(s.latency_buckets, EXCLUDED.latency_buckets) WITH ORDINALITY AS x(a, b, i))
    RETURNING 1
)"""
_ADD = (
    """WITH u AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::bigint[], $7::text[],
                         $8::bigint[], $9::numeric[], $10::bigint[], $11::text[])
        WITH ORDINALITY AS u(w, t, b, c, p, tp, st, n, cost, ls, lb, i)
),"""
    + ",".join(_INSERT.format(name=f"add_{w}", table=table, width=w) for w, table in WIDTHS.items())
    + "\nSELECT " + " + ".join(f"(SELECT count(*) FROM add_{w})" for w in WIDTHS)
)


_OUTBOX = """
INSERT INTO stats_outbox (event_id, tenant_id, occurred_at, channel, provider, template_id, status, cost, latency_ms)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::bigint[], $7::text[],
                     $8::numeric[], $9::bigint[])
"""


async def count_outcomes(conn: Any, stored: list[EventV1], *, backend: str = "postgres") -> list[Outcome]:
    """Count the outcomes among ``stored`` (events stored for the first time in this transaction);
    answers them. ``postgres``: added to the rollups (one read of their records, one statement for
    the three tables); ``clickhouse``: written to ``stats_outbox``, which the trackers ship to
    ClickHouse (services/tracker/stats_shipper.py)."""
    candidates = [e for e in stored if e.state in OUTCOMES]
    if not candidates:
        return []
    rows = await conn.fetch(_RECORDS, sorted({e.message_id for e in candidates}))
    outcomes = outcomes_of(candidates, {r["message_id"]: r for r in rows})
    if backend == "clickhouse":
        cols = [[getattr(o, f) for o in outcomes] for f in
                ("event_id", "tenant_id", "occurred_at", "channel", "provider", "template_id", "status", "cost",
                 "latency_ms")]  # fmt: skip
        await conn.execute(_OUTBOX, *cols)
        return outcomes
    by_width = rollups(outcomes)
    cols = [[] for _ in range(11)]
    for width in WIDTHS:
        for key, r in sorted(by_width[width].items()):
            cols[0].append(width)
            for i, v in enumerate(key, 1):
                cols[i].append(v)
            cols[7].append(r.count)
            cols[8].append(r.cost)
            cols[9].append(r.latency_sum_ms)
            cols[10].append("{" + ",".join(map(str, r.buckets)) + "}")
    await conn.fetchval(_ADD, *cols)
    return outcomes
