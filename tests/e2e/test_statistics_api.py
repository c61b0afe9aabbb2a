"""The statistics API (issue 11) against the running pipeline: messages sent through ingest, the
router, the email sender and the tracker, then counted in the tracker's rollups and read as seed 004
§4.2.4's summary, breakdowns and their CSV; bad parameters answered with the field named; the
archive's manual trigger."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import AsyncIterator
from datetime import date, timedelta

import httpx
import pytest

from devstack import access
from tests.conftest import Pipeline
from tests.e2e.helpers import SEND, own_tenant, uniq, wait_for_state

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

SUMMARY = "/api/v1/statistics/summary"
BREAKDOWN = "/api/v1/statistics/breakdown"
ARCHIVE = "/api/v1/statistics/archive"


@pytest.fixture(scope="module")
async def tenant(pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    """A tenant of its own, so the counts are this module's alone, with its own mailbox."""
    client = await own_tenant(pipeline, "st-", mailbox=True)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
async def traffic(tenant: httpx.AsyncClient) -> dict:
    """Three emails delivered (one from a template) and one refused by its server (550: failed)."""
    t = await tenant.post("/api/v1/templates", json={
        "template_name": uniq("stats-"), "template_type": "email", "subject": "Hi {{ name }}",
        "content": "<p>Hello {{ name }}</p>", "variables": ["name"]})  # fmt: skip
    assert t.status_code == 201, t.text
    template = t.json()["data"]
    bodies = [
        {"to": f"{uniq('a-')}@example.com", "subject": "one", "content": "<p>1</p>"},
        {"to": f"{uniq('b-')}@example.com", "subject": "two", "content": "<p>2</p>"},
        {"to": f"{uniq('c-')}@example.com", "template_id": template["id"], "template_vars": {"name": "Ann"}},
        {"to": f"bounce-{uniq()}@example.com", "subject": "lost", "content": "<p>x</p>"},
    ]
    ids = []
    for body in bodies:
        r = await tenant.post(SEND, json=body)
        assert r.status_code == 202, r.text
        ids.append(r.json()["data"]["message_id"])
    for mid in ids[:3]:
        await wait_for_state(tenant, mid, "sent")
    await wait_for_state(tenant, ids[3], "failed")
    return {"ids": ids, "template": template}


async def _counted(client: httpx.AsyncClient, total: int, timeout: float = 15) -> dict:
    """The summary once the tracker's rollups hold ``total`` outcomes (they are written in the same
    transaction as the records' states, so they are there already; polled for safety)."""
    deadline = time.monotonic() + timeout
    while True:
        r = await client.get(SUMMARY)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        if data["total_sent"] >= total or time.monotonic() > deadline:
            return data
        await asyncio.sleep(0.2)


async def test_summary_is_the_seeds_answer(
    pipeline: Pipeline, tenant: httpx.AsyncClient, traffic: dict
) -> None:
    data = await _counted(tenant, 4)
    assert (data["total_sent"], data["success_count"], data["failed_count"], data["success_rate"]) == (4, 3, 1, 0.75)
    assert data["by_type"] == {"email": {"total": 4, "success": 3, "failed": 1}}
    today = data["end_date"]  # the range ends today (UTC) by default: the last of its 30 days
    assert len(data["by_date"]) == 30 and data["by_date"][-1]["date"] == today
    assert sum(d["total"] for d in data["by_date"]) == 4 and sum(d["success"] for d in data["by_date"]) == 3
    # (all on today's line, unless the traffic straddled UTC midnight)
    assert data["latency_ms"]["p95"] is not None and data["latency_ms"]["avg"] >= 0
    only_sms = (await tenant.get(SUMMARY, params={"message_type": "sms"})).json()["data"]
    assert (only_sms["total_sent"], only_sms["by_type"]) == (0, {})
    first = (await tenant.get(f"/api/v1/messages/{traffic['ids'][0]}")).json()["data"]["sent_at"][:10]
    r = await tenant.get(SUMMARY, params={"start_date": first, "end_date": first})
    assert r.json()["data"]["by_date"][0]["date"] == first and r.json()["data"]["by_date"][0]["success"] >= 1
    # Another tenant sees its own counts (none), not these.
    other = await own_tenant(pipeline, "st-other-")
    try:
        theirs = (await other.get(SUMMARY)).json()["data"]
        assert (theirs["total_sent"], theirs["by_type"], theirs["by_status"]["sent"]) == (0, {}, 0)
        assert (await other.get(BREAKDOWN, params={"by": "provider"})).json()["data"]["rows"] == []
    finally:
        await other.aclose()


async def test_breakdowns_by_provider_template_and_hour_and_their_csv(
    tenant: httpx.AsyncClient, traffic: dict
) -> None:
    await _counted(tenant, 4)
    providers = (await tenant.get(BREAKDOWN, params={"by": "provider"})).json()["data"]
    assert sum(r["total"] for r in providers["rows"]) == 4
    assert all(r["provider"] for r in providers["rows"])  # the mailbox's provider is named
    templates = (await tenant.get(BREAKDOWN, params={"by": "template"})).json()["data"]["rows"]
    assert [(r["template"], r["template_name"], r["total"]) for r in templates] == [
        (0, None, 3), (traffic["template"]["id"], traffic["template"]["template_name"], 1)]  # fmt: skip
    hours = (await tenant.get(BREAKDOWN, params={"by": "hour"})).json()["data"]["rows"]
    sent_at = (await tenant.get(f"/api/v1/messages/{traffic['ids'][0]}")).json()["data"]["sent_at"]
    assert sent_at[:13] + ":00:00Z" in [r["hour"] for r in hours]  # the hour of a send has a line
    assert sum(r["total"] for r in hours) == 4
    statuses = (await tenant.get(BREAKDOWN, params={"by": "status"})).json()["data"]["rows"]
    assert {r["status"]: r["outcomes"][r["status"]] for r in statuses} == {"sent": 3, "failed": 1}

    r = await tenant.get(BREAKDOWN, params={"by": "template", "format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"].startswith('attachment; filename="herald-template-')
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [(row["template_name"], row["total"], row["state_sent"]) for row in rows] == [
        ("", "3", "2"), (traffic["template"]["template_name"], "1", "1")]  # fmt: skip


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"by": "country"}, "by"),
        ({"by": "provider", "format": "xml"}, "format"),
        ({"by": "provider", "start_date": "2026-02-30"}, "start_date"),
        ({"by": "provider", "start_date": "2026-12-02", "end_date": "2026-12-01"}, "end_date"),
        # 60 days by the hour: within the hours kept (90 days), beyond an hourly breakdown's 31
        ({"by": "hour", "start_date": str(date.today() - timedelta(days=60)), "end_date": str(date.today())},
         "end_date"),
        ({"by": "hour", "start_date": "2025-01-01", "end_date": "2025-01-10"}, "start_date"),  # hours kept 90 days
        ({}, "by"),
    ],
)
async def test_bad_parameters_name_the_field(tenant: httpx.AsyncClient, params: dict, field: str) -> None:
    r = await tenant.get(BREAKDOWN, params=params)
    assert r.status_code == 400 and r.json()["code"] == 1001, r.text
    assert r.json()["errors"][0]["field"] == field


async def test_archive_runs_on_demand_for_the_tenant_only(
    pipeline: Pipeline, tenant: httpx.AsyncClient, traffic: dict
) -> None:
    r = await tenant.post(ARCHIVE)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    # Nothing here is 30 days old: nothing deleted, and the record of the run kept.
    assert (data["records"], data["retention_days"], data["retention_failed_days"]) == (0, 30, 90)
    assert (await tenant.get(f"/api/v1/messages/{traffic['ids'][0]}")).status_code == 200
    listed = (await tenant.get(ARCHIVE)).json()["data"]
    assert listed["rows"] == [] and listed["runs"][0]["trigger"] == "manual"
    audit = (await tenant.get("/api/v1/audit-logs", params={"action": "statistics.archive"})).json()["data"]
    assert audit["total"] == 1
    # The operator's command does the same for every tenant (what the tracker does periodically).
    done = await asyncio.to_thread(access.admin, pipeline.backing.env, "archive")
    assert done["records"] == 0 and set(done) == {"records", "failed_records", "events", "stats_rows"}


async def test_a_cancelled_scheduled_message_is_counted_as_cancelled(tenant: httpx.AsyncClient, traffic: dict) -> None:
    r = await tenant.post("/api/v1/messages/email/send/scheduled", json={
        "to": f"{uniq('later-')}@example.com", "subject": "later", "content": "<p>l</p>",
        "delay": "2h"})  # fmt: skip
    assert r.status_code == 202, r.text
    message_id = r.json()["data"]["message_id"]
    await wait_for_state(tenant, message_id, "scheduled")
    assert (await tenant.post(f"/api/v1/messages/{message_id}/cancel")).status_code == 200
    data = (await tenant.get(SUMMARY)).json()["data"]
    assert data["by_status"]["cancelled"] == 1
    assert (data["total_sent"], data["success_count"], data["failed_count"]) == (4, 3, 1)  # not a send's outcome
