"""Gotify against its emulation (POST /message with the application token)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from services.senders.base import Permanent, Retryable
from services.senders.gotify.api import Gotify, GotifyConfig
from services.senders.plugins.base import Card, CardField
from shared.errors import ErrorCode
from tests.emulators.gotify import GotifyEmulator
from tests.providers.conftest import message

APP_TOKEN = "AgzU9Zq1hYkX0cB"
CLIENT_TOKEN = "CkTJgO7qzVHbD1e"


@pytest.fixture
async def emu():
    async with GotifyEmulator(app_tokens={APP_TOKEN: 7}, client_tokens={CLIENT_TOKEN}) as e:
        yield e


def gotify(emu, http, token: str = APP_TOKEN, **config) -> Gotify:
    return Gotify(GotifyConfig(server=emu.url, app_token=SecretStr(token), **config), http)


async def test_send_wire_format(emu, http):
    result = await gotify(emu, http).send(message("ops-alerts", "Backup done", title="nightly"))
    (call,) = emu.calls
    assert (call.method, call.path, call.query) == ("POST", "/message", {})
    assert call.headers["x-gotify-key"] == APP_TOKEN
    assert call.headers["content-type"] == "application/json"
    assert call.json() == {"title": "nightly", "message": "Backup done", "priority": 5}
    assert call.verified and call.status == 200
    assert result.provider_message_id == "1" and result.detail == {"appid": 7}


async def test_markdown_priority_and_click(emu, http):
    msg = message(
        "ops", "**disk** 95%", format="markdown", options={"priority": 8, "click_url": "https://grafana.example"}
    )
    await gotify(emu, http, priority=2).send(msg)
    assert emu.calls[0].json() == {
        "message": "**disk** 95%",
        "priority": 8,
        "extras": {
            "client::display": {"contentType": "text/markdown"},
            "client::notification": {"click": {"url": "https://grafana.example"}},
        },
    }
    assert emu.messages[0]["extras"]["client::display"] == {"contentType": "text/markdown"}


async def test_card(emu, http):
    card = Card(
        title="Deploy", text="v1.4.2", fields=[CardField(title="Env", value="prod")], url="https://ci.example/7"
    )
    await gotify(emu, http, priority=2).send(message("ops", "", format="card", card=card))
    assert emu.calls[0].json() == {
        "title": "Deploy",
        "message": "v1.4.2\n\n- **Env**: prod\n\n[https://ci.example/7](https://ci.example/7)",
        "priority": 2,
        "extras": {
            "client::display": {"contentType": "text/markdown"},
            "client::notification": {"click": {"url": "https://ci.example/7"}},
        },
    }


@pytest.mark.parametrize("token", ["wrong-token", CLIENT_TOKEN])
async def test_wrong_or_client_token_is_auth(emu, http, token):
    with pytest.raises(Permanent) as err:
        await gotify(emu, http, token=token).send(message("ops"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert token not in err.value.message
    assert emu.calls[0].status == 401 and not emu.calls[0].verified


@pytest.mark.parametrize(
    ("kind", "exc", "code", "sender_fault"),
    [
        ("rate_limited", Retryable, ErrorCode.RATE_LIMITED, True),
        ("quota", Retryable, ErrorCode.RATE_LIMITED, True),  # no quota in Gotify: a proxy's 429
        ("auth", Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True),
        ("invalid_recipient", Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True),  # the app (token) is gone
        ("server_error", Retryable, ErrorCode.CHANNEL_SEND_FAILED, True),
    ],
)
async def test_injected_failures(emu, http, kind, exc, code, sender_fault):
    emu.fail(kind)
    with pytest.raises(exc) as err:
        await gotify(emu, http).send(message("ops"))
    assert type(err.value) is exc and err.value.code == code and err.value.sender_fault is sender_fault
    if kind == "rate_limited":
        assert err.value.retry_after == 10.0
    assert emu.calls[-1].injected == kind


async def test_empty_message_is_rejected(emu, http):
    with pytest.raises(Permanent) as err:
        await gotify(emu, http).send(message("ops", ""))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED and not err.value.sender_fault
    assert "Field 'message' is required" in err.value.message


async def test_emulator_down_is_retryable(http):
    emu = GotifyEmulator(app_tokens={APP_TOKEN: 1})
    await emu.start()
    plugin = gotify(emu, http)
    await emu.stop()
    with pytest.raises(Retryable):
        await plugin.send(message("ops"))


@pytest.mark.parametrize(
    ("options", "named"),
    [({"priority": 11}, "priority"), ({"priority": "5"}, "priority"), ({"click_url": "x"}, "click_url")],
)
def test_invalid_options_name_the_option(options, named):
    config = GotifyConfig(server="https://gotify.example", app_token=SecretStr(APP_TOKEN))
    with pytest.raises(Permanent) as err:
        Gotify(config, None).build(message("ops", options=options))  # type: ignore[arg-type]
    assert f"option '{named}'" in err.value.message and err.value.code == ErrorCode.CHANNEL_SEND_FAILED


def test_config_needs_server_and_token():
    with pytest.raises(ValidationError):
        GotifyConfig(app_token=SecretStr(APP_TOKEN))  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        GotifyConfig(server="https://gotify.example", app_token=SecretStr(APP_TOKEN), priority=11)
