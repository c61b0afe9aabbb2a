"""Event contracts and the tracker's fold plan."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import aiosmtplib
import pytest

from services.senders.base import Permanent, Retryable
from services.senders.email.smtp import classify
from services.senders.runner import next_step
from services.tracker.fold import fold_plan
from shared.errors import ErrorCode
from shared.events import (
    EVENT_MODELS,
    SCHEMA_DIR,
    SEED_STATUS,
    STATE_RANK,
    EventV1,
    MessageSnapshot,
    State,
    event_id,
    json_schema,
)
from shared.ids import is_message_id, new_message_id

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def test_checked_in_schemas_are_current() -> None:
    for name in EVENT_MODELS:
        on_disk = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
        assert on_disk == json_schema(name), f"run `make schemas`: {name}.json is stale"


def test_every_state_has_a_seed_status_and_a_rank() -> None:
    assert set(SEED_STATUS) == set(State) == set(STATE_RANK)


def test_every_error_code_has_a_status_and_message() -> None:
    for code in ErrorCode:
        assert 200 <= code.http_status < 600 and code.default_message


def test_message_ids() -> None:
    ids = {new_message_id(T0) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("msg_20261123_") and is_message_id(i) for i in ids)
    assert not is_message_id("msg_2026_x") and not is_message_id("hello")


def ev(message_id: str, state: State, attempt: int, at: int, snapshot: bool = False) -> EventV1:
    return EventV1(
        event_id=event_id(message_id, attempt, state),
        message_id=message_id,
        state=state,
        attempt=attempt,
        occurred_at=T0 + timedelta(seconds=at),
        service="test",
        message=MessageSnapshot(channel="email", recipient="a@example.com") if snapshot else None,
    )


def test_fold_plan_keeps_the_furthest_state_whatever_the_arrival_order() -> None:
    events = [
        ev("m1", State.SENT, 1, 3),
        ev("m1", State.ROUTED, 0, 1, snapshot=True),
        ev("m1", State.SENDING, 1, 2),
        ev("m2", State.FAILED, 1, 2),
        ev("m2", State.SENDING, 2, 3),
        ev("m1", State.SENT, 1, 3),  # redelivered
    ]
    plan = fold_plan(events)
    assert len(plan.timeline) == 5
    assert {e.message_id: (e.state, e.attempt) for e in plan.moves} == {
        "m1": (State.SENT, 1),
        "m2": (State.SENDING, 2),
    }
    assert [e.message_id for e in plan.new_records] == ["m1"]


@pytest.mark.parametrize(
    ("exc", "kind", "code"),
    [
        (aiosmtplib.SMTPResponseException(550, "mailbox unavailable"), Permanent, ErrorCode.EMAIL_SEND_FAILED),
        (aiosmtplib.SMTPResponseException(451, "try later"), Retryable, ErrorCode.EMAIL_SEND_FAILED),
        (aiosmtplib.SMTPConnectError("refused"), Retryable, ErrorCode.SMTP_CONNECT_FAILED),
        (aiosmtplib.SMTPServerDisconnected("gone"), Retryable, ErrorCode.SMTP_CONNECT_FAILED),
        (aiosmtplib.SMTPAuthenticationError(535, "bad credentials"), Retryable, ErrorCode.SMTP_CONNECT_FAILED),
        (ConnectionResetError(), Retryable, ErrorCode.SMTP_CONNECT_FAILED),
        (
            aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(550, "no such user", "x@example.com")]),
            Permanent,
            ErrorCode.EMAIL_SEND_FAILED,
        ),
        (
            aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(452, "full", "x@example.com")]),
            Retryable,
            ErrorCode.EMAIL_SEND_FAILED,
        ),
    ],
)
def test_smtp_errors_are_classified_by_reply_class(exc: Exception, kind: type, code: int) -> None:
    decision = classify(exc)
    assert type(decision) is kind and decision.code == code


def test_failed_attempts_are_retried_by_tier_then_dead_and_permanent_ones_fail_at_once() -> None:
    delays = [1.0, 5.0, 10.0]
    steps = [next_step(Retryable("421 try later"), attempt, delays) for attempt in (1, 2, 3, 4)]
    assert [(s.state, s.retry_in, s.tier) for s in steps[:3]] == [
        (State.RETRYING, 1.0, 0),
        (State.RETRYING, 5.0, 1),
        (State.RETRYING, 10.0, 2),
    ]
    assert (steps[3].state, steps[3].reason, steps[3].retry_in) == (State.DEAD, "retries_exhausted", None)
    # The provider's Retry-After lengthens a delay, never shortens it.
    assert next_step(Retryable("429", retry_after=30), 1, delays).retry_in == 30
    assert next_step(Retryable("429", retry_after=0.5), 2, delays).retry_in == 5.0
    permanent = next_step(Permanent("550 no such user"), 1, delays)
    assert (permanent.state, permanent.reason, permanent.retry_in) == (State.FAILED, "permanent_failure", None)
    # More delays than tier topics: the extra attempts wait in the last tier.
    assert next_step(Retryable("x"), 5, [1, 1, 1, 1, 1]).tier == 2
