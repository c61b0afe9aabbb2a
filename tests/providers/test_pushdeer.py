"""PushDeer against its emulation (POST /message/push, form-encoded)."""

from __future__ import annotations

from urllib.parse import parse_qsl

import httpx
import pytest

from services.senders.base import Permanent, Retryable
from services.senders.plugins.base import Card, CardField
from services.senders.pushdeer.api import PushDeer, PushDeerConfig
from shared.errors import ErrorCode
from tests.emulators.pushdeer import PushDeerEmulator
from tests.providers.conftest import message

KEY = "PDU1TTnEZKlRVODU9GkFmtHwaIraV5twUPQbA"
NO_DEVICE = "PDU2NoDevicesRegisteredHere00"
DISABLED = "PDU3OwnerAccountDisabled000"


@pytest.fixture
async def emu():
    async with PushDeerEmulator(keys={KEY: 2, NO_DEVICE: 0, DISABLED: 1}, disabled={DISABLED}) as e:
        yield e


def deer(emu, http) -> PushDeer:
    return PushDeer(PushDeerConfig(server=emu.url), http)


def form(call) -> dict[str, str]:
    return dict(parse_qsl(call.body.decode()))


async def test_send_wire_format(emu, http):
    result = await deer(emu, http).send(message(KEY, "这是什么呀", title="提醒"))
    (call,) = emu.calls
    assert (call.method, call.path, call.query) == ("POST", "/message/push", {})
    assert call.headers["content-type"] == "application/x-www-form-urlencoded"
    assert form(call) == {"pushkey": KEY, "text": "提醒", "desp": "这是什么呀", "type": "text"}
    assert call.verified and call.status == 200
    assert result.provider_message_id is None and result.detail == {"devices": 2}


async def test_text_without_title_and_markdown(emu, http):
    await deer(emu, http).send(message(KEY, "just text"))
    await deer(emu, http).send(message(KEY, "# Disk\n**95%**", format="markdown", title="db1"))
    assert form(emu.calls[0]) == {"pushkey": KEY, "text": "just text", "type": "text"}
    assert form(emu.calls[1]) == {"pushkey": KEY, "text": "db1", "desp": "# Disk\n**95%**", "type": "markdown"}


async def test_card_as_markdown(emu, http):
    card = Card(title="Deploy", text="v1.4.2", fields=[CardField(title="Env", value="prod")])
    await deer(emu, http).send(message(KEY, "", format="card", card=card))
    assert form(emu.calls[0]) == {
        "pushkey": KEY,
        "text": "Deploy",
        "desp": "v1.4.2\n\n- **Env**: prod",
        "type": "markdown",
    }


@pytest.mark.parametrize("key", ["PDU9UnknownKey000000", NO_DEVICE, DISABLED])
async def test_keys_reaching_no_device(emu, http, key):
    with pytest.raises(Permanent) as err:
        await deer(emu, http).send(message(key))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID and not err.value.sender_fault
    assert emu.calls[0].status == 200  # PushDeer answers errors with HTTP 200 and a code


async def test_missing_text_is_content_rejection(emu, http):
    with pytest.raises(Permanent) as err:
        await deer(emu, http).send(message(KEY, ""))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED and "80501" in err.value.message
    assert emu.calls[0].problems == ["no text"]


@pytest.mark.parametrize(
    ("kind", "exc", "code", "sender_fault", "retry"),
    [
        ("rate_limited", Retryable, ErrorCode.RATE_LIMITED, True, 60.0),
        ("quota", Retryable, ErrorCode.RATE_LIMITED, True, 60.0),  # no quota: Laravel's throttle
        ("auth", Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True, None),
        ("invalid_recipient", Permanent, ErrorCode.RECIPIENT_INVALID, False, None),
        ("server_error", Retryable, ErrorCode.CHANNEL_SEND_FAILED, True, None),
    ],
)
async def test_injected_failures(emu, http, kind, exc, code, sender_fault, retry):
    emu.fail(kind)
    with pytest.raises(exc) as err:
        await deer(emu, http).send(message(KEY))
    assert type(err.value) is exc and err.value.code == code and err.value.sender_fault is sender_fault
    if retry is not None:
        assert err.value.retry_after == retry
    assert emu.calls[-1].injected == kind


def test_remote_error_is_retryable():
    response = httpx.Response(200, json={"code": 80502, "error": "push relay failed"})
    with pytest.raises(Retryable):
        PushDeer(PushDeerConfig(), None).parse(message(KEY), response)  # type: ignore[arg-type]


async def test_emulator_down_is_retryable(http):
    emu = PushDeerEmulator(keys={KEY: 1})
    await emu.start()
    plugin = deer(emu, http)
    await emu.stop()
    with pytest.raises(Retryable):
        await plugin.send(message(KEY))


def test_default_server():
    call = PushDeer(PushDeerConfig(), None).build(message(KEY))  # type: ignore[arg-type]
    assert call.url == "https://api2.pushdeer.com/message/push"
