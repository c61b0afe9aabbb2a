"""Bark against its emulation (bark-server's POST /push)."""

from __future__ import annotations

import base64

import httpx
import pytest
from pydantic import SecretStr

from services.senders.bark.api import Bark, BarkConfig
from services.senders.base import Permanent, Retryable
from services.senders.plugins.base import Card, CardField
from shared.errors import ErrorCode
from tests.emulators.bark import BarkEmulator
from tests.providers.conftest import message

KEY = "ynJ5Ft4atkMkWeo2PAvFhF"


@pytest.fixture
async def emu():
    async with BarkEmulator(device_keys={KEY}) as e:
        yield e


def bark(emu, http, **config) -> Bark:
    return Bark(BarkConfig(server=emu.url, **config), http)


async def test_send_wire_format(emu, http):
    options = {"group": "ops", "sound": "minuet", "url": "https://status.example", "level": "timeSensitive", "badge": 1}
    result = await bark(emu, http).send(message(KEY, "Backup done", title="nightly", options=options))
    (call,) = emu.calls
    assert (call.method, call.path, call.query) == ("POST", "/push", {})
    assert call.headers["content-type"] == "application/json"
    assert "authorization" not in call.headers
    assert call.json() == {
        "device_key": KEY,
        "title": "nightly",
        "body": "Backup done",
        "group": "ops",
        "sound": "minuet",
        "url": "https://status.example",
        "level": "timeSensitive",
        "badge": 1,
    }
    assert call.verified and call.status == 200
    assert result.provider_message_id is None  # Bark returns no id
    assert isinstance(result.detail["timestamp"], int)


async def test_markdown(emu, http):
    await bark(emu, http).send(message(KEY, "**disk** 95%", format="markdown", options={"is_archive": True}))
    assert emu.calls[0].json() == {
        "device_key": KEY,
        "body": "**disk** 95%",
        "markdown": "**disk** 95%",
        "isArchive": "1",
    }


async def test_card_as_markdown(emu, http):
    card = Card(
        title="Deploy",
        text="v1.4.2 is **live**",
        fields=[CardField(title="Env", value="prod")],
        url="https://ci.example/7",
        button="Open run",
    )
    await bark(emu, http).send(message(KEY, "", format="card", card=card))
    assert emu.calls[0].json() == {
        "device_key": KEY,
        "title": "Deploy",
        "body": "v1.4.2 is **live**\nEnv: prod\nhttps://ci.example/7",
        "markdown": "v1.4.2 is **live**\n\n- **Env**: prod\n\n[Open run](https://ci.example/7)",
        "url": "https://ci.example/7",
    }


async def test_basic_auth_of_a_self_hosted_server(http):
    async with BarkEmulator(device_keys={KEY}, username="herald", password="s3cret") as emu:
        await bark(emu, http, username="herald", password=SecretStr("s3cret")).send(message(KEY))
        assert emu.calls[0].headers["authorization"] == "Basic " + base64.b64encode(b"herald:s3cret").decode()
        assert emu.calls[0].verified
        with pytest.raises(Permanent) as err:
            await bark(emu, http, username="herald", password=SecretStr("wrong")).send(message(KEY))
        assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
        assert emu.calls[1].status == 418 and emu.calls[1].problems == ["basic auth"] and not emu.calls[1].verified
        assert "wrong" not in err.value.message


async def test_unknown_device_key(emu, http):
    with pytest.raises(Permanent) as err:
        await bark(emu, http).send(message("UnknownKey123"))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID and not err.value.sender_fault
    assert emu.calls[0].status == 400 and emu.calls[0].problems == ["unknown device key"]


@pytest.mark.parametrize(
    ("kind", "exc", "code", "sender_fault"),
    [
        ("rate_limited", Retryable, ErrorCode.RATE_LIMITED, True),  # Apple's TooManyRequests passed on
        ("quota", Retryable, ErrorCode.RATE_LIMITED, True),  # Bark has no quota
        ("auth", Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True),
        ("invalid_recipient", Permanent, ErrorCode.RECIPIENT_INVALID, False),
        ("server_error", Retryable, ErrorCode.CHANNEL_SEND_FAILED, True),
    ],
)
async def test_injected_failures(emu, http, kind, exc, code, sender_fault):
    emu.fail(kind)
    with pytest.raises(exc) as err:
        await bark(emu, http).send(message(KEY))
    assert type(err.value) is exc and err.value.code == code and err.value.sender_fault is sender_fault
    assert emu.calls[-1].injected == kind


async def test_apns_unregistered_passed_on_is_recipient_invalid(http):
    response = httpx.Response(500, json={"code": 500, "message": "push failed: APNS push failed: Unregistered"})
    with pytest.raises(Permanent) as err:
        Bark(BarkConfig(), http).parse(message(KEY), response)
    assert err.value.code == ErrorCode.RECIPIENT_INVALID


async def test_emulator_down_is_retryable(http):
    emu = BarkEmulator(device_keys={KEY})
    await emu.start()
    plugin = bark(emu, http)
    await emu.stop()
    with pytest.raises(Retryable) as err:
        await plugin.send(message(KEY))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"level": "loud"}, "level"),
        ({"badge": "x"}, "badge"),
        ({"icon": "ftp://x"}, "icon"),
        ({"sound": "a b"}, "sound"),
    ],
)
def test_invalid_options_name_the_option(options, named):
    with pytest.raises(Permanent) as err:
        Bark(BarkConfig(), None).build(message(KEY, options=options))  # type: ignore[arg-type]
    assert f"option '{named}'" in err.value.message and err.value.code == ErrorCode.CHANNEL_SEND_FAILED


def test_default_server():
    call = Bark(BarkConfig(), None).build(message(KEY))  # type: ignore[arg-type]
    assert call.url == "https://api.day.app/push"
