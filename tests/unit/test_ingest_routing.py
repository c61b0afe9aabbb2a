"""Ingest's side of smart routing (issue 10), without servers: what the config topic carries for
providers, rules and policies (and that routers' stores read it back), the bodies of the routing
and recipient APIs, and a send to a user (its ``to``, its record, its fingerprint)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from services.ingest.dedup import fingerprint, fingerprint_of
from services.ingest.http import _field_name
from services.ingest.publish import NewRecord
from services.ingest.routes.messages import SendRequest, UserRef
from services.ingest.routes.recipients import RecipientIn, RecipientPatch, _audited, _normalised, _profile
from services.ingest.routes.routing import PolicyIn, RuleIn, RulePatch
from services.ingest.routing import _record, policy_of, provider_route_of, rule_of
from shared.errors import HeraldError
from shared.events import Channel, RequestV1
from shared.routing import RoutingStore, policy_key, provider_key, rule_key

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
