"""Frequency caps and digests: the rule store, the caps' decisions and the digests' events and
rendering, as pure functions (the Redis scripts are tested in tests/integration/test_frequency.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from services.router import caps, digests
from services.router.routing import Parked, Rejected, Routed, plan
from services.router.schedule import released_request
from shared.errors import ErrorCode
from shared.events import RequestV1, State
from shared.frequency import DigestRule, FrequencyCap, RuleStore
from shared.ids import is_message_id
from shared.template_store import TemplateStore
from shared.templates import Renderer, TemplateHead, TemplateVersion, Variant

NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
MID = "msg_20261123_abcdef123456"


def cap(cap_id: int = 1, **changes: object) -> FrequencyCap:
    base = {"cap_id": cap_id, "tenant_id": "default", "category": "promo", "max_count": 5, "window_s": 86400,
            "action": "suppress"}  # fmt: skip
    return FrequencyCap.model_validate({**base, **changes})


def rule(**changes: object) -> DigestRule:
    base = {"rule_id": 7, "tenant_id": "default", "category": "news", "channel": "email", "window_s": 600}
    return DigestRule.model_validate({**base, **changes})


def routed(**changes: object) -> Routed:
    body = {"message_id": MID, "channel": "email", "to": ["a@example.com"], "subject": "s", "content": "<p>c</p>",
            "category": "promo", "recorded": True, **changes}  # fmt: skip
    decision = plan(orjson.dumps(body), now=NOW)
    assert isinstance(decision, Routed), decision
    return decision


# --- the rule store ------------------------------------------------------------------------------


def test_store_follows_caps_and_digest_rules_by_revision_and_ignores_other_records() -> None:
    store = RuleStore()
    store.apply(cap(1, revision=5).model_dump_json(by_alias=True).encode())
    store.apply(cap(2, channel="email", window_s=60, max_count=1, revision=6).model_dump_json(by_alias=True).encode())
    store.apply(cap(3, channel="sms", revision=7).model_dump_json(by_alias=True).encode())
    store.apply(orjson.dumps({"schema": "notify.config.template-head.v1"}))  # someone else's
    store.apply(None)
    assert [c.cap_id for c in store.caps_for("default", "promo", "email")] == [1, 2]
    assert store.caps_for("default", "promo", "webhook") == [cap(1, revision=5)]
    assert store.caps_for("other", "promo", "email") == [] and store.caps_for("default", "otp", "email") == []

    store.put_cap(cap(1, revision=9, deleted=True))
    store.put_cap(cap(1, revision=8))  # published late: the deletion stands
    assert [c.cap_id for c in store.caps_for("default", "promo", "email")] == [2]
    store.put_cap(cap(2, revision=10, category="otp"))  # moved to another category
    assert store.caps_for("default", "promo", "email") == []
    assert [c.cap_id for c in store.caps_for("default", "otp", "email")] == [2]
    store.put_cap(cap(2, revision=11, category="otp", is_active=False))
    assert store.caps_for("default", "otp", "email") == []

    store.apply(rule(revision=3).model_dump_json(by_alias=True).encode())
    assert store.digest_for("default", "news", "email") == rule(revision=3)
    assert store.digest_for("default", "news", "sms") is None
    store.put_digest(rule(revision=4, deleted=True))
    assert store.digest_for("default", "news", "email") is None


def test_each_store_takes_its_own_records_of_the_shared_config_topic() -> None:
    templates, rules = TemplateStore(), RuleStore()
    records = [
        cap().model_dump_json(by_alias=True).encode(),
        TemplateHead(template_id=1, tenant_id="default", template_name="t", version=1).model_dump_json(
            by_alias=True).encode(),
    ]  # fmt: skip
    for value in records:  # as ConfigFollower applies every record to every store
        for store in (templates, rules):
            store.apply(value)
    assert rules.caps_for("default", "promo", "email") == [cap()]
    assert templates.head("default", 1, None) is not None and templates.versions == {}


# --- caps: what the windows decide ---------------------------------------------------------------


def test_no_full_window_allows_and_a_message_already_counted_is_let_through() -> None:
    assert caps.decide([]) == caps.Allow()
    assert caps.decide([caps.CapCount(cap(), False, 4, None)]) == caps.Allow()
    # Counted before a crash: the window holds it, so it is not over the cap.
    assert caps.decide([caps.CapCount(cap(), True, 5, None)]) == caps.Allow()


def test_a_full_suppressing_cap_drops_even_when_a_deferring_one_is_full_too() -> None:
    minute = cap(1, window_s=60, max_count=1, action="defer")
    day = cap(2, action="suppress")
    verdict = caps.decide([caps.CapCount(minute, False, 1, 1), caps.CapCount(day, False, 5, 2)])
    assert verdict == caps.Suppress(day, 5)


def test_defer_waits_until_every_full_window_has_room() -> None:
    a, b = cap(1, action="defer", window_s=60), cap(2, action="defer", window_s=3600)
    frees_a = int((NOW + timedelta(seconds=30)).timestamp() * 1000)
    frees_b = int((NOW + timedelta(seconds=900)).timestamp() * 1000)
    verdict = caps.decide([caps.CapCount(a, False, 5, frees_a), caps.CapCount(b, False, 5, frees_b)])
    assert isinstance(verdict, caps.Defer) and verdict.cap == b
    assert verdict.until == NOW + timedelta(seconds=900) + caps.RELEASE_MARGIN


def test_script_arguments_and_reply() -> None:
    a, b = cap(1, max_count=5, window_s=60), cap(2, max_count=1, window_s=2)
    assert caps.script_args(MID, NOW, [a, b]) == [MID, int(NOW.timestamp() * 1000), 5, 60_000, 1, 2000]
    counted, counts = caps.read_counts([a, b], [0, 1, 5, -1, 0, 1, 1234])
    assert not counted
    assert counts == [caps.CapCount(a, True, 5, None), caps.CapCount(b, False, 1, 1234)]


def test_counter_keys_hash_the_recipient_case_blind_and_share_a_slot_per_recipient() -> None:
    k1 = caps.counter_key("default", 1, "Alice@Example.com")
    assert k1 == caps.counter_key("default", 1, "alice@example.com")
    assert "alice" not in k1.lower()
    k2 = caps.counter_key("default", 2, "alice@example.com")
    assert k1.split("}")[0] == k2.split("}")[0]  # one hash tag: one Redis Cluster slot
    assert k1 != caps.counter_key("default", 1, "bob@example.com") != caps.counter_key("t2", 1, "alice@example.com")


@pytest.mark.parametrize("recorded", [True, False])
def test_a_suppressed_message_ends_suppressed_with_1007_and_the_cap_named(recorded: bool) -> None:
    decision = routed(recorded=recorded)
    held = caps.suppressed(decision, caps.Suppress(cap(3), 5), NOW)
    assert held.state is State.SUPPRESSED and held.message_id == MID
    expected = [State.SUPPRESSED] if recorded else [State.ACCEPTED, State.SUPPRESSED]
    assert [e.state for e in held.events] == expected  # a direct publish is announced as well
    event = held.events[-1]
    assert event.event_id == f"{MID}:0:suppressed" and event.attempt == 0
    assert event.error_code == ErrorCode.RATE_LIMITED == 1007
    assert "frequency cap 3" in (event.error or "") and "at most 5 promo messages" in (event.error or "")
    assert event.detail is not None and event.detail["cap_id"] == 3 and event.detail["reason"] == "frequency_cap"
    assert event.message is not None and event.message.recipient == "a@example.com"


def test_a_deferred_templated_message_is_parked_as_published_not_as_rendered() -> None:
    store = TemplateStore()
    variant = Variant(channel="email", subject="Hi {{ n }}", content="<b>{{ n }}</b>")
    store.put_version(TemplateVersion(template_id=4, tenant_id="default", template_name="t", template_type="email",
                                      version=1, variables=["n"], variants=[variant]))  # fmt: skip
    body = {"message_id": MID, "channel": "email", "to": ["a@example.com"], "category": "promo", "recorded": True,
            "deferrals": 2, "template": {"template_id": 4, "version": 1, "vars": {"n": "Ann"}}}  # fmt: skip
    raw = orjson.dumps(body)
    decision = plan(raw, now=NOW, templates=store)
    assert isinstance(decision, Routed) and decision.request.content == "<b>Ann</b>"
    until = NOW + timedelta(seconds=30)
    parked = caps.deferred(caps.unrendered(raw, decision), caps.Defer(cap(1, action="defer"), 5, until), NOW)
    assert isinstance(parked, Parked) and parked.reason == "deferred" and parked.until == until
    stored = parked.request
    assert stored.content == "" and stored.subject is None and stored.template is not None
    assert stored.deferrals == 3 and stored.scheduled_at == until
    event = parked.events[-1]
    assert event.state is State.SCHEDULED and event.event_id == f"{MID}:0:scheduled.3"
    assert event.detail is not None and event.detail["reason"] == "deferred" and event.detail["cap_id"] == 1
    # What the scheduler publishes again routes (and renders) like the first time.
    again = plan(released_request(event.detail["request"]), now=until, templates=store)
    assert isinstance(again, Routed) and again.dispatch.content == "<b>Ann</b>"


# --- digests ------------------------------------------------------------------------------------


def test_digest_ids_are_derived_from_the_opening_message() -> None:
    d = digests.digest_message_id(MID)
    assert is_message_id(d) and d.startswith("msg_20261123_") and d != MID
    assert d == digests.digest_message_id(MID) != digests.digest_message_id("msg_20261123_other0000000")


def test_only_what_lists_without_loss_goes_into_a_digest() -> None:
    assert digests.eligible(routed().request)
    assert not digests.eligible(routed(to=["a@example.com", "b@example.com"]).request)
    assert not digests.eligible(routed(email={"cc": ["c@example.com"]}).request)
    assert not digests.eligible(routed(digest={"rule_id": 1, "opened_by": MID}).request)


def test_the_opening_message_parks_the_digest_and_every_message_ends_digested() -> None:
    r = rule()
    decision = routed(category="news", email={"from_name": "Shop"})
    digest_id = digests.digest_message_id(MID)
    until_ms = int((NOW + timedelta(seconds=600)).timestamp() * 1000)
    held = digests.hold(decision, r, digest_id, until_ms, "open", NOW)
    assert held.state is State.DIGESTED
    assert [(e.message_id, e.state) for e in held.events] == [
        (digest_id, State.ACCEPTED),  # the digest message's record
        (digest_id, State.SCHEDULED),
        (MID, State.DIGESTED),
    ]
    scheduled = held.events[1]
    assert scheduled.event_id == f"{digest_id}:0:scheduled.1" and scheduled.detail is not None
    assert scheduled.detail["reason"] == "digest"
    assert scheduled.detail["scheduled_at"] == (NOW + timedelta(seconds=600)).isoformat()
    stored = RequestV1.model_validate(scheduled.detail["request"])
    assert stored.digest is not None and stored.digest.opened_by == MID and stored.digest.rule_id == 7
    assert stored.to == ["a@example.com"] and stored.category == "news" and stored.recorded
    assert stored.email is not None and stored.email.from_name == "Shop"
    digested = held.events[-1]
    assert digested.event_id == f"{MID}:0:digested" and digested.detail is not None
    assert digested.detail["digest_message_id"] == digest_id

    # Another message of the bucket, or the opener once its digest was released: no parking.
    other = digests.hold(routed(message_id="msg_20261123_second000000", category="news"), r, digest_id, until_ms,
                         "open", NOW)  # fmt: skip
    assert [e.state for e in other.events] == [State.DIGESTED]
    assert [e.state for e in digests.hold(decision, r, digest_id, until_ms, "frozen", NOW).events] == [State.DIGESTED]

    # When released, the digest message is a valid request (its placeholder passes validation).
    again = plan(released_request(scheduled.detail["request"]), now=NOW + timedelta(seconds=601))
    assert isinstance(again, Routed) and again.request.digest is not None


def _items(n: int) -> dict[bytes, bytes]:
    out = {}
    for i in range(n):
        request = routed(message_id=f"msg_20261123_item{i:08d}", subject=f"Offer {i}", content=f"<i>body {i}</i>",
                         accepted_at=(NOW + timedelta(seconds=i)).isoformat())  # fmt: skip
        out[request.request.message_id.encode()] = digests.item_of(request.request, NOW)  # type: ignore[union-attr]
    return out


def _digest_routed(**ref: object) -> Routed:
    return routed(message_id=digests.digest_message_id(MID), category="news", content=digests.PLACEHOLDER,
                  digest={"rule_id": 7, "opened_by": MID, **ref})  # fmt: skip


def test_the_built_in_listing_names_every_message_oldest_first() -> None:
    items = digests.items_of(dict(reversed(list(_items(3).items()))))
    assert [i["subject"] for i in items] == ["Offer 0", "Offer 1", "Offer 2"]
    rendered, how = digests.render(_digest_routed().request, items, TemplateStore(), Renderer())
    assert how == "listing" and rendered.subject == "3 news messages"
    for i in range(3):
        assert f"Offer {i}" in rendered.content and f"<i>body {i}</i>" in rendered.content
    out = digests.deliver(_digest_routed(), items, rendered, how, NOW)
    assert out.dispatch.subject == "3 news messages" and "Offer 2" in out.dispatch.content
    assert out.dispatch.dispatch_id == f"{digests.digest_message_id(MID)}:1"
    detail = out.events[-1].detail
    assert detail is not None and detail["digest"]["count"] == 3
    assert detail["digest"]["message_ids"] == [i["message_id"] for i in items]


def test_a_digest_template_renders_the_items_and_a_missing_one_falls_back_to_the_listing() -> None:
    store = TemplateStore()
    variant = Variant(channel="email", subject="{{ count }} {{ category }} updates",
                      content="{% for i in items %}<h2>{{ i.subject }}</h2>{{ i.content }}{% endfor %}")  # fmt: skip
    store.put_version(
        TemplateVersion(
            template_id=9,
            tenant_id="default",
            template_name="digest",
            template_type="email",
            version=2,
            variables=["items", "count", "category"],
            variants=[variant],
        )
    )
    store.put_head(TemplateHead(template_id=9, tenant_id="default", template_name="digest", version=2))
    items = digests.items_of(_items(2))
    rendered, how = digests.render(_digest_routed(template_id=9).request, items, store, Renderer())
    assert how == "template 9" and rendered.subject == "2 news updates"
    # An HTML message's content is markup, not escaped again; subjects are escaped as usual.
    assert rendered.content == "<h2>Offer 0</h2><i>body 0</i><h2>Offer 1</h2><i>body 1</i>"
    rendered, how = digests.render(_digest_routed(template_id=10).request, items, store, Renderer())
    assert how.startswith("listing: template 10") and "Offer 1" in rendered.content
    # Deleted since the rule was saved: the listing again, saying why.
    store.put_head(TemplateHead(template_id=9, tenant_id="default", template_name="digest", version=2, deleted=True,
                                revision=1))  # fmt: skip
    rendered, how = digests.render(_digest_routed(template_id=9).request, items, store, Renderer())
    assert how == "listing: template 9 failed: template 9 is deleted" and "Offer 1" in rendered.content


def test_a_digest_whose_messages_are_gone_is_rejected() -> None:
    rejected = digests.lost(_digest_routed(), NOW)
    assert isinstance(rejected, Rejected) and rejected.reason == "digest_items_lost"
    assert rejected.events[0].state is State.REJECTED and rejected.events[0].error_code == 3002


def test_item_content_is_bounded() -> None:
    big = routed(content="<p>" + "x" * 100_000 + "</p>").request
    item = orjson.loads(digests.item_of(big, NOW))
    assert len(item["content"].encode()) <= digests.ITEM_CONTENT_MAX_BYTES + 4
