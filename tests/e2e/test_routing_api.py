"""Smart routing's configuration API (issue 10) against the running pipeline: routing rules
(create, list in order, change, soft delete), the tenant's quality policy (defaults, then set),
validation naming the field with nothing stored, tenant isolation, the audit log, and what
``notify.config`` carries for routers: every rule, policy and configured provider, each change
as a new record with a higher revision."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from devstack import access
from tests.conftest import Pipeline
from tests.e2e.helpers import own_tenant, uniq

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

RULES = "/api/v1/routing/rules"
POLICY = "/api/v1/routing/policy"
PROVIDERS = "/api/v1/providers"
AUDIT = "/api/v1/audit-logs"


@pytest.fixture(scope="module")
async def tenant_a(pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    """A tenant of its own: its rules, policy and providers are only this module's."""
    async with await own_tenant(pipeline, "ra-") as c:
        yield c


@pytest.fixture(scope="module")
async def tenant_b(pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    async with await own_tenant(pipeline, "rb-") as c:
        yield c


async def _config_topic(bootstrap: str) -> dict[bytes, list[dict]]:
    """Every record of ``notify.config`` from the beginning to its current end, by key (oldest
    first), read without a consumer group as routers read it."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        parts = [TopicPartition("notify.config", p) for p in sorted(consumer.partitions_for_topic("notify.config"))]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        found: dict[bytes, list[dict]] = {}
        deadline = time.monotonic() + 20
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            assert time.monotonic() < deadline, "notify.config not read to its end"
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for rec in records:
                    if rec.key is not None and rec.value:
                        found.setdefault(rec.key, []).append(orjson.loads(rec.value))
        return found
    finally:
        await consumer.stop()


async def _audits(client: httpx.AsyncClient, target_type: str, target_id: object) -> list[dict]:
    r = await client.get(AUDIT, params={"target_type": target_type, "page_size": 100})
    assert r.status_code == 200, r.text
    return [a for a in r.json()["data"]["items"] if a["target_id"] == str(target_id)]


async def test_rules_are_created_listed_in_order_changed_and_deleted_and_published(
    pipeline: Pipeline, tenant_a: httpx.AsyncClient, tenant_b: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    tenant = tenant_a.tenant  # type: ignore[attr-defined]
    r = await tenant_a.post(RULES, json={
        "name": "urgent-ops", "position": 10, "channels": ["wecom", "sms", "email"],
        "match": {"priorities": ["urgent", "high"], "attributes": {"team": ["ops", "sre"]},
                  "local_time": {"start": "22:00", "end": "07:00"}},
        "step_timeout_s": 60, "description": "page the on-call",
    })  # fmt: skip
    assert r.status_code == 201, r.text
    urgent = r.json()["data"]
    assert urgent["channels"] == ["wecom", "sms", "email"] and urgent["strategy"] == "first_success"
    assert urgent["match"]["priorities"] == ["urgent", "high"] and urgent["match"]["local_time"]["start"] == "22:00"
    r = await tenant_a.post(RULES, json={"name": "everything", "channels": ["email"], "strategy": "all"})
    assert r.status_code == 201, r.text
    fallback = r.json()["data"]
    assert (fallback["position"], fallback["step_timeout_s"], fallback["match"]) == (100, 300, {})
    assert fallback["revision"] > urgent["revision"]

    listed = (await tenant_a.get(RULES)).json()["data"]
    assert [x["id"] for x in listed["records"]] == [urgent["id"], fallback["id"]] and listed["total"] == 2
    page = (await tenant_a.get(RULES, params={"page": 2, "page_size": 1})).json()["data"]
    assert [x["id"] for x in page["records"]] == [fallback["id"]] and page["total"] == 2
    only_sms = (await tenant_a.get(RULES, params={"channel": "sms"})).json()["data"]["records"]
    assert [x["id"] for x in only_sms] == [urgent["id"]]
    assert (await tenant_a.get(f"{RULES}/{urgent['id']}")).json()["data"] == urgent

    # A live name is unique per tenant; another tenant may use it.
    r = await tenant_a.post(RULES, json={"name": "urgent-ops", "channels": ["sms"]})
    assert (r.status_code, r.json()["code"], r.json()["errors"][0]["field"]) == (409, 1006, "name"), r.text
    r = await tenant_b.post(RULES, json={"name": "urgent-ops", "channels": ["sms"]})
    assert r.status_code == 201, r.text
    theirs = r.json()["data"]

    r = await tenant_a.patch(f"{RULES}/{urgent['id']}", json={"position": 200, "channels": ["sms", "email"],
                                                                "is_active": False})  # fmt: skip
    assert r.status_code == 200, r.text
    changed = r.json()["data"]
    assert changed["channels"] == ["sms", "email"] and changed["is_active"] is False
    assert changed["revision"] > fallback["revision"] and changed["name"] == "urgent-ops"
    listed = (await tenant_a.get(RULES)).json()["data"]["records"]
    assert [x["id"] for x in listed] == [fallback["id"], urgent["id"]]  # by position now
    assert [x["id"] for x in (await tenant_a.get(RULES, params={"is_active": True})).json()["data"]["records"]] == [
        fallback["id"]
    ]
    for body, field in (({"position": None}, "position"), ({}, "body"), ({"channels": ["sms", "sms"]}, "channels")):
        r = await tenant_a.patch(f"{RULES}/{urgent['id']}", json=body)
        assert (r.status_code, r.json()["code"], r.json()["errors"][0]["field"]) == (400, 1001, field), r.text

    # Another tenant neither sees nor changes them.
    for method, body in (("GET", None), ("PATCH", {"position": 1}), ("DELETE", None)):
        r = await tenant_b.request(method, f"{RULES}/{urgent['id']}", json=body)
        assert (r.status_code, r.json()["code"], r.json()["data"]) == (404, 1004, None), (method, r.text)
    assert [x["id"] for x in (await tenant_b.get(RULES)).json()["data"]["records"]] == [theirs["id"]]
    assert await db.fetchval("SELECT position FROM routing_rules WHERE id = $1", urgent["id"]) == 200

    r = await tenant_a.delete(f"{RULES}/{urgent['id']}")
    assert r.status_code == 200 and r.json()["data"]["deleted"] is True, r.text
    deleted_revision = r.json()["data"]["revision"]
    assert (await tenant_a.get(f"{RULES}/{urgent['id']}")).json()["code"] == 1004
    assert (await tenant_a.delete(f"{RULES}/{urgent['id']}")).status_code == 404
    # The name is free again once the rule is gone.
    r = await tenant_a.post(RULES, json={"name": "urgent-ops", "channels": ["sms"], "is_active": False})
    assert r.status_code == 201, r.text

    actions = [a["action"] for a in await _audits(tenant_a, "routing_rule", urgent["id"])]
    assert sorted(actions) == ["routing_rule.create", "routing_rule.delete", "routing_rule.update"], actions

    # Routers read each change from notify.config: the latest record of the rule is its deletion.
    records = await _config_topic(pipeline.backing.bootstrap)
    history = records[f"routing-rule:{tenant}:{urgent['id']}".encode()]
    assert [h["revision"] for h in history][-3:] == [urgent["revision"], changed["revision"], deleted_revision]
    assert history[-1]["deleted"] is True and history[-1]["schema"] == "notify.config.routing-rule.v1"
    assert history[-2]["channels"] == ["sms", "email"] and history[-2]["is_active"] is False
    assert history[0]["match"]["attributes"] == {"team": ["ops", "sre"]} and history[0]["tenant_id"] == tenant
    latest = records[f"routing-rule:{tenant}:{fallback['id']}".encode()][-1]
    assert (latest["strategy"], latest["channels"], latest["deleted"]) == ("all", ["email"], False)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "r", "channels": []}, "channels"),
        ({"name": "r", "channels": ["sms", "sms"]}, "channels"),
        ({"name": "r", "channels": ["sms", "pigeon"]}, "channels.1"),
        ({"name": "r", "channels": ["sms"] * 9}, "channels"),
        ({"name": "r", "channels": ["sms"], "strategy": "random"}, "strategy"),
        ({"name": "r", "channels": ["sms"], "step_timeout_s": 2}, "step_timeout_s"),
        ({"name": "r", "channels": ["sms"], "position": -1}, "position"),
        ({"name": "r", "channels": ["sms"], "match": {"priorities": ["asap"]}}, "match.priorities.0"),
        ({"name": "r", "channels": ["sms"], "match": {"categories": ["Bad Category"]}}, "match.categories.0"),
        ({"name": "r", "channels": ["sms"], "match": {"local_time": {"start": "7am", "end": "09:00"}}},
         "match.local_time.start"),
        ({"name": "r", "channels": ["sms"], "match": {"hour": 3}}, "match.hour"),
        ({"name": "bad\nname", "channels": ["sms"]}, "name"),
        ({"channels": ["sms"]}, "name"),
        ({"name": "r", "channels": ["sms"], "colour": "red"}, "colour"),
    ],
)  # fmt: skip
async def test_a_bad_rule_is_refused_naming_the_field_and_nothing_is_stored(
    tenant_b: httpx.AsyncClient, db: asyncpg.Pool, body: dict, field: str
) -> None:
    before = await db.fetchval("SELECT count(*) FROM routing_rules")
    r = await tenant_b.post(RULES, json=body)
    assert (r.status_code, r.json()["code"]) == (400, 1001), r.text
    assert field in [e["field"] for e in r.json()["errors"]], r.text
    assert set(r.json()) >= {"code", "message", "data", "request_id"} and r.json()["data"] is None
    assert await db.fetchval("SELECT count(*) FROM routing_rules") == before


async def test_the_policy_has_defaults_until_set_and_each_tenant_has_its_own(
    pipeline: Pipeline, tenant_a: httpx.AsyncClient, tenant_b: httpx.AsyncClient
) -> None:
    tenant = tenant_a.tenant  # type: ignore[attr-defined]
    r = await tenant_a.get(POLICY)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == {"min_success_rate": 0.9, "max_p95_ms": None, "min_samples": 10, "revision": 0,
                                "updated_at": None}  # fmt: skip
    for body, field in (({"min_success_rate": 1.2}, "min_success_rate"), ({"min_success_rate": -0.1},
                        "min_success_rate"), ({"max_p95_ms": 0}, "max_p95_ms"), ({"min_samples": 0}, "min_samples"),
                        ({"min_samples": 5, "breaker": "on"}, "breaker")):  # fmt: skip
        r = await tenant_a.put(POLICY, json=body)
        assert (r.status_code, r.json()["code"], r.json()["errors"][0]["field"]) == (400, 1001, field), r.text
    assert (await tenant_a.get(POLICY)).json()["data"]["revision"] == 0  # nothing stored

    r = await tenant_a.put(POLICY, json={"min_success_rate": 0.97, "max_p95_ms": 1500, "min_samples": 25})
    assert r.status_code == 200, r.text
    first = r.json()["data"]
    assert (first["min_success_rate"], first["max_p95_ms"], first["min_samples"]) == (0.97, 1500, 25)
    assert first["revision"] > 0 and first["updated_at"]
    assert (await tenant_a.get(POLICY)).json()["data"] == first
    # PUT replaces: what is left out goes back to its default.
    r = await tenant_a.put(POLICY, json={"min_success_rate": 0.8})
    second = r.json()["data"]
    assert (second["min_success_rate"], second["max_p95_ms"], second["min_samples"]) == (0.8, None, 10)
    assert second["revision"] > first["revision"]
    assert (await tenant_b.get(POLICY)).json()["data"]["revision"] == 0  # not the other tenant's

    audits = await _audits(tenant_a, "routing_policy", tenant)
    assert [a["action"] for a in audits] == ["routing_policy.update"] * 2
    assert (await tenant_b.get(AUDIT, params={"target_type": "routing_policy"})).json()["data"]["items"] == []

    history = (await _config_topic(pipeline.backing.bootstrap))[f"routing-policy:{tenant}".encode()]
    assert [h["revision"] for h in history][-2:] == [first["revision"], second["revision"]]
    assert history[-1] == {"schema": "notify.config.routing-policy.v1", "tenant_id": tenant, "min_success_rate": 0.8,
                           "max_p95_ms": None, "min_samples": 10, "revision": second["revision"]}  # fmt: skip


async def test_providers_are_published_for_routers_without_configuration_or_secrets(
    pipeline: Pipeline, tenant_a: httpx.AsyncClient
) -> None:
    tenant = tenant_a.tenant  # type: ignore[attr-defined]
    secret = "tk_" + uniq() + uniq()
    access.ISSUED.append(secret)
    r = await tenant_a.post(PROVIDERS, json={
        "channel": "ntfy", "provider": "ntfy", "name": uniq("ntfy-"), "priority": 20, "weight": 60,
        "costs": {"default": "0.01"}, "config": {"server": "https://ntfy.example.com", "token": secret},
    })  # fmt: skip
    assert r.status_code == 201, r.text
    created = r.json()["data"]
    r = await tenant_a.patch(f"{PROVIDERS}/{created['id']}", json={"priority": 5, "weight": 0, "is_active": False})
    assert r.status_code == 200, r.text
    changed = r.json()["data"]
    assert changed["revision"] == created["revision"] + 1
    assert (await tenant_a.delete(f"{PROVIDERS}/{created['id']}")).status_code == 200

    records = await _config_topic(pipeline.backing.bootstrap)
    history = records[f"provider:{tenant}:{created['id']}".encode()]
    assert [h["revision"] for h in history][-3:] == [created["revision"], changed["revision"], changed["revision"] + 1]
    first, second, gone = history[-3:]
    assert first["schema"] == "notify.config.provider.v1" and first["tenant_id"] == tenant
    assert (first["channel"], first["provider"], first["name"]) == ("ntfy", "ntfy", created["name"])
    assert (first["priority"], first["weight"], first["is_active"]) == (20, 60, True)
    assert first["costs"]["default"] == "0.01" and first["default_cost"] == "0"  # ntfy is free
    assert (second["priority"], second["weight"], second["is_active"], second["deleted"]) == (5, 0, False, False)
    assert gone["deleted"] is True
    raw = orjson.dumps(history).decode()
    assert secret not in raw and "ntfy.example.com" not in raw and '"config"' not in raw
