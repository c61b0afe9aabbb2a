"""Microsoft Teams incoming webhook (Workflows and connector URLs) against its emulation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.senders.base import Permanent, Retryable
from services.senders.plugins.base import Card, CardField, QuotaExceeded
from services.senders.teams.webhook import TeamsConfig, TeamsWebhook, escape_markdown
from shared.errors import ErrorCode
from tests.emulators.teams import TeamsWebhookApi, card_problems
from tests.providers.conftest import message


@pytest.fixture
async def api():
    async with TeamsWebhookApi() as emu:
        yield emu


def teams(url: str, http) -> TeamsWebhook:
    return TeamsWebhook(TeamsConfig(webhook_url=url), http)


def card_of(call) -> dict:
    (attachment,) = call.json()["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    return attachment["content"]


async def test_send_text_to_workflow(api, http):
    result = await teams(api.workflow_url, http).send(message("ops", "cpu 2*3 [high]", title="Alert_1"))
    assert result.provider_message_id is None and result.detail == {"status": 202}
    (call,) = api.calls
    assert call.verified and call.method == "POST"
    assert call.path == f"/workflows/{api.flow}/triggers/manual/paths/invoke"
    assert call.query == {"api-version": "1", "sp": "/triggers/manual/run", "sv": "1.0", "sig": api.sig}
    assert call.headers["content-type"] == "application/json"
    assert call.json()["type"] == "message"
    assert card_of(call) == {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {"type": "TextBlock", "text": "Alert\\_1", "weight": "Bolder", "size": "Medium", "wrap": True},
            {"type": "TextBlock", "text": "cpu 2\\*3 \\[high\\]", "wrap": True},
        ],
    }


async def test_send_to_connector(api, http):
    result = await teams(api.connector_url, http).send(message("ops", "## Heading\n**bold** - x", format="markdown"))
    assert result.detail == {"status": 200}
    (call,) = api.calls
    assert call.verified and call.path == f"/webhookb2/{api.connector}" and call.status == 200
    assert card_of(call)["body"] == [{"type": "TextBlock", "text": "**Heading**\n**bold** - x", "wrap": True}]


async def test_card(api, http):
    card = Card(
        title="Deploy failed",
        text="see **log**",
        fields=[CardField(title="env", value="prod"), CardField(title="by", value="ci")],
        url="https://ci.example.com/7",
        button="Open run",
        color="red",
    )
    await teams(api.workflow_url, http).send(message("ops", "", format="card", card=card, options={"full_width": True}))
    content = card_of(api.calls[0])
    assert content["body"] == [
        {"type": "TextBlock", "text": "Deploy failed", "weight": "Bolder", "size": "Large", "wrap": True,
         "color": "Attention"},
        {"type": "TextBlock", "text": "see **log**", "wrap": True},
        {"type": "FactSet", "facts": [{"title": "env", "value": "prod"}, {"title": "by", "value": "ci"}]},
    ]  # fmt: skip
    assert content["actions"] == [{"type": "Action.OpenUrl", "title": "Open run", "url": "https://ci.example.com/7"}]
    assert content["msteams"] == {"width": "Full"}
    assert api.calls[0].verified and card_problems(api.calls[0].json()) == []


def test_escape_and_emulator_check():
    assert escape_markdown("- a *b* _c_ `d` [e]") == "\\- a \\*b\\* \\_c\\_ \\`d\\` \\[e\\]"
    assert card_problems({"type": "message", "attachments": [{"contentType": "application/json"}]})
    no_text = {"type": "AdaptiveCard", "version": "1.4", "body": [{"type": "TextBlock"}]}
    attachment = {"contentType": "application/vnd.microsoft.card.adaptive", "content": no_text}
    assert card_problems({"type": "message", "attachments": [attachment]}) == ["body[0].text missing"]


async def test_invalid_option(api, http):
    with pytest.raises(Permanent) as err:
        await teams(api.workflow_url, http).send(message("ops", options={"full_width": "very"}))
    assert "full_width" in err.value.message and err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    assert api.calls == []


async def test_wrong_signature_and_removed_webhook(api, http):
    with pytest.raises(Permanent) as err:
        await teams(api.workflow_url.replace(api.sig, "forged"), http).send(message("ops"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert "DirectApiInvalidAuthorizationSignature" in err.value.message and "forged" not in err.value.message
    with pytest.raises(Permanent) as err:
        await teams(api.connector_url + "x", http).send(message("ops"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert [c.status for c in api.calls] == [401, 404] and not any(c.verified for c in api.calls)


async def test_too_large_is_permanent(api, http):
    with pytest.raises(Permanent) as err:
        await teams(api.workflow_url, http).send(message("ops", "x" * 30_000))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED and "413" in err.value.message


@pytest.mark.parametrize("route", ["workflow_url", "connector_url"])
async def test_injected_failures(api, http, route):
    plugin = teams(getattr(api, route), http)
    api.fail("rate_limited")
    with pytest.raises(Retryable) as err:
        await plugin.send(message("ops"))
    assert err.value.code == ErrorCode.RATE_LIMITED
    assert err.value.retry_after == (9.0 if route == "workflow_url" else 1.0)
    assert not isinstance(err.value, QuotaExceeded)
    if route == "connector_url":
        assert api.calls[-1].status == 200  # a connector's throttling is a 200 with an error text

    api.fail("invalid_recipient")
    with pytest.raises(Permanent) as err:
        await plugin.send(message("ops"))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID and not err.value.sender_fault

    api.fail("server_error")
    with pytest.raises(Retryable) as err:
        await plugin.send(message("ops"))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED

    api.fail("auth")
    with pytest.raises(Permanent) as err:
        await plugin.send(message("ops"))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault

    api.fail("quota")  # Teams has no quota: throttling
    with pytest.raises(Retryable) as err:
        await plugin.send(message("ops"))
    assert err.value.code == ErrorCode.RATE_LIMITED
    assert [c.injected for c in api.calls] == ["rate_limited", "invalid_recipient", "server_error", "auth", "quota"]
    assert api.cards == []


async def test_connection_refused(http):
    emu = TeamsWebhookApi()
    await emu.start()
    url = emu.workflow_url
    await emu.stop()
    with pytest.raises(Retryable):
        await teams(url, http).send(message("ops"))


def test_config():
    with pytest.raises(ValidationError):
        TeamsConfig(webhook_url="not a url")
