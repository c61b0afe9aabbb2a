"""The router's decisions, as pure functions of the raw record."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from services.router.routing import Origin, Rejected, Routed, Unavailable, Unknown, plan, settle_unknown
from shared.events import State
from shared.template_store import TemplateStore
from shared.templates import TemplateHead, TemplateVersion, Variant

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
        # Other channels (issue 9): their address forms, formats and one recipient per message.
        (raw(channel="sms", to=["13800138000"], content="x", subject=None), "invalid_request", "to.0"),
        (raw(channel="sms", to=["+8613800138000", "+8613800138001"], content="x"), "invalid_request", "to"),
        (raw(channel="sms", to=["+8613800138000"], content_type="html"), "invalid_request", "content_type"),
        (raw(channel="telegram", to=["12345"], content="", content_type="card"), "invalid_request", "card"),
        (raw(channel="telegram", to=["12345"], email={"cc": []}), "invalid_request", "email"),
        (raw(content_type="markdown"), "invalid_request", "content_type"),
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


def _templated(version: int = 1, **vars_: object) -> bytes:
    return orjson.dumps({"channel": "email", "to": ["t@example.com"], "tenant_id": "default",
                         "template": {"template_id": 5, "version": version, "vars": vars_}})  # fmt: skip


def _store_with(*, deleted: bool = False) -> TemplateStore:
    store = TemplateStore()
    store.put_version(TemplateVersion(template_id=5, tenant_id="default", template_name="t", template_type="email",
                                      version=1, variables=["code"],
                                      variants=[Variant(channel="email", subject="Code {{ code }}",
                                                        content="<p>{{ code }}</p>")]))  # fmt: skip
    store.put_head(TemplateHead(template_id=5, tenant_id="default", template_name="t", version=1, deleted=deleted))
    return store


def test_a_templated_request_is_rendered_from_the_store() -> None:
    routed = plan(_templated(code="<42>"), templates=_store_with())
    assert isinstance(routed, Routed)
    assert (routed.dispatch.subject, routed.dispatch.content) == ("Code <42>", "<p>&lt;42&gt;</p>")
    routed_event = routed.events[-1]
    assert routed_event.detail["template"] == {"template_id": 5, "version": 1, "locale": None}
    assert routed_event.message.content == "<p>&lt;42&gt;</p>"  # the tracker stores what was rendered


def test_a_render_failure_is_rejected_with_2004() -> None:
    rejected = plan(_templated(), templates=_store_with())  # no 'code'
    assert isinstance(rejected, Rejected) and rejected.reason == "template_render_failed"
    assert rejected.events[0].error_code == 2004


def test_an_unknown_version_is_rejected_only_when_it_can_never_come() -> None:
    store = _store_with()
    unknown = plan(_templated(version=2, code="1"), templates=store)
    assert isinstance(unknown, Unknown)
    # Newer than the current version: it will never exist.
    final = settle_unknown(unknown, _templated(version=2, code="1"), synced=True, templates=store)
    assert isinstance(final, Rejected) and final.events[0].error_code == 2003
    # The topic could not be read to its end: maybe it is on its way.
    assert isinstance(settle_unknown(unknown, None, synced=False, templates=store), Unavailable)
    # A template this store has never heard of (a broker that lost the topic): not final either.
    other = Unknown(unknown.message_id, "default", 99, 1)
    assert isinstance(settle_unknown(other, None, synced=True, templates=store), Unavailable)
    # Deleted: final.
    gone = settle_unknown(Unknown(unknown.message_id, "default", 5, 3), None, synced=True,
                          templates=_store_with(deleted=True))  # fmt: skip
    assert isinstance(gone, Rejected)


def test_a_card_alone_is_routed_with_its_card_options_and_provider() -> None:
    card = {"title": "Deploy finished", "text": "**api** v1.4", "fields": [{"title": "took", "value": "3m"}]}
    decision = plan(raw(channel="telegram", to=["-1001234567890"], subject=None, content="", content_type="card",
                        card=card, options={"silent": True}, provider="ops-bot"), now=NOW)  # fmt: skip
    assert isinstance(decision, Routed), getattr(decision, "errors", None)
    dispatch = decision.dispatch
    assert dispatch.channel == "telegram" and dispatch.to == ["-1001234567890"]
    assert dispatch.card is not None and dispatch.card.fields[0].value == "3m"
    assert dispatch.options == {"silent": True} and dispatch.provider == "ops-bot"


def test_a_direct_publishers_phone_number_is_normalised_for_the_providers() -> None:
    decision = plan(raw(channel="sms", to=["+86 138-0013-8000"], subject=None, content="x", content_type="text"),
                    now=NOW)  # fmt: skip
    assert isinstance(decision, Routed), getattr(decision, "errors", None)
    assert decision.dispatch.to == ["+8613800138000"]
