"""The alert rules and dashboards, checked without a running pipeline (issue 11).

``promtool`` (Debian's ``prometheus`` package, which ``make install`` installs) checks the rule
file and the example configuration and runs the rules' unit tests (deploy/prometheus/
alerts.test.yml); a rule file with a broken expression, and a threshold moved, must fail them. Every
metric the dashboards and the rules name must be one Herald exports (a typo would otherwise only
show as an empty panel). tests/e2e/test_observability.py evaluates all of it against a real
Prometheus scraping the pipeline."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

import shared.metrics  # noqa: F401 - every metric Herald defines, registered
from shared.statistics import FAILURE, SUCCESS

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
SEED_ALERTS = {  # seed 004 §5.1.2
    "HeraldSendFailureRateHigh", "HeraldQueueBacklogHigh", "HeraldApiLatencyP95High", "HeraldDbPoolSaturated",
}  # fmt: skip
OTHER_ALERTS = {"HeraldRetryRelayStalled", "HeraldStatisticsDropped", "HeraldBacklogUnknown", "HeraldTargetDown"}
SEED_METRICS = (  # seed 004 §3.1.9, under its names (histograms by their buckets)
    "http_requests_total", "http_request_duration_seconds_bucket", "messages_sent_total",
    "messages_send_duration_seconds_bucket", "email_pool_available_accounts", "email_pool_daily_sent",
    "queue_length", "celery_tasks_total", "db_connections_active", "redis_memory_usage_bytes",
)  # fmt: skip


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed: `make install` (scripts/install-system-deps.sh) installs it"
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout, result.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "FAILED" not in result.stdout, result.stdout


def test_the_example_configuration_is_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid prometheus config file syntax" in result.stdout, result.stdout


def _rules() -> dict:
    return yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())


def _rule(rules: dict, alert: str) -> dict:
    [rule] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == alert]
    return rule


def _unit_tests_with(tmp_path: Path, rules: dict) -> str:
    """alerts.test.yml run against ``rules`` (a changed copy of alerts.yml); its output if it failed."""
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(PROMETHEUS_DIR / "alerts.test.yml", tmp_path / "alerts.test.yml")
    result = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"the unit tests did not notice the change: {output}"
    return output


def test_a_broken_expression_fails_the_check(tmp_path: Path) -> None:
    rules = _rules()
    _rule(rules, "HeraldQueueBacklogHigh")["expr"] = "max by (queue) ("
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    result = promtool("check", "rules", "alerts.yml", cwd=tmp_path)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr, result.stdout


@pytest.mark.parametrize(("alert", "threshold", "moved"), [
    ("HeraldSendFailureRateHigh", "> 0.05", "> 0.15"),
    ("HeraldQueueBacklogHigh", "> 1000", "> 5000"),
    ("HeraldApiLatencyP95High", "> 0.5", "> 1"),
    ("HeraldDbPoolSaturated", "> 0.8", "> 0.9"),
    ("HeraldRetryRelayStalled", "> 900", "> 1800"),
    ("HeraldStatisticsDropped", "> 0", "> 5"),
])  # fmt: skip
def test_the_unit_tests_notice_a_moved_threshold(tmp_path: Path, alert: str, threshold: str, moved: str) -> None:
    rules = _rules()
    rule = _rule(rules, alert)
    assert rule["expr"].rstrip().endswith(threshold), rule["expr"]
    rule["expr"] = rule["expr"].rstrip()[: -len(threshold)] + moved
    output = _unit_tests_with(tmp_path, rules)
    assert f"alertname: {alert}" in output, output


@pytest.mark.parametrize("change", ["every label matcher dropped", "herald_consumer_lag read instead"])
def test_the_unit_tests_notice_retry_tiers_counted_as_backlog(tmp_path: Path, change: str) -> None:
    """Retries waiting for their delay are no backlog (docs/observability.md): alerts.test.yml feeds
    the retry tiers' waiting attempts to the backlog alert as queue_length (an older tracker) and
    as herald_consumer_lag, and expects no alert. An expression that let them in fails it."""
    rules = _rules()
    rule = _rule(rules, "HeraldQueueBacklogHigh")
    if change == "every label matcher dropped":
        changed = re.sub(r"\{[^}]*\}", "", rule["expr"])
    else:
        changed = rule["expr"].replace("queue_length", "herald_consumer_lag")
    assert changed != rule["expr"]
    rule["expr"] = changed
    output = _unit_tests_with(tmp_path, rules)
    assert "alertname: HeraldQueueBacklogHigh, time: 10m" in output, output


def test_the_seed_alerts_are_there_with_their_thresholds() -> None:
    rules = {r["alert"]: r for g in _rules()["groups"] for r in g["rules"]}
    assert set(rules) == SEED_ALERTS | OTHER_ALERTS
    assert rules["HeraldSendFailureRateHigh"]["expr"].rstrip().endswith("> 0.05")
    assert rules["HeraldQueueBacklogHigh"]["expr"].rstrip().endswith("> 1000")
    assert rules["HeraldApiLatencyP95High"]["expr"].rstrip().endswith("> 0.5")
    assert rules["HeraldDbPoolSaturated"]["expr"].rstrip().endswith("> 0.8")
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# --- every metric named exists ------------------------------------------------------------------

# Prometheus's own series and the process collector's (prometheus_client, on Linux).
BUILTIN = {"up", "process_cpu_seconds_total", "process_resident_memory_bytes", "ALERTS"}
_KEYWORDS = {"by", "without", "and", "or", "unless", "on", "ignoring", "bool", "offset", "group_left", "group_right"}


def exported_names() -> set[str]:
    """The sample names Herald's registry can expose (counters with _total, histograms' series)."""
    names: set[str] = set()
    for line in generate_latest().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    found = re.findall(r"(?<![\w$])([A-Za-z_:][\w:]*)\b(?!\s*\()", expr)
    return {n for n in found if n not in _KEYWORDS and not re.fullmatch(r"e\d*|Inf|NaN", n)}


def dashboard_targets() -> list[tuple[str, str, dict]]:
    out = []
    for path in sorted(GRAFANA_DIR.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((path.name, panel["title"], target))
    return out


def test_every_metric_the_dashboards_and_rules_name_is_exported() -> None:
    known = exported_names() | BUILTIN
    assert not [name for name in SEED_METRICS if name not in known]
    exprs = [(f"{name} / {title}", t["expr"]) for name, title, t in dashboard_targets() if "expr" in t]
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    exprs += [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]
    unknown = {(where, n) for where, expr in exprs for n in metric_names(expr) if n not in known}
    assert not unknown, unknown


def test_the_dashboards_are_importable() -> None:
    boards = {p.name: json.loads(p.read_text()) for p in sorted(GRAFANA_DIR.glob("*.json"))}
    assert set(boards) == {"herald-overview.json", "herald-channels.json", "herald-pipeline.json", "herald-tenant.json"}
    assert len({b["uid"] for b in boards.values()}) == 4
    for name, board in boards.items():
        assert {i["name"] for i in board["__inputs"]} == {"DS_PROMETHEUS", "DS_POSTGRES"}, name
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["DS_PROMETHEUS"]["type"] == variables["DS_POSTGRES"]["type"] == "datasource"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["targets"], (name, panel["title"])
            for target in panel["targets"]:
                uid = target["datasource"]["uid"]
                assert uid in ("${DS_PROMETHEUS}", "${DS_POSTGRES}"), (name, panel["title"], uid)
                assert ("expr" in target) == (uid == "${DS_PROMETHEUS}"), (name, panel["title"])
                if "rawSql" in target:
                    assert target["rawQuery"] and target["format"] in ("table", "time_series")
                    if target["format"] == "time_series":
                        assert "$__timeGroupAlias" in target["rawSql"] and "AS metric" in target["rawSql"]
    tenant = {v["name"]: v for v in boards["herald-tenant.json"]["templating"]["list"]}["tenant"]
    assert tenant["datasource"]["uid"] == "${DS_POSTGRES}" and "tenants" in tenant["query"]
    tenant_sql = [
        t["rawSql"] for file, _title, t in dashboard_targets() if "rawSql" in t and file == "herald-tenant.json"
    ]
    assert tenant_sql and all("${tenant:sqlstring}" in sql for sql in tenant_sql)


def test_sql_variables_are_escaped() -> None:
    """Grafana's PostgreSQL source interpolates ``$tenant`` raw (``?var-tenant=x' OR '1'='1``): every
    variable in SQL goes through the ``sqlstring`` format, which quotes the value and doubles its
    quotes, and is never quoted again around it."""
    for file, title, target in dashboard_targets():
        sql = target.get("rawSql")
        if sql is None:
            continue
        variables = re.findall(r"\$\{?(?!__)(\w+)(:\w+)?\}?", sql)
        assert all(fmt == ":sqlstring" for _name, fmt in variables), (file, title, variables)
        assert "'${" not in sql and "${tenant:sqlstring}'" not in sql, (file, title)


def test_stats_panels_count_outcomes_as_the_statistics_api_does() -> None:
    """shared/statistics.py: success = sent; failed = failed, dead, rejected; total = both. No panel
    over the rollups counts a delivery receipt (a second outcome of a message already sent) as a
    success, or leaves rejected out of its failures."""
    expected = {"success": set(SUCCESS), "failed": set(FAILURE), "total": SUCCESS | FAILURE,
                "messages": SUCCESS | FAILURE, "delivery_receipts": {"delivered"}}  # fmt: skip
    filtered = re.compile(r"FILTER \(WHERE (?:s\.)?status (?:= '(\w+)'|IN \(([^)]*)\))\)(?:, 0\))? AS (\w+)")
    stats = [(f, title, t["rawSql"]) for f, title, t in dashboard_targets() if "stats_" in t.get("rawSql", "")]
    assert len(stats) >= 8, stats
    checked = 0
    for file, title, sql in stats:
        assert not [group for group in re.findall(r"IN \(([^)]*)\)", sql) if "'delivered'" in group], (file, title)
        for one, many, alias in filtered.findall(sql):
            statuses = {one} if one else {v.strip().strip("'") for v in many.split(",")}
            assert statuses == expected[alias], (file, title, alias, statuses)
            checked += 1
    assert checked >= 11, checked
    # The daily series name the API's success and failed.
    [daily] = [sql for _f, title, sql in stats if title.startswith("Success and failed per day")]
    pairs = dict(re.findall(r"\('(\w+)', '([\w ]+)'\)", daily))
    assert {k for k, v in pairs.items() if v == "success"} == set(SUCCESS)
    assert {k for k, v in pairs.items() if v == "failed"} == set(FAILURE)
