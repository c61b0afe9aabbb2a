"""Metrics, dashboards and alerts against a real Prometheus (issue 11).

A Prometheus server (Debian's package, run here as a plain process: scrape and evaluation every
second, its storage in a temporary folder, a free port) scrapes every service of the session's
pipeline. The module sends traffic through ingest (emails delivered and refused, ntfy messages
whose provider fails twice, a malformed record published straight to Kafka, a request with a
bad token), then:

- the failure ratio Prometheus computes from ``messages_sent_total`` is what was sent;
- every Prometheus query of every panel of ``deploy/grafana/*.json`` returns data, through
  Prometheus's HTTP API (Grafana's ``$__rate_interval`` and ``$tenant`` expanded as Grafana would);
- every alert of ``deploy/prometheus/alerts.yml`` is loaded with health "ok", the measure left of
  each threshold returns data, and the failure-rate alert fires (a copy of the rules with every
  ``for`` at 0 s, loaded beside them);
- the backlog gauges read the groups' committed offsets (``notify.requests`` drains to 0), and the
  retry tiers are exported as ``herald_retries_waiting``, not as backlog;
- every PostgreSQL panel's SQL, its Grafana macros expanded to plain SQL, runs against the
  pipeline's database and returns rows, also as the read-only role docs/observability.md gives;
- the tenant dashboard's success numbers are what ``GET /api/v1/statistics`` answers for the same
  tenant and range;
- a hostile tenant variable stays a string literal (``${tenant:sqlstring}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from devstack import access
from devstack.servers import free_port
from services.tracker.lag import consuming_groups, is_retry_topic
from shared.events import Channel
from tests.conftest import Pipeline
from tests.e2e.helpers import SEND, uniq, wait_for_state
from tests.emulators.ntfy import NtfyEmulator

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DOCS = ROOT / "docs" / "observability.md"
TENANT = "default"  # the suite's key belongs to it
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval is for a short range at a 1 s scrape, give or take
NTFY_TOKEN, NTFY_TOPIC = "tk_e2eobservability0123456789ab", "herald-observability"
SENT_OK, SENT_REFUSED, NTFY_SENT, NTFY_FAILURES = 8, 2, 3, 2


# --- Prometheus ---------------------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen
    log: Path
    http: httpx.AsyncClient = field(init=False)

    async def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        r = await self.http.get(f"{self.url}/api/v1/query", params=params)
        assert r.status_code == 200, f"{expr}: {r.status_code} {r.text}"
        body = r.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result = body["data"]["result"]
        if body["data"]["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return result

    async def values(self, expr: str, key: str, at: float | None = None) -> dict[str, float]:
        return {s["metric"].get(key, ""): float(s["value"][1]) for s in await self.query(expr, at)}

    async def get(self, path: str) -> Any:
        r = await self.http.get(f"{self.url}{path}")
        assert r.status_code == 200, r.text
        return r.json()["data"]


def _test_rules(directory: Path) -> Path:
    """alerts.yml again, as group herald-e2e with every ``for`` at 0 s: its alerts fire at the
    first evaluation that finds their condition (the real group keeps its durations)."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        group["name"] += "-e2e"
        for rule in group["rules"]:
            rule["for"] = "0s"
    path = directory / "alerts.e2e.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def prometheus_server(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: `make install` (scripts/install-system-deps.sh) installs it"
    directory = tmp_path_factory.mktemp("prometheus")
    targets = [
        {"targets": [f"127.0.0.1:{service.port}"], "labels": {"service": name}}
        for name, service in pipeline.services.items()
    ]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(ALERTS), str(_test_rules(directory))],
        "scrape_configs": [{"job_name": "herald", "metrics_path": "/metrics", "static_configs": targets}],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = directory / "prometheus.log"
    process = subprocess.Popen(
        [binary, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"prometheus exited: {log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready: {log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield Prometheus(url, process, log)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture(scope="module")
async def prometheus(prometheus_server: Prometheus) -> AsyncIterator[Prometheus]:
    async with httpx.AsyncClient(timeout=10) as http:
        prometheus_server.http = http
        yield prometheus_server


async def _eventually(check, timeout: float, what: str, every: float = 0.25) -> Any:
    """Call ``check()`` until it answers something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"{what}: not after {timeout}s (last: {last})")


async def _settled(prom: Prometheus, expr: str, key: str, quiet_s: float = 2.0, timeout: float = 20) -> dict:
    """The values of ``expr`` once they have not moved for ``quiet_s`` (other tests' retries done)."""
    last: dict | None = None
    since = time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        current = await prom.values(expr, key)
        if current != last:
            last, since = current, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return current
        await asyncio.sleep(0.25)
    raise AssertionError(f"{expr} kept moving for {timeout}s: {last}")


# --- the traffic ---------------------------------------------------------------------------------

EMAIL_OUTCOMES = 'sum by (status) (messages_sent_total{type="email"})'
DECISIONS = "sum by (channel, provider, reason) (herald_routing_decisions_total)"


@dataclass
class Traffic:
    baseline: dict[str, float]
    decisions_before: list[dict]
    sent_at: float
    message_ids: dict[str, list[str]]


@pytest.fixture(scope="module")
async def ntfy() -> AsyncIterator[NtfyEmulator]:
    emu = NtfyEmulator(tokens={NTFY_TOKEN})
    await emu.start()
    yield emu
    await emu.stop()


@pytest.fixture(scope="module")
async def traffic(
    pipeline: Pipeline, prometheus: Prometheus, client: httpx.AsyncClient, producer: AIOKafkaProducer,
    ntfy: NtfyEmulator,
) -> Traffic:  # fmt: skip
    # Every service scraped, and the email counters quiet: what moves from now on is ours.
    async def all_up() -> bool:
        ups = await prometheus.values("up", "service")
        return set(ups) == set(pipeline.services) and all(v == 1 for v in ups.values())

    await _eventually(all_up, 15, "every service scraped")
    # A labelled counter appears at its first increment, already at 1, and rate() cannot see that
    # first step: one email of each outcome first, so that the series exist before the baseline.
    for to in (f"obs-{uniq()}@example.com", f"bounce-{uniq()}@example.com"):
        r = await client.post(SEND, json={"to": to, "subject": uniq("obs warm-up "), "content": "<p>x</p>"})
        assert r.status_code == 202, r.text
        await wait_for_state(client, r.json()["data"]["message_id"], "failed" if to.startswith("b") else "sent")
    baseline = await _settled(prometheus, EMAIL_OUTCOMES, "status")
    decisions_before = await prometheus.query(DECISIONS)

    r = await client.post("/api/v1/providers", json={
        "channel": "ntfy", "provider": "ntfy", "name": uniq("obs-ntfy-"),
        "config": {"server": ntfy.url, "token": NTFY_TOKEN}, "costs": {"default": "0.001"},
    })  # fmt: skip
    assert r.status_code == 201, r.text
    provider = r.json()["data"]["name"]
    ntfy.fail("server_error", times=NTFY_FAILURES)  # the provider's fault: retried, counted by quality

    sends = [{"to": f"obs-{uniq()}@example.com", "subject": uniq("obs "), "content": "<p>ok</p>"}
             for _ in range(SENT_OK)]  # fmt: skip
    sends += [{"to": f"bounce-{uniq()}@example.com", "subject": uniq("obs "), "content": "<p>refused</p>"}
              for _ in range(SENT_REFUSED)]  # fmt: skip
    ids: dict[str, list[str]] = {"email": [], "ntfy": []}
    for body in sends:
        r = await client.post(SEND, json=body)
        assert r.status_code == 202, r.text
        ids["email"].append(r.json()["data"]["message_id"])
    for _ in range(NTFY_SENT):
        body = {"channel": "ntfy", "provider": provider, "to": NTFY_TOPIC, "title": "obs", "content": uniq("n ")}
        r = await client.post("/api/v1/messages/send", json=body)
        assert r.status_code == 202, r.text
        ids["ntfy"].append(r.json()["data"]["message_id"])
    await producer.send_and_wait("notify.requests", b"{not json", key=b"default:observability")
    r = await client.get("/api/v1/messages", headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401, r.text

    for message_id in ids["email"][:SENT_OK]:
        await wait_for_state(client, message_id, "sent")
    for message_id in ids["email"][SENT_OK:]:
        await wait_for_state(client, message_id, "failed")
    for message_id in ids["ntfy"]:
        await wait_for_state(client, message_id, "sent", timeout=30)
    return Traffic(baseline, decisions_before, time.time(), ids)


# --- panels and rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    kind: str  # prometheus | postgres
    text: str
    default_range: timedelta  # the dashboard's own time range (e.g. now-6h)


def dashboard_queries() -> list[Query]:
    found: list[Query] = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["time"]["to"] == "now", board["time"]
        span = timedelta(seconds=_interval(board["time"]["from"].removeprefix("now-")))
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                source = (target.get("datasource") or panel["datasource"])["uid"]
                if source == "${DS_PROMETHEUS}":
                    found.append(Query(board["title"], panel["title"], "prometheus", target["expr"], span))
                else:
                    assert source == "${DS_POSTGRES}", (path.name, panel["title"], source)
                    found.append(Query(board["title"], panel["title"], "postgres", target["rawSql"], span))
    return found


def promql(expr: str) -> str:
    """A panel's PromQL as Grafana sends it."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$tenant", TENANT)


_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _interval(text: str) -> int:
    number, unit = re.fullmatch(r"\s*'?(\d+)([smhd])'?\s*", text).groups()  # type: ignore[union-attr]
    return int(number) * _SECONDS[unit]


def sqlstring(value: str) -> str:
    """Grafana's ``sqlstring`` variable format: the value quoted, its single quotes doubled (one
    value; a multi-value variable's would be joined with commas)."""
    return "'" + value.replace("'", "''") + "'"


def expand_sql(sql: str, start: datetime, end: datetime, tenant: str = TENANT) -> str:
    """Grafana's PostgreSQL macros (those the dashboards use) and the tenant variable, as Grafana
    expands them: ``$__timeFilter(c)`` → ``c BETWEEN '<from>' AND '<to>'``, ``$__timeGroupAlias(c,
    '1h')`` → ``floor(extract(epoch from c)/3600)*3600 AS "time"``, ``$__timeFrom()``/``$__timeTo()``;
    ``${tenant:sqlstring}`` → the value as a string literal; ``$tenant`` and ``${tenant}`` → the value
    raw, as Grafana's PostgreSQL source does (which is why no panel uses them)."""
    iso = {"from": start.isoformat(), "to": end.isoformat()}

    def group(m: re.Match, alias: bool) -> str:
        seconds = _interval(m.group(2))
        out = f"floor(extract(epoch from {m.group(1).strip()})/{seconds})*{seconds}"
        return f'{out} AS "time"' if alias else out

    between = f"BETWEEN '{iso['from']}' AND '{iso['to']}'"
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", lambda m: f"{m.group(1).strip()} {between}", sql)
    sql = re.sub(r"\$__timeGroupAlias\(([^,]+),([^)]+)\)", lambda m: group(m, True), sql)
    sql = re.sub(r"\$__timeGroup\(([^,]+),([^)]+)\)", lambda m: group(m, False), sql)
    sql = sql.replace("$__timeFrom()", f"'{iso['from']}'").replace("$__timeTo()", f"'{iso['to']}'")
    sql = sql.replace("${tenant:sqlstring}", sqlstring(tenant))
    sql = sql.replace("${tenant}", tenant).replace("$tenant", tenant)
    assert "$" not in sql, f"a macro or variable left unexpanded: {sql}"
    return sql


_THRESHOLD = re.compile(r"\s*(>|<|>=|<=|==|!=)\s*[0-9.e+-]+\s*$")


def measure_of(expr: str) -> str:
    """What an alert compares with its threshold: ``X > 0.05`` → ``X``; ``absent(X)`` → ``X``."""
    expr = _THRESHOLD.sub("", expr.strip())
    inner = re.fullmatch(r"absent\((.*)\)", expr, re.S)
    return inner.group(1) if inner else expr


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


# --- the tests -------------------------------------------------------------------------------------


async def test_every_dashboard_prometheus_query_returns_data(prometheus: Prometheus, traffic: Traffic) -> None:
    queries = [q for q in dashboard_queries() if q.kind == "prometheus"]
    assert len({q.dashboard for q in queries}) == 4 and len(queries) >= 35, len(queries)
    # The backlog exporter polls every HERALD_LAG_POLL_S (5 s): wait for its first numbers.
    await _eventually(lambda: prometheus.query("queue_length"), 15, "queue_length exported")

    async def empty() -> list[Query]:
        return [q for q in queries if not await prometheus.query(promql(q.text))]

    missing = await empty()
    if missing:  # a gauge between two polls: look once more, a little later
        await asyncio.sleep(2)
        missing = [q for q in missing if not await prometheus.query(promql(q.text))]
    assert not missing, "\n".join(f"{q.dashboard} / {q.panel}: {q.text}" for q in missing)


async def test_failure_ratio_is_what_was_sent(prometheus: Prometheus, traffic: Traffic) -> None:
    """Counted by the email sender, scraped and summed by Prometheus: the attempts of this module
    and their outcomes, exactly; and the alert's expression says the same ratio (1 in 5)."""
    base = traffic.baseline

    async def delta() -> dict[str, float] | None:
        now = await prometheus.values(EMAIL_OUTCOMES, "status")
        moved = {s: now.get(s, 0) - base.get(s, 0) for s in set(now) | set(base)}
        done = moved.get("success", 0) >= SENT_OK and moved.get("failed", 0) >= SENT_REFUSED
        return moved if done else None

    await _eventually(delta, 15, "the email outcomes scraped")
    moved = await _settled(prometheus, EMAIL_OUTCOMES, "status")
    moved = {s: v - base.get(s, 0) for s, v in moved.items() if v - base.get(s, 0)}
    assert moved == {"success": SENT_OK, "failed": SENT_REFUSED}, moved
    failure_ratio = moved["failed"] / (moved["success"] + moved["failed"])
    assert failure_ratio == pytest.approx(0.2)

    rule = next(r for r in alert_rules() if r["alert"] == "HeraldSendFailureRateHigh")
    rates = await prometheus.values(measure_of(rule["expr"]), "type")
    # rate() extrapolates to the window's edges; over the same window, both counters alike.
    assert rates["email"] == pytest.approx(failure_ratio, abs=0.08), rates


async def test_alert_rules_load_and_evaluate(prometheus: Prometheus, traffic: Traffic) -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {"HeraldSendFailureRateHigh", "HeraldQueueBacklogHigh",
                                            "HeraldApiLatencyP95High", "HeraldDbPoolSaturated"}  # fmt: skip
    loaded = (await prometheus.get("/api/v1/rules"))["groups"]
    assert {g["name"] for g in loaded} == {"herald", "herald-e2e"}
    by_group = {g["name"]: {r["name"]: r for r in g["rules"]} for g in loaded}
    for group in by_group.values():
        assert set(group) == {r["alert"] for r in rules}
        for name, rule in group.items():
            assert rule["health"] == "ok", (name, rule.get("lastError"))
    # The measure of each alert, left of its threshold, has data now.
    for rule in rules:
        assert await prometheus.query(measure_of(rule["expr"])), f"{rule['alert']}: {measure_of(rule['expr'])}"

    # The stalled-relay alert finds the live relay's gauge (scraped here, as in prometheus.yml, with
    # a `service` target label that renames the relay's own to exported_service): with attempts
    # deemed waiting, its measure is seconds since the relay's loop last turned, not "never".
    relay = measure_of(next(r for r in rules if r["alert"] == "HeraldRetryRelayStalled")["expr"])
    stalled = relay.replace("sum(herald_retries_waiting)", "vector(1)")
    assert stalled != relay, relay
    [since] = await prometheus.query(stalled)
    assert 0 <= float(since["value"][1]) < 60, since

    # 2 of 10 email attempts failed: above 5 %. The real group waits its 5 minutes (pending); the
    # copy without `for` fires.
    async def firing() -> list[dict]:
        alerts = (await prometheus.get("/api/v1/alerts"))["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "HeraldSendFailureRateHigh"
                and a["labels"].get("type") == "email"]  # fmt: skip

    states = await _eventually(lambda: _states(firing), 10, "the failure-rate alert")
    assert states == {"pending", "firing"}, states
    # Nothing else is wrong with the pipeline.
    quiet = ("HeraldQueueBacklogHigh", "HeraldDbPoolSaturated", "HeraldTargetDown", "HeraldBacklogUnknown",
             "HeraldRetryRelayStalled", "HeraldStatisticsDropped")  # fmt: skip
    assert not [a for a in by_group["herald"].values() if a["name"] in quiet and a["state"] != "inactive"]


async def _states(alerts) -> set[str] | None:
    found = {a["state"] for a in await alerts()}
    return found if found == {"pending", "firing"} else None


async def test_backlog_reads_committed_offsets(prometheus: Prometheus, traffic: Traffic) -> None:
    """Every consumed topic has its backlog, one series each (one tracker exports them), the
    same as its group's lag; the traffic's topics drain to 0 once their consumers have committed."""
    groups = consuming_groups()
    backlog = {t for t in groups if not is_retry_topic(t)}
    retries = {t for t in groups if is_retry_topic(t)}
    assert backlog and retries
    queues = await _eventually(lambda: prometheus.values("queue_length", "queue"), 15, "queue_length")
    assert set(queues) == backlog, backlog ^ set(queues)
    assert len(await prometheus.query("queue_length")) == len(backlog)
    # The retry tiers' attempts wait for their delay on purpose: their own gauge, not the backlog.
    waiting = await _eventually(lambda: prometheus.values("herald_retries_waiting", "queue"), 10, "retries")
    assert set(waiting) == retries, retries ^ set(waiting)
    lag = {(s["metric"]["group"], s["metric"]["topic"]) for s in await prometheus.query("herald_consumer_lag")}
    assert lag == {(g, t) for t, g in groups.items()}

    # Once every record of the traffic is processed and committed, its topics have no backlog:
    # the committed offsets of the router, the two senders and the tracker were read.
    ours = ["notify.requests", "notify.dispatch.email", "notify.dispatch.ntfy", "notify.events", "notify.dlq"]

    async def drained() -> dict[str, float] | None:
        now = await prometheus.values("queue_length", "queue")
        return now if all(now.get(q) == 0 for q in ours) else None

    await _eventually(drained, 20, f"{ours} drained")
    redis = await prometheus.values("redis_memory_usage_bytes", "redis")
    assert len(redis) == 1 and next(iter(redis.values())) > 100_000, redis


async def test_routing_decisions_by_provider(prometheus: Prometheus, traffic: Traffic) -> None:
    def counts(samples: list[dict]) -> dict[tuple[str, str, str], float]:
        return {(s["metric"]["channel"], s["metric"]["provider"], s["metric"]["reason"]): float(s["value"][1])
                for s in samples}  # fmt: skip

    before = counts(traffic.decisions_before)

    async def moved() -> dict | None:
        now = counts(await prometheus.query(DECISIONS))
        delta = {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}
        ok = delta.get(("email", "smtp", "mailbox_pool"), 0) >= SENT_OK + SENT_REFUSED
        return delta if ok and delta.get(("ntfy", "ntfy", "named"), 0) >= NTFY_SENT else None

    delta = await _eventually(moved, 10, "routing decisions scraped")
    # Each message is routed once (its retries go through the retry topics, not the router).
    assert delta[("ntfy", "ntfy", "named")] == NTFY_SENT, delta
    assert delta[("email", "smtp", "mailbox_pool")] == SENT_OK + SENT_REFUSED, delta


async def test_every_dashboard_sql_runs_against_the_database(db: asyncpg.Pool, traffic: Traffic) -> None:
    queries = [q for q in dashboard_queries() if q.kind == "postgres"]
    assert len(queries) >= 12, len(queries)
    end = datetime.now(UTC) + timedelta(minutes=1)
    # The per-tenant dashboard's variable.
    tenants = [r[0] for r in await db.fetch(_tenant_variable())]
    assert TENANT in tenants

    # The statistics rollups are written as the tracker folds the outcomes: wait for ours.
    async def counted() -> bool:
        return bool(await db.fetchval(
            "SELECT count(*) FROM stats_minute WHERE tenant_id = $1 AND bucket_start >= $2", TENANT,
            datetime.fromtimestamp(traffic.sent_at, UTC) - timedelta(minutes=2),
        ))  # fmt: skip

    await _eventually(counted, 30, "statistics rows of the traffic")

    empty: list[str] = []
    async with db.acquire() as conn:
        for q in queries:
            sql = expand_sql(q.text, end - q.default_range, end)
            rows = await conn.fetch(sql)  # raises on any error in the SQL
            if not rows:
                empty.append(f"{q.dashboard} / {q.panel}")
            elif "$__timeGroupAlias" in q.text:  # a time series: Grafana wants time, metric, value
                assert {"time", "metric", "value"} <= set(rows[0].keys()), (q.panel, rows[0])
    assert not empty, empty


def _tenant_variable() -> str:
    board = json.loads((ROOT / "deploy" / "grafana" / "herald-tenant.json").read_text())
    [variable] = [v for v in board["templating"]["list"] if v["name"] == "tenant"]
    return variable["query"]


def _panel_sql(title: str, board: str = "herald-tenant.json") -> str:
    found = json.loads((ROOT / "deploy" / "grafana" / board).read_text())
    [sql] = [t["rawSql"] for p in found["panels"] if p["title"] == title for t in p.get("targets", [])]
    return sql


def _panel_numbers(rows: list) -> dict[tuple[str, str], dict]:
    """The rows of "Success rate and cost by channel and provider", in the API's terms."""
    return {(r["channel"], r["provider"]): {
        "total": r["total"], "success": r["success"], "failed": r["failed"],
        "success_pct": None if r["success_pct"] is None else float(r["success_pct"]),
        "delivered": r["delivery_receipts"], "cost": Decimal(r["cost"]), "latency": r["avg_latency_ms"],
    } for r in rows}  # fmt: skip


def _differ(a: float | None, b: float | None, tolerance: float) -> bool:
    return (a is None) != (b is None) or (a is not None and b is not None and abs(float(a) - b) > tolerance)


async def dashboard_vs_api(db: asyncpg.Pool, api: httpx.AsyncClient, tenant: str) -> tuple[list[str], dict] | None:
    """What differs between the tenant dashboard and ``GET /api/v1/statistics`` (``api``: a client of
    ``tenant``) over the last 24 whole hours, and the dashboard's rows; None while the rollups move.
    Compared: "Success rate and cost by channel and provider" with the breakdown by provider of each
    channel (every column) and, summed by channel, with the summary's ``by_type``; today's "Success
    and failed per day" with the summary's ``by_date``."""
    now = datetime.now(UTC)
    hour = now.replace(minute=0, second=0, microsecond=0)
    start, end = hour - timedelta(hours=24), hour + timedelta(hours=1)  # whole hours: stats_hour in both
    today = now.date()
    day_start = datetime.combine(today, datetime.min.time(), tzinfo=UTC)
    by_provider_sql = expand_sql(_panel_sql("Success rate and cost by channel and provider"), start, end, tenant)
    daily_sql = expand_sql(_panel_sql("Success and failed per day (statistics)"), day_start, now, tenant)
    span = {"start_date": start.strftime("%Y-%m-%dT%H:00:00Z"), "end_date": end.strftime("%Y-%m-%dT%H:00:00Z")}

    async def get(path: str, **params: str) -> dict:
        r = await api.get(f"/api/v1/statistics/{path}", params=params)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    async with db.acquire() as conn:
        before = _panel_numbers(await conn.fetch(by_provider_sql))
        daily = {r["metric"]: int(r["value"]) for r in await conn.fetch(daily_sql)}
    summary = await get("summary", **span)
    [day] = (await get("summary", start_date=today.isoformat(), end_date=today.isoformat()))["by_date"]
    expected: dict[tuple[str, str], dict] = {}
    for channel in sorted({c for c, _p in before} | set(summary["by_type"])):
        if channel not in set(Channel):
            continue  # not a channel the API can filter on: the summary's by_type below covers it
        for r in (await get("breakdown", by="provider", message_type=channel, **span))["rows"]:
            expected[(channel, r["provider"])] = {
                "total": r["total"], "success": r["success"], "failed": r["failed"],
                "success_pct": None if r["success_rate"] is None else r["success_rate"] * 100,
                "delivered": r["outcomes"]["delivered"], "cost": Decimal(r["cost"]), "latency": r["latency_avg_ms"],
            }  # fmt: skip
    async with db.acquire() as conn:
        after = _panel_numbers(await conn.fetch(by_provider_sql))
    if before != after:
        return None  # outcomes still being counted: look again
    problems = []
    known = {k: v for k, v in after.items() if k[0] in set(Channel)}
    if set(known) != set(expected):
        problems.append(f"rows: dashboard {sorted(known)} != API {sorted(expected)}")
    for key in sorted(set(known) & set(expected)):
        ours, theirs = known[key], expected[key]
        for name in ("total", "success", "failed", "delivered", "cost"):
            if ours[name] != theirs[name]:
                problems.append(f"{key} {name}: dashboard {ours[name]} != API {theirs[name]}")
        if _differ(ours["success_pct"], theirs["success_pct"], 0.011):
            problems.append(f"{key} success %: dashboard {ours['success_pct']} != API {theirs['success_pct']}")
        if _differ(ours["latency"], theirs["latency"], 1):
            problems.append(f"{key} latency: dashboard {ours['latency']} != API {theirs['latency']}")
    for channel, line in summary["by_type"].items():
        rows = [v for (c, _p), v in after.items() if c == channel]
        ours_line = {k: sum(r[k] for r in rows) for k in ("total", "success", "failed")}
        if ours_line != line:
            problems.append(f"summary by_type {channel}: dashboard {ours_line} != API {line}")
    ours_day = {"success": daily.get("success", 0), "failed": daily.get("failed", 0)}
    if ours_day != {"success": day["success"], "failed": day["failed"]}:
        problems.append(f"today: dashboard {ours_day} != API {day}")
    return problems, after


async def test_tenant_dashboard_success_numbers_are_the_statistics_api(
    db: asyncpg.Pool, client: httpx.AsyncClient, traffic: Traffic
) -> None:
    """The dashboard and ``GET /api/v1/statistics`` count the same way, for this module's traffic
    (tenant ``default``): shared/statistics.py's success = sent; failed = failed, dead, rejected."""
    last: tuple[list[str], dict] | None = None

    async def agreed() -> bool:
        nonlocal last
        last = await dashboard_vs_api(db, client, TENANT) or last
        return bool(last) and not last[0]

    with contextlib.suppress(AssertionError):
        await _eventually(agreed, 20, "the dashboard and the statistics API agree", every=1)
    assert last is not None, "the rollups kept moving"
    problems, rows = last
    assert not problems, "\n".join(problems)
    # The numbers compared are this module's traffic (not two empty answers).
    email = [v for (c, _p), v in rows.items() if c == "email"]
    assert sum(v["success"] for v in email) >= SENT_OK and sum(v["failed"] for v in email) >= SENT_REFUSED, rows
    assert sum(v["success"] for (c, _p), v in rows.items() if c == "ntfy") >= NTFY_SENT, rows


async def test_every_outcome_is_counted_as_the_statistics_api_counts_it(pipeline: Pipeline, db: asyncpg.Pool) -> None:
    """Every outcome the rollups hold, delivery receipts and rejections included, for a tenant of its
    own (rollup rows written here, as the tracker writes them): the dashboard and the API agree, and
    success is the sent messages alone, failed the failed, dead and rejected ones."""
    name = uniq("obs-")
    env = pipeline.backing.env
    await asyncio.to_thread(access.admin, env, "create-tenant", name, "--name", f"Observability {name}")
    headers = await asyncio.to_thread(access.admin_headers, env, pipeline.ingest_url, tenant=name)
    now = datetime.now(UTC)
    counts = {"sent": 40, "delivered": 31, "failed": 5, "dead": 2, "rejected": 3, "cancelled": 4, "suppressed": 1,
              "digested": 6}  # fmt: skip
    rows = []
    for provider, scale in (("aliyun", 1), ("tencent", 2)):
        for status, n in counts.items():
            buckets = [0] * 12
            buckets[3] = n * scale - 1  # one outcome without a known start: no latency
            rows.append((provider, status, n * scale, Decimal("0.045") * n * scale, 800 * (n * scale - 1), buckets))
    async with db.acquire() as conn:
        for table, width in (("stats_hour", "hour"), ("stats_day", "day")):
            bucket = now.replace(minute=0, second=0, microsecond=0)
            bucket = bucket if width == "hour" else bucket.replace(hour=0)
            await conn.executemany(
                f"""INSERT INTO {table} (tenant_id, bucket_start, channel, provider, template_id, status, count,
                        cost_sum, latency_sum_ms, latency_buckets) VALUES ($1, $2, 'sms', $3, 0, $4, $5, $6, $7, $8)""",
                [(name, bucket, *r) for r in rows],
            )  # fmt: skip
    async with httpx.AsyncClient(base_url=pipeline.ingest_url, timeout=30, headers=headers) as api:
        compared = await dashboard_vs_api(db, api, name)
    assert compared is not None
    problems, panel = compared
    assert not problems, "\n".join(problems)
    assert panel[("sms", "aliyun")] == {
        "total": 50, "success": 40, "failed": 10, "success_pct": 80.0, "delivered": 31,
        "cost": Decimal("0.045") * 92, "latency": 800,
    }  # fmt: skip
    assert panel[("sms", "tencent")]["total"] == 100 and panel[("sms", "tencent")]["success"] == 80


HOSTILE = "x' OR '1'='1"


def test_the_tenant_variable_is_a_string_literal() -> None:
    """Grafana's sqlstring format, as expand_sql applies it: the value quoted, its quotes doubled."""
    now = datetime.now(UTC)
    sql = expand_sql("WHERE tenant_id = ${tenant:sqlstring}", now, now, tenant=HOSTILE)
    assert sql == "WHERE tenant_id = 'x'' OR ''1''=''1'"
    assert expand_sql("WHERE tenant_id = ${tenant:sqlstring}", now, now, tenant="o'brien") == (
        "WHERE tenant_id = 'o''brien'"
    )


async def test_a_hostile_tenant_value_stays_a_string(db: asyncpg.Pool, traffic: Traffic) -> None:
    """``?var-tenant=x' OR '1'='1``: every tenant panel runs, compares tenant_id with that text and
    finds nothing; the raw ``'$tenant'`` the panels used before would have read every tenant."""
    end = datetime.now(UTC) + timedelta(minutes=1)
    tenant_sql = [q for q in dashboard_queries() if q.kind == "postgres" and q.dashboard == "Herald / Tenant usage"]
    assert len(tenant_sql) >= 8
    async with db.acquire() as conn:
        for q in tenant_sql:
            sql = expand_sql(q.text, end - q.default_range, end, tenant=HOSTILE)
            assert "'x'' OR ''1''=''1'" in sql, q.panel
            assert await conn.fetch(sql) == [], q.panel  # no error, no rows: nobody's tenant is that text
        # The old form, for contrast: the value closes the literal and the OR reads every tenant.
        [outcomes] = [q for q in tenant_sql if q.panel.startswith("Outcomes by state")]
        raw = outcomes.text.replace("${tenant:sqlstring}", "'$tenant'")
        assert await conn.fetch(expand_sql(raw, end - outcomes.default_range, end, tenant=HOSTILE))


def _read_only_role_sql() -> str:
    """The ```sql block of docs/observability.md's section on the data source's role."""
    text = DOCS.read_text()
    section = text[text.index("### The PostgreSQL data source's role") :]
    return re.search(r"```sql\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


async def test_panels_run_as_the_documented_read_only_role(db: asyncpg.Pool, traffic: Traffic) -> None:
    """The role docs/observability.md gives the PostgreSQL data source can run every panel and the
    tenant variable, and read nothing else (inside a transaction rolled back: nothing stays)."""
    role = f"herald_grafana_{uniq()}"
    end = datetime.now(UTC) + timedelta(minutes=1)
    queries = [q for q in dashboard_queries() if q.kind == "postgres"]
    async with db.acquire() as conn:
        database = await conn.fetchval("SELECT current_database()")
        grants = _read_only_role_sql().replace("herald_grafana", role)
        grants = grants.replace("DATABASE herald ", f'DATABASE "{database}" ')
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(grants)
            await conn.execute(f"SET LOCAL ROLE {role}")
            assert await conn.fetchval("SELECT current_user") == role
            assert TENANT in [r[0] for r in await conn.fetch(_tenant_variable())]
            for q in queries:
                await conn.fetch(expand_sql(q.text, end - q.default_range, end))  # raises if not allowed
            forbidden = [
                "SELECT content FROM message_records LIMIT 1",
                "SELECT * FROM tenants LIMIT 1",
                "SELECT content FROM message_templates LIMIT 1",
                "SELECT 1 FROM api_keys LIMIT 1",
                "SELECT 1 FROM providers LIMIT 1",
                "SELECT 1 FROM email_accounts LIMIT 1",
                "DELETE FROM stats_minute WHERE false",
            ]
            for sql in forbidden:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    async with conn.transaction():  # a savepoint: the refusal does not end the test's
                        await conn.fetch(sql)
        finally:
            await tx.rollback()
