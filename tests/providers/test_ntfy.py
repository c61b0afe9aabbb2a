"""ntfy against its emulation (JSON publishing to the root URL)."""

from __future__ import annotations

import base64

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from services.senders.base import Permanent, Retryable
from services.senders.ntfy.api import Ntfy, NtfyConfig
from services.senders.plugins.base import Card, CardField, QuotaExceeded
from shared.errors import ErrorCode
from tests.emulators.ntfy import NtfyEmulator
from tests.providers.conftest import message

TOPIC = "phil_alerts"
TOKEN = "tk_AgQdq7mVBoFD37zQVN29RhuMzNIz2"


@pytest.fixture
async def emu():
    async with NtfyEmulator(tokens={TOKEN}, users={"phil": "mypass"}, protected={"private"}) as e:
        yield e


def ntfy(emu, http, **config) -> Ntfy:
    return Ntfy(NtfyConfig(server=emu.url, **config), http)


async def test_send_wire_format(emu, http):
    options = {"priority": "urgent", "tags": ["warning", "skull"], "click": "https://status.example"}
    msg = message(TOPIC, "Remote access to phils-laptop detected.", title="Unauthorized access", options=options)
    result = await ntfy(emu, http, token=SecretStr(TOKEN)).send(msg)
    (call,) = emu.calls
    assert (call.method, call.path, call.query) == ("POST", "/", {})
    assert call.headers["authorization"] == f"Bearer {TOKEN}"
    assert call.headers["content-type"] == "application/json"
    assert call.json() == {
        "topic": TOPIC,
        "title": "Unauthorized access",
        "message": "Remote access to phils-laptop detected.",
        "priority": 5,
        "tags": ["warning", "skull"],
        "click": "https://status.example",
    }
    assert call.verified and call.status == 200
    assert result.provider_message_id == emu.published[0]["id"]
    assert result.detail == {"topic": TOPIC, "time": emu.published[0]["time"]}


async def test_anonymous_markdown(emu, http):
    await ntfy(emu, http).send(message(TOPIC, "Look ma, **bold**", format="markdown"))
    call = emu.calls[0]
    assert "authorization" not in call.headers
    assert call.json() == {"topic": TOPIC, "message": "Look ma, **bold**", "markdown": True}
    assert emu.published[0]["content_type"] == "text/markdown"


async def test_card(emu, http):
    card = Card(
        title="Deploy", text="v1.4.2", fields=[CardField(title="Env", value="prod")], url="https://ci.example/7"
    )
    await ntfy(emu, http).send(message(TOPIC, "", format="card", card=card))
    assert emu.calls[0].json() == {
        "topic": TOPIC,
        "title": "Deploy",
        "message": "v1.4.2\n\n- **Env**: prod\n\n[https://ci.example/7](https://ci.example/7)",
        "markdown": True,
        "click": "https://ci.example/7",
    }


async def test_basic_auth(emu, http):
    await ntfy(emu, http, username="phil", password=SecretStr("mypass")).send(message("private", "hi"))
    assert emu.calls[0].headers["authorization"] == "Basic " + base64.b64encode(b"phil:mypass").decode()
    assert emu.calls[0].verified


async def test_wrong_token_is_auth(emu, http):
    with pytest.raises(Permanent) as err:
        await ntfy(emu, http, token=SecretStr("tk_wrong")).send(message(TOPIC))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert "40101" in err.value.message and "tk_wrong" not in err.value.message
    assert emu.calls[0].status == 401 and not emu.calls[0].verified


async def test_protected_topic_without_credentials_is_auth(emu, http):
    with pytest.raises(Permanent) as err:
        await ntfy(emu, http).send(message("private"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and emu.calls[0].status == 403


@pytest.mark.parametrize(
    ("kind", "exc", "code", "sender_fault"),
    [
        ("rate_limited", Retryable, ErrorCode.RATE_LIMITED, True),
        ("quota", QuotaExceeded, ErrorCode.QUOTA_EXCEEDED, True),  # 42908: the daily message limit
        ("auth", Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True),
        ("invalid_recipient", Permanent, ErrorCode.RECIPIENT_INVALID, False),
        ("server_error", Retryable, ErrorCode.CHANNEL_SEND_FAILED, True),
    ],
)
async def test_injected_failures(emu, http, kind, exc, code, sender_fault):
    emu.fail(kind)
    with pytest.raises(exc) as err:
        await ntfy(emu, http).send(message(TOPIC))
    assert type(err.value) is exc and err.value.code == code and err.value.sender_fault is sender_fault
    if kind == "rate_limited":
        assert err.value.retry_after == 5.0  # ntfy sends no Retry-After; the bucket refills every 5 s
    assert emu.calls[-1].injected == kind


def test_unified_push_without_subscriber_is_recipient_invalid():
    body = {
        "code": 50701,
        "http": 507,
        "error": "cannot publish to UnifiedPush topic without previously active subscriber",
    }
    with pytest.raises(Permanent) as err:
        Ntfy(NtfyConfig(), None).parse(message("upABC"), httpx.Response(507, json=body))  # type: ignore[arg-type]
    assert err.value.code == ErrorCode.RECIPIENT_INVALID


async def test_emulator_down_is_retryable(http):
    emu = NtfyEmulator()
    await emu.start()
    plugin = ntfy(emu, http)
    await emu.stop()
    with pytest.raises(Retryable):
        await plugin.send(message(TOPIC))


@pytest.mark.parametrize(
    ("options", "named"),
    [({"priority": 9}, "priority"), ({"tags": ["a,b"]}, "tags"), ({"click": "nope"}, "click"), ({"icon": "x"}, "icon")],
)
def test_invalid_options_name_the_option(options, named):
    with pytest.raises(Permanent) as err:
        Ntfy(NtfyConfig(), None).build(message(TOPIC, options=options))  # type: ignore[arg-type]
    assert f"option '{named}'" in err.value.message and err.value.code == ErrorCode.CHANNEL_SEND_FAILED


def test_config():
    assert Ntfy(NtfyConfig(), None).build(message(TOPIC)).url == "https://ntfy.sh/"  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        NtfyConfig(token=SecretStr("tk_x"), username="phil", password=SecretStr("p"))
    with pytest.raises(ValidationError):
        NtfyConfig(username="phil")
