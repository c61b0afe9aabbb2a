"""Provider quality's pure parts: which events are tries, window sums, p95 from the histogram, and
the breaker's state machine with explicit times (services/tracker/quality.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from services.tracker.quality import (
    LATENCY_FIELDS,
    Breaker,
    BreakerRules,
    Counts,
    Facts,
    Stats,
    fingerprint,
    health_record,
    latency_field,
    p95_ms,
    refresh_due,
    step,
    sum_buckets,
    trip_reason,
    try_of,
    window_buckets,
)
from shared.events import EventV1, ProviderHealthV1, State
from shared.routing import health_identity
from shared.settings import Settings

NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
RULES = BreakerRules(failures=5, error_rate=0.5, min_samples=10, cooldown_s=30)


def event(state: State, detail: dict[str, Any] | None, **changes: Any) -> EventV1:
    base = {"event_id": f"m1:1:{state.value}", "message_id": "m1", "state": state, "attempt": 1,
            "occurred_at": NOW, "service": "sender-sms", "channel": "sms", "provider": "aliyun",
            "tenant_id": "acme", "detail": detail}  # fmt: skip
    return EventV1.model_validate({**base, **changes})


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


# --- which events are tries ---------------------------------------------------------------------


def test_a_sent_event_is_a_success_with_the_vendors_answer_time() -> None:
    t = try_of(event(State.SENT, {"provider_id": 7, "provider_ms": 123.4}))
    assert t is not None and t.ok and t.provider_id == 7 and t.latency_ms == 123.4
    assert (t.tenant_id, t.channel, t.provider) == ("acme", "sms", "aliyun")
    assert t.at_ms == int(NOW.timestamp() * 1000)


def test_a_failure_counts_only_when_it_is_the_providers() -> None:
    for state in (State.RETRYING, State.FAILED, State.DEAD):
        t = try_of(event(state, {"provider_id": 7, "provider_fault": True}))
        assert t is not None and not t.ok and t.latency_ms is None
        assert try_of(event(state, {"provider_id": 7, "provider_fault": False})) is None
        assert try_of(event(state, {"provider_id": 7})) is None  # unknown: not held against it
    failover = try_of(event(State.RETRYING, {"provider_id": 7, "provider_fault": True, "failover": True}))
    assert failover is not None and not failover.ok


def test_waits_router_events_and_events_without_a_provider_are_no_tries() -> None:
    deferred = {"provider_id": 7, "provider_fault": True, "deferred": True}
    assert try_of(event(State.RETRYING, deferred)) is None
    assert try_of(event(State.SENT, None)) is None  # the email pool's
    assert try_of(event(State.SENT, {"account_id": 3})) is None
    assert try_of(event(State.ROUTED, {"provider_id": 7})) is None
    assert try_of(event(State.SENT, {"provider_id": True})) is None
    assert try_of(event(State.SENT, {"provider_id": "x"})) is None


def test_a_success_without_a_usable_answer_time_is_counted_untimed() -> None:
    for ms in (None, "12", -1, float("nan"), True):
        t = try_of(event(State.SENT, {"provider_id": 7, "provider_ms": ms}))
        assert t is not None and t.ok and t.latency_ms is None


def test_answer_times_fall_in_the_bucket_of_their_upper_bound() -> None:
    assert [latency_field(v) for v in (0, 50, 50.1, 299, 1000, 30000, 30000.5, 1e9)] == [
        "h50", "h50", "h100", "h300", "h1000", "h30000", "hinf", "hinf"
    ]  # fmt: skip


# --- windows and p95 ------------------------------------------------------------------------------


def test_the_window_is_the_whole_buckets_within_it_plus_one_ahead() -> None:
    s = 1000
    assert window_buckets(105 * s, 30 * s, 10 * s) == [80 * s, 90 * s, 100 * s, 110 * s]
    assert window_buckets(100 * s, 30 * s, 10 * s) == [70 * s, 80 * s, 90 * s, 100 * s, 110 * s]
    # A close restarts the statistics at the first boundary after it.
    assert window_buckets(105 * s, 30 * s, 10 * s, since_ms=93 * s) == [100 * s, 110 * s]
    assert window_buckets(105 * s, 30 * s, 10 * s, since_ms=90 * s) == [90 * s, 100 * s, 110 * s]
    assert window_buckets(105 * s, 30 * s, 10 * s, since_ms=10 * s) == [80 * s, 90 * s, 100 * s, 110 * s]


def test_buckets_sum_as_redis_answers_them() -> None:
    counts = sum_buckets([{b"ok": b"3", b"fault": b"1", b"h50": b"2", b"h100": b"1"}, {}, {"ok": "2", "hinf": "2"}])
    assert (counts.ok, counts.fault, counts.samples) == (5, 1, 6)
    assert counts.latency[LATENCY_FIELDS.index("h50")] == 2
    assert counts.latency[LATENCY_FIELDS.index("h100")] == 1
    assert counts.latency[-1] == 2


def hist(**by_field: int) -> tuple[int, ...]:
    return tuple(by_field.get(name, 0) for name in LATENCY_FIELDS)


def test_p95_is_the_bound_where_the_cumulative_count_reaches_95_percent() -> None:
    assert p95_ms(hist()) is None
    assert p95_ms(hist(h50=100)) == 50.0
    assert p95_ms(hist(h50=95, h1000=5)) == 50.0
    assert p95_ms(hist(h50=94, h200=6)) == 200.0
    assert p95_ms(hist(h100=1)) == 100.0
    # Beyond the last bound it reads as that bound (the p95 is at least that).
    assert p95_ms(hist(h50=10, hinf=90)) == 30000.0


def test_stats_of_counts_and_facts() -> None:
    facts = Facts.of({b"consecutive": b"2", b"last_ok_ms": str(int(NOW.timestamp() * 1000)).encode()})
    stats = Stats.of(Counts(ok=9, fault=3, latency=hist(h300=9)), facts)
    assert (stats.samples, stats.faults, stats.success_rate, stats.p95_ms) == (12, 3, 0.75, 300.0)
    assert stats.consecutive == 2 and stats.last_ok_at == NOW and stats.last_fault_at is None
    assert Stats.of(Counts(), Facts()).success_rate is None


# --- the breaker ----------------------------------------------------------------------------------


def test_consecutive_faults_open_a_closed_breaker() -> None:
    closed = Breaker()
    assert step(closed, Stats(samples=4, faults=4, consecutive=4), NOW, RULES) == closed
    opened = step(closed, Stats(samples=5, faults=5, consecutive=5), NOW, RULES)
    assert opened == Breaker("open", NOW, None, "5 consecutive failures")


def test_an_error_rate_opens_it_only_over_enough_tries() -> None:
    closed = Breaker(since=at(-100))
    assert step(closed, Stats(samples=9, faults=9, consecutive=1), NOW, RULES) == closed
    assert step(closed, Stats(samples=12, faults=5, consecutive=1), NOW, RULES) == closed
    opened = step(closed, Stats(samples=12, faults=6, consecutive=1), NOW, RULES)
    assert opened.state == "open" and opened.opened_at == NOW and opened.since == at(-100)
    assert opened.reason == "error rate 50% over 12 tries"
    assert trip_reason(Stats(samples=10, faults=6), RULES) == "error rate 60% over 10 tries"


def test_only_a_success_after_the_cooldown_closes_it() -> None:
    # Routers probe an open breaker only once its cooldown has passed; a success before that is
    # a send that started before it opened, or was routed before the routers heard of it.
    opened = Breaker("open", NOW, None, "5 consecutive failures")
    failing = Stats(samples=20, faults=20, consecutive=20, last_fault_at=at(1))
    assert step(opened, replace_ok(failing, at(-1)), at(5), RULES) == opened  # before it opened
    assert step(opened, replace_ok(failing, NOW), at(5), RULES) == opened
    assert step(opened, replace_ok(failing, at(1)), at(5), RULES) == opened  # in flight: cooldown 30
    assert step(opened, replace_ok(failing, at(29.999)), at(31), RULES) == opened
    # A probe's success (at or after the cooldown) closes it and restarts the statistics.
    assert step(opened, replace_ok(failing, at(30)), at(31), RULES) == Breaker("closed", None, at(31), None)
    assert step(opened, replace_ok(failing, at(31)), at(32), RULES) == Breaker("closed", None, at(32), None)


def test_a_flaky_provider_is_held_out_for_the_whole_cooldown() -> None:
    # 60 % of its tries fail: successes of the traffic that was on its way keep coming in for a
    # while after it opened; none of them closes it, so it stays out until a probe.
    opened = Breaker("open", NOW, at(-300), "error rate 60% over 10 tries")
    for second in range(1, 30):
        stats = Stats(samples=10, faults=6, consecutive=1, last_ok_at=at(second - 0.5), last_fault_at=at(second))
        assert step(opened, stats, at(second), RULES) == opened


def replace_ok(stats: Stats, last_ok_at: datetime) -> Stats:
    return Stats(stats.samples, stats.faults, stats.success_rate, stats.p95_ms, stats.consecutive, last_ok_at,
                 stats.last_fault_at)  # fmt: skip


def test_a_fault_after_the_cooldown_is_a_failed_probe_and_opens_it_again() -> None:
    opened = Breaker("open", NOW, None, "5 consecutive failures")
    # Faults within the cooldown are the traffic that was on its way: nothing changes.
    assert step(opened, Stats(consecutive=8, last_fault_at=at(30)), at(31), RULES) == opened
    again = step(opened, Stats(consecutive=9, last_fault_at=at(30.001)), at(31), RULES)
    assert again == Breaker("open", at(31), None, "probe failed; 9 consecutive failures")
    # Its cooldown runs from then on.
    assert step(again, Stats(consecutive=9, last_fault_at=at(30.001)), at(80), RULES) == again


def test_a_probes_success_wins_over_a_fault_after_the_cooldown() -> None:
    opened = Breaker("open", NOW, None, "5 consecutive failures")
    stats = Stats(consecutive=1, last_ok_at=at(40), last_fault_at=at(41))
    assert step(opened, stats, at(42), RULES).state == "closed"
    # A success within the cooldown is no probe's: the failed probe opens it again.
    stats = Stats(consecutive=1, last_ok_at=at(10), last_fault_at=at(35))
    assert step(opened, stats, at(36), RULES) == Breaker("open", at(36), None, "probe failed; 1 consecutive failures")


def test_a_breaker_is_stored_and_read_back() -> None:
    for breaker in (Breaker(), Breaker("open", NOW, at(-60), "5 consecutive failures"), Breaker(since=NOW)):
        assert Breaker.from_json(breaker.to_json()) == breaker
    for raw in (None, b"", b"not json", b"[1]", b'{"state": "open", "opened_ms": "x"}'):
        assert Breaker.from_json(raw) == Breaker()


# --- the record -----------------------------------------------------------------------------------


def test_the_record_carries_what_routers_score_on() -> None:
    settings = Settings(quality_window_s=60, breaker_cooldown_s=3)
    facts = Facts("acme", "sms", "aliyun", 5)
    stats = Stats(samples=12, faults=6, success_rate=0.5, p95_ms=200.0, consecutive=5)
    opened = Breaker("open", NOW, None, "5 consecutive failures")
    record = health_record(42, facts, stats, opened, settings, at(1))
    assert record.identity == health_identity(42) == "provider:42"
    assert (record.provider, record.channel, record.tenant_id, record.state) == ("aliyun", "sms", "acme", "disabled")
    assert (record.breaker, record.opened_at, record.cooldown_s, record.window_s) == ("open", NOW, 3.0, 60.0)
    assert (record.samples, record.success_rate, record.p95_ms, record.failures) == (12, 0.5, 200.0, 5)
    assert record.reason == "5 consecutive failures"
    assert ProviderHealthV1.model_validate(orjson.loads(record.to_bytes())) == record
    healthy = health_record(42, facts, stats, Breaker(since=NOW), settings, at(1))
    assert healthy.state == "healthy" and healthy.breaker == "closed"
    assert healthy.opened_at is None and healthy.reason is None
    # Equal but for the time: nothing to publish.
    assert fingerprint(healthy) == fingerprint(health_record(42, facts, stats, Breaker(since=NOW), settings, at(9)))
    assert fingerprint(healthy) != fingerprint(record)


def test_a_live_record_is_refreshed_before_it_is_older_than_the_refresh() -> None:
    # The publisher looks every tick_s: it refreshes when waiting for the next tick would leave
    # the record older than refresh_s (routers take one older than 4 x refresh_s for unknown).
    assert not refresh_due(NOW, at(28.9), refresh_s=30, tick_s=1)
    assert refresh_due(NOW, at(29), refresh_s=30, tick_s=1)
    assert refresh_due(NOW, at(45), refresh_s=30, tick_s=1)
    for refresh_s, tick_s in ((30, 1), (5, 0.7), (2, 0.5), (30, 7), (1, 2)):
        sent, gaps = 0.0, []
        for k in range(1, 400):
            if refresh_due(at(sent), at(k * tick_s), refresh_s=refresh_s, tick_s=tick_s):
                gaps.append(k * tick_s - sent)
                sent = k * tick_s
        assert gaps and max(gaps) <= max(refresh_s, tick_s), (refresh_s, tick_s, max(gaps))


def test_the_lease_is_released_with_the_shared_script() -> None:
    import services.tracker.quality as quality
    from shared import redis_scripts

    assert quality.RELEASE_IF_OWNER is redis_scripts.RELEASE_IF_OWNER
    assert not hasattr(quality, "RELEASE_SCRIPT")  # one copy, in shared/redis_scripts.py


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert (defaults.quality_window_s, defaults.quality_bucket_s, defaults.quality_tick_s) == (300, 10, 1.0)
    # Every live provider is republished this often onto a topic Tansu never compacts: not 5 s.
    assert (defaults.quality_refresh_s, defaults.breaker_failures, defaults.breaker_error_rate) == (30.0, 5, 0.5)
    assert defaults.breaker_min_samples == 10
    monkeypatch.setenv("HERALD_QUALITY_WINDOW_S", "30")
    monkeypatch.setenv("HERALD_QUALITY_BUCKET_S", "2")
    monkeypatch.setenv("HERALD_BREAKER_COOLDOWN_S", "3")
    s = Settings()
    assert (s.quality_window_s, s.quality_bucket_s, s.breaker_cooldown_s) == (30, 2, 3.0)
    assert BreakerRules.of(s) == BreakerRules(5, 0.5, 10, 3.0)
    with pytest.raises(ValidationError):
        Settings(quality_window_s=5, quality_bucket_s=10)
