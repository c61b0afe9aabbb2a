"""The frequency scripts on a real Redis: sliding windows counted once per message, digests
opened, filled, frozen and listed idempotently, and the router's step (Frequency.apply) on top of
them, with Redis away too (fail open)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from redis.asyncio import Redis

from services.router import digests
from services.router.caps import Held
from services.router.frequency import Frequency
from services.router.routing import Parked, Rejected, Routed, plan
from services.router.schedule import released_request
from shared.events import State
from shared.frequency import DigestRule, FrequencyCap, RuleStore
from shared.settings import Settings
from shared.template_store import TemplateStore
from shared.templates import Renderer
from tests.conftest import Backing

NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


@pytest.fixture
async def redis(backing: Backing) -> AsyncIterator[Redis]:
    client = Redis.from_url(backing.redis_url)
    yield client
    await client.aclose()


def _frequency(redis: Redis, rules: RuleStore | None = None, max_items: int = 50) -> Frequency:
    settings = Settings(digest_max_items=max_items, digest_keep_s=3600)
    return Frequency(redis, rules or RuleStore(), TemplateStore(), Renderer(), settings)


def _cap(cap_id: int, tenant: str, **changes: object) -> FrequencyCap:
    base = {"cap_id": cap_id, "tenant_id": tenant, "category": "promo", "max_count": 5, "window_s": 60,
            "action": "suppress"}  # fmt: skip
    return FrequencyCap.model_validate({**base, **changes})


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _mid(n: int | str) -> str:
    return f"msg_20261123_{uuid.uuid4().hex[:10]}{n}"


# --- the counting script -------------------------------------------------------------------------


async def test_a_window_counts_up_to_its_limit_once_per_message_and_slides(redis: Redis) -> None:
    f, tenant = _frequency(redis), uuid.uuid4().hex
    cap = _cap(1, tenant)
    ids = [_mid(i) for i in range(6)]
    for i, mid in enumerate(ids[:5]):
        counted, [c] = await f.count(tenant, "a@example.com", mid, [cap], NOW + timedelta(seconds=i))
        assert counted and c.count == i and not c.seen
    # The same message routed again (a crash before the commit): found, not counted twice.
    counted, [c] = await f.count(tenant, "A@example.com", ids[2], [cap], NOW + timedelta(seconds=10))
    assert counted and c.seen and c.count == 5
    # The sixth: the window is full until its oldest entry leaves it.
    counted, [c] = await f.count(tenant, "a@example.com", ids[5], [cap], NOW + timedelta(seconds=10))
    assert not counted and c.full and c.frees_at_ms == _ms(NOW + timedelta(seconds=60))
    # Another recipient has a window of its own.
    counted, _ = await f.count(tenant, "b@example.com", ids[5], [cap], NOW + timedelta(seconds=10))
    assert counted
    # Just before the oldest leaves, still full; at that moment, room for one.
    counted, _ = await f.count(tenant, "a@example.com", ids[5], [cap], NOW + timedelta(seconds=59.999))
    assert not counted
    counted, [c] = await f.count(tenant, "a@example.com", ids[5], [cap], NOW + timedelta(seconds=60))
    assert counted and c.count == 4
    key = f"herald:fcap:{{{tenant}:" + (await redis.keys(f"herald:fcap:{{{tenant}:*"))[0].decode().split(":", 3)[3]
    ttl = await redis.pttl(key)
    assert 0 < ttl <= 60_000  # the key goes when its window is empty


async def test_a_full_window_counts_the_message_in_none_of_its_caps(redis: Redis) -> None:
    f, tenant = _frequency(redis), uuid.uuid4().hex
    minute, day = _cap(1, tenant, max_count=1, window_s=60), _cap(2, tenant, max_count=10, window_s=86400)
    first, second = _mid("a"), _mid("b")
    counted, _ = await f.count(tenant, "a@example.com", first, [minute, day], NOW)
    assert counted
    counted, counts = await f.count(tenant, "a@example.com", second, [minute, day], NOW + timedelta(seconds=1))
    assert not counted and [c.count for c in counts] == [1, 1] and counts[0].full and not counts[1].full
    # Not counted in the day's window either: it was held back.
    counted, counts = await f.count(tenant, "a@example.com", second, [minute, day], NOW + timedelta(seconds=61))
    assert counted and [c.count for c in counts] == [0, 1]


async def test_a_lowered_limit_frees_when_enough_entries_have_left(redis: Redis) -> None:
    f, tenant = _frequency(redis), uuid.uuid4().hex
    for i in range(4):
        await f.count(tenant, "a@example.com", _mid(i), [_cap(1, tenant)], NOW + timedelta(seconds=i))
    counted, [c] = await f.count(tenant, "a@example.com", _mid("x"), [_cap(1, tenant, max_count=2)],
                                 NOW + timedelta(seconds=5))  # fmt: skip
    # 4 in the window, 2 allowed: room for one more once three have left (the third oldest, at +2 s).
    assert not counted and c.frees_at_ms == _ms(NOW + timedelta(seconds=62))


# --- the digest scripts --------------------------------------------------------------------------


async def test_deferred_messages_queue_behind_each_other_and_each_goes_at_its_time(redis: Redis) -> None:
    """One OTP a minute: three more arrive in the first minute. Each deferred one holds its place,
    so they go one a minute in arrival order (not all parked until the same moment, N² times),
    and a message arriving later waits behind them all."""
    tenant, rules = uuid.uuid4().hex, RuleStore()
    rules.put_cap(_cap(7, tenant, category="otp", max_count=1, window_s=60, action="defer"))
    f = _frequency(redis, rules)
    assert isinstance(await f.apply(*_routed(tenant, _mid("first"), "otp"), now=NOW), Routed)
    parked = []
    for i in range(3):
        decision = await f.apply(*_routed(tenant, _mid(f"d{i}"), "otp"), now=NOW + timedelta(seconds=1 + i))
        assert isinstance(decision, Parked), decision
        parked.append(decision)
    untils = [p.until - NOW for p in parked]
    # (each 50 ms of margin after the one before it: the margin for clocks adds up along the queue)
    assert untils == [timedelta(seconds=60 * n, milliseconds=50 * n) for n in (1, 2, 3)], untils
    late = await f.apply(*_routed(tenant, _mid("late"), "otp"), now=NOW + timedelta(seconds=70))
    assert isinstance(late, Parked) and late.until - NOW == timedelta(seconds=240, milliseconds=200)
    # Each, back at its time, finds its place and goes.
    for p in parked:
        raw = released_request(p.events[-1].detail["request"])  # type: ignore[index]
        again = plan(raw, now=p.until)
        assert isinstance(again, Routed) and isinstance(await f.apply(again, raw, now=p.until), Routed)


async def test_a_bucket_opens_fills_freezes_and_lists_the_same_items_every_time(redis: Redis) -> None:
    f, tag = _frequency(redis, max_items=3), f"t:{uuid.uuid4().hex}"
    first = _mid("first")
    opened = digests.digest_message_id(first)
    until = _ms(NOW + timedelta(seconds=600))
    assert await f.add(tag, first, opened, NOW, 600, b'{"n": 0}') == (opened, until, "open", first)
    second = _mid("second")
    later = NOW + timedelta(seconds=5)
    assert await f.add(tag, second, digests.digest_message_id(second), later, 600, b'{"n": 1}') == (
        opened, until, "open", first)  # fmt: skip
    # Stored again (routed twice): the same digest, stored once.
    assert await f.add(tag, second, "msg_20261123_ignored000", later, 600, b'{"n": 1}') == (
        opened, until, "open", first)  # fmt: skip
    third, fourth = _mid("third"), _mid("fourth")
    await f.add(tag, third, digests.digest_message_id(third), later, 600, b'{"n": 2}')
    # Full (3 items): the fourth opens the next digest, named after it, with its own window.
    next_id = digests.digest_message_id(fourth)
    assert await f.add(tag, fourth, next_id, later, 600, b'{"n": 3}') == (
        next_id, _ms(later) + 600_000, "open", fourth)  # fmt: skip

    items = await f.freeze(tag, opened)
    assert sorted(items.values()) == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert await f.freeze(tag, opened) == items  # a digest routed again lists the same
    assert await f.add(tag, first, digests.digest_message_id(first), later, 600, b"{}") == (
        opened, until, "frozen", first)  # fmt: skip
    # The next digest froze its own items; a message after that opens a third.
    assert list((await f.freeze(tag, next_id)).values()) == [b'{"n": 3}']
    fifth = _mid("fifth")
    assert (await f.add(tag, fifth, digests.digest_message_id(fifth), later, 600, b"{}"))[0] == (
        digests.digest_message_id(fifth))  # fmt: skip
    assert await f.freeze(tag, digests.digest_message_id("msg_20261123_neverseen0")) == {}


# --- the router's step on a real Redis ------------------------------------------------------------


def _routed(tenant: str, mid: str, category: str, to: str = "a@example.com", **extra: object) -> tuple[Routed, bytes]:
    raw = orjson.dumps({"message_id": mid, "tenant_id": tenant, "channel": "email", "to": [to], "subject": f"S {mid}",
                        "content": f"<p>{mid}</p>", "category": category, "recorded": True, **extra})  # fmt: skip
    decision = plan(raw, now=NOW)
    assert isinstance(decision, Routed)
    return decision, raw


async def test_apply_suppresses_and_defers_by_rule(redis: Redis) -> None:
    tenant, rules = uuid.uuid4().hex, RuleStore()
    rules.put_cap(_cap(1, tenant, max_count=2, action="suppress"))
    rules.put_cap(_cap(2, tenant, category="otp", max_count=1, window_s=3, action="defer"))
    f = _frequency(redis, rules)
    outcomes = [await f.apply(*_routed(tenant, _mid(i), "promo"), now=NOW) for i in range(3)]
    assert [type(o) for o in outcomes] == [Routed, Routed, Held]
    assert isinstance(outcomes[2], Held) and outcomes[2].state is State.SUPPRESSED
    assert isinstance(await f.apply(*_routed(tenant, _mid("u"), "untracked"), now=NOW), Routed)

    first = await f.apply(*_routed(tenant, _mid("o1"), "otp"), now=NOW)
    deferred = await f.apply(*_routed(tenant, _mid("o2"), "otp"), now=NOW + timedelta(seconds=1))
    assert isinstance(first, Routed) and isinstance(deferred, Parked)
    assert deferred.until == NOW + timedelta(seconds=3, milliseconds=50)
    # Released by the scheduler at its time, it goes through.
    again = plan(released_request(deferred.events[-1].detail["request"]), now=deferred.until)  # type: ignore[index]
    assert isinstance(again, Routed) and again.request.deferrals == 1
    assert isinstance(await f.apply(again, released_request(deferred.events[-1].detail["request"]),  # type: ignore[index]
                                    now=deferred.until), Routed)  # fmt: skip


async def test_apply_collects_a_digest_and_delivers_it_once_released(redis: Redis) -> None:
    tenant, rules = uuid.uuid4().hex, RuleStore()
    rules.put_digest(DigestRule(rule_id=3, tenant_id=tenant, category="news", channel="email", window_s=60))
    rules.put_cap(_cap(1, tenant, category="news", max_count=1, window_s=86400))  # counts deliveries
    f = _frequency(redis, rules)
    mids = [_mid(i) for i in range(5)]
    helds = [await f.apply(*_routed(tenant, mid, "news"), now=NOW + timedelta(seconds=i)) for i, mid in enumerate(mids)]
    assert all(isinstance(h, Held) and h.state is State.DIGESTED for h in helds)
    opener = helds[0]
    assert isinstance(opener, Held)
    parking = next(e for e in opener.events if e.state is State.SCHEDULED)
    digest_id = digests.digest_message_id(mids[0])
    assert parking.message_id == digest_id
    # The opener routed again after a crash: the same events (same ids), so the same digest.
    replay = await f.apply(*_routed(tenant, mids[0], "news"), now=NOW + timedelta(seconds=9))
    assert isinstance(replay, Held) and [e.event_id for e in replay.events] == [e.event_id for e in opener.events]
    # Every member carries the digest's parking, with the opener's ids and the same time and
    # request: a broker that lost the opener's events cannot leave the digest parked by nobody.
    for held in helds[1:]:
        assert isinstance(held, Held)
        carried = next(e for e in held.events if e.state is State.SCHEDULED)
        assert carried.event_id == parking.event_id and carried.message_id == digest_id
        assert carried.detail["scheduled_at"] == parking.detail["scheduled_at"]  # type: ignore[index]
        assert carried.detail["request"]["digest"] == parking.detail["request"]["digest"]  # type: ignore[index]
        assert next(e for e in held.events if e.state is State.ACCEPTED).message_id == digest_id
    # A message with two recipients is delivered on its own (and counted by the cap).
    alone = await f.apply(*_routed(tenant, _mid("x"), "news", to="z@example.com",
                                   email={"cc": ["c@example.com"]}), now=NOW)  # fmt: skip
    assert isinstance(alone, Routed)

    raw = released_request(parking.detail["request"])  # type: ignore[index]
    released = plan(raw, now=NOW + timedelta(seconds=60))
    assert isinstance(released, Routed)
    out = await f.apply(released, raw, now=NOW + timedelta(seconds=60))
    assert isinstance(out, Routed) and out.dispatch.message_id == digest_id
    for mid in mids:
        assert f"S {mid}" in out.dispatch.content and f"<p>{mid}</p>" in out.dispatch.content
    assert out.dispatch.subject == "5 news messages"
    # Routed again after a crash: the same listing, and the cap counts the digest once.
    again = await f.apply(released, raw, now=NOW + timedelta(seconds=61))
    assert isinstance(again, Routed) and again.dispatch.content == out.dispatch.content
    # A new message after the release opens a new digest.
    new = await f.apply(*_routed(tenant, _mid("new"), "news"), now=NOW + timedelta(seconds=62))
    assert isinstance(new, Held) and any(e.state is State.SCHEDULED for e in new.events)


async def test_with_redis_away_caps_fail_open_and_a_due_digest_waits(backing: Backing) -> None:
    tenant, rules = uuid.uuid4().hex, RuleStore()
    rules.put_cap(_cap(1, tenant, max_count=1))
    rules.put_digest(DigestRule(rule_id=3, tenant_id=tenant, category="news", channel="email", window_s=60))
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2)
    f = _frequency(dead, rules)
    try:
        for i in range(3):  # over the cap, but not counted: delivered
            assert isinstance(await f.apply(*_routed(tenant, _mid(i), "promo"), now=NOW), Routed)
        assert isinstance(await f.apply(*_routed(tenant, _mid("n"), "news"), now=NOW), Routed)  # on its own
        digest = {"message_id": digests.digest_message_id(_mid("d")), "tenant_id": tenant, "channel": "email",
                  "to": ["a@example.com"], "subject": "d", "content": digests.PLACEHOLDER, "category": "news",
                  "recorded": True, "deferrals": 1, "digest": {"rule_id": 3, "opened_by": _mid("d")}}  # fmt: skip
        raw = orjson.dumps(digest)
        released = plan(raw, now=NOW)
        assert isinstance(released, Routed)
        waiting = await f.apply(released, raw, now=NOW)
        assert isinstance(waiting, Parked) and waiting.reason == "digest" and waiting.request.deferrals == 2
        assert waiting.until == NOW + timedelta(seconds=30)
    finally:
        await dead.aclose()
    # Its messages gone from a Redis that answers: rejected, not sent empty.
    lost = await _frequency(Redis.from_url(backing.redis_url), rules).apply(released, raw, now=NOW)
    assert isinstance(lost, Rejected) and lost.reason == "digest_items_lost"


async def test_a_digest_deferred_by_a_cap_comes_back_with_the_same_listing(redis: Redis) -> None:
    tenant, rules = uuid.uuid4().hex, RuleStore()
    rules.put_digest(DigestRule(rule_id=3, tenant_id=tenant, category="news", channel="email", window_s=10))
    rules.put_cap(_cap(1, tenant, category="news", max_count=1, window_s=60, action="defer"))
    f = _frequency(redis, rules)
    # One delivery of the category already went out to this recipient (not digestible: it has a cc).
    assert isinstance(await f.apply(*_routed(tenant, _mid("cc"), "news", email={"cc": ["c@example.com"]}), now=NOW),
                      Routed)  # fmt: skip
    mids = [_mid(i) for i in range(2)]
    held = [await f.apply(*_routed(tenant, mid, "news"), now=NOW) for mid in mids]
    parking = next(e for e in held[0].events if e.state is State.SCHEDULED)  # type: ignore[union-attr]
    raw = released_request(parking.detail["request"])  # type: ignore[index]
    due = NOW + timedelta(seconds=10)
    released = plan(raw, now=due)
    assert isinstance(released, Routed)
    deferred = await f.apply(released, raw, now=due)
    # Parked as it was published (placeholder, digest reference), until the cap's window has room.
    assert isinstance(deferred, Parked) and deferred.reason == "deferred"
    assert deferred.until == NOW + timedelta(seconds=60, milliseconds=50)
    assert deferred.request.digest is not None and deferred.request.content == digests.PLACEHOLDER
    # A message arriving meanwhile opens the next digest: this one is frozen.
    late = await f.apply(*_routed(tenant, _mid("late"), "news"), now=due + timedelta(seconds=1))
    assert isinstance(late, Held) and any(e.state is State.SCHEDULED for e in late.events)
    raw = released_request(deferred.events[-1].detail["request"])  # type: ignore[index]
    again = plan(raw, now=deferred.until)
    assert isinstance(again, Routed)
    out = await f.apply(again, raw, now=deferred.until)
    assert isinstance(out, Routed) and out.dispatch.subject == "2 news messages"
    assert sorted(out.events[-1].detail["digest"]["message_ids"]) == sorted(mids)  # type: ignore[index]
