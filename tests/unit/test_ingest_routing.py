"""Ingest's side of smart routing (issue 10), without servers: what the config topic carries for
providers, rules and policies (and that routers' stores read it back), the bodies of the routing
and recipient APIs (with the limits of the shared models), a send to a user (its ``to``, its
record, its fingerprint, the check of a send without a channel), the cache of each tenant's rules,
and profiles cut out of what ``read`` keys see."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from services.ingest.dedup import fingerprint, fingerprint_of
from services.ingest.http import _field_name
from services.ingest.publish import NewRecord
from services.ingest.recipients import text_without_profiles, without_profiles
from services.ingest.routes.messages import SendRequest, UserRef
from services.ingest.routes.recipients import RecipientIn, RecipientPatch, _audited, _normalised, _profile
from services.ingest.routes.routing import PolicyIn, RuleIn, RulePatch
from services.ingest.routing import RuleCache, _record, policy_of, provider_route_of, rule_of
from services.ingest.sends import check_route
from shared.errors import ErrorCode, HeraldError
from shared.events import Channel, RecipientProfile, RequestV1
from shared.routing import RoutingPolicy, RoutingRule, RoutingStore, policy_key, provider_key, rule_key

NOW = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


def _fields(exc: ValidationError) -> list[str]:
    return [_field_name(("body", *e["loc"])) for e in exc.errors()]


# --- what notify.config carries -----------------------------------------------------------------


def _provider_row(**over: object) -> dict:
    row = {"id": 7, "tenant_id": "acme", "channel": "sms", "provider": "aliyun", "name": "ali-main", "priority": 5,
           "weight": 30, "costs": {"default": "0.05", "by_country": {"86": "0.045"}}, "is_active": True,
           "revision": 3, "deleted": False}  # fmt: skip
    return {**row, **over}


def _rule_row(**over: object) -> dict:
    row = {"id": 11, "tenant_id": "acme", "name": "urgent", "position": 10,
           "match": {"priorities": ["urgent"], "categories": [], "attributes": {"team": ["ops", "sre"]},
                     "local_time": {"start": "22:00", "end": "07:00"}},
           "channels": ["wecom", "sms"], "strategy": "first_success", "step_timeout_s": 60, "is_active": True,
           "description": None, "revision": 42, "deleted": False,
           "created_at": NOW, "updated_at": NOW}  # fmt: skip
    return {**row, **over}


def test_a_provider_is_published_with_its_public_facts_only_and_read_back_by_routers() -> None:
    route = provider_route_of({**_provider_row(), "config": {"sign_name": "x"}, "secrets": "v1:..."})
    key, value = _record(route)
    assert key == provider_key("acme", 7) == b"provider:acme:7"
    assert b"secret" not in value and b"sign_name" not in value and b'"config"' not in value
    store = RoutingStore()
    store.apply(value)
    got = store.providers[7]
    assert (got.channel, got.priority, got.weight, got.revision, got.live) == (Channel.SMS, 5, 30, 3, True)
    assert str(got.cost("+8613800138000")) == "0.045" and str(got.cost("+15550100")) == "0.05"
    # Without configured costs, the plugin's list price (what the sender charges).
    plain = provider_route_of(_provider_row(costs={}))
    assert plain.default_cost > 0 and plain.cost("+8613800138000") == plain.default_cost
    # A deletion is published as such (rows read without the column say it explicitly); an older
    # record arriving late changes nothing.
    gone = provider_route_of({k: v for k, v in _provider_row(revision=4).items() if k != "deleted"}, deleted=True)
    store.apply(_record(gone)[1])
    store.apply(_record(route)[1])
    assert store.providers[7].deleted and store.providers_of("acme", Channel.SMS) == []


def test_a_rule_and_a_policy_round_trip_through_the_topic() -> None:
    rule = rule_of(_rule_row())
    key, value = _record(rule)
    assert key == rule_key("acme", 11)
    policy = policy_of({"tenant_id": "acme", "min_success_rate": 0.95, "max_p95_ms": None, "min_samples": 20,
                        "revision": 43})  # fmt: skip
    assert _record(policy)[0] == policy_key("acme")
    store = RoutingStore()
    store.apply(value)
    store.apply(_record(policy)[1])
    assert store.rules_of("acme") == [rule]
    assert store.policy("acme").min_success_rate == 0.95 and store.policy("other").min_success_rate == 0.9
    store.apply(_record(rule_of(_rule_row(deleted=True, revision=44)))[1])
    assert store.rules_of("acme") == []


# --- the routing API's bodies ---------------------------------------------------------------------


def test_a_rule_body_is_checked_field_by_field() -> None:
    ok = RuleIn.model_validate({"name": "r", "channels": ["email"]})
    assert (ok.position, ok.strategy, ok.step_timeout_s, ok.match.priorities) == (100, "first_success", 300, [])
    cases = [
        ({"name": "r", "channels": []}, "channels"),
        ({"name": "r", "channels": ["sms", "sms"]}, "channels"),
        ({"name": "r", "channels": ["sms", "pigeon"]}, "channels.1"),
        ({"name": "r", "channels": ["sms"] * 9}, "channels"),
        ({"name": "r", "channels": ["sms"], "strategy": "random"}, "strategy"),
        ({"name": "r", "channels": ["sms"], "step_timeout_s": 1}, "step_timeout_s"),
        ({"name": "r", "channels": ["sms"], "match": {"priorities": ["asap"]}}, "match.priorities.0"),
        ({"name": "r", "channels": ["sms"], "match": {"local_time": {"start": "25:00", "end": "07:00"}}},
         "match.local_time.start"),
        ({"name": "r", "channels": ["sms"], "match": {"weekday": 1}}, "match.weekday"),
        ({"name": "", "channels": ["sms"]}, "name"),
        ({"channels": ["sms"]}, "name"),
    ]  # fmt: skip
    for body, field in cases:
        with pytest.raises(ValidationError) as caught:
            RuleIn.model_validate(body)
        assert field in _fields(caught.value), (body, _fields(caught.value))
    with pytest.raises(ValidationError) as caught:
        RulePatch.model_validate({"channels": ["sms", "sms"]})
    assert _fields(caught.value) == ["channels"]


def test_a_policy_takes_the_defaults_for_what_is_left_out() -> None:
    assert PolicyIn.model_validate({}).model_dump() == {"min_success_rate": 0.9, "max_p95_ms": None,
                                                        "min_samples": 10}  # fmt: skip
    for body, field in (({"min_success_rate": 1.5}, "min_success_rate"), ({"max_p95_ms": 0}, "max_p95_ms"),
                        ({"min_samples": 0}, "min_samples"), ({"min_sample": 5}, "min_sample")):  # fmt: skip
        with pytest.raises(ValidationError) as caught:
            PolicyIn.model_validate(body)
        assert _fields(caught.value) == [field]


# --- recipients -----------------------------------------------------------------------------------


def test_addresses_are_stored_normalised_and_a_bad_one_is_named() -> None:
    assert _normalised({Channel.SMS: "+86 138-0013-8000", Channel.EMAIL: "Alice@Example.COM"}) == {
        "sms": "+8613800138000",
        "email": "Alice@example.com",
    }
    with pytest.raises(HeraldError) as caught:
        _normalised({Channel.EMAIL: "a@example.com", Channel.SMS: "13800138000"})
    assert caught.value.field == "addresses.sms" and "E.164" in caught.value.message


def test_a_profile_is_validated_as_sends_will_carry_it() -> None:
    body = RecipientIn.model_validate({"addresses": {"sms": "+8613800138000"}, "timezone": "Asia/Shanghai",
                                       "quiet_hours": {"start": "22:00", "end": "07:00"},
                                       "attributes": {"team": "ops", "level": 3, "vip": True}})  # fmt: skip
    profile = _profile("u1", body.model_dump(mode="json"))
    assert profile.attributes == {"team": "ops", "level": 3, "vip": True} and profile.timezone == "Asia/Shanghai"
    with pytest.raises(RequestValidationError) as caught:
        _profile("u1", RecipientIn.model_validate({"timezone": "Mars/Olympus"}).model_dump(mode="json"))
    assert [_field_name(e["loc"]) for e in caught.value.errors()] == ["timezone"]
    for body, field in (({"addresses": {"pigeon": "x"}}, "addresses.pigeon"),
                        ({"quiet_hours": {"start": "22:00", "end": "22:00"}}, "quiet_hours.end"),
                        ({"opt_outs": {"channels": ["fax"]}}, "opt_outs.channels.0"),
                        ({"locale": "not a locale"}, "locale"), ({"phone": "+1"}, "phone")):  # fmt: skip
        with pytest.raises(ValidationError) as caught:
            RecipientIn.model_validate(body)
        assert field in _fields(caught.value), (body, _fields(caught.value))
    patch = RecipientPatch.model_validate({"addresses": {"sms": None}, "attributes": {"team": "web"}})
    assert patch.model_dump(exclude_unset=True, mode="json") == {"addresses": {"sms": None},
                                                                 "attributes": {"team": "web"}}  # fmt: skip


def test_audit_entries_name_channels_and_attributes_but_not_their_values() -> None:
    details = _audited({"addresses": {"sms": "+8613800138000", "email": None}, "attributes": {"team": "ops"},
                        "timezone": "UTC"})  # fmt: skip
    assert details == {"addresses": {"sms": "<set>", "email": "<removed>"}, "attributes": {"team": "<set>"},
                       "timezone": "UTC"}  # fmt: skip


# --- sends to a user ------------------------------------------------------------------------------


def test_to_takes_a_user_and_errors_name_to_user_id() -> None:
    body = SendRequest.model_validate_json(b'{"to": {"user_id": "u-1@corp"}, "content": "x", "priority": "urgent"}')
    assert body.user == UserRef(user_id="u-1@corp") and body.to_list == [] and body.channel is None
    assert SendRequest.model_validate_json(b'{"channel": "sms", "to": "+8613800138000", "content": "x"}').user is None
    cases = [
        (b'{"to": {"user_id": "bad id"}, "content": "x"}', ["to.user_id"]),
        (b'{"to": {"user": "u1"}, "content": "x"}', ["to.user_id", "to.user"]),
        (b'{"to": ["a@example.com", ""], "content": "x"}', ["to.1"]),
        (b'{"to": 5, "content": "x"}', ["to"]),
        (b'{"to": {"user_id": "u1"}, "content": "x", "priority": "asap"}', ["priority"]),
    ]
    for raw, fields in cases:
        with pytest.raises(ValidationError) as caught:
            SendRequest.model_validate_json(raw)
        assert _fields(caught.value) == fields, raw


def _to_user(**fields: object) -> RequestV1:
    profile = {"user_id": "u1", "addresses": {"email": "u1@example.com"}}
    return RequestV1.model_validate({"tenant_id": "acme", "to": [], "content": "x", "recipient": profile, **fields})


def test_a_channelless_message_is_recorded_as_auto_to_the_user_and_keyed_by_them() -> None:
    record = NewRecord(_to_user(), {"to": [], "user_id": ["u1"]}, NOW)
    assert (record.recipient, record.message_type) == ("u1", "auto")
    with_channel = NewRecord(_to_user(channel="email", to=["u1@example.com"]), {"to": ["u1@example.com"]}, NOW)
    assert (with_channel.recipient, with_channel.message_type) == ("u1@example.com", "email")


def test_the_fingerprint_of_a_send_to_a_user_names_the_user_and_the_priority() -> None:
    base = fingerprint_of(_to_user())
    assert base == fingerprint_of(_to_user())
    assert base != fingerprint_of(_to_user(priority="urgent"))
    other = _to_user(recipient={"user_id": "u2", "addresses": {"email": "u1@example.com"}})
    assert base != fingerprint_of(other)
    direct = RequestV1.model_validate({"channel": "email", "to": ["u1@example.com"], "content": "x"})
    via_user = _to_user(channel="email", to=["u1@example.com"])
    assert fingerprint_of(direct) != fingerprint_of(via_user)
    # Sends without a user at the default priority keep the fingerprint they had.
    assert fingerprint_of(direct) == fingerprint("default", "email", ["u1@example.com"], None, "x")
    assert fingerprint_of(direct) != fingerprint_of(direct.model_copy(update={"priority": "low"}))


# --- one place for the limits --------------------------------------------------------------------

# Values at and around every limit of the fields the API bodies share with what routers read.
_PROBES: dict[str, list[Any]] = {
    "name": ["", "r", "x" * 100, "x" * 101],
    "position": [-1, 0, 100_000, 100_001],
    "channels": [[], ["sms"], ["sms", "sms"], ["sms", "email", "pigeon"], [c.value for c in Channel][:8],
                 [c.value for c in Channel][:9]],
    "strategy": ["first_success", "all", "random"],
    "step_timeout_s": [4, 5, 86_400, 86_401],
    "min_success_rate": [-0.01, 0, 1, 1.01],
    "max_p95_ms": [None, 0, 0.5, 3_600_000],
    "min_samples": [0, 1, 10_000, 10_001],
}  # fmt: skip


def _accepts(model: type, body: dict, field: str) -> bool:
    try:
        model.model_validate(body)
    except ValidationError as exc:
        assert {e["loc"][0] for e in exc.errors()} == {field}, exc
        return False
    return True


@pytest.mark.parametrize(("api", "shared", "base"), [
    (RuleIn, RoutingRule, {"rule_id": 1, "tenant_id": "t", "name": "r", "channels": ["sms"]}),
    (RulePatch, RoutingRule, {"rule_id": 1, "tenant_id": "t", "name": "r", "channels": ["sms"]}),
    (PolicyIn, RoutingPolicy, {"tenant_id": "t"}),
])  # fmt: skip
def test_the_api_bodies_take_their_limits_from_the_shared_models(api: type, shared: type, base: dict) -> None:
    common = [name for name in api.model_fields if name in shared.model_fields and name in _PROBES]
    assert common, api
    for name in common:
        for value in _PROBES[name]:
            ours = {} if api is RulePatch else {k: v for k, v in base.items() if k in api.model_fields}
            same = _accepts(api, {**ours, name: value}, name) == _accepts(shared, {**base, name: value}, name)
            assert same, (api.__name__, name, value)
        # The very definitions, not copies of them: a limit changed in shared/routing.py is the API's.
        if api is not RulePatch:
            limits = api.model_fields[name].metadata
            assert all(any(ours is theirs for ours in limits) for theirs in shared.model_fields[name].metadata), name
    assert set(PolicyIn().model_dump()) == {"min_success_rate", "max_p95_ms", "min_samples"}
    assert PolicyIn().model_dump() == RoutingPolicy(tenant_id="t").model_dump(include=set(PolicyIn.model_fields))


def test_an_unbounded_latency_threshold_is_refused() -> None:
    # RoutingPolicy has no upper bound on max_p95_ms yet; the API keeps its own until it has.
    for raw in (b'{"max_p95_ms": 3600001}', b'{"max_p95_ms": 1e400}', b'{"max_p95_ms": Infinity}'):
        with pytest.raises(ValidationError) as caught:
            PolicyIn.model_validate_json(raw)
        assert _fields(caught.value) == ["max_p95_ms"], raw


# --- a send to a user without a channel ------------------------------------------------------------


def _rule(rule_id: int, channels: list[str], **match: Any) -> RoutingRule:
    return RoutingRule(rule_id=rule_id, tenant_id="acme", name=f"rule-{rule_id}", position=rule_id, channels=channels,
                       match=match)  # fmt: skip


class _Rules:
    def __init__(self, rules: list[RoutingRule]) -> None:
        self.rules = rules
        self.asked = 0

    async def get(self, tenant_id: str) -> list[RoutingRule]:
        self.asked += 1
        return self.rules


def _services(rules: list[RoutingRule]) -> Any:
    return SimpleNamespace(routing_rules=_Rules(rules), settings=SimpleNamespace(record_timeout_s=1.0))


async def _route(rules: list[RoutingRule], profile: dict, **facts: Any) -> str | None:
    facts = {"priority": "normal", "category": None, "scheduled_at": None, "now": NOW, **facts}
    return await check_route(_services(rules), "acme", RecipientProfile.model_validate(profile), **facts)


async def test_a_send_without_a_channel_that_can_never_be_routed_is_refused_naming_the_field() -> None:
    user = {"user_id": "u1", "addresses": {"email": "u1@example.com"}}
    # No rule matches: 1001 naming channel.
    with pytest.raises(HeraldError) as caught:
        await _route([_rule(1, ["email"], categories=["billing"])], user, category="ops")
    assert (caught.value.code, caught.value.field) == (ErrorCode.INVALID_PARAMS, "channel")
    with pytest.raises(HeraldError):
        await _route([], user)
    # The rule's channels have no address in the profile: 1001 naming to.user_id, and the channels.
    with pytest.raises(HeraldError) as caught:
        await _route([_rule(1, ["sms", "wecom"]), _rule(2, ["email"])], user)
    assert (caught.value.code, caught.value.field) == (ErrorCode.INVALID_PARAMS, "to.user_id")
    assert "sms, wecom" in caught.value.message and "'rule-1'" in caught.value.message
    # Routed: the first channel with an address counts; opted out: accepted, nothing counted.
    assert await _route([_rule(1, ["sms", "email"])], user) == "email"
    assert await _route([_rule(1, ["email"])], {**user, "opt_outs": {"channels": ["email"]}}) is None
    assert await _route([], {**user, "opt_outs": {"categories": ["ads"]}}, category="ads") is None


async def test_a_send_without_a_channel_is_checked_at_the_time_the_router_will_route_it() -> None:
    nights = _rule(1, ["email"], local_time={"start": "22:00", "end": "06:00"})
    user = {"user_id": "u1", "addresses": {"email": "u1@example.com"}}  # UTC; NOW is 09:30
    with pytest.raises(HeraldError):
        await _route([nights], user)
    assert await _route([nights], user, scheduled_at=NOW.replace(hour=23)) == "email"
    # Quiet hours until 23:00: routed when they end (unless urgent, routed now).
    quiet = {**user, "quiet_hours": {"start": "08:00", "end": "23:00"}}
    assert await _route([nights], quiet) == "email"
    with pytest.raises(HeraldError):
        await _route([nights], quiet, priority="urgent")
    # A time already past is now (and then the quiet hours).
    assert await _route([nights], quiet, scheduled_at=NOW - timedelta(minutes=1)) == "email"


# --- each tenant's rules, cached ---------------------------------------------------------------------


class _Pool:
    """Answers live_rules' query with the rules set for each tenant, counting the queries; a
    query may be held until ``release`` is set."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict]] = {}
        self.queries = 0
        self.release: asyncio.Event | None = None

    async def fetch(self, query: str, tenant_id: str) -> list[dict]:
        self.queries += 1
        rows = list(self.rows.get(tenant_id, []))
        if self.release is not None:
            await self.release.wait()
        return rows


async def test_a_tenants_rules_are_read_once_per_ttl_and_again_at_once_after_a_change(monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("services.ingest.routing.time.monotonic", lambda: clock[0])
    pool = _Pool()
    pool.rows["acme"] = [_rule_row()]
    cache = RuleCache(pool, ttl_s=5.0, max_tenants=2)  # type: ignore[arg-type]
    first = await cache.get("acme")
    assert [r.rule_id for r in first] == [11]
    for _ in range(50):
        assert await cache.get("acme") == first
    assert pool.queries == 1
    clock[0] += 5.0  # expired
    await cache.get("acme")
    assert pool.queries == 2
    # A change through this ingest's API: read again at once.
    pool.rows["acme"] = [_rule_row(), _rule_row(id=12, position=20)]
    cache.forget("acme")
    assert [r.rule_id for r in await cache.get("acme")] == [11, 12] and pool.queries == 3
    # At most max_tenants entries: the oldest goes first.
    await cache.get("beta")
    await cache.get("gamma")
    assert list(cache._entries) == ["beta", "gamma"]
    await cache.get("acme")
    assert pool.queries == 6


async def test_a_read_begun_before_a_change_is_not_kept_after_it() -> None:
    pool = _Pool()
    pool.rows["acme"] = [_rule_row()]
    cache = RuleCache(pool)  # type: ignore[arg-type]
    pool.release = asyncio.Event()
    reading = asyncio.create_task(cache.get("acme"))
    await asyncio.sleep(0)
    pool.rows["acme"] = []
    cache.forget("acme")  # the change committed while the read was under way
    pool.release.set()
    assert len(await reading) == 1  # its caller began before the change
    assert await cache.get("acme") == [] and pool.queries == 2


# --- profiles are config-scope data ----------------------------------------------------------------


def test_profiles_are_cut_to_the_user_id_and_nothing_else_changes() -> None:
    profile = {"user_id": "u1", "addresses": {"sms": "+8613800138000", "email": "u1@example.com"},
               "attributes": {"team": "ops"}, "timezone": "Asia/Shanghai"}  # fmt: skip
    detail = {"scheduled_at": "2026-03-01T23:00:00+00:00", "reason": "quiet_hours", "seq": 1,
              "request": {"tenant_id": "acme", "to": [], "content": "x", "recipient": profile,
                          "children": [{"recipient": profile}]}}  # fmt: skip
    cut = without_profiles(detail)
    assert cut["request"]["recipient"] == {"user_id": "u1"}
    assert cut["request"]["children"] == [{"recipient": {"user_id": "u1"}}]
    kept = {k: v for k, v in cut["request"].items() if k not in ("recipient", "children")}
    assert kept == {"tenant_id": "acme", "to": [], "content": "x"}
    assert {k: v for k, v in cut.items() if k != "request"} == {k: v for k, v in detail.items() if k != "request"}
    assert detail["request"]["recipient"] == profile  # the original is left alone
    assert without_profiles({"recipient": "+8613800138000"}) == {"recipient": "+8613800138000"}
    assert without_profiles(None) is None and without_profiles([1, "a"]) == [1, "a"]
    # A dead letter's payload: JSON text.
    raw = orjson.dumps(detail["request"]).decode()
    assert orjson.loads(text_without_profiles(raw))["recipient"] == {"user_id": "u1"}
    assert "+8613800138000" not in text_without_profiles(raw)
    plain = '{"channel": "email", "to": ["a@example.com"]}'
    assert text_without_profiles(plain) is plain
    assert text_without_profiles("not json, recipient") == "not json, recipient"
    assert text_without_profiles('{"recipient": "a@example.com"}') == '{"recipient": "a@example.com"}'
