"""Statistics of the caller's tenant, read from the tracker's rollups (services/ingest/statistics.py):
seed 004 §4.2.4's summary, breakdowns by any dimension (JSON or CSV), and retention's archive with
its manual trigger (seed 004 §3.1.5)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from services.ingest import audit
from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.http import envelope, iso_z
from services.ingest.statistics import (
    DIMENSIONS,
    PostgresStatistics,
    Range,
    StatisticsStore,
    breakdown,
    check_hourly,
    parse_range,
    summary,
    to_csv,
)
from shared.errors import ErrorCode, HeraldError
from shared.events import Channel
from shared.retention import archive

router = APIRouter(prefix="/api/v1/statistics", tags=["statistics"])

_START = "YYYY-MM-DD (UTC, inclusive) or an ISO 8601 datetime (to the hour); default: 29 days before end_date"
_END = "YYYY-MM-DD (UTC, inclusive) or an ISO 8601 datetime (to the hour); default: today"


def store_of(request: Request) -> StatisticsStore:
    services = services_of(request)
    chosen = getattr(request.app.state, "statistics", None)
    return chosen if chosen is not None else PostgresStatistics(services.pool)


def _range(request: Request, start_date: str | None, end_date: str | None, by: str | None) -> Range:
    span = parse_range(start_date, end_date)
    if getattr(request.app.state, "statistics", None) is None:  # PostgreSQL's rollups: hours are trimmed
        check_hourly(span, by, services_of(request).settings.stats_hour_days)
    return span


@router.get("/summary", summary="Sent, succeeded and failed messages by channel and by day (seed 004 §4.2.4)")
async def get_summary(
    request: Request,
    start_date: str | None = Query(default=None, max_length=40, description=_START),
    end_date: str | None = Query(default=None, max_length=40, description=_END),
    message_type: Channel | None = Query(default=None, description="one channel only"),
):
    tenant = tenant_of(request, Scope.READ)
    span = _range(request, start_date, end_date, None)
    channel = message_type.value if message_type else None
    return envelope(await summary(store_of(request), tenant, span, channel))


@router.get("/breakdown", summary="Outcomes, cost and latency by date, hour, channel, provider, template or status")
async def get_breakdown(
    request: Request,
    # Optional here and required by breakdown(): the scope is checked before the parameters.
    by: str | None = Query(default=None, description=" | ".join(DIMENSIONS), max_length=20),
    start_date: str | None = Query(default=None, max_length=40, description=_START),
    end_date: str | None = Query(default=None, max_length=40, description=_END),
    message_type: Channel | None = Query(default=None, description="one channel only"),
    format: str = Query(default="json", max_length=10, description="json, or csv: a spreadsheet's download"),
):
    tenant = tenant_of(request, Scope.READ)
    if format not in ("json", "csv"):
        raise HeraldError(ErrorCode.INVALID_PARAMS, "json or csv", field="format")
    span = _range(request, start_date, end_date, by)
    channel = message_type.value if message_type else None
    rows = await breakdown(store_of(request), tenant, by, span, channel)
    first, last = span.label()
    if format == "csv":
        name = f"herald-{by}-{first[:10]}-{last[:10]}.csv"
        return Response(
            to_csv(rows, by),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    return envelope({"by": by, "start_date": first, "end_date": last, "rows": rows})


@router.get("/archive", summary="Counts of the records retention deleted, by day, channel and status")
async def get_archive(
    request: Request,
    start_date: str | None = Query(default=None, max_length=10, description="YYYY-MM-DD, inclusive"),
    end_date: str | None = Query(default=None, max_length=10, description="YYYY-MM-DD, inclusive"),
):
    tenant = tenant_of(request, Scope.READ)
    args: list = [tenant]
    where = "tenant_id = $1"
    if start_date or end_date:
        span = parse_range(start_date, end_date)
        args += [span.start.date(), span.end.date()]
        where += " AND day >= $2 AND day < $3"
    rows = await services_of(request).pool.fetch(
        f"""SELECT day, channel, status, count, archived_at FROM message_archive WHERE {where}
            ORDER BY day, channel, status""",
        *args,
    )
    runs = await services_of(request).pool.fetch(
        # The tenant's own runs: the periodic run's counts are everyone's (its deletions show in
        # the rows above, each with its archived_at).
        """SELECT trigger, started_at, finished_at, records, failed_records, events FROM archive_runs
           WHERE tenant_id = $1 ORDER BY id DESC LIMIT 10""",
        tenant,
    )
    return envelope(
        {
            "rows": [{**dict(r), "day": r["day"].isoformat(), "archived_at": iso_z(r["archived_at"])} for r in rows],
            "runs": [
                {**dict(r), "started_at": iso_z(r["started_at"]), "finished_at": iso_z(r["finished_at"])}
                for r in runs
            ],
        }
    )


@router.post("/archive", summary="Archive now: delete this tenant's records past retention, keep their counts")
async def run_archive(request: Request):
    tenant = tenant_of(request, Scope.ADMIN)
    services = services_of(request)
    run = await archive(services.pool, services.settings, tenant_id=tenant, trigger="manual")
    await audit.record(services.pool, request, "statistics.archive", "archive", tenant, run.as_dict())
    return envelope(
        {**run.as_dict(), "retention_days": services.settings.retention_days,
         "retention_failed_days": services.settings.retention_failed_days}
    )  # fmt: skip
