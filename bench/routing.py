"""Phase 7: what smart routing costs the router per message (issue 10).

The router's decision for one record is a pure function (``services.router.routing.plan``), so it
is timed in this process without servers: records decided per second for

- an SMS without routing state (the decision as it was before issue 10: the baseline),
- the same SMS ranked among the tenant's three SMS providers with their live quality,
- a send to a user's profile that a rule routes to Feishu, then SMS (two steps ranked, chained).

Reported as rates and as ratios against the baseline, measured in the same process one after the
other, each the best of three rounds (the machine's other load only ever slows a round down).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

import orjson

from services.router.routing import Routed, Routing, plan
from shared.events import ProviderHealthV1, RecipientProfile
from shared.routing import HealthStore, Probes, ProviderRoute, RoutingRule, RoutingStore

ROUTING_N = int(os.environ.get("BENCH_ROUTING_N", "20000"))
NOW = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


def _routing() -> Routing:
    store, health = RoutingStore(), HealthStore()
    for pid, (plugin, cost, rate) in enumerate([("aliyun", "0.03", 0.97), ("tencent", "0.04", 0.99),
                                                ("huawei", "0.05", 0.80)], 1):  # fmt: skip
        store.put_provider(ProviderRoute(provider_id=pid, tenant_id="acme", channel="sms", provider=plugin,
                                         name=plugin, costs={"default": cost, "by_country": {"86": cost}}))  # fmt: skip
        health.apply(ProviderHealthV1(provider=plugin, channel="sms", identity=f"provider:{pid}", state="healthy",
                                      provider_id=pid, samples=200, success_rate=rate, p95_ms=300.0,
                                      breaker="closed", occurred_at=NOW).to_bytes())  # fmt: skip
    store.put_provider(ProviderRoute(provider_id=9, tenant_id="acme", channel="feishu", provider="feishu",
                                     name="ops-bot"))  # fmt: skip
    store.put_rule(RoutingRule(rule_id=1, tenant_id="acme", name="ops", match={"categories": ["ops"]},
                               channels=["feishu", "sms"], step_timeout_s=60))  # fmt: skip
    return Routing(store, health, Probes(), random.Random(7))


def _records(n: int) -> dict[str, list[bytes]]:
    addresses = {"sms": "+8613800138000", "feishu": "ops-bot"}
    profile = RecipientProfile(user_id="u1", timezone="Asia/Shanghai", addresses=addresses).model_dump(mode="json")
    sms = {"tenant_id": "acme", "channel": "sms", "to": ["+8613800138000"], "content": "db down",
           "content_type": "text"}  # fmt: skip
    user = {"tenant_id": "acme", "recipient": profile, "category": "ops", "content": "db down",
            "content_type": "text"}  # fmt: skip
    return {
        "sms": [orjson.dumps({**sms, "content": f"db down {i}"}) for i in range(n)],
        "user": [orjson.dumps({**user, "content": f"db down {i}"}) for i in range(n)],
    }


def _rate(records: list[bytes], decide: Callable[[bytes], object]) -> float:
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        for raw in records:
            decide(raw)
        best = max(best, len(records) / (time.perf_counter() - started))
    return best


def phase_routing(n: int = ROUTING_N) -> dict:
    routing = _routing()
    records = _records(n)
    check = plan(records["user"][0], now=NOW, routing=routing)
    assert isinstance(check, Routed) and check.dispatch.fallback is not None, check  # the chain is built
    baseline = _rate(records["sms"], lambda raw: plan(raw, now=NOW))
    ranked = _rate(records["sms"], lambda raw: plan(raw, now=NOW, routing=routing))
    chained = _rate(records["user"], lambda raw: plan(raw, now=NOW, routing=routing))
    return {
        "records": n,
        "baseline_per_s": round(baseline),
        "ranked_per_s": round(ranked),
        "rule_chain_per_s": round(chained),
        "ranked_ratio": round(ranked / baseline, 3),
        "rule_chain_ratio": round(chained / baseline, 3),
        "note": "plan() in one process, best of 3 rounds each; baseline: the same SMS without routing state",
    }


if __name__ == "__main__":
    print(orjson.dumps(phase_routing(), option=orjson.OPT_INDENT_2).decode())
