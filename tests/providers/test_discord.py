"""Discord webhook against its emulation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.senders.base import Permanent, Retryable
from services.senders.discord.webhook import DiscordConfig, DiscordWebhook, escape_markdown
from services.senders.plugins.base import Card, CardField, QuotaExceeded
from shared.errors import ErrorCode
from tests.emulators.discord import DiscordWebhookApi
from tests.providers.conftest import message


@pytest.fixture
async def api():
    async with DiscordWebhookApi() as emu:
        yield emu


def hook(api, http, **fields) -> DiscordWebhook:
    return DiscordWebhook(DiscordConfig(webhook_url=fields.pop("url", api.webhook_url), **fields), http)


async def test_send_text(api, http):
    plugin = hook(api, http, username="Herald", avatar_url="https://example.com/a.png")
    result = await plugin.send(message("ops", "2 * 3 = 6 @everyone", title="Math_time"))
    assert result.provider_message_id == api.messages[0]["id"]
    assert result.detail == {"channel_id": "1150000000000000001"}
    (call,) = api.calls
    assert call.verified and call.method == "POST"
    assert call.path == f"/api/webhooks/{api.webhook_id}/{api.token}" and call.query == {"wait": "true"}
    assert call.json() == {
        "content": "**Math\\_time**\n2 \\* 3 = 6 @everyone",
        "username": "Herald",
        "avatar_url": "https://example.com/a.png",
        "allowed_mentions": {"parse": []},
    }


def test_escape_markdown():
    assert escape_markdown("# not a heading\n- no list\n*a* _b_ `c` ~d~ |e| > f \\") == (
        "\\# not a heading\n\\- no list\n\\*a\\* \\_b\\_ \\`c\\` \\~d\\~ \\|e\\| \\> f \\\\"
    )


async def test_markdown_and_options(api, http):
    await hook(api, http).send(
        message("ops", "**bold** <@123>", format="markdown",
                options={"thread_id": "1160000000000000002", "allow_mentions": True, "tts": True})
    )  # fmt: skip
    call = api.calls[0]
    assert call.verified and call.query == {"wait": "true", "thread_id": "1160000000000000002"}
    assert call.json() == {"content": "**bold** <@123>", "tts": True}


async def test_long_content_becomes_embed(api, http):
    await hook(api, http).send(message("ops", "x" * 3000, format="markdown", title="Log"))
    body = api.calls[0].json()
    assert "content" not in body and body["embeds"] == [{"description": "x" * 3000, "title": "Log"}]
    assert api.calls[0].verified


async def test_card(api, http):
    card = Card(
        title="Deploy failed",
        text="see **log**",
        fields=[CardField(title="env", value="prod"), CardField(title="empty", value="")],
        url="https://ci.example.com/1",
        button="Open",
        color="red",
    )
    await hook(api, http).send(message("ops", "", format="card", card=card))
    assert api.calls[0].json()["embeds"] == [
        {
            "title": "Deploy failed",
            "description": "see **log**\n\n[Open](https://ci.example.com/1)",
            "url": "https://ci.example.com/1",
            "color": 0xE74C3C,
            "fields": [
                {"name": "env", "value": "prod", "inline": False},
                {"name": "empty", "value": "\u200b", "inline": False},
            ],
        }
    ]
    assert api.calls[0].verified


async def test_invalid_option(api, http):
    with pytest.raises(Permanent) as err:
        await hook(api, http).send(message("ops", options={"thread_id": "abc"}))
    assert "thread_id" in err.value.message and err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    assert api.calls == []


async def test_wrong_token_and_unknown_webhook(api, http):
    with pytest.raises(Permanent) as err:
        await hook(api, http, url=f"{api.url}/api/webhooks/{api.webhook_id}/wrong").send(message("ops"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault and "50027" in err.value.message
    assert "wrong" not in err.value.message
    with pytest.raises(Permanent) as err:
        await hook(api, http, url=f"{api.url}/api/webhooks/1/{api.token}").send(message("ops"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and "10015" in err.value.message
    assert [c.status for c in api.calls] == [401, 404] and not any(c.verified for c in api.calls)


async def test_unknown_thread_is_recipient(api, http):
    with pytest.raises(Permanent) as err:
        await hook(api, http).send(message("ops", options={"thread_id": "42"}))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID and not err.value.sender_fault


async def test_form_error_is_permanent(api, http):
    # A username Discord refuses slips past only a config made without validation.
    config = DiscordConfig.model_construct(webhook_url=DiscordConfig(webhook_url=api.webhook_url).webhook_url,
                                           username="my discord bot", avatar_url=None)  # fmt: skip
    with pytest.raises(Permanent) as err:
        await DiscordWebhook(config, http).send(message("ops"))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED and "50035" in err.value.message
    assert not err.value.sender_fault


async def test_injected_failures(api, http):
    plugin = hook(api, http)
    api.fail("rate_limited")
    with pytest.raises(Retryable) as err:
        await plugin.send(message("ops"))
    assert err.value.code == ErrorCode.RATE_LIMITED and err.value.retry_after == 2.5  # the body's float seconds
    assert not isinstance(err.value, QuotaExceeded)

    api.fail("quota")  # no quota at Discord: the global rate limit
    with pytest.raises(Retryable) as err:
        await plugin.send(message("ops"))
    assert err.value.code == ErrorCode.RATE_LIMITED and "global" in err.value.message

    api.fail("invalid_recipient")
    with pytest.raises(Permanent) as err:
        await plugin.send(message("ops"))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID and not err.value.sender_fault

    api.fail("auth")
    with pytest.raises(Permanent) as err:
        await plugin.send(message("ops"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault

    api.fail("server_error")
    with pytest.raises(Retryable) as err:
        await plugin.send(message("ops"))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    assert [c.injected for c in api.calls] == ["rate_limited", "quota", "invalid_recipient", "auth", "server_error"]


async def test_connection_refused(http):
    emu = DiscordWebhookApi()
    await emu.start()
    url = emu.webhook_url
    await emu.stop()
    with pytest.raises(Retryable):
        await DiscordWebhook(DiscordConfig(webhook_url=url), http).send(message("ops"))


def test_config():
    with pytest.raises(ValidationError):
        DiscordConfig(webhook_url="https://example.com/not-a-webhook")
    with pytest.raises(ValidationError):
        DiscordConfig(webhook_url="https://discord.com/api/webhooks/1/abc", username="Clyde")
    assert DiscordConfig(webhook_url="https://discord.com/api/webhooks/1/abc").username is None
