"""Smart routing's decisions (issue 10), as pure functions: the provider order from cost, quality
and breakers; rules, opt-outs and quiet hours on a recipient's profile; the decision recorded on
the 'routed' event."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest

from services.router.routing import Held, Parked, Rejected, Routed, Routing, plan
from shared.events import ProviderHealthV1, RecipientProfile, State
from shared.routing import (
    HealthStore,
    Probes,
    ProviderRoute,
    RoutingPolicy,
    RoutingRule,
    RoutingStore,
    RuleMatch,
    matches,
    quiet_until,
    rank,
    score,
)

NOW = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)  # 16:00 in Shanghai


def _route(pid: int, name: str, cost: str, *, channel: str = "sms", weight: int = 100, **more) -> ProviderRoute:
    return ProviderRoute(provider_id=pid, tenant_id="acme", channel=channel, provider="aliyun", name=name,
                         costs={"default": cost}, weight=weight, **more)  # fmt: skip


def _health(pid: int, **fields) -> ProviderHealthV1:
    base = {"provider": "aliyun", "channel": "sms", "identity": f"provider:{pid}", "state": "healthy",
            "provider_id": pid, "breaker": "closed", "occurred_at": NOW}  # fmt: skip
    return ProviderHealthV1(**{**base, **fields})


POLICY = RoutingPolicy(tenant_id="acme", min_success_rate=0.9, min_samples=10)


def _order(routes, healths=(), *, now=NOW, probes=None, seed=1) -> list[str]:
    by_id = {h.provider_id: h for h in healths}
    scored = [score(r, by_id.get(r.provider_id), POLICY, "+8613800138000", now) for r in routes]
    return [s.route.name for s in rank(scored, probes=probes or Probes(), now=now, rng=random.Random(seed))]


# --- the provider order ------------------------------------------------------------------------


def test_the_cheapest_healthy_provider_comes_first() -> None:
    routes = [_route(1, "dear", "0.05"), _route(2, "cheap", "0.03")]
    assert _order(routes) == ["cheap", "dear"]
    healthy = [_health(1, samples=50, success_rate=1.0), _health(2, samples=50, success_rate=0.95)]
    assert _order(routes, healthy) == ["cheap", "dear"]


def test_a_provider_below_the_threshold_goes_behind_the_others() -> None:
    routes = [_route(1, "dear", "0.05"), _route(2, "cheap", "0.03")]
    healths = [_health(1, samples=50, success_rate=0.99), _health(2, samples=20, success_rate=0.7)]
    assert _order(routes, healths) == ["dear", "cheap"]
    # ... unless there are too few tries to judge it
    assert _order(routes, [_health(2, samples=3, success_rate=2 / 3)]) == ["cheap", "dear"]
    # ... though few can be enough to know: 3 failures in 9 tries cannot reach 90 % in 10
    assert _order(routes, [_health(2, samples=9, success_rate=6 / 9)]) == ["dear", "cheap"]
    assert _order(routes, [_health(2, samples=0, success_rate=None)]) == ["cheap", "dear"]


def test_the_country_price_decides() -> None:
    intl = ProviderRoute(provider_id=1, tenant_id="acme", channel="sms", provider="twilio", name="intl",
                         costs={"default": "0.05", "by_country": {"86": "0.02"}})  # fmt: skip
    routes = [intl, _route(2, "cn", "0.03")]
    assert _order(routes) == ["intl", "cn"]  # +86: 0.02 beats 0.03
    assert routes[0].cost("+14155550100") == Decimal("0.05")
    unpriced = ProviderRoute(provider_id=3, tenant_id="acme", channel="sms", provider="x", name="x",
                             default_cost=Decimal("0.04"))  # fmt: skip
    assert unpriced.cost("+8613800138000") == Decimal("0.04")


def test_an_open_breaker_sends_traffic_elsewhere_and_is_probed_once_cooled_down() -> None:
    routes = [_route(1, "backup", "0.05"), _route(2, "cheap", "0.03")]
    opened = _health(2, breaker="open", state="disabled", opened_at=NOW, cooldown_s=30, reason="5 consecutive failures")
    assert _order(routes, [opened]) == ["backup", "cheap"]  # last resort, never dropped
    probes = Probes(every_s=5)
    later = NOW + timedelta(seconds=31)
    assert _order(routes, [opened], now=later, probes=probes) == ["cheap", "backup"]  # the probe
    assert _order(routes, [opened], now=later + timedelta(seconds=1), probes=probes) == ["backup", "cheap"]
    assert _order(routes, [opened], now=later + timedelta(seconds=6), probes=probes) == ["cheap", "backup"]


def test_equal_costs_are_balanced_by_weight() -> None:
    routes = [_route(1, "a", "0.03", weight=300), _route(2, "b", "0.03", weight=100)]
    firsts = Counter(_order(routes, seed=seed)[0] for seed in range(2000))
    assert 0.70 < firsts["a"] / 2000 < 0.80  # 3 to 1
    zero = [_route(1, "a", "0.03", weight=0), _route(2, "b", "0.03", weight=100)]
    assert {_order(zero, seed=s)[0] for s in range(50)} == {"b"}


# --- recipients: rules, quiet hours -----------------------------------------------------------


def _profile(**fields) -> RecipientProfile:
    base = {"user_id": "u1", "timezone": "Asia/Shanghai",
            "addresses": {"sms": "+8613800138000", "feishu": "ops-bot", "email": "u1@example.com"}}  # fmt: skip
    return RecipientProfile(**{**base, **fields})


def test_quiet_hours_span_midnight_in_the_recipients_zone() -> None:
    profile = _profile(quiet_hours={"start": "22:00", "end": "07:00"})
    at_23 = datetime(2026, 12, 2, 15, 0, tzinfo=UTC)  # 23:00 Shanghai
    assert quiet_until(profile, at_23) == datetime(2026, 12, 2, 23, 0, tzinfo=UTC)  # 07:00 next morning
    at_6 = datetime(2026, 12, 2, 22, 30, tzinfo=UTC)  # 06:30 Shanghai
    assert quiet_until(profile, at_6) == datetime(2026, 12, 2, 23, 0, tzinfo=UTC)
    assert quiet_until(profile, NOW) is None  # 16:00
    assert quiet_until(profile, datetime(2026, 12, 2, 23, 0, tzinfo=UTC)) is None  # 07:00 sharp: over


def test_rule_matching() -> None:
    rule = RoutingRule(rule_id=1, tenant_id="acme", name="r", channels=["sms"],
                       match={"priorities": ["urgent"], "categories": ["ops"], "attributes": {"team": ["sre", "db"]},
                              "local_time": {"start": "09:00", "end": "18:00"}})  # fmt: skip
    profile = _profile(attributes={"team": "sre"})
    assert matches(rule, priority="urgent", category="ops", profile=profile, now=NOW)
    assert not matches(rule, priority="normal", category="ops", profile=profile, now=NOW)
    assert not matches(rule, priority="urgent", category="billing", profile=profile, now=NOW)
    assert not matches(rule, priority="urgent", category="ops", profile=_profile(attributes={"team": "web"}), now=NOW)
    night = datetime(2026, 12, 2, 14, 0, tzinfo=UTC)  # 22:00 Shanghai
    assert not matches(rule, priority="urgent", category="ops", profile=profile, now=night)


# --- plan() with a recipient ---------------------------------------------------------------------


def _routing(*rules: RoutingRule) -> Routing:
    store = RoutingStore()
    for r in [_route(1, "dear", "0.05"), _route(2, "cheap", "0.03"),
              _route(3, "ops-bot", "0", channel="feishu")]:  # fmt: skip
        store.put_provider(r)
    for rule in rules:
        store.put_rule(rule)
    return Routing(store, HealthStore(), Probes(), random.Random(1))


FALLBACK = RoutingRule(rule_id=7, tenant_id="acme", name="im then sms", channels=["feishu", "sms"],
                       step_timeout_s=60)  # fmt: skip


def _request(**fields) -> bytes:
    base = {
        "tenant_id": "acme",
        "content": "db down",
        "content_type": "text",
        "recipient": _profile().model_dump(mode="json"),
    }
    return orjson.dumps({**base, **fields})


def test_a_rule_chains_its_channels_with_the_providers_ranked() -> None:
    decision = plan(_request(), now=NOW, routing=_routing(FALLBACK))
    assert isinstance(decision, Routed)
    first = decision.dispatch
    assert (first.channel.value, first.to, [c.name for c in first.candidates]) == ("feishu", ["ops-bot"], ["ops-bot"])
    assert first.step_deadline == NOW + timedelta(seconds=60)
    nxt = first.fallback
    assert nxt is not None and nxt.channel.value == "sms" and nxt.to == ["+8613800138000"] and nxt.step == 2
    assert [c.name for c in nxt.candidates] == ["cheap", "dear"] and nxt.step_timeout_s == 60
    routed = next(e for e in decision.events if e.state is State.ROUTED)
    routing = routed.detail["routing"]
    assert routing["rule"] == {"rule_id": 7, "name": "im then sms"} and routing["channels"] == ["feishu", "sms"]
    sms = routing["steps"][1]
    assert sms["chosen"] == "cheap" and "cheapest" in sms["reason"]
    assert [c["name"] for c in sms["candidates"]] == ["cheap", "dear"] and sms["candidates"][0]["cost"] == "0.03"


def test_all_sends_every_channel_as_linked_messages() -> None:
    rule = FALLBACK.model_copy(update={"strategy": "all"})
    decision = plan(_request(), now=NOW, routing=_routing(rule))
    assert isinstance(decision, Routed) and decision.dispatch.fallback is None
    assert decision.dispatch.channel.value == "feishu"
    [child] = decision.children  # a request of its own, published to notify.requests
    assert (child.channel.value, child.to, child.parent_id) == ("sms", ["+8613800138000"], decision.dispatch.message_id)
    assert child.message_id != decision.dispatch.message_id and not child.recorded and child.idempotency_key is None
    parent = next(e for e in decision.events if e.state is State.ROUTED)
    assert parent.detail["routing"]["children"] == [{"message_id": child.message_id, "channel": "sms"}]
    again = plan(_request(message_id=decision.dispatch.message_id), now=NOW, routing=_routing(rule))
    assert again.children[0].message_id == child.message_id  # a replay gives the same ids
    # Routed in its turn: recorded by its 'accepted' event, which brings the request for the sweeper.
    routed = plan(child.to_bytes(), now=NOW, routing=_routing(rule))
    assert isinstance(routed, Routed) and routed.dispatch.candidates[0].name == "cheap" and routed.children == []
    accepted = routed.events[0]
    assert accepted.state is State.ACCEPTED and accepted.detail["parent_id"] == decision.dispatch.message_id
    stored = accepted.detail["request"]
    assert stored["channel"] == "sms" and stored["message_id"] == child.message_id


def test_opted_out_category_is_suppressed_and_says_why() -> None:
    profile = _profile(opt_outs={"categories": ["marketing"]}).model_dump(mode="json")
    decision = plan(_request(category="marketing", recipient=profile), now=NOW, routing=_routing(FALLBACK))
    assert isinstance(decision, Held) and decision.state is State.SUPPRESSED
    event = decision.events[-1]
    assert event.detail == {"reason": "opted_out", "category": "marketing"} and "opted out" in event.error


def test_opted_out_channels_are_skipped_and_recorded() -> None:
    profile = _profile(opt_outs={"channels": ["feishu"]}).model_dump(mode="json")
    decision = plan(_request(recipient=profile), now=NOW, routing=_routing(FALLBACK))
    assert isinstance(decision, Routed) and decision.dispatch.channel.value == "sms"
    routed = next(e for e in decision.events if e.state is State.ROUTED)
    assert routed.detail["routing"]["left_out"] == [{"channel": "feishu", "why": "opted out"}]
    every = _profile(opt_outs={"channels": ["feishu", "sms"]}).model_dump(mode="json")
    held = plan(_request(recipient=every), now=NOW, routing=_routing(FALLBACK))
    assert isinstance(held, Held) and held.events[-1].detail["reason"] == "opted_out"


@pytest.mark.parametrize("priority", ["normal", "high", "low"])
def test_quiet_hours_hold_a_message_until_they_end(priority: str) -> None:
    profile = _profile(quiet_hours={"start": "15:00", "end": "17:30"}).model_dump(mode="json")
    decision = plan(_request(recipient=profile, priority=priority), now=NOW, routing=_routing(FALLBACK))
    assert isinstance(decision, Parked) and decision.reason == "quiet_hours"
    assert decision.until == datetime(2026, 12, 2, 9, 30, tzinfo=UTC)


def test_urgent_messages_go_through_quiet_hours() -> None:
    profile = _profile(quiet_hours={"start": "15:00", "end": "17:30"}).model_dump(mode="json")
    decision = plan(_request(recipient=profile, priority="urgent"), now=NOW, routing=_routing(FALLBACK))
    assert isinstance(decision, Routed)


def test_no_rule_and_no_channel_is_rejected_naming_the_field() -> None:
    decision = plan(_request(), now=NOW, routing=_routing())
    assert isinstance(decision, Rejected) and decision.reason == "no_route"
    assert decision.errors[0]["field"] == "channel"


def test_a_named_channel_uses_the_profiles_address_and_the_ranking() -> None:
    decision = plan(_request(channel="sms"), now=NOW, routing=_routing())
    assert isinstance(decision, Routed)
    assert decision.dispatch.to == ["+8613800138000"] and decision.dispatch.candidates[0].name == "cheap"


def test_a_plain_send_is_ranked_too_and_a_named_provider_is_kept() -> None:
    plain = orjson.dumps({"tenant_id": "acme", "channel": "sms", "to": ["+8613800138000"], "content": "x",
                          "content_type": "text"})  # fmt: skip
    decision = plan(plain, now=NOW, routing=_routing())
    assert [c.name for c in decision.dispatch.candidates] == ["cheap", "dear"]
    named = orjson.loads(plain) | {"provider": "dear"}
    decision = plan(orjson.dumps(named), now=NOW, routing=_routing())
    assert [c.name for c in decision.dispatch.candidates] == ["dear"]


def test_quiet_hours_that_start_when_they_end_are_refused_however_written() -> None:
    with pytest.raises(ValueError, match="same time"):
        _profile(quiet_hours={"start": "22:00", "end": "22:00:00"})
    window = RuleMatch(local_time={"start": "08:00", "end": "08:00:00"})  # no validator there: never within
    rule = RoutingRule(rule_id=1, tenant_id="acme", name="r", channels=["sms"], match=window)
    assert not matches(rule, priority="normal", category=None, profile=_profile(), now=NOW)


def test_attribute_values_match_by_type_too() -> None:
    rule = RoutingRule(rule_id=1, tenant_id="acme", name="r", channels=["sms"], match={"attributes": {"vip": True}})
    facts = {"priority": "normal", "category": None, "now": NOW}
    assert matches(rule, profile=_profile(attributes={"vip": True}), **facts)
    assert not matches(rule, profile=_profile(attributes={"vip": 1}), **facts)
    tier = RoutingRule(rule_id=2, tenant_id="acme", name="t", channels=["sms"], match={"attributes": {"tier": [1, 2]}})
    assert matches(tier, profile=_profile(attributes={"tier": 2}), **facts)
    assert not matches(tier, profile=_profile(attributes={"tier": True}), **facts)
    assert not matches(tier, profile=_profile(), **facts)  # absent


def test_a_channel_the_message_cannot_take_is_left_out_not_the_message() -> None:
    rule = RoutingRule(rule_id=9, tenant_id="acme", name="mail then sms", channels=["email", "sms"])
    decision = plan(_request(), now=NOW, routing=_routing(rule))  # no subject: not an email
    assert isinstance(decision, Routed) and decision.dispatch.channel.value == "sms"
    assert decision.dispatch.fallback is None
    routed = next(e for e in decision.events if e.state is State.ROUTED)
    [left] = routed.detail["routing"]["left_out"]
    assert left["channel"] == "email" and "subject" in left["why"]
    only_email = RoutingRule(rule_id=9, tenant_id="acme", name="mail", channels=["email"])
    rejected = plan(_request(), now=NOW, routing=_routing(only_email))
    assert isinstance(rejected, Rejected) and rejected.errors[0]["field"] == "subject"


def test_a_health_record_nobody_refreshes_is_not_trusted() -> None:
    store = HealthStore(stale_after_s=120)
    opened = _health(2, breaker="open", state="disabled", opened_at=NOW, cooldown_s=30)
    store.apply(opened.to_bytes())
    assert store.get(2, NOW + timedelta(seconds=119)) is not None
    assert store.get(2, NOW + timedelta(seconds=121)) is None  # no tracker measured it since
    store.apply(_health(2, breaker="closed", occurred_at=NOW - timedelta(hours=1)).to_bytes())
    assert store.get(2, NOW) is None  # the last record read wins, and it is old


def test_a_message_swept_after_its_next_channel_took_over_resumes_there() -> None:
    # The sweeper publishes attempt 3 (the fallback's) with step 2: feishu had failed already.
    decision = plan(_request(step=2, attempt=3, recorded=True, message_id="msg_20261202_resumed000000001"), now=NOW,
                    routing=_routing(FALLBACK))  # fmt: skip
    assert isinstance(decision, Routed)
    d = decision.dispatch
    assert (d.channel.value, d.step, d.attempt, d.first_attempt, d.fallback) == ("sms", 2, 3, 3, None)
    assert d.dispatch_id == "msg_20261202_resumed000000001:3"  # the lost fallback's own id: sent once
    routed = next(e for e in decision.events if e.state is State.ROUTED)
    assert routed.detail["routing"]["left_out"] == [{"channel": "feishu", "why": "failed before; resumed at step 2"}]


def test_the_store_follows_changes_and_late_records() -> None:
    store = RoutingStore()
    store.put_provider(_route(1, "a", "0.03", revision=2))
    store.put_provider(_route(2, "b", "0.03", revision=1, priority=1))
    assert [p.name for p in store.providers_of("acme", "sms")] == ["b", "a"]  # by priority
    store.put_provider(_route(1, "a", "0.03", revision=1, is_active=False))  # published late: ignored
    assert [p.name for p in store.providers_of("acme", "sms")] == ["b", "a"]
    store.put_provider(_route(1, "a", "0.03", revision=3, deleted=True))
    assert [p.name for p in store.providers_of("acme", "sms")] == ["b"] and store.named("acme", "sms", "a") is None
    store.put_provider(_route(2, "b", "0.03", revision=2, channel="push"))  # moved to another channel
    assert store.providers_of("acme", "sms") == [] and [p.name for p in store.providers_of("acme", "push")] == ["b"]
    store.put_rule(RoutingRule(rule_id=1, tenant_id="acme", name="x", channels=["sms"], position=5, revision=1))
    store.put_rule(RoutingRule(rule_id=2, tenant_id="acme", name="y", channels=["sms"], position=1, revision=1))
    assert [r.name for r in store.rules_of("acme")] == ["y", "x"] and store.rules_of("other") == []
    store.put_rule(RoutingRule(rule_id=2, tenant_id="acme", name="y", channels=["sms"], deleted=True, revision=2))
    assert [r.name for r in store.rules_of("acme")] == ["x"]


def test_a_resumed_chain_counts_its_steps_after_the_channels_left_out() -> None:
    # [email, feishu, sms] without a subject: feishu was step 1 and sms step 2 when first routed.
    rule = RoutingRule(rule_id=3, tenant_id="acme", name="three", channels=["email", "feishu", "sms"])
    first = plan(_request(message_id="msg_20261202_resumedleftout01"), now=NOW, routing=_routing(rule))
    assert (first.dispatch.channel.value, first.dispatch.fallback.channel.value) == ("feishu", "sms")
    assert first.dispatch.fallback.step == 2
    again = plan(_request(step=2, attempt=2, recorded=True, message_id="msg_20261202_resumedleftout01"), now=NOW,
                 routing=_routing(rule))  # fmt: skip
    assert (again.dispatch.channel.value, again.dispatch.step, again.dispatch.dispatch_id) == (
        "sms", 2, "msg_20261202_resumedleftout01:2")  # fmt: skip


def test_quiet_hours_do_not_hold_a_replayed_or_swept_attempt() -> None:
    profile = _profile(quiet_hours={"start": "15:00", "end": "17:30"}).model_dump(mode="json")
    replay = plan(_request(recipient=profile, channel="sms", attempt=3, recorded=True,
                           message_id="msg_20261202_replayedquiet001"), now=NOW, routing=_routing())  # fmt: skip
    assert isinstance(replay, Routed) and replay.dispatch.attempt == 3


def test_a_linked_message_stores_its_request_unrendered_and_its_content_once() -> None:
    from shared.template_store import TemplateStore
    from shared.templates import TemplateHead, TemplateVersion, Variant

    store = TemplateStore()
    variant = Variant(channel="sms", format="text", content="code {{ n }}")
    store.put_version(TemplateVersion(template_id=5, tenant_id="acme", template_name="t", template_type="sms",
                                      version=1, variables=["n"], variants=[variant]))  # fmt: skip
    store.put_head(TemplateHead(template_id=5, tenant_id="acme", template_name="t", version=1))
    child = {"tenant_id": "acme", "channel": "sms", "to": ["+8613800138000"], "content_type": "text",
             "parent_id": "msg_20261202_parent0000000001", "message_id": "msg_20261202_child00000000001",
             "template": {"template_id": 5, "version": 1, "vars": {"n": 7}}}  # fmt: skip
    decision = plan(orjson.dumps(child), now=NOW, routing=_routing(), templates=store)
    assert isinstance(decision, Routed) and decision.dispatch.content == "code 7"
    accepted = decision.events[0]
    assert accepted.state is State.ACCEPTED and accepted.message.content is None  # not twice
    stored = accepted.detail["request"]
    assert stored["template"]["vars"] == {"n": 7} and not stored.get("content")  # routed again as published
    assert isinstance(plan(orjson.dumps(stored), now=NOW, routing=_routing(), templates=store), Routed)
