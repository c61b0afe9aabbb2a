"""Parsing scheduled_time and delay, parking in the router, folding 'scheduled' events, and the
request the scheduler publishes: pure logic, no servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from services.router.routing import Parked, Routed, park, plan, scheduled_event_id
from services.router.schedule import released_request
from services.tracker.fold import fold_plan
from shared.events import Channel, EventV1, RequestV1, State
from shared.schedule import ScheduleError, due_at, parse_delay

NOW = datetime(2026, 12, 2, 8, 0, 0, tzinfo=UTC)


def _due(**kw):
    base = {"scheduled_time": None, "delay": None, "timezone": None, "default_timezone": "Asia/Shanghai",
            "horizon_s": 30 * 86400, "now": NOW}  # fmt: skip
    return due_at(**{**base, **kw})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30m", 1800), ("2h", 7200), ("3d", 259200), ("1h30m", 5400), ("45s", 45), ("1w", 604800),
     ("PT30M", 1800), ("P1DT2H", 93600), ("pt1h", 3600), ("90", 90), (15, 15), (" 2H ", 7200)],
)  # fmt: skip
def test_delays(text, seconds) -> None:
    assert parse_delay(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "text", ["", "soon", "0m", "-5m", "5 minutes", "1.5h", "P", "PT", "m30", True, 0, -3, "999999999w",
             "P999999999W", 9000000000000000000, 1e300],
)  # fmt: skip
def test_bad_delays_name_the_field(text) -> None:
    with pytest.raises(ScheduleError) as exc:
        parse_delay(text)
    assert exc.value.field == "delay"


def test_times_with_a_zone_naive_times_in_the_request_zone_or_the_default() -> None:
    assert _due(scheduled_time="2026-12-24T09:00:00+08:00") == datetime(2026, 12, 24, 1, tzinfo=UTC)
    assert _due(scheduled_time="2026-12-24T09:00:00Z") == datetime(2026, 12, 24, 9, tzinfo=UTC)
    assert _due(scheduled_time="2026-12-24 09:00:00") == datetime(2026, 12, 24, 1, tzinfo=UTC)  # Shanghai
    assert _due(scheduled_time="2026-12-24 09:00:00", timezone="Europe/Paris") == datetime(2026, 12, 24, 8, tzinfo=UTC)
    assert _due(delay="2h") == NOW + timedelta(hours=2)
    assert _due() is None


def test_a_moment_ago_is_allowed_for_clock_skew_but_not_more() -> None:
    assert _due(scheduled_time=(NOW - timedelta(seconds=3)).isoformat()) == NOW - timedelta(seconds=3)
    with pytest.raises(ScheduleError, match="in the past"):
        _due(scheduled_time=(NOW - timedelta(seconds=30)).isoformat())


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"scheduled_time": "2027-02-01T00:00:00Z"}, "scheduled_time"),  # past the 30-day horizon
        ({"delay": "31d"}, "delay"),
        ({"scheduled_time": "2026-12-24"}, "scheduled_time"),
        ({"scheduled_time": "24/12/2026 09:00"}, "scheduled_time"),
        ({"scheduled_time": "2026-12-24T09:00:00Z", "delay": "1h"}, "delay"),
        ({"delay": "1h", "timezone": "Nowhere/City"}, "timezone"),
        ({}, "scheduled_time"),  # required
        ({"scheduled_time": "9999-12-31T23:59:59-01:00"}, "scheduled_time"),  # overflows in UTC
        ({"scheduled_time": "0001-01-01T00:00:00+01:00"}, "scheduled_time"),
        ({"delay": "1h", "timezone": "Asia"}, "timezone"),  # a folder of zones, not a zone
        ({"delay": "1h", "timezone": "../../etc/passwd"}, "timezone"),
    ],
)
def test_refusals_name_the_field(kw, field) -> None:
    with pytest.raises(ScheduleError) as exc:
        _due(**kw, required=not kw)
    assert exc.value.field == field


def _raw(**kw) -> bytes:
    body = {"channel": "email", "message_id": "msg_20261202_abcdefghijklmnop", "to": ["a@example.com"],
            "subject": "s", "content": "c", **kw}  # fmt: skip
    return orjson.dumps(body)


def test_the_router_parks_a_request_whose_time_is_ahead_and_routes_one_that_is_due() -> None:
    later = NOW + timedelta(minutes=5)
    decision = plan(_raw(scheduled_at=later.isoformat(), category="news"), now=NOW, horizon_s=86400)
    assert isinstance(decision, Parked) and decision.until == later and decision.reason == "scheduled"
    accepted, scheduled = decision.events  # published straight to Kafka: its acceptance is recorded too
    assert accepted.state is State.ACCEPTED and scheduled.state is State.SCHEDULED
    assert scheduled.event_id == "msg_20261202_abcdefghijklmnop:0:scheduled"
    stored = RequestV1.model_validate(scheduled.detail["request"])
    assert stored.scheduled_at == later and stored.recorded and stored.deferrals == 0 and stored.category == "news"
    assert scheduled.detail["seq"] == 0 and scheduled.detail["reason"] == "scheduled"
    assert scheduled.message is None  # the content travels once, in the request (size)
    soon = plan(_raw(scheduled_at=(NOW + timedelta(milliseconds=500)).isoformat()), now=NOW)
    assert isinstance(soon, Parked), "not before its time, even by half a second"
    naive = plan(_raw(scheduled_at="2030-01-01T00:00:00"), now=NOW)
    assert naive.reason == "invalid_request" and naive.errors[0]["field"] == "scheduled_at"
    assert isinstance(plan(_raw(scheduled_at=(NOW - timedelta(hours=1)).isoformat()), now=NOW), Routed)
    too_far = plan(_raw(scheduled_at=(NOW + timedelta(days=2)).isoformat()), now=NOW, horizon_s=86400)
    assert too_far.reason == "invalid_request" and too_far.errors[0]["field"] == "scheduled_at"


def test_each_deferral_is_a_new_parking_with_its_own_event() -> None:
    request = RequestV1(message_id="msg_20261202_abcdefghijklmnop", channel=Channel.EMAIL, to=["a@example.com"],
                        subject="s", content="c", recorded=True, deferrals=2)  # fmt: skip
    parked = park(request, NOW + timedelta(minutes=1), "deferred", NOW)
    assert [e.state for e in parked.events] == [State.SCHEDULED]  # recorded: no second 'accepted'
    assert parked.events[0].event_id == scheduled_event_id(request.message_id, 3) == (
        "msg_20261202_abcdefghijklmnop:0:scheduled.3"
    )
    assert parked.request.deferrals == 3 and parked.events[0].detail["seq"] == 3


def _scheduled(seq: int, event_id: str | None = None) -> EventV1:
    return EventV1(
        event_id=event_id or scheduled_event_id("msg_20261202_abcdefghijklmnop", seq),
        message_id="msg_20261202_abcdefghijklmnop", state=State.SCHEDULED, service="router",
        detail={"scheduled_at": (NOW + timedelta(minutes=seq)).isoformat(), "seq": seq, "reason": "deferred",
                "request": {"channel": "email"}},
    )  # fmt: skip


def test_the_tracker_parks_the_latest_parking_and_moves_no_state_for_it() -> None:
    accepted = EventV1(event_id="msg_20261202_abcdefghijklmnop:0:accepted", message_id="msg_20261202_abcdefghijklmnop",
                       state=State.ACCEPTED, service="router")  # fmt: skip
    plan_ = fold_plan([accepted, _scheduled(2), _scheduled(1), _scheduled(2)])
    assert [p.seq for p in plan_.parked] == [2]
    assert [e.state for e in plan_.moves] == [State.ACCEPTED]  # 'scheduled' is set by the parking statement
    assert len(plan_.timeline) == 3  # the repeated event once
    broken = _scheduled(0, "x:0:scheduled")
    broken.detail = {"seq": 0}
    assert fold_plan([broken]).parked == []


def test_a_released_request_has_no_time_and_is_marked_recorded() -> None:
    stored = orjson.loads(_raw(scheduled_at=NOW.isoformat(), attempt=2, deferrals=1))
    released = orjson.loads(released_request(stored))
    assert "scheduled_at" not in released and "attempt" not in released
    assert released["recorded"] is True and released["deferrals"] == 1
    assert isinstance(plan(released_request(stored), now=NOW), Routed)


def test_a_digest_s_routed_event_brings_its_listing_to_the_record() -> None:
    from shared.events import MessageSnapshot

    snapshot = MessageSnapshot(channel="email", recipient="a@example.com", subject="5 news messages", content="…")
    routed = EventV1(event_id="d:0:routed", message_id="d", state=State.ROUTED, service="router", message=snapshot,
                     detail={"channel": "email", "digest": {"count": 5}})  # fmt: skip
    plain = EventV1(event_id="p:0:routed", message_id="p", state=State.ROUTED, service="router", message=snapshot,
                    detail={"channel": "email"})  # fmt: skip
    assert [e.message_id for e in fold_plan([routed, plain]).rendered] == ["d"]


async def test_a_request_too_large_for_the_broker_is_refused_before_it_is_recorded() -> None:
    from services.ingest.publish import NewRecord, Publisher
    from shared.errors import HeraldError
    from shared.kafka import MAX_RECORD_BYTES

    big = RequestV1(message_id="msg_20261202_abcdefghijklmnop", channel=Channel.EMAIL, to=["a@example.com"],
                    subject="s", content="x" * MAX_RECORD_BYTES, scheduled_at=NOW)  # fmt: skip
    publisher = Publisher(pool=None, producer=None, batcher=None, publish_timeout_s=1)  # type: ignore[arg-type]
    with pytest.raises(HeraldError) as exc:  # nothing else is touched: no pool, no broker here
        await publisher.accept(NewRecord(big, {"to": big.to}, NOW), trace=None)  # type: ignore[arg-type]
    assert exc.value.http_status == 413 and exc.value.field == "content"


def test_derived_ids_do_not_change_between_versions() -> None:
    """Ids the router derives are compared with ids it derived before a restart (or an upgrade):
    the same seed must give the same id for good."""
    from services.router.digests import digest_message_id
    from services.router.routing import Origin

    origin = Origin("t", 1, 42, datetime(2026, 12, 2, 1, 2, 3, tzinfo=UTC))
    assert origin.message_id() == "msg_20261202_cprgszn0v3814jg7"
    assert digest_message_id("msg_20261202_abc") == "msg_20261202_fcicn754tu0ten2r"
