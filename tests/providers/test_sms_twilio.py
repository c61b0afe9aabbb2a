"""Twilio SMS plugin against its emulator (tests/emulators/twilio.py)."""

from __future__ import annotations

import json
from decimal import Decimal
from urllib.parse import parse_qsl

import httpx
import pytest
from pydantic import ValidationError

from services.senders.base import Permanent, Retryable
from services.senders.plugins import plugin
from services.senders.plugins.base import Card, CardField, Costs, QuotaExceeded
from services.senders.sms.twilio import TwilioSms, TwilioSmsConfig, basic_auth
from shared.errors import ErrorCode
from tests.emulators.twilio import TwilioEmulator
from tests.providers.conftest import message

SID = "AC" + "0123456789abcdef" * 2
TOKEN = "herald-test-auth-token"
FROM = "+15005550006"
SERVICE = "MG" + "fedcba9876543210" * 2


def make(http, emu: TwilioEmulator, token: str = TOKEN, **extra) -> TwilioSms:
    config = TwilioSmsConfig(account_sid=SID, auth_token=token, api_base=emu.url, **({"from_number": FROM} | extra))
    return TwilioSms(config, http)


def form(call) -> dict[str, str]:
    return dict(parse_qsl(call.body.decode(), keep_blank_values=True))


def test_basic_auth_header():
    # RFC 7617 with the account SID as user and the auth token as password.
    assert basic_auth("ACxxx", "token") == "Basic QUN4eHg6dG9rZW4="


def test_catalogue_points_here():
    assert plugin("sms", "twilio") is TwilioSms


# --- a send over the wire --------------------------------------------------------------------


async def test_send_wire_format(http):
    async with TwilioEmulator(SID, TOKEN, numbers={FROM}) as emu:
        result = await make(http, emu).send(message("+14155550100", "Your code is 1234"))
    [call] = emu.calls
    assert call.verified and call.status == 201 and not call.problems
    assert (call.method, call.path, call.query) == ("POST", f"/2010-04-01/Accounts/{SID}/Messages.json", {})
    assert call.headers["content-type"] == "application/x-www-form-urlencoded"
    assert call.headers["authorization"] == basic_auth(SID, TOKEN)
    assert form(call) == {"To": "+14155550100", "From": FROM, "Body": "Your code is 1234"}
    assert result.provider_message_id == "SM" + "0" * 31 + "1"
    assert result.detail == {"status": "queued", "segments": "1"}
    assert "4155550100" not in json.dumps(result.detail)


async def test_messaging_service_and_options(http):
    async with TwilioEmulator(SID, TOKEN) as emu:
        plug = make(http, emu, messaging_service_sid=SERVICE, status_callback="https://hooks.example.com/twilio")
        msg = message("+447700900123", "hi", options={"validity_period": 600, "template_code": "SMS_1"})
        result = await plug.send(msg)
        msg.options = {"status_callback": "https://other.example.com/cb"}
        await plug.send(msg)
    assert form(emu.calls[0]) == {
        "To": "+447700900123",
        "Body": "hi",
        "MessagingServiceSid": SERVICE,
        "StatusCallback": "https://hooks.example.com/twilio",
        "ValidityPeriod": "600",
    }
    assert form(emu.calls[1])["StatusCallback"] == "https://other.example.com/cb"
    assert result.detail["status"] == "accepted"
    assert all(c.verified for c in emu.calls)


# --- credentials and classification ----------------------------------------------------------


async def test_wrong_token_is_an_auth_failure(http):
    async with TwilioEmulator(SID, TOKEN) as emu:
        with pytest.raises(Permanent) as info:
            await make(http, emu, token="not-the-token").send(message("+14155550100"))
    assert info.value.code == ErrorCode.PROVIDER_AUTH_FAILED and info.value.sender_fault
    assert "not-the-token" not in str(info.value)
    [call] = emu.calls
    assert not call.verified and call.status == 401 and call.problems == ["20003: Authenticate"]


async def test_unsubscribed_and_invalid_recipients(http):
    async with TwilioEmulator(SID, TOKEN, unsubscribed={"+14155550199"}) as emu:
        plug = make(http, emu)
        with pytest.raises(Permanent) as stop:
            await plug.send(message("+14155550199"))
        with pytest.raises(Permanent) as bad:
            await plug.send(message("+01234567890"))
    assert stop.value.code == ErrorCode.RECIPIENT_INVALID and not stop.value.sender_fault
    assert "21610" in str(stop.value)
    assert bad.value.code == ErrorCode.RECIPIENT_INVALID and "21211" in str(bad.value)
    assert "1234567890" not in str(bad.value)  # the number Twilio quotes is not repeated


async def test_sender_not_on_the_account_is_the_providers_fault(http):
    async with TwilioEmulator(SID, TOKEN, numbers={"+15005550001"}) as emu:
        with pytest.raises(Permanent) as info:
            await make(http, emu).send(message("+14155550100"))
    assert info.value.code == ErrorCode.CHANNEL_SEND_FAILED and info.value.sender_fault
    assert "21606" in str(info.value)


async def test_injected_failures(http):
    async with TwilioEmulator(SID, TOKEN) as emu:
        plug = make(http, emu)
        msg = message("+14155550100")

        emu.fail("rate_limited")
        with pytest.raises(Retryable) as info:
            await plug.send(msg)
        assert info.value.code == ErrorCode.RATE_LIMITED and info.value.retry_after == 1.0
        assert info.value.sender_fault

        emu.fail("quota")
        with pytest.raises(QuotaExceeded):
            await plug.send(msg)

        emu.fail("invalid_recipient")
        with pytest.raises(Permanent) as info:
            await plug.send(msg)
        assert info.value.code == ErrorCode.RECIPIENT_INVALID and not info.value.sender_fault

        emu.fail("server_error")
        with pytest.raises(Retryable) as info:
            await plug.send(msg)
        assert info.value.code == ErrorCode.CHANNEL_SEND_FAILED and not isinstance(info.value, QuotaExceeded)

        emu.fail("auth")
        with pytest.raises(Permanent) as info:
            await plug.send(msg)
        assert info.value.code == ErrorCode.PROVIDER_AUTH_FAILED and info.value.sender_fault

        assert (await plug.send(msg)).provider_message_id
    injected = [c.injected for c in emu.calls]
    assert injected == ["rate_limited", "quota", "invalid_recipient", "server_error", "auth", None]
    assert all(c.verified for c in emu.calls)


def _error(status: int, code: int, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(status, json={"code": code, "message": "m", "status": status}, headers=headers)


@pytest.mark.parametrize(
    ("response", "kind", "error_code", "sender_fault", "retry_after"),
    [
        (_error(429, 20429, {"Retry-After": "7"}), Retryable, ErrorCode.RATE_LIMITED, True, 7.0),
        (_error(400, 21611), Retryable, ErrorCode.RATE_LIMITED, True, 1.0),
        (_error(403, 10001), QuotaExceeded, ErrorCode.QUOTA_EXCEEDED, True, None),
        (_error(404, 20404), Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True, None),
        (_error(400, 21614), Permanent, ErrorCode.RECIPIENT_INVALID, False, None),
        (_error(400, 21408), Permanent, ErrorCode.CHANNEL_SEND_FAILED, True, None),
        (_error(400, 21617), Permanent, ErrorCode.CHANNEL_SEND_FAILED, False, None),
        (_error(503, 20503), Retryable, ErrorCode.CHANNEL_SEND_FAILED, True, None),
        (httpx.Response(201, json={"sid": "SMx", "error_code": 30007, "error_message": "filtered"}), Permanent,
         ErrorCode.CHANNEL_SEND_FAILED, False, None),
    ],
)
def test_error_codes(response, kind, error_code, sender_fault, retry_after):
    plug = TwilioSms(TwilioSmsConfig(account_sid=SID, auth_token=TOKEN, from_number=FROM), None)
    with pytest.raises(kind) as info:
        plug.parse(message("+14155550100"), response)
    assert type(info.value) is kind
    assert info.value.code == error_code and info.value.sender_fault is sender_fault
    if retry_after is not None:
        assert info.value.retry_after == retry_after


async def test_emulator_down_is_retryable(http):
    emu = TwilioEmulator(SID, TOKEN)
    await emu.start()
    plug = make(http, emu)
    await emu.stop()
    with pytest.raises(Retryable) as info:
        await plug.send(message("+14155550100"))
    assert info.value.code == ErrorCode.CHANNEL_SEND_FAILED


# --- content and options ---------------------------------------------------------------------


async def test_formats_become_the_body(http):
    card = Card(title="Deploy done", text="v1.2 is live", fields=[CardField(title="env", value="prod")],
                url="https://ci.example.com/1")  # fmt: skip
    cases = [
        (message("+14155550100", "plain"), "plain"),
        (message("+14155550100", "*md* text", format="markdown", title="Note"), "Note\n*md* text"),
        (message("+14155550100", "", format="card", card=card), "Deploy done\nv1.2 is live\nenv: prod\nhttps://ci.example.com/1"),
    ]  # fmt: skip
    async with TwilioEmulator(SID, TOKEN) as emu:
        for msg, _ in cases:
            await make(http, emu).send(msg)
    assert [form(c)["Body"] for c in emu.calls] == [text for _, text in cases]


@pytest.mark.parametrize(
    ("msg", "named"),
    [
        (message("+14155550100", options={"validity_period": 0}), "'validity_period'"),
        (message("+14155550100", options={"validity_period": "soon"}), "'validity_period'"),
        (message("+14155550100", options={"status_callback": "ftp://x"}), "'status_callback'"),
        (message("+14155550100", "x" * 1601), "1601 characters"),
        (message("+14155550100", "  "), "empty"),
    ],
)
def test_invalid_messages_are_refused_before_sending(msg, named):
    plug = TwilioSms(TwilioSmsConfig(account_sid=SID, auth_token=TOKEN, from_number=FROM), None)
    with pytest.raises(Permanent) as info:
        plug.build(msg)
    assert info.value.code == ErrorCode.CHANNEL_SEND_FAILED and not info.value.sender_fault
    assert named in str(info.value)


def test_config():
    with pytest.raises(ValidationError):
        TwilioSmsConfig(account_sid=SID, auth_token=TOKEN)  # no sender
    with pytest.raises(ValidationError):
        TwilioSmsConfig(account_sid="AC123", auth_token=TOKEN, from_number=FROM)
    config = TwilioSmsConfig(account_sid=SID, auth_token=TOKEN, from_number=FROM)
    assert TOKEN not in repr(config) and TOKEN not in config.model_dump_json()
    call = TwilioSms(config, None).build(message("+14155550100"))
    assert call.url == f"https://api.twilio.com/2010-04-01/Accounts/{SID}/Messages.json"


def test_cost_by_country():
    # Twilio prices differ a lot by destination: +1 vs +86, and the longest calling code wins.
    costs = Costs(by_country={"1": Decimal("0.0083"), "86": Decimal("0.0497"), "1242": Decimal("0.1")})
    assert TwilioSms.cost(costs, "+14155550100") == Decimal("0.0083")
    assert TwilioSms.cost(costs, "+8613800138000") == Decimal("0.0497")
    assert TwilioSms.cost(costs, "+12423570000") == Decimal("0.1")
    assert TwilioSms.cost(costs, "+447700900123") == TwilioSms.default_cost
