"""ClickHouse as the statistics backend (services/statistics_clickhouse.py), against a real server:
Debian's clickhouse-server (18.16.1 on bookworm), started here in a temporary folder on a free
port, as ``nobody`` when the suite runs as root, with a server time zone other than UTC (days and
hours must still be UTC). A throw-away PostgreSQL holds the template names of the ``template``
breakdown. No mocks: every number below comes back from the servers."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import clickhouse_connect
import pytest
from aiokafka import ConsumerRecord
from prometheus_client import REGISTRY

from devstack import servers
from services.ingest.statistics import parse_range
from services.ingest.statistics import summary as api_summary
from services.statistics_clickhouse import (
    TABLE,
    ClickHouseStatistics,
    ensure_schema,
    from_settings,
    parse_url,
    schema_statements,
)
from services.tracker.app import Tracker
from services.tracker.stats_shipper import StatsShipper, kind_of
from shared.db import apply_migrations
from shared.events import EventV1, MessageSnapshot, State
from shared.settings import Settings
from shared.statistics import Outcome

# Debian's package, which scripts/install-system-deps.sh (make install) installs: its absence fails
# these tests (the fixture says so) rather than skipping them.
SERVER = shutil.which("clickhouse-server") or "/usr/sbin/clickhouse-server"

CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{d}/log/server.log</log><errorlog>{d}/log/error.log</errorlog>
    <size>10M</size><count>1</count></logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>{port}</http_port>
  <max_connections>64</max_connections>
  <keep_alive_timeout>1</keep_alive_timeout>
  <max_concurrent_queries>16</max_concurrent_queries>
  <uncompressed_cache_size>67108864</uncompressed_cache_size>
  <mark_cache_size>67108864</mark_cache_size>
  <path>{d}/data/</path>
  <tmp_path>{d}/data/tmp/</tmp_path>
  <user_files_path>{d}/data/user_files/</user_files_path>
  <format_schema_path>{d}/data/format_schemas/</format_schema_path>
  <users_config>{d}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>Asia/Shanghai</timezone>
  <mlock_executable>false</mlock_executable>
</yandex>
"""

USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>1000000000</max_memory_usage></default></profiles>
  <users><herald><password>s3cret/pass</password><networks><ip>127.0.0.1</ip></networks>
    <profile>default</profile><quota>default</quota></herald></users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
"""


@dataclass
class ClickHouse:
    port: int
    version: str

    def url(self, database: str) -> str:
        return f"http://herald:s3cret%2Fpass@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str) -> str:
        """One statement over plain HTTP (not through the client under test)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/", data=statement.encode(),
            headers={"X-ClickHouse-User": "herald", "X-ClickHouse-Key": "s3cret/pass"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode().strip()


@pytest.fixture(scope="module")
def clickhouse() -> Iterator[ClickHouse]:
    assert os.access(SERVER, os.X_OK), "no clickhouse-server: run make install (apt-get install clickhouse-server)"
    tmp = Path(tempfile.mkdtemp(prefix="herald-clickhouse-"))
    for sub in ("data", "log"):
        (tmp / sub).mkdir()
    port = servers.free_port()
    (tmp / "config.xml").write_text(CONFIG.format(d=tmp, port=port))
    (tmp / "users.xml").write_text(USERS)
    cmd = [SERVER, f"--config-file={tmp / 'config.xml'}"]
    if os.geteuid() == 0:  # never as root: as nobody, in a folder of its own
        for path in [tmp, *tmp.rglob("*")]:
            shutil.chown(path, "nobody", "nogroup")
        cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]
    out = open(tmp / "log" / "stdout.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"clickhouse-server exited with {proc.returncode}: {_logs(tmp)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as r:
                    if r.read().strip() == b"Ok.":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"clickhouse-server did not answer in 30 s: {_logs(tmp)}")
            time.sleep(0.05)
        server = ClickHouse(port, "")
        server.version = server.sql("SELECT version()")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        out.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _logs(tmp: Path) -> str:
    return " | ".join(p.read_text(errors="replace")[-2000:] for p in sorted((tmp / "log").glob("*")) if p.is_file())


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    tmp = Path(tempfile.mkdtemp(prefix="herald-chpg-"))
    os.chmod(tmp, 0o755)
    pg = servers.start_postgres(tmp / "pg", servers.free_port(), fast=True)
    try:
        yield pg.extra["dsn"]
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
async def stats(clickhouse: ClickHouse, request: pytest.FixtureRequest) -> AsyncIterator[ClickHouseStatistics]:
    database = "t_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:40]
    store = ClickHouseStatistics(clickhouse.url(database))
    yield store
    await store.close()
    clickhouse.sql(f"DROP DATABASE IF EXISTS {database}")


def ev(event_id: str, at: str, channel: str, provider: str, status: str, *, template: int = 0,
       cost: str | None = None, latency: int | None = None, tenant: str = "acme") -> dict:  # fmt: skip
    return {
        "event_id": event_id,
        "tenant_id": tenant,
        "occurred_at": datetime.fromisoformat(at).replace(tzinfo=UTC),
        "channel": channel,
        "provider": provider,
        "template_id": template,
        "status": status,
        "cost": Decimal(cost) if cost is not None else None,
        "latency_ms": latency,
    }


# Two days of one tenant (and a little of another). 2025-10-20T23:30Z is 07:30 on the 21st in
# Shanghai, the server's zone: it must count on the 20th.
BATCH_1 = [
    ev("e01", "2025-10-20T09:05:00", "email", "smtp", "sent", template=7, cost="0.010", latency=80),
    ev("e02", "2025-10-20T09:40:00", "email", "smtp", "sent", template=7, cost="0.010", latency=300),
    ev("e03", "2025-10-20T10:15:00", "email", "smtp", "failed", template=7, latency=1200),
    ev("e04", "2025-10-20T23:30:00", "sms", "aliyun", "sent", template=9, cost="0.03", latency=450),
    ev("e05", "2025-10-20T23:59:59", "sms", "aliyun", "dead", template=9, cost="0.03"),
]
BATCH_2 = [
    ev("e06", "2025-10-21T00:00:00", "sms", "tencent", "sent", template=9, cost="0.05", latency=700),
    ev("e07", "2025-10-21T08:00:00", "sms", "tencent", "rejected", template=9),
    ev("e08", "2025-10-21T08:30:00", "email", "smtp", "delivered", template=7, latency=5000),  # neither
    ev("e09", "2025-10-21T08:45:00", "email", "smtp", "suppressed"),  # neither success nor failure
    ev("e10", "2025-10-21T12:00:00", "feishu", "feishu", "sent", latency=40_000),
    ev("x01", "2025-10-21T12:00:00", "email", "smtp", "sent", tenant="other", cost="9", latency=1),
    ev("e11", "2025-10-22T00:00:00", "email", "smtp", "sent"),  # the day after the range
    ev("e12", "2025-10-19T23:59:59", "email", "smtp", "failed"),  # the day before
]


async def _record_twice(stats: ClickHouseStatistics) -> None:
    await stats.record(BATCH_1)
    await stats.record(BATCH_2)
    # The tracker read the first batch again after a crash, and part of the second.
    await stats.record(BATCH_1)
    await stats.record(BATCH_2[:3])


EXPECTED_SUMMARY = {
    "total_sent": 8,
    "success_count": 5,
    "failed_count": 3,
    "success_rate": 0.625,
    "by_type": {
        "email": {"total": 3, "success": 2, "failed": 1},
        "feishu": {"total": 1, "success": 1, "failed": 0},
        "sms": {"total": 4, "success": 2, "failed": 2},
    },
    "by_date": [
        {"date": "2025-10-20", "total": 5, "success": 3, "failed": 2},
        {"date": "2025-10-21", "total": 3, "success": 2, "failed": 1},
    ],
    "start_date": "2025-10-20",
    "end_date": "2025-10-21",
    "by_status": {
        "cancelled": 0,
        "dead": 1,
        "delivered": 1,
        "digested": 0,
        "failed": 1,
        "rejected": 1,
        "sent": 5,
        "suppressed": 1,
    },  # fmt: skip
    "cost": "0.13",
    # 80, 300, 1200, 450, 700, 5000, 40000: avg 6818.57; p50 the 4th (700 -> 1000); p95 -> 60000
    "latency_ms": {"avg": 6819, "p50": 1000, "p95": 60000},
}


async def test_server_and_client_versions(clickhouse: ClickHouse, stats: ClickHouseStatistics) -> None:
    client = await stats.client()
    assert client.server_version == clickhouse.version
    # What docs/clickhouse.md says was tested: Debian bookworm's server (18.16.1) and clickhouse-connect 1.6.
    assert clickhouse_connect.__version__.startswith("1.6.")
    assert clickhouse.sql("SELECT timezone()") == "Asia/Shanghai"


async def test_summary_counts_each_event_once(clickhouse: ClickHouse, stats: ClickHouseStatistics) -> None:
    await stats.client()  # creates the table
    table = f"{stats.database}.{TABLE}"
    clickhouse.sql(f"SYSTEM STOP MERGES {table}")  # so the duplicates are certainly still there
    await _record_twice(stats)
    # Duplicates are stored (until a merge), FINAL counts each event once.
    assert int(clickhouse.sql(f"SELECT count() FROM {table}")) == 13 + 5 + 3
    assert int(clickhouse.sql(f"SELECT count() FROM {table} FINAL")) == 13
    assert await stats.summary("acme", date(2025, 10, 20), date(2025, 10, 21)) == EXPECTED_SUMMARY
    # The same after the merge that drops the duplicates.
    clickhouse.sql(f"SYSTEM START MERGES {table}")
    clickhouse.sql(f"OPTIMIZE TABLE {table} FINAL")
    assert int(clickhouse.sql(f"SELECT count() FROM {table}")) == 13
    assert await stats.summary("acme", date(2025, 10, 20), date(2025, 10, 21)) == EXPECTED_SUMMARY
    # The API's own summary over the store (what GET /api/v1/statistics/summary answers).
    span = parse_range("2025-10-20", "2025-10-21")
    assert await api_summary(stats, "acme", span, None) == EXPECTED_SUMMARY


async def test_summary_of_one_channel_and_empty_days(stats: ClickHouseStatistics) -> None:
    await _record_twice(stats)
    sms = await stats.summary("acme", date(2025, 10, 20), date(2025, 10, 23), "sms")
    assert (sms["total_sent"], sms["success_count"], sms["failed_count"], sms["success_rate"]) == (4, 2, 2, 0.5)
    assert sms["by_type"] == {"sms": {"total": 4, "success": 2, "failed": 2}}
    assert sms["by_date"] == [
        {"date": "2025-10-20", "total": 2, "success": 1, "failed": 1},
        {"date": "2025-10-21", "total": 2, "success": 1, "failed": 1},
        {"date": "2025-10-22", "total": 0, "success": 0, "failed": 0},
        {"date": "2025-10-23", "total": 0, "success": 0, "failed": 0},
    ]
    assert sms["cost"] == "0.11"
    nothing = await stats.summary("nobody", date(2025, 10, 20), date(2025, 10, 20))
    assert (nothing["total_sent"], nothing["success_rate"], nothing["by_type"]) == (0, 0.0, {})
    assert nothing["by_date"] == [{"date": "2025-10-20", "total": 0, "success": 0, "failed": 0}]
    other = await stats.summary("other", date(2025, 10, 21), date(2025, 10, 21))
    assert (other["total_sent"], other["cost"]) == (1, "9")


def _core(rows: list[dict], by: str) -> list[tuple]:
    return [(r[by], r["total"], r["success"], r["failed"], r["success_rate"], r["cost"], r["latency_avg_ms"])
            for r in rows]  # fmt: skip


async def test_breakdowns(stats: ClickHouseStatistics) -> None:
    await _record_twice(stats)
    first, last = date(2025, 10, 20), date(2025, 10, 21)
    assert _core(await stats.breakdown("acme", "date", first, last), "date") == [
        ("2025-10-20", 5, 3, 2, 0.6, "0.08", 508),  # 80, 300, 1200, 450
        ("2025-10-21", 3, 2, 1, 0.6667, "0.05", 15233),  # 700, 5000, 40000
    ]
    assert _core(await stats.breakdown("acme", "hour", first, last), "hour") == [
        ("2025-10-20T09:00:00Z", 2, 2, 0, 1.0, "0.02", 190),
        ("2025-10-20T10:00:00Z", 1, 0, 1, 0.0, "0", 1200),
        ("2025-10-20T23:00:00Z", 2, 1, 1, 0.5, "0.06", 450),
        ("2025-10-21T00:00:00Z", 1, 1, 0, 1.0, "0.05", 700),
        ("2025-10-21T08:00:00Z", 1, 0, 1, 0.0, "0", 5000),
        ("2025-10-21T12:00:00Z", 1, 1, 0, 1.0, "0", 40000),
    ]
    # Non-time keys: the most traffic first, as PostgreSQL's store orders them.
    assert _core(await stats.breakdown("acme", "channel", first, last), "channel") == [
        ("sms", 4, 2, 2, 0.5, "0.11", 575),
        ("email", 3, 2, 1, 0.6667, "0.02", 1645),  # 80, 300, 1200, 5000 (delivered counts its latency)
        ("feishu", 1, 1, 0, 1.0, "0", 40000),
    ]
    assert _core(await stats.breakdown("acme", "provider", first, last), "provider") == [
        ("smtp", 3, 2, 1, 0.6667, "0.02", 1645),
        ("aliyun", 2, 1, 1, 0.5, "0.06", 450),
        ("tencent", 2, 1, 1, 0.5, "0.05", 700),
        ("feishu", 1, 1, 0, 1.0, "0", 40000),
    ]
    assert _core(await stats.breakdown("acme", "template", first, last), "template") == [
        (9, 4, 2, 2, 0.5, "0.11", 575),
        (7, 3, 2, 1, 0.6667, "0.02", 1645),
        (0, 1, 1, 0, 1.0, "0", 40000),  # e09 (suppressed) is here too, outside total
    ]
    status = await stats.breakdown("acme", "status", first, last)
    assert [(r["status"], r["total"], sum(r["outcomes"].values())) for r in status] == [
        ("sent", 5, 5), ("dead", 1, 1), ("failed", 1, 1), ("rejected", 1, 1), ("delivered", 0, 1), ("suppressed", 0, 1),
    ]  # fmt: skip
    template_0 = (await stats.breakdown("acme", "template", first, last))[2]
    assert template_0["outcomes"]["suppressed"] == 1 and template_0["template_name"] is None
    # Latency buckets as the rollups keep them: p50 / p95 are bucket bounds.
    day_20 = (await stats.breakdown("acme", "date", first, last))[0]
    assert (day_20["latency_p50_ms"], day_20["latency_p95_ms"]) == (500, 2500)
    with pytest.raises(Exception, match="one of"):
        await stats.breakdown("acme", "weekday", first, last)


async def test_template_names_from_postgres(clickhouse: ClickHouse, postgres: str, request) -> None:
    conn = await asyncpg.connect(postgres)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS message_templates (id BIGINT PRIMARY KEY, tenant_id VARCHAR(64) NOT NULL,
                                                             template_name VARCHAR(100) NOT NULL)"""
        )
        await conn.execute(
            "INSERT INTO message_templates VALUES (7, 'acme', 'welcome'), (9, 'acme', '=otp'), (11, 'other', 'x')"
        )
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(postgres, min_size=1, max_size=2)
    store = ClickHouseStatistics(clickhouse.url("t_names"), pool=pool)
    try:
        await store.record(BATCH_1 + BATCH_2)
        await store.record(BATCH_1)
        rows = await store.breakdown("acme", "template", date(2025, 10, 20), date(2025, 10, 21))
        assert [(r["template"], r["template_name"], r["total"]) for r in rows] == [
            (9, "=otp", 4), (7, "welcome", 3), (0, None, 1),
        ]  # fmt: skip
    finally:
        await store.close()
        await pool.close()
        clickhouse.sql("DROP DATABASE IF EXISTS t_names")


async def test_outcomes_of_the_tracker_and_odd_values(clickhouse: ClickHouse, stats: ClickHouseStatistics) -> None:
    at = datetime(2025, 10, 20, 12, 0, 0, 999_000, tzinfo=UTC)
    await stats.record(
        [
            # shared.statistics.Outcome, as write_fold answers them
            Outcome("acme", at, "email", "smtp", 3, "sent", Decimal("0.0000004"), 12, "o1"),
            Outcome("acme", at, "email", "smtp", 3, "sent", Decimal("1.2345675"), None, "o2"),
            # a naive datetime is UTC; a latency beyond UInt32 is capped; a negative one is 0
            {
                **ev("o3", "2025-10-20T12:00:00", "sms", "p", "failed", latency=-5),
                "occurred_at": at.replace(tzinfo=None),
            },
            ev("o4", "2025-10-20T12:00:00", "sms", "p", "failed", latency=10**12),
        ]
    )
    await stats.record([])  # nothing to do, no error
    summary = await stats.summary("acme", date(2025, 10, 20), date(2025, 10, 20))
    assert (summary["total_sent"], summary["success_count"], summary["failed_count"]) == (4, 2, 2)
    assert summary["cost"] == "1.234568"  # Decimal(18, 6): 0.0000004 -> 0, 1.2345675 -> 1.234568
    assert clickhouse.sql(f"SELECT latency_ms FROM {stats.database}.{TABLE} FINAL WHERE event_id = 'o3'") == "0"
    assert clickhouse.sql(f"SELECT latency_ms FROM {stats.database}.{TABLE} FINAL WHERE event_id = 'o4'") == str(
        2**32 - 1
    )
    with pytest.raises(ValueError, match="event_id"):
        await stats.record([{**ev("x", "2025-10-20T12:00:00", "sms", "p", "sent"), "event_id": ""}])


async def test_schema_with_the_sync_client(clickhouse: ClickHouse) -> None:
    params = parse_url(clickhouse.url("t_sync"))
    database = params.pop("database")
    client = clickhouse_connect.get_client(**params, compress=False)
    try:
        ensure_schema(client, database)
        ensure_schema(client, database)  # idempotent
        engine = clickhouse.sql(f"SELECT engine FROM system.tables WHERE database = '{database}' AND name = '{TABLE}'")
        assert engine == "ReplacingMergeTree"
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")
        client.close()
    with pytest.raises(ValueError):
        schema_statements("herald; DROP")


def test_settings_select_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_STATS_BACKEND", "clickhouse")
    monkeypatch.setenv("HERALD_CLICKHOUSE_URL", "https://stats:p%40ss@ch.example:9443/analytics")
    store = from_settings(Settings())
    assert store is not None and store.database == "analytics"
    assert store._params == {"host": "ch.example", "port": 9443, "username": "stats", "password": "p@ss",
                             "secure": True}  # fmt: skip
    monkeypatch.setenv("HERALD_STATS_BACKEND", "postgres")
    assert from_settings(Settings()) is None
    assert parse_url("http://127.0.0.1")["database"] == "herald"
    with pytest.raises(ValueError):
        parse_url("clickhouse://127.0.0.1:9000/herald")


async def test_unreachable_server_raises_an_error_the_shipper_waits_out(clickhouse: ClickHouse) -> None:
    store = ClickHouseStatistics(f"http://default:@127.0.0.1:{servers.free_port()}/herald", connect_timeout=2)
    with pytest.raises(clickhouse_connect.driver.exceptions.OperationalError) as info:
        await store.record([ev("u1", "2025-10-20T00:00:00", "sms", "p", "sent")])
    assert kind_of(info.value) == "wait"
    await store.close()


def _record(offset: int, event: EventV1) -> ConsumerRecord:
    return ConsumerRecord("notify.events", 0, offset, 0, 0, None, event.to_bytes(), None, 0, 0, ())


def _events(prefix: str, states: list[State]) -> list[EventV1]:
    t0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    events = []
    for i, state in enumerate(states):
        mid = f"msg_{prefix}_{i}"
        snap = MessageSnapshot(channel="sms", recipient="+8613800000000", accepted_at=t0)
        events += [
            EventV1(event_id=f"{mid}:0:accepted", message_id=mid, tenant_id="acme", state=State.ACCEPTED,
                    occurred_at=t0, service="t", message=snap),
            EventV1(event_id=f"{mid}:1:{state.value}", message_id=mid, tenant_id="acme", state=state, attempt=1,
                    channel="sms", provider="aliyun", occurred_at=t0 + timedelta(milliseconds=700), service="t",
                    detail={"provider_name": "aliyun-main", "cost": "0.03"} if state is State.SENT else None),
        ]  # fmt: skip
    return events


async def test_the_tracker_keeps_statistics_in_clickhouse_through_its_outbox(
    clickhouse: ClickHouse, postgres: str, stats: ClickHouseStatistics
) -> None:
    """HERALD_STATS_BACKEND=clickhouse: the fold writes its outcomes to stats_outbox (never to the
    rollups, never waiting for ClickHouse), the shipper moves them to ClickHouse; a batch folded
    again counts once; ClickHouse away holds nothing but the outbox; rows ClickHouse refuses for
    their data are set aside with the reason, the others shipped; a table dropped by hand is made
    again."""
    admin = await asyncpg.connect(postgres)  # a database of its own, migrated as the services migrate theirs
    await admin.execute("CREATE DATABASE tracker_ch")
    await admin.close()
    dsn = postgres.rsplit("/", 1)[0] + "/tracker_ch"
    await asyncio.to_thread(apply_migrations, dsn)
    settings = Settings(database_url=dsn, stats_backend="clickhouse")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        tracker = Tracker(settings, pool, None, None)  # type: ignore[arg-type]
        records = [_record(i, e) for i, e in enumerate(_events("a", [State.SENT, State.SENT, State.DEAD]))]

        # ClickHouse away: the fold goes on; the outbox waits, and the shipper says to wait.
        away = ClickHouseStatistics(f"http://default:@127.0.0.1:{servers.free_port()}/herald", connect_timeout=1)
        await tracker.fold(records)
        assert await pool.fetchval("SELECT count(*) FROM message_records WHERE state = 'sent'") == 2
        with pytest.raises(clickhouse_connect.driver.exceptions.OperationalError):
            await StatsShipper(pool, away, settings).ship_once()
        await away.close()
        assert await pool.fetchval("SELECT count(*) FROM stats_outbox WHERE failed_at IS NULL") == 3

        await tracker.fold(records)  # read again after a crash before the commit: nothing new
        assert await pool.fetchval("SELECT count(*) FROM stats_outbox") == 3
        assert await pool.fetchval("SELECT count(*) FROM stats_day") == 0  # no rollups in this mode
        shipper = StatsShipper(pool, stats, settings)
        assert await shipper.ship_once() == 3
        assert await pool.fetchval("SELECT count(*) FROM stats_outbox") == 0
        data = await stats.summary("acme", date(2026, 11, 20), date(2026, 11, 20))
        assert (data["total_sent"], data["success_count"], data["failed_count"], data["cost"]) == (3, 2, 1, "0.06")
        assert data["latency_ms"]["avg"] == 700

        # A row ClickHouse refuses for its data (a cost beyond its Decimal, as if written by hand)
        # is found by splitting, set aside with the reason; the rest of the batch is shipped.
        await tracker.fold([_record(i, e) for i, e in enumerate(_events("b", [State.SENT] * 4))])
        await pool.execute("UPDATE stats_outbox SET cost = 1e13 WHERE event_id = 'msg_b_2:1:sent'")
        dropped = REGISTRY.get_sample_value("herald_statistics_dropped_total") or 0
        assert await shipper.ship_once() == 4
        kept = await pool.fetch("SELECT event_id, failed_at IS NOT NULL AS failed, last_error FROM stats_outbox")
        assert [(r["event_id"], r["failed"]) for r in kept] == [("msg_b_2:1:sent", True)]
        assert kept[0]["last_error"]
        assert REGISTRY.get_sample_value("herald_statistics_dropped_total") == dropped + 1
        assert (await stats.summary("acme", date(2026, 11, 20), date(2026, 11, 20)))["success_count"] == 5
        assert await shipper.ship_once() == 0  # a refused row is not claimed again

        # The table dropped by hand: that round waits, the next connection makes it again.
        clickhouse.sql(f"DROP TABLE {stats.table}")
        await tracker.fold([_record(i, e) for i, e in enumerate(_events("c", [State.SENT]))])
        with pytest.raises(clickhouse_connect.driver.exceptions.DatabaseError) as info:
            await shipper.ship_once()
        assert kind_of(info.value) == "schema"
        await stats.close()
        assert await shipper.ship_once() == 1
        assert (await stats.summary("acme", date(2026, 11, 20), date(2026, 11, 20)))["success_count"] == 1
    finally:
        await pool.close()
