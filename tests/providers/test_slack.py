"""Slack incoming webhook against its emulator (tests/emulators/slack.py).

Incoming webhooks are not signed (the secret path is the credential), so there is no
signature example to reproduce; a wrong path secret stands for the wrong secret."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from services.senders.base import Permanent, Retryable
from services.senders.plugins import plugin
from services.senders.plugins.base import Card, CardField, QuotaExceeded
from services.senders.slack.webhook import SlackWebhook, mrkdwn
from shared.errors import ErrorCode
from tests.emulators.slack import SlackEmulator
from tests.providers.conftest import message


@pytest.fixture
async def emu():
    async with SlackEmulator() as e:
        yield e


def hook(http: httpx.AsyncClient, url: str) -> SlackWebhook:
    return SlackWebhook(SlackWebhook.Config(webhook_url=url), http)


def test_catalogue_and_declarations():
    assert plugin("slack", "slack") is SlackWebhook
    [limit] = SlackWebhook.rate_limits
    assert (limit.count, limit.per_s, limit.scope) == (1, 1.0, "provider")
    assert limit.source.startswith("https://docs.slack.dev/apis/web-api/rate-limits")
    assert SlackWebhook.default_cost == 0


async def test_text_wire_format(http, emu):
    msg = message("ops-alerts", "deploy <prod> & rollback", title="CI", options={"mentions": ["U024BE7LH", "here"]})
    result = await hook(http, emu.webhook_url).send(msg)

    [call] = emu.calls
    assert call.verified and not call.problems
    assert call.method == "POST"
    assert call.path == f"/services/{emu.team}/{emu.bot}/{emu.secret}"
    assert call.query == {}
    assert call.headers["content-type"] == "application/json; charset=utf-8"
    assert call.json() == {"text": "<@U024BE7LH> <!here> CI\ndeploy &lt;prod&gt; &amp; rollback"}
    assert result.provider_message_id is None and result.detail == {"kind": "text"}


async def test_wrong_secret_is_refused_as_bad_credentials(http, emu):
    url = emu.webhook_url.replace(emu.secret, "WrongSecretWrongSecret00")
    with pytest.raises(Permanent) as err:
        await hook(http, url).send(message("ops"))
    assert emu.calls[0].problems == ["wrong webhook secret"] and not emu.calls[0].verified
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert "WrongSecret" not in str(err.value) and emu.secret not in str(err.value)


async def test_unknown_webhook_is_bad_credentials(http, emu):
    url = emu.webhook_url.replace(emu.bot, "B0ZZZZZZZ")
    with pytest.raises(Permanent) as err:
        await hook(http, url).send(message("ops"))
    assert emu.calls[0].problems == ["unknown webhook"]
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and "no_service" in str(err.value)


@pytest.mark.parametrize(
    ("kind", "expected", "code", "sender_fault"),
    [
        ("rate_limited", Retryable, ErrorCode.RATE_LIMITED, True),
        # Incoming webhooks have no quota: the emulator answers "quota" as the rate limit.
        ("quota", Retryable, ErrorCode.RATE_LIMITED, True),
        ("auth", Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True),
        ("invalid_recipient", Permanent, ErrorCode.RECIPIENT_INVALID, False),
        ("server_error", Retryable, ErrorCode.CHANNEL_SEND_FAILED, True),
    ],
)
async def test_injected_failures_are_classified(http, emu, kind, expected, code, sender_fault):
    emu.retry_after_s = 3
    emu.fail(kind)
    with pytest.raises(expected) as err:
        await hook(http, emu.webhook_url).send(message("ops"))
    assert type(err.value) is expected and not isinstance(err.value, QuotaExceeded)
    assert err.value.code == code and err.value.sender_fault is sender_fault
    if code == ErrorCode.RATE_LIMITED:
        assert err.value.retry_after == 3.0  # Slack's Retry-After
    assert emu.calls[0].verified and emu.calls[0].injected == kind
    await hook(http, emu.webhook_url).send(message("ops"))


@pytest.mark.parametrize(
    ("status", "error", "code", "sender_fault"),
    [
        (410, "channel_is_archived", ErrorCode.RECIPIENT_INVALID, False),
        (403, "action_prohibited", ErrorCode.PROVIDER_AUTH_FAILED, True),
        (404, "team_disabled", ErrorCode.PROVIDER_AUTH_FAILED, True),
        (400, "invalid_payload", ErrorCode.CHANNEL_SEND_FAILED, False),
        (400, "no_text", ErrorCode.CHANNEL_SEND_FAILED, False),
    ],
)
def test_other_documented_errors(status, error, code, sender_fault):
    config = SlackWebhook.Config(webhook_url="https://hooks.slack.com/services/T000/B000/XXXX")
    with pytest.raises(Permanent) as err:
        SlackWebhook(config, httpx.AsyncClient()).parse(message("ops"), httpx.Response(status, text=error))
    assert err.value.code == code and err.value.sender_fault is sender_fault and error in str(err.value)


async def test_unreachable_service_is_retryable(http):
    emu = SlackEmulator()
    await emu.start()
    url = emu.webhook_url
    await emu.stop()
    with pytest.raises(Retryable) as err:
        await hook(http, url).send(message("ops"))
    assert err.value.sender_fault and not isinstance(err.value, QuotaExceeded)


def test_markdown_to_mrkdwn():
    assert mrkdwn("## Deploy\n**v1.2** is <live> & [see](https://x.example.com/a?b=1&c=2)") == (
        "*Deploy*\n*v1.2* is &lt;live&gt; &amp; <https://x.example.com/a?b=1&c=2|see>"
    )


async def test_markdown_is_sent_as_mrkdwn(http, emu):
    msg = message("ops", "version **1.4** is live, [notes](https://n.example.com)", format="markdown", title="Release")
    result = await hook(http, emu.webhook_url).send(msg)
    assert emu.calls[0].verified and result.detail == {"kind": "mrkdwn"}
    assert emu.calls[0].json() == {"text": "*Release*\n\nversion *1.4* is live, <https://n.example.com|notes>"}


CARD = Card(
    title="CPU high on web-3",
    text="Load above **90%**",
    fields=[CardField(title="Host", value="web-3"), CardField(title="Load", value="0.97")],
    url="https://grafana.example.com/d/abc",
    button="Open dashboard",
)


async def test_card_is_block_kit(http, emu):
    result = await hook(http, emu.webhook_url).send(message("ops", "", format="card", card=CARD))
    assert emu.calls[0].verified and result.detail == {"kind": "blocks"}
    assert emu.calls[0].json() == {
        "text": "CPU high on web-3\nLoad above **90%**\nHost: web-3\nLoad: 0.97\nhttps://grafana.example.com/d/abc",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": "CPU high on web-3", "emoji": True}},
            {"type": "section", "text": {"type": "mrkdwn", "text": "Load above *90%*"}},
            {
                "type": "section",
                "fields": [{"type": "mrkdwn", "text": "*Host*\nweb-3"}, {"type": "mrkdwn", "text": "*Load*\n0.97"}],
            },
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open dashboard", "emoji": True},
                        "url": "https://grafana.example.com/d/abc",
                    }
                ],
            },
        ],
    }


async def test_coloured_card_goes_in_an_attachment_with_mentions_first(http, emu):
    card = CARD.model_copy(update={"color": "red"})
    await hook(http, emu.webhook_url).send(
        message("ops", "", format="card", card=card, options={"mentions": ["channel"]})
    )
    body = emu.calls[0].json()
    assert emu.calls[0].verified and "blocks" not in body
    [attachment] = body["attachments"]
    assert attachment["color"] == "#E01E5A"
    assert attachment["blocks"][0] == {"type": "section", "text": {"type": "mrkdwn", "text": "<!channel>"}}
    assert [b["type"] for b in attachment["blocks"]] == ["section", "header", "section", "section", "actions"]


async def test_long_card_is_split_within_block_kit_limits(http, emu):
    card = Card(
        title="T" * 200,
        text="w" * 3500,
        fields=[CardField(title=f"f{i}", value="v" * 2000) for i in range(12)],
    )
    await hook(http, emu.webhook_url).send(message("ops", "", format="card", card=card))
    blocks = emu.calls[0].json()["blocks"]
    assert emu.calls[0].verified and not emu.calls[0].problems
    assert len(blocks[0]["text"]["text"]) == 150 and blocks[0]["text"]["text"].endswith("…")
    assert [len(b["text"]["text"]) for b in blocks[1:3]] == [3000, 500]
    assert [len(b["fields"]) for b in blocks[3:5]] == [10, 2]
    assert all(len(f["text"]) <= 2000 for b in blocks[3:5] for f in b["fields"])
    assert blocks[-1]["type"] == "section"  # no url: no actions block


async def test_card_on_a_text_send_is_flattened(http, emu):
    await hook(http, emu.webhook_url).send(message("ops", "", format="text", card=CARD))
    assert emu.calls[0].json() == {
        "text": "CPU high on web-3\nLoad above **90%**\nHost: web-3\nLoad: 0.97\nhttps://grafana.example.com/d/abc"
    }


@pytest.mark.parametrize(
    ("options", "named"),
    [({"mentions": "U024BE7LH"}, "mentions"), ({"mentions": ["@bob"]}, "mentions.0")],
)
async def test_invalid_options_are_refused_naming_the_option(http, emu, options, named):
    with pytest.raises(Permanent) as err:
        await hook(http, emu.webhook_url).send(message("ops", options=options))
    assert f"option {named}:" in str(err.value) and err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    assert emu.calls == []


async def test_emulator_checks_blocks_and_content_type(http, emu):
    bad = {"blocks": [{"type": "header", "text": {"type": "mrkdwn", "text": "x"}}]}
    response = await http.post(emu.webhook_url, json=bad)
    assert (response.status_code, response.text) == (400, "invalid_blocks")
    response = await http.post(emu.webhook_url, data={"payload": "{}"})
    assert (response.status_code, response.text) == (400, "invalid_payload")
    response = await http.post(emu.webhook_url, json={"username": "x"})
    assert (response.status_code, response.text) == (400, "no_text")
    assert not any(c.verified for c in emu.calls)


def test_config_checks_the_webhook_without_echoing_it():
    with pytest.raises(ValidationError) as err:
        SlackWebhook.Config(webhook_url="https://hooks.slack.com/other/T0/B0/s3cr3tvalue")
    assert "s3cr3tvalue" not in str(err.value)
    config = SlackWebhook.Config(webhook_url="https://hooks.slack.com/services/T0A1/B0E4/s3cr3tvalue")
    assert "s3cr3tvalue" not in repr(config)
