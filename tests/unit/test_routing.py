"""The router's decisions, as pure functions of the raw record."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from services.router.routing import Origin, Rejected, Routed, plan
from shared.events import State

NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
GOOD = {"channel": "email", "to": ["a@example.com"], "subject": "s", "content": "<p>c</p>"}


def raw(**changes: object) -> bytes:
    return orjson.dumps({**GOOD, **changes})


def test_valid_request_without_id_gets_one_and_is_announced_as_accepted() -> None:
    decision = plan(raw(), now=NOW)
    assert isinstance(decision, Routed)
    message_id = decision.dispatch.message_id
    assert message_id.startswith("msg_20261123_")
    assert [e.state for e in decision.events] == [State.ACCEPTED, State.ROUTED]
    assert all(e.message_id == message_id for e in decision.events)
    assert decision.events[0].message is not None and decision.events[0].message.recipient == "a@example.com"
    d = decision.dispatch
    assert (d.channel.value, d.attempt, d.dispatch_id) == ("email", 1, f"{message_id}:1")
    assert d.to == ["a@example.com"] and d.subject == "s" and d.content == "<p>c</p>"


def test_request_recorded_by_ingest_is_not_accepted_twice() -> None:
    decision = plan(raw(message_id="msg_20261123_abcdef123456", recorded=True), now=NOW)
    assert isinstance(decision, Routed)
    assert [e.state for e in decision.events] == [State.ROUTED]
    assert decision.dispatch.message_id == "msg_20261123_abcdef123456"
    assert decision.events[0].event_id == "msg_20261123_abcdef123456:0:routed"


def test_event_ids_are_deterministic_so_a_replay_dedups() -> None:
    a = plan(raw(message_id="msg_20261123_abcdef123456"), now=NOW)
    b = plan(raw(message_id="msg_20261123_abcdef123456"), now=NOW)
    assert isinstance(a, Routed) and isinstance(b, Routed)
    assert [e.event_id for e in a.events] == [e.event_id for e in b.events]


@pytest.mark.parametrize(
    ("record", "reason", "field"),
    [
        (b"{nope", "invalid_json", "body"),
        (b"[1, 2]", "invalid_json", "body"),
        (b"", "invalid_json", "body"),
        (raw(to=None), "invalid_request", "to"),
        (raw(to=[]), "invalid_request", "to"),
        (raw(to=["not-an-address"]), "invalid_request", "to.0"),
        (raw(subject=None), "invalid_request", "subject"),
        (raw(content=""), "invalid_request", "content"),
        (raw(channel="pigeon"), "invalid_request", "channel"),
        (raw(content_type="pdf"), "invalid_request", "content_type"),
        (raw(surprise=1), "invalid_request", "surprise"),
        (raw(schema="notify.request.v9"), "unknown_schema", "schema"),
        (raw(message_id="12345"), "invalid_request", "message_id"),
    ],
)
def test_invalid_requests_are_rejected_with_reason_and_field(record: bytes, reason: str, field: str) -> None:
    decision = plan(record, now=NOW)
    assert isinstance(decision, Rejected)
    assert decision.reason == reason
    assert field in [e["field"] for e in decision.errors]
    (event,) = decision.events
    assert event.state is State.REJECTED and event.message_id == decision.message_id
    assert event.error_code == 1001 and field in (event.error or "")
    assert event.message is not None  # the tracker can create a record for it


def test_rejection_keeps_what_the_request_said() -> None:
    decision = plan(raw(to=["bad"], tenant_id="acme", idempotency_key="k1"), now=NOW)
    assert isinstance(decision, Rejected)
    event = decision.events[0]
    assert event.tenant_id == "acme"
    assert event.message is not None
    assert event.message.recipient == "bad" and event.message.idempotency_key == "k1"


def test_duplicate_recipients_are_collapsed() -> None:
    decision = plan(raw(to=["a@example.com", "a@example.com", "b@example.com"]), now=NOW)
    assert isinstance(decision, Routed)
    assert decision.dispatch.to == ["a@example.com", "b@example.com"]


def test_ids_the_router_assigns_follow_the_record_so_a_replay_gets_the_same_one() -> None:
    origin = Origin("notify.requests", 2, 41, NOW)
    first, again = plan(raw(), now=NOW, origin=origin), plan(raw(), now=datetime.now(UTC), origin=origin)
    assert isinstance(first, Routed) and isinstance(again, Routed)
    assert first.dispatch.message_id == again.dispatch.message_id
    assert first.dispatch.dispatch_id == again.dispatch.dispatch_id
    assert first.dispatch.message_id.startswith("msg_20261123_")
    other = plan(raw(), now=NOW, origin=Origin("notify.requests", 2, 42, NOW))
    assert isinstance(other, Routed) and other.dispatch.message_id != first.dispatch.message_id
    rejected = plan(b"not json", now=NOW, origin=origin)
    assert isinstance(rejected, Rejected) and rejected.message_id == first.dispatch.message_id
