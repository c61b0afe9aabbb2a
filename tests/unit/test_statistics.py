"""What the tracker counts (shared/statistics.py) and how the statistics API reads and writes it
(services/ingest/statistics.py), without a database."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from services.ingest.statistics import Line, check_hourly, parse_range, to_csv
from shared.errors import HeraldError
from shared.events import EventV1, MessageSnapshot, State
from shared.statistics import LATENCY_BOUNDS_MS, bucket_of, latency_bucket, outcomes_of, percentile_ms, rollups

T0 = datetime(2026, 11, 30, 23, 59, 30, 500_000, tzinfo=UTC)


def ev(state: State, at: datetime = T0, mid: str = "m1", **kw) -> EventV1:
    return EventV1(event_id=f"{mid}:{state.value}", message_id=mid, state=state, occurred_at=at, service="t", **kw)


def test_buckets_are_utc_minutes_hours_and_days() -> None:
    local = T0.astimezone(datetime.now().astimezone().tzinfo)
    assert bucket_of(local, "minute") == datetime(2026, 11, 30, 23, 59, tzinfo=UTC)
    assert bucket_of(T0, "hour") == datetime(2026, 11, 30, 23, tzinfo=UTC)
    assert bucket_of(T0, "day") == datetime(2026, 11, 30, tzinfo=UTC)


def test_latency_buckets_and_percentiles() -> None:
    assert latency_bucket(0) == 0 and latency_bucket(100) == 0 and latency_bucket(101) == 1
    assert latency_bucket(10**9) == len(LATENCY_BOUNDS_MS)
    buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    buckets[0], buckets[3] = 90, 10  # 90 within 100 ms, 10 within 1 s
    assert percentile_ms(buckets, 0.5) == 100
    assert percentile_ms(buckets, 0.95) == 1_000
    assert percentile_ms([0] * len(buckets), 0.95) is None
    buckets[-1] = 1000  # above the last bound: the last bound
    assert percentile_ms(buckets, 0.99) == LATENCY_BOUNDS_MS[-1]


def test_outcomes_carry_the_records_template_and_latency_from_acceptance_or_schedule() -> None:
    records = {
        "m1": {"template_id": 7, "message_type": "sms", "created_at": T0 - timedelta(seconds=2), "scheduled_at": None},
        # Scheduled for later than its acceptance: latency from the scheduled time.
        "m2": {"template_id": None, "message_type": "email", "created_at": T0 - timedelta(hours=5),
               "scheduled_at": T0 - timedelta(milliseconds=300)},
    }  # fmt: skip
    events = [
        ev(State.SENT, mid="m1", channel="sms", provider="aliyun",
           detail={"provider_name": "aliyun-main", "cost": "0.035"}),
        ev(State.ROUTED, mid="m1"),  # not an outcome
        ev(State.RETRYING, mid="m1"),  # not an outcome either: a failed try that goes on
        ev(State.FAILED, mid="m2", provider="smtp"),
        ev(State.SENT, mid="m3", message=MessageSnapshot(channel="telegram", recipient="x")),  # no record yet
        ev(State.SENT, mid="m4", channel="sms"),  # a record of the same id in another tenant: not this one's
    ]  # fmt: skip
    records["m4"] = {"tenant_id": "other", "template_id": 9, "message_type": "sms", "created_at": T0,
                     "scheduled_at": None}  # fmt: skip
    out = outcomes_of(events, records)
    assert [(o.status, o.channel, o.provider, o.template_id, o.cost, o.latency_ms) for o in out] == [
        ("sent", "sms", "aliyun-main", 7, Decimal("0.035"), 2000),
        ("failed", "email", "smtp", 0, Decimal(0), 300),
        ("sent", "telegram", "", 0, Decimal(0), None),
        ("sent", "sms", "", 0, Decimal(0), None),
    ]


def test_rollups_group_by_key_at_each_width() -> None:
    records = {f"m{i}": {"template_id": 1, "message_type": "sms", "created_at": T0, "scheduled_at": None}
               for i in range(3)}  # fmt: skip
    events = [
        ev(State.SENT, T0 + timedelta(milliseconds=50), "m0", channel="sms", detail={"cost": "0.01"}),
        ev(State.SENT, T0 + timedelta(seconds=40), "m1", channel="sms", detail={"cost": "0.02"}),  # next minute, day
        ev(State.DEAD, T0 + timedelta(seconds=1), "m2", channel="sms"),
    ]
    by = rollups(outcomes_of(events, records))
    assert len(by["minute"]) == 3 and len(by["hour"]) == 3 and len(by["day"]) == 3
    day0 = by["day"][("default", datetime(2026, 11, 30, tzinfo=UTC), "sms", "", 1, "sent")]
    assert (day0.count, day0.cost, day0.latency_sum_ms, day0.buckets[0]) == (1, Decimal("0.01"), 50, 1)
    day1 = by["day"][("default", datetime(2026, 12, 1, tzinfo=UTC), "sms", "", 1, "sent")]
    assert (day1.count, day1.latency_sum_ms, day1.buckets[latency_bucket(40_000)]) == (1, 40_000, 1)


def test_default_range_is_the_last_thirty_days_and_bounds_are_checked() -> None:
    now = datetime(2026, 12, 2, 11, tzinfo=UTC)
    r = parse_range(None, None, now=now)
    assert (r.start, r.end, r.whole_days) == (
        datetime(2026, 11, 3, tzinfo=UTC), datetime(2026, 12, 3, tzinfo=UTC), True)  # fmt: skip
    assert len(r.days) == 30 and r.label() == ("2026-11-03", "2026-12-02")
    r = parse_range("2026-12-01", "2026-12-01", now=now)
    assert (r.start, r.end, r.days) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2026, 12, 2, tzinfo=UTC),
                                       [date(2026, 12, 1)])  # fmt: skip
    r = parse_range("2026-12-01T10:15:00+08:00", "2026-12-01T04:00:00Z", now=now)  # to the hour
    assert (r.start, r.end, r.whole_days) == (
        datetime(2026, 12, 1, 2, tzinfo=UTC), datetime(2026, 12, 1, 4, tzinfo=UTC), False)  # fmt: skip
    assert parse_range("2026-12-01T04:10:00Z", "2026-12-01T04:20:00Z").end == datetime(2026, 12, 1, 5, tzinfo=UTC)
    for start, end, field in (("2026-13-01", None, "start_date"), ("2026-12-02", "2026-12-01", "end_date"),
                              (None, "yesterday", "end_date"), ("2024-01-01", "2026-01-01", "end_date")):  # fmt: skip
        with pytest.raises(HeraldError) as info:
            parse_range(start, end, now=now)
        assert info.value.field == field


def test_a_line_answers_seed_fields_and_every_outcome() -> None:
    buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    buckets[1] = 3
    line = Line("aliyun", {"sent": 3, "dead": 1, "suppressed": 2}, Decimal("0.090"), 600, buckets)
    row = line.as_dict("provider")
    assert row["provider"] == "aliyun"
    assert (row["total"], row["success"], row["failed"], row["success_rate"]) == (4, 3, 1, 0.75)
    assert (row["outcomes"]["suppressed"], row["outcomes"]["delivered"], row["cost"]) == (2, 0, "0.09")
    assert (row["latency_avg_ms"], row["latency_p95_ms"]) == (200, 250)


def test_csv_has_a_header_every_row_and_no_formulas() -> None:
    rows = [
        Line("=HYPERLINK(\"http://x\")", {"sent": 1}, Decimal(0), 0, [0] * 12, label="-2+3").as_dict("template"),
        Line(5, {"failed": 2}, Decimal("1.5"), 0, [0] * 12, label="welcome").as_dict("template"),
    ]
    text = to_csv(rows, "template")
    assert text.endswith("\r\n")
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert list(parsed[0])[:6] == ["template", "template_name", "total", "success", "failed", "success_rate"]
    assert parsed[0]["template"] == "'=HYPERLINK(\"http://x\")" and parsed[0]["template_name"] == "'-2+3"
    assert (parsed[1]["template_name"], parsed[1]["failed"], parsed[1]["cost"], parsed[1]["success_rate"]) == (
        "welcome", "2", "1.5", "0.0")  # fmt: skip
    assert (parsed[1]["state_failed"], parsed[1]["state_sent"], parsed[0]["state_sent"]) == ("2", "0", "1")
    assert parsed[0]["latency_p95_ms"] == ""  # no latency: an empty cell, not "None"


def test_hours_older_than_their_keeping_are_refused_not_answered_with_zeros() -> None:
    now = datetime(2026, 12, 2, 11, tzinfo=UTC)
    old_days = parse_range("2026-01-01", "2026-06-01", now=now)
    check_hourly(old_days, "provider", 90, now)  # whole days: the daily rollups, kept
    for span, by in ((parse_range("2026-01-01", "2026-06-01T12:00:00Z", now=now), None),
                     (parse_range("2026-08-01", "2026-08-20", now=now), "hour")):  # fmt: skip
        with pytest.raises(HeraldError) as info:
            check_hourly(span, by, 90, now)
        assert info.value.field == "start_date" and "2026-09-03T12:00:00Z" in info.value.message
    check_hourly(parse_range("2026-11-01", "2026-11-20", now=now), "hour", 90, now)
    # The boundary is retention's: at 11:00 the hours before 12:00 of 90 days ago are (being) deleted.
    with pytest.raises(HeraldError):
        check_hourly(parse_range("2026-09-03T11:00:00Z", "2026-09-04", now=now), None, 90, now)
    check_hourly(parse_range("2026-09-03T12:00:00Z", "2026-09-04", now=now), None, 90, now)
