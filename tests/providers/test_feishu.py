"""Feishu / Lark custom bot against its emulator (tests/emulators/feishu.py)."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from services.senders.base import Permanent, Retryable
from services.senders.feishu.bot import FeishuBot, feishu_sign
from services.senders.plugins import plugin
from services.senders.plugins.base import Card, CardField, QuotaExceeded
from shared.errors import ErrorCode
from tests.emulators.feishu import FeishuEmulator
from tests.providers.conftest import message

NOW = 1_760_000_000.0
SECRET = "qZ8tW2xR5yN1vB7m"


@pytest.fixture
async def emu():
    async with FeishuEmulator(secret=SECRET, clock=lambda: NOW) as e:
        yield e


def bot(http: httpx.AsyncClient, emu: FeishuEmulator, *, secret: str | None = SECRET, clock: float = NOW, **cfg):
    config = FeishuBot.Config(webhook_url=cfg.pop("webhook_url", emu.webhook_url), secret=secret)
    return FeishuBot(config, http, clock=lambda: clock)


def test_catalogue_and_declarations():
    assert plugin("feishu", "feishu") is FeishuBot
    assert {(r.count, r.per_s, r.scope) for r in FeishuBot.rate_limits} == {
        (100, 60.0, "provider"),
        (5, 1.0, "provider"),
    }
    assert all(r.source.startswith("https://open.feishu.cn/") for r in FeishuBot.rate_limits)
    assert FeishuBot.default_cost == 0
    assert FeishuBot.formats == {"text", "markdown", "card"}


def test_signature_of_the_guides_sign_demo():
    # The custom bot guide's SignDemo (Java/Go/Python) signs secret "demo" at timestamp
    # 1599360473 but prints no value; the expected value was computed independently with
    #   openssl dgst -sha256 -hmac $'1599360473\ndemo' -binary </dev/null | base64
    assert feishu_sign(1599360473, "demo") == "l1N0gAcBjdwBvGm1xMjOF0XSyaLRpR7tuO5dHfhAYc8="
    assert feishu_sign("1599360473", "demo") == feishu_sign(1599360473, "demo")


async def test_signed_text_with_mentions_wire_format(http, emu):
    msg = message("ops-alerts", "disk full on db-1", options={"mentions": ["ou_7d8a6e6df76215", "all"]})
    result = await bot(http, emu).send(msg)

    [call] = emu.calls
    assert call.verified and not call.problems
    assert call.method == "POST"
    assert call.path == f"/open-apis/bot/v2/hook/{emu.token}"
    assert call.query == {}
    assert call.headers["content-type"] == "application/json; charset=utf-8"
    assert call.json() == {
        "timestamp": "1760000000",
        "sign": feishu_sign(1760000000, SECRET),
        "msg_type": "text",
        "content": {"text": '<at user_id="ou_7d8a6e6df76215"></at> <at user_id="all">所有人</at> disk full on db-1'},
    }
    assert "ops-alerts" not in call.body.decode()  # the provider's name is not sent
    assert result.provider_message_id is None
    assert result.detail == {"msg_type": "text"}


async def test_unsigned_bot_sends_no_signature(http):
    async with FeishuEmulator() as emu:
        await bot(http, emu, secret=None).send(message("ops", "hello", title="Deploy"))
    [call] = emu.calls
    assert call.verified
    assert call.json() == {"msg_type": "text", "content": {"text": "Deploy\nhello"}}


async def test_wrong_secret_is_refused_as_bad_credentials(http, emu):
    with pytest.raises(Permanent) as err:
        await bot(http, emu, secret="not-the-secret").send(message("ops"))
    [call] = emu.calls
    assert not call.verified and call.problems == ["sign mismatch"]
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert SECRET not in str(err.value) and "not-the-secret" not in str(err.value)


async def test_timestamp_more_than_an_hour_off_is_refused(http, emu):
    with pytest.raises(Permanent) as err:
        await bot(http, emu, clock=NOW - 3700).send(message("ops"))
    assert emu.calls[0].problems == ["timestamp is not within one hour"]
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED


async def test_unknown_webhook_token_is_bad_credentials(http, emu):
    url = emu.webhook_url.replace(emu.token, "11111111-2222-3333-4444-555555555555")
    with pytest.raises(Permanent) as err:
        await bot(http, emu, webhook_url=url).send(message("ops"))
    assert emu.calls[0].problems == ["unknown webhook token"]
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert "11111111" not in str(err.value)


async def test_keyword_filter_refusal_is_the_bots_configuration(http):
    async with FeishuEmulator(keywords=["告警"]) as emu:
        with pytest.raises(Permanent) as err:
            await bot(http, emu, secret=None).send(message("ops", "disk full"))
        assert emu.calls[0].problems == ["no keyword"]
        assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED and err.value.sender_fault
        await bot(http, emu, secret=None).send(message("ops", "告警: disk full"))
        assert emu.calls[1].verified


@pytest.mark.parametrize(
    ("kind", "expected", "code", "sender_fault"),
    [
        ("rate_limited", Retryable, ErrorCode.RATE_LIMITED, True),
        # The custom bot has no quota: the emulator answers "quota" as the frequency limit.
        ("quota", Retryable, ErrorCode.RATE_LIMITED, True),
        ("auth", Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True),
        ("invalid_recipient", Permanent, ErrorCode.RECIPIENT_INVALID, False),
        ("server_error", Retryable, ErrorCode.CHANNEL_SEND_FAILED, True),
    ],
)
async def test_injected_failures_are_classified(http, emu, kind, expected, code, sender_fault):
    emu.fail(kind)
    with pytest.raises(expected) as err:
        await bot(http, emu).send(message("ops"))
    assert type(err.value) is expected and not isinstance(err.value, QuotaExceeded)
    assert err.value.code == code and err.value.sender_fault is sender_fault
    assert emu.calls[0].verified and emu.calls[0].injected == kind
    await bot(http, emu).send(message("ops"))  # recovered after one


async def test_frequency_limit_answer_with_gateway_reset_header():
    response = httpx.Response(429, headers={"x-ogw-ratelimit-reset": "7"}, json={"code": 99991400, "msg": "limited"})
    config = FeishuBot.Config(webhook_url="https://open.feishu.cn/open-apis/bot/v2/hook/0f3c9a4e-6b1d-4c2a")
    with pytest.raises(Retryable) as err:
        FeishuBot(config, httpx.AsyncClient()).parse(message("ops"), response)
    assert err.value.code == ErrorCode.RATE_LIMITED and err.value.retry_after == 7.0
    response = httpx.Response(200, json={"code": 9499, "msg": "too many request"})
    with pytest.raises(Retryable) as err:
        FeishuBot(config, httpx.AsyncClient()).parse(message("ops"), response)
    assert err.value.code == ErrorCode.RATE_LIMITED
    response = httpx.Response(400, json={"code": 9499, "msg": "Bad Request", "data": {}})
    with pytest.raises(Permanent) as err:
        FeishuBot(config, httpx.AsyncClient()).parse(message("ops"), response)
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED and not err.value.sender_fault


async def test_unreachable_service_is_retryable(http):
    emu = FeishuEmulator()
    await emu.start()
    url = emu.webhook_url
    await emu.stop()
    config = FeishuBot.Config(webhook_url=url)
    with pytest.raises(Retryable) as err:
        await FeishuBot(config, http).send(message("ops"))
    assert not isinstance(err.value, QuotaExceeded) and err.value.sender_fault


async def test_markdown_is_sent_as_rich_text(http, emu):
    content = "## Deploy\nversion **1.4.2** is live\nsee [the runbook](https://runbook.example.com/x) now\n\nthanks"
    msg = message("ops", content, format="markdown", title="Release", options={"mentions": ["all"]})
    result = await bot(http, emu).send(msg)
    body = emu.calls[0].json()
    assert emu.calls[0].verified and result.detail == {"msg_type": "post"}
    assert body["msg_type"] == "post"
    assert body["content"]["post"]["zh_cn"] == {
        "title": "Release",
        "content": [
            [
                {"tag": "at", "user_id": "all"},
                {"tag": "text", "text": " "},
                {"tag": "text", "text": "Deploy", "style": ["bold"]},
            ],
            [
                {"tag": "text", "text": "version "},
                {"tag": "text", "text": "1.4.2", "style": ["bold"]},
                {"tag": "text", "text": " is live"},
            ],
            [
                {"tag": "text", "text": "see "},
                {"tag": "a", "text": "the runbook", "href": "https://runbook.example.com/x"},
                {"tag": "text", "text": " now"},
            ],
            [{"tag": "text", "text": ""}],
            [{"tag": "text", "text": "thanks"}],
        ],
    }


async def test_card_is_an_interactive_card(http, emu):
    card = Card(
        title="CPU high on web-3",
        text="Load has been above **90%** for 10 minutes.",
        fields=[CardField(title="Host", value="web-3"), CardField(title="Load", value="0.97")],
        url="https://grafana.example.com/d/abc",
        button="Open dashboard",
        color="red",
    )
    msg = message("ops", "", format="card", card=card, options={"mentions": ["ou_1a2b3c"]})
    result = await bot(http, emu).send(msg)
    body = emu.calls[0].json()
    assert emu.calls[0].verified and result.detail == {"msg_type": "interactive"}
    assert body["msg_type"] == "interactive" and "content" not in body
    assert body["card"] == {
        "config": {"wide_screen_mode": True},
        "header": {"title": {"tag": "plain_text", "content": "CPU high on web-3"}, "template": "red"},
        "elements": [
            {"tag": "markdown", "content": "<at id=ou_1a2b3c></at>\nLoad has been above **90%** for 10 minutes."},
            {
                "tag": "div",
                "fields": [
                    {"is_short": True, "text": {"tag": "lark_md", "content": "**Host**\nweb-3"}},
                    {"is_short": True, "text": {"tag": "lark_md", "content": "**Load**\n0.97"}},
                ],
            },
            {
                "tag": "action",
                "actions": [
                    {
                        "tag": "button",
                        "text": {"tag": "plain_text", "content": "Open dashboard"},
                        "type": "primary",
                        "url": "https://grafana.example.com/d/abc",
                    }
                ],
            },
        ],
    }


async def test_bare_card_has_a_body_and_no_colour(http, emu):
    await bot(http, emu).send(message("ops", "", format="card", card=Card(title="Backup done")))
    card = emu.calls[0].json()["card"]
    assert emu.calls[0].verified
    assert card["header"] == {"title": {"tag": "plain_text", "content": "Backup done"}}
    assert card["elements"] == [{"tag": "markdown", "content": "Backup done"}]


async def test_card_on_a_text_send_and_html_are_flattened_to_text(http, emu):
    card = Card(
        title="Backup", text="done", fields=[CardField(title="Size", value="3 GB")], url="https://x.example.com"
    )
    await bot(http, emu).send(message("ops", "", format="text", card=card))
    await bot(http, emu).send(message("ops", "<b>hi</b>", format="html", title="T"))
    assert emu.calls[0].json()["content"] == {"text": "Backup\ndone\nSize: 3 GB\nhttps://x.example.com"}
    assert emu.calls[1].json()["content"] == {"text": "T\n<b>hi</b>"}
    assert all(c.verified for c in emu.calls)


@pytest.mark.parametrize(
    ("options", "named"),
    [({"mentions": "ou_1"}, "mentions"), ({"mentions": ["ou 1"]}, "mentions.0"), ({"mentions": [""]}, "mentions.0")],
)
async def test_invalid_options_are_refused_naming_the_option(http, emu, options, named):
    with pytest.raises(Permanent) as err:
        await bot(http, emu).send(message("ops", options=options))
    assert f"option {named}:" in str(err.value) and err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    assert not err.value.sender_fault and emu.calls == []


async def test_body_over_20_kb_is_refused_before_sending(http, emu):
    with pytest.raises(Permanent) as err:
        await bot(http, emu).send(message("ops", "x" * 21_000))
    assert "20 KB" in str(err.value) and emu.calls == []


async def test_emulator_refuses_a_malformed_body(http, emu):
    signed = {"timestamp": "1760000000", "sign": feishu_sign(1760000000, SECRET)}
    response = await http.post(emu.webhook_url, json={**signed, "msg_type": "text", "content": {}})
    assert response.json() == {"code": 9499, "msg": "Bad Request", "data": {}}
    assert not emu.calls[0].verified and emu.calls[0].problems == ["content.text is required"]


def test_config_checks_the_webhook_without_echoing_it():
    with pytest.raises(ValidationError) as err:
        FeishuBot.Config(webhook_url="https://open.feishu.cn/open-apis/bot/v2/other/s3cr3t-t0ken-value")
    assert "s3cr3t" not in str(err.value)
    config = FeishuBot.Config(webhook_url=" https://open.larksuite.com/open-apis/bot/v2/hook/0f3c9a4e-6b1d ")
    assert config.webhook_url.get_secret_value() == "https://open.larksuite.com/open-apis/bot/v2/hook/0f3c9a4e-6b1d"
    assert "0f3c9a4e" not in repr(config)
