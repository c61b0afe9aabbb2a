"""Provider failover inside one attempt (issue 10): the plugin sender tries the router's
candidates in order against real vendor emulations (two ntfy servers) and a real Redis (pacing):
a provider that fails hands the message to the next at once, its failure kept for the timeline
and the provider's quality; a refused recipient stops there; when every one failed, the attempt's
outcome is the failure the retry schedule should see."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from decimal import Decimal

import orjson
import pytest
from redis.asyncio import Redis

from services.senders.base import Deferred, Permanent, Retryable
from services.senders.channel import ChannelSender, provider_fault
from services.senders.ntfy.api import NtfyConfig
from services.senders.plugins.base import Costs
from services.senders.plugins.config import Configured
from shared.crypto import SecretBox
from shared.errors import ErrorCode
from shared.events import Candidate, Channel, DispatchV1
from shared.settings import Settings
from tests.conftest import Backing
from tests.emulators.ntfy import NtfyEmulator

KEY = base64.b64encode(os.urandom(32)).decode()


def _entry(provider_id: int, name: str, emu: NtfyEmulator) -> Configured:
    return Configured(id=provider_id, tenant_id="acme", channel="ntfy", provider="ntfy", name=name,
                      config=NtfyConfig(server=emu.url), priority=provider_id, weight=1,
                      costs=Costs(default=Decimal("0.01")), rate_limit=None, is_active=True, revision=1)  # fmt: skip


def _dispatch(*candidates: tuple[int, str]) -> DispatchV1:
    return DispatchV1(
        dispatch_id="msg_20261202_failover0001:1",
        message_id="msg_20261202_failover0001",
        tenant_id="acme",
        channel="ntfy",
        to=["alerts"],
        content="disk full",
        content_type="text",
        candidates=[Candidate(id=i, name=n) for i, n in candidates],
    )


@pytest.fixture
async def pair(backing: Backing) -> AsyncIterator[tuple[ChannelSender, NtfyEmulator, NtfyEmulator]]:
    redis = Redis.from_url(backing.redis_url)
    settings = Settings(encryption_key=KEY, outbound_allow="127.0.0.1/32", provider_timeout_s=5)
    sender = ChannelSender.bound("ntfy")(settings, None, redis, SecretBox.from_setting(KEY))
    async with NtfyEmulator() as a, NtfyEmulator() as b:
        sender.directory.by_tenant = {"acme": [_entry(1, "primary", a), _entry(2, "backup", b)]}
        sender.directory.loaded.set()
        try:
            yield sender, a, b
        finally:
            for client in sender._clients:
                await client.aclose()
            await redis.aclose()


async def test_a_failing_provider_hands_the_message_to_the_next_at_once(pair) -> None:
    sender, a, b = pair
    a.fail("server_error", times=-1)
    result = await sender.send(_dispatch((1, "primary"), (2, "backup")))
    assert result.detail["provider_id"] == 2 and result.detail["provider_name"] == "backup"
    assert [c.injected for c in a.calls] == ["server_error"] and len(b.verified()) == 1
    assert b.verified()[0].json()["message"] == "disk full"  # the same message, as ntfy takes it
    [tried] = result.tries
    assert tried["detail"]["provider_id"] == 1 and tried["detail"]["provider_fault"] is True
    assert tried["deferred"] is False and tried["error_code"] != ErrorCode.RECIPIENT_INVALID


async def test_the_router_order_is_followed_not_the_priority(pair) -> None:
    sender, a, b = pair
    result = await sender.send(_dispatch((2, "backup"), (1, "primary")))
    assert result.detail["provider_name"] == "backup" and result.tries == []
    assert a.calls == [] and len(b.verified()) == 1


async def test_a_refused_recipient_is_not_tried_elsewhere(pair) -> None:
    sender, a, b = pair
    a.fail("invalid_recipient")
    with pytest.raises(Permanent) as caught:
        await sender.send(_dispatch((1, "primary"), (2, "backup")))
    assert caught.value.code == ErrorCode.RECIPIENT_INVALID and b.calls == []
    assert caught.value.detail["provider_fault"] is False and caught.value.tries == []


async def test_when_every_provider_fails_the_attempt_is_retried_with_every_try_kept(pair) -> None:
    sender, a, b = pair
    a.fail("auth", times=-1)  # permanent at a (its credentials) ...
    b.fail("server_error", times=-1)  # ... transient at b: the attempt is worth retrying
    with pytest.raises(Retryable) as caught:
        await sender.send(_dispatch((1, "primary"), (2, "backup")))
    assert caught.value.detail["provider_id"] == 2
    assert [t["detail"]["provider_id"] for t in caught.value.tries] == [1]
    assert caught.value.tries[0]["detail"]["provider_fault"] is True  # bad credentials: the provider's


async def test_only_permanent_failures_everywhere_fail_the_attempt(pair) -> None:
    sender, a, b = pair
    a.fail("auth", times=-1)
    b.fail("auth", times=-1)
    with pytest.raises(Permanent) as caught:
        await sender.send(_dispatch((1, "primary"), (2, "backup")))
    assert caught.value.code == ErrorCode.PROVIDER_AUTH_FAILED and len(caught.value.tries) == 1


async def test_unknown_candidates_fall_back_to_the_configured_choice(pair) -> None:
    sender, a, b = pair
    result = await sender.send(_dispatch((99, "deleted-meanwhile")))
    assert result.detail["provider_name"] == "primary" and len(a.verified()) == 1  # first by priority


def test_what_counts_against_a_provider() -> None:
    assert provider_fault(Retryable("503")) is True
    assert provider_fault(Permanent("bad key", code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)) is True
    assert provider_fault(Permanent("no such number", code=ErrorCode.RECIPIENT_INVALID)) is False
    assert provider_fault(Permanent("content refused", code=ErrorCode.CHANNEL_SEND_FAILED)) is False
    assert provider_fault(Deferred("our own rate limit", retry_after=3)) is False
    assert provider_fault(Retryable("throttled", code=ErrorCode.RATE_LIMITED)) is False
    # plugins mark a vendor's throttling as the sending account's: still not a fault of its health
    assert provider_fault(Retryable("per-number limit", code=ErrorCode.RATE_LIMITED, sender_fault=True)) is False


async def test_each_provider_reads_its_own_options(pair) -> None:
    sender, a, b = pair
    a.fail("server_error")
    options = {"priority": 2, "tags": ["common"],
               "providers": {"ntfy": {"tags": ["by-plugin"]}, "backup": {"priority": 5}}}  # fmt: skip
    dispatch = _dispatch((1, "primary"), (2, "backup")).model_copy(update={"options": options})
    await sender.send(dispatch)
    body = b.verified()[0].json()
    assert (body["priority"], body["tags"]) == (5, ["by-plugin"])  # the configured name's, then the plugin's


async def test_the_last_providers_failure_is_kept_when_an_earlier_one_decides(pair) -> None:
    sender, a, b = pair
    a.fail("server_error", times=-1)  # transient: it is the failure the attempt ends with ...
    b.fail("auth", times=-1)  # ... and b's bad credentials must still be on the timeline
    with pytest.raises(Retryable) as caught:
        await sender.send(_dispatch((1, "primary"), (2, "backup")))
    assert caught.value.detail["provider_id"] == 1
    [tried] = caught.value.tries
    assert tried["detail"]["provider_id"] == 2 and tried["error_code"] == ErrorCode.PROVIDER_AUTH_FAILED


async def test_a_request_that_may_have_landed_is_not_sent_elsewhere(pair) -> None:
    sender, a, b = pair
    a.slow(3)  # answers after the sender's timeout: the vendor may well have the message
    sender.settings = sender.settings.model_copy(update={"provider_timeout_s": 0.5})
    sender._default_client = sender._client({})
    with pytest.raises(Retryable) as caught:
        await sender.send(_dispatch((1, "primary"), (2, "backup")))
    assert caught.value.unsure is True and caught.value.tries == []
    assert b.calls == []  # not sent a second time elsewhere; the retry schedule decides


async def test_a_provider_that_cannot_be_reached_is_failed_over_at_once(pair) -> None:
    sender, a, b = pair
    await a.stop()  # nothing listens: the connection is refused, nothing was sent
    result = await sender.send(_dispatch((1, "primary"), (2, "backup")))
    assert result.detail["provider_name"] == "backup" and result.tries[0]["detail"]["provider_id"] == 1


def test_the_ledger_keeps_the_attempts_outcome_not_its_first_failover() -> None:
    # What a redelivered dispatch replays once its records are compacted: "sent", so the sweeper
    # never sends a message again that a second provider delivered.
    from services.senders.runner import _Out, _outcome_state
    from shared.kafka import Topics

    def event(state: str) -> _Out:
        return _Out.of(Topics.EVENTS, b"m", orjson.dumps({"state": state}), [])

    outputs = [event("retrying"), event("retrying"), event("sent")]
    assert _outcome_state(outputs) == "sent"
    assert _outcome_state([event("retrying"), event("failed"), _Out.of(Topics.DLQ, b"m", b"{}", [])]) == "failed"


def test_a_run_after_a_rate_limit_wait_has_event_ids_of_its_own(pair) -> None:
    # The wait's 'retrying' and the re-run's failure (or failover) must both reach the timeline.
    from services.senders.runner import SenderRunner
    from shared.events import State

    sender, _, _ = pair
    runner = SenderRunner.__new__(SenderRunner)
    runner.service, runner.channel, runner.provider = "sender-ntfy", "ntfy", sender
    first = _dispatch((1, "primary"))
    rerun = first.model_copy(update={"deferrals": 1, "dispatch_id": f"{first.message_id}:1.1"})
    waited = runner._event(first, State.RETRYING).event_id
    failed = runner._event(rerun, State.RETRYING).event_id
    assert waited == f"{first.message_id}:1:retrying" and failed == f"{first.message_id}:1:retrying.d1"
    assert runner._event(rerun, State.SENT).event_id == f"{first.message_id}:1:sent"  # one outcome per attempt


def test_a_retry_past_the_steps_deadline_hands_over_to_the_next_channel(pair) -> None:
    from datetime import timedelta

    from services.senders.runner import SenderRunner
    from shared.events import utcnow

    sender, _, _ = pair
    runner = SenderRunner.__new__(SenderRunner)
    runner.service, runner.channel, runner.provider = "sender-ntfy", "ntfy", sender
    runner.settings = Settings(encryption_key=KEY, retry_delays_s="60,300")
    nxt = _dispatch((2, "backup")).model_copy(update={"channel": Channel.SMS, "to": ["+8613800138000"], "step": 2,
                                                      "step_timeout_s": 30})  # fmt: skip
    head = _dispatch((1, "primary")).model_copy(update={"fallback": nxt, "step_timeout_s": 30})
    assert head.step_deadline == head.created_at + timedelta(seconds=30)  # derived, never stored
    outs = runner._failed(head, Retryable("503"), 0.1, [])  # its retry (60 s) would fall after the deadline
    [event, dispatch] = outs
    assert orjson.loads(event.value)["detail"]["fallback"]["reason"] == "step_timeout"
    handed = DispatchV1.model_validate_json(dispatch.value)
    assert (dispatch.topic, handed.attempt, handed.first_attempt, handed.dispatch_id) == (
        "notify.dispatch.sms", 2, 2, f"{head.message_id}:2")  # fmt: skip
    assert handed.created_at >= utcnow() - timedelta(seconds=5)  # its own step's clock starts now
    patient = head.model_copy(update={"step_timeout_s": 3600})
    [retry_event, retry] = runner._failed(patient, Retryable("503"), 0.1, [])  # within it: retried as usual
    assert retry.topic == "notify.retry.1m" and "fallback" not in orjson.loads(retry_event.value)["detail"]
