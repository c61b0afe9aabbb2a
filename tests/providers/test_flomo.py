"""flomo's record API against its emulation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.senders.base import Permanent, Retryable
from services.senders.flomo.api import Flomo, FlomoConfig
from services.senders.plugins.base import Card, CardField, QuotaExceeded
from shared.errors import ErrorCode
from tests.emulators.flomo import FlomoApi
from tests.providers.conftest import message


@pytest.fixture
async def api():
    async with FlomoApi() as emu:
        yield emu


def flomo(api, http, url=None) -> Flomo:
    return Flomo(FlomoConfig(api_url=url or api.api_url), http)


async def test_send_text_with_tags(api, http):
    result = await flomo(api, http).send(
        message("notes", "read **this**", title="Idea", options={"tags": ["inbox", "#work/ops"]})
    )
    (call,) = api.calls
    assert call.verified and call.method == "POST" and call.path == f"/iwh/{api.user}/{api.token}/"
    assert call.headers["content-type"] == "application/json"
    assert call.json() == {"content": "Idea\nread **this**\n#inbox #work/ops"}
    assert result.provider_message_id == api.memos[0]["slug"] and result.provider_message_id
    assert result.detail == {"tags": ["inbox", "work/ops"]}


async def test_markdown_and_card(api, http):
    await flomo(api, http).send(message("notes", "- a\n- b", title="List", format="markdown"))
    card = Card(title="Deploy", text="ok", fields=[CardField(title="env", value="prod")], url="https://x.test/1")
    await flomo(api, http).send(message("notes", "", format="card", card=card))
    assert [c.json()["content"] for c in api.calls] == [
        "**List**\n\n- a\n- b",
        "**Deploy**\n\nok\n\n- **env**: prod\n\n[https://x.test/1](https://x.test/1)",
    ]
    assert all(c.verified for c in api.calls)


async def test_invalid_option(api, http):
    with pytest.raises(Permanent) as err:
        await flomo(api, http).send(message("notes", options={"tags": ["two words"]}))
    assert "tags" in err.value.message and err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    with pytest.raises(Permanent) as err:
        await flomo(api, http).send(message("notes", options={"tag": "x"}))
    assert "tag" in err.value.message
    assert api.calls == []


async def test_wrong_token(api, http):
    with pytest.raises(Permanent) as err:
        await flomo(api, http, f"{api.url}/iwh/{api.user}/ffffffffffffffffffffffffffffffff/").send(message("notes"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert "ffffffff" not in err.value.message
    assert not api.calls[0].verified and api.memos == []


async def test_daily_limit_is_quota(http):
    async with FlomoApi(daily_limit=1) as emu:
        plugin = flomo(emu, http)
        await plugin.send(message("notes"))
        with pytest.raises(QuotaExceeded) as err:
            await plugin.send(message("notes"))
        assert err.value.code == ErrorCode.QUOTA_EXCEEDED and err.value.sender_fault


async def test_injected_failures(api, http):
    plugin = flomo(api, http)
    api.fail("rate_limited")
    with pytest.raises(Retryable) as err:
        await plugin.send(message("notes"))
    assert err.value.code == ErrorCode.RATE_LIMITED and err.value.retry_after == 60.0
    assert not isinstance(err.value, QuotaExceeded)

    api.fail("quota")
    with pytest.raises(QuotaExceeded):
        await plugin.send(message("notes"))

    api.fail("auth")
    with pytest.raises(Permanent) as err:
        await plugin.send(message("notes"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault

    api.fail("invalid_recipient")
    with pytest.raises(Permanent) as err:
        await plugin.send(message("notes"))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID and not err.value.sender_fault

    api.fail("server_error")
    with pytest.raises(Retryable) as err:
        await plugin.send(message("notes"))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    assert [c.injected for c in api.calls] == ["rate_limited", "quota", "auth", "invalid_recipient", "server_error"]
    assert api.memos == []


async def test_other_refusals_are_permanent(api, http):
    # Whitespace only: the plugin refuses before sending.
    with pytest.raises(Permanent) as err:
        await flomo(api, http).send(message("notes", "   "))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED and api.calls == []
    # A refusal whose wording is none of the known ones: permanent, the memo's fault.
    with pytest.raises(Permanent) as err:
        await flomo(api, http).send(message("notes", "x" * 5001))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED and not err.value.sender_fault
    assert "5000" in err.value.message


async def test_connection_refused(http):
    emu = FlomoApi()
    await emu.start()
    url = emu.api_url
    await emu.stop()
    with pytest.raises(Retryable):
        await Flomo(FlomoConfig(api_url=url), http).send(message("notes"))


def test_config():
    with pytest.raises(ValidationError):
        FlomoConfig(api_url="https://flomoapp.com/mine")
    assert FlomoConfig(api_url="https://flomoapp.com/iwh/MTIzNDU/abcdef0123/").api_url.get_secret_value()
