"""WeCom group robot against its emulator (tests/emulators/wecom.py).

WeCom robots are not signed (the webhook key is the only credential), so there is no
signature example to reproduce; a wrong key stands for the wrong secret."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from services.senders.base import Permanent, Retryable
from services.senders.plugins import plugin
from services.senders.plugins.base import Card, CardField, QuotaExceeded
from services.senders.wecom.bot import WeComBot
from shared.errors import ErrorCode
from tests.emulators.wecom import WeComEmulator
from tests.providers.conftest import message


@pytest.fixture
async def emu():
    async with WeComEmulator() as e:
        yield e


def bot(http: httpx.AsyncClient, emu: WeComEmulator, **cfg) -> WeComBot:
    if "webhook_url" not in cfg:
        cfg.setdefault("endpoint", emu.endpoint)
        cfg.setdefault("key", emu.key)
    return WeComBot(WeComBot.Config(**cfg), http)


def test_catalogue_and_declarations():
    assert plugin("wecom", "wecom") is WeComBot
    [limit] = WeComBot.rate_limits
    assert (limit.count, limit.per_s, limit.scope) == (20, 60.0, "provider")
    assert limit.source.startswith("https://developer.work.weixin.qq.com/document/path/91770")
    assert WeComBot.default_cost == 0
    assert WeComBot.Config.model_fields["endpoint"].default == "https://qyapi.weixin.qq.com/cgi-bin/webhook/send"


async def test_text_with_mentions_wire_format(http, emu):
    msg = message(
        "ops-alerts",
        "广州今日天气：29度",
        title="天气",
        options={"mentioned_list": ["wangqing", "@all"], "mentioned_mobile_list": ["13800001111"]},
    )
    result = await bot(http, emu).send(msg)

    [call] = emu.calls
    assert call.verified and not call.problems
    assert call.method == "POST" and call.path == "/cgi-bin/webhook/send"
    assert call.query == {"key": emu.key}
    assert call.headers["content-type"] == "application/json; charset=utf-8"
    assert call.json() == {
        "msgtype": "text",
        "text": {
            "content": "天气\n广州今日天气：29度",
            "mentioned_list": ["wangqing", "@all"],
            "mentioned_mobile_list": ["13800001111"],
        },
    }
    assert result.provider_message_id is None and result.detail == {"msgtype": "text"}


async def test_whole_webhook_url_instead_of_key(http, emu):
    await bot(http, emu, webhook_url=emu.webhook_url).send(message("ops", "hello"))
    assert emu.calls[0].verified and emu.calls[0].query == {"key": emu.key}
    assert emu.calls[0].json() == {"msgtype": "text", "text": {"content": "hello"}}


async def test_wrong_key_is_refused_as_bad_credentials(http, emu):
    wrong = "00000000-0000-0000-0000-000000000000"
    with pytest.raises(Permanent) as err:
        await bot(http, emu, key=wrong).send(message("ops"))
    assert emu.calls[0].problems == ["unknown key"] and not emu.calls[0].verified
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert wrong not in str(err.value) and "hint" not in str(err.value)


@pytest.mark.parametrize(
    ("kind", "expected", "code", "sender_fault"),
    [
        ("rate_limited", Retryable, ErrorCode.RATE_LIMITED, True),
        # A group robot has no quota: the emulator answers "quota" as the frequency limit.
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
    await bot(http, emu).send(message("ops"))


@pytest.mark.parametrize(
    ("errcode", "code", "expected"),
    [
        (93004, ErrorCode.RECIPIENT_INVALID, Permanent),
        (45033, ErrorCode.RATE_LIMITED, Retryable),
        (40008, ErrorCode.CHANNEL_SEND_FAILED, Permanent),
    ],
)
def test_other_documented_errcodes(errcode, code, expected):
    response = httpx.Response(200, json={"errcode": errcode, "errmsg": "x, hint: [1], from ip: 1.2.3.4"})
    with pytest.raises(expected) as err:
        WeComBot(WeComBot.Config(key="k"), httpx.AsyncClient()).parse(message("ops"), response)
    assert err.value.code == code and "from ip" not in str(err.value)


async def test_unreachable_service_is_retryable(http):
    emu = WeComEmulator()
    await emu.start()
    endpoint = emu.endpoint
    await emu.stop()
    with pytest.raises(Retryable) as err:
        await WeComBot(WeComBot.Config(endpoint=endpoint, key="k"), http).send(message("ops"))
    assert err.value.sender_fault and not isinstance(err.value, QuotaExceeded)


async def test_markdown_with_mentions(http, emu):
    msg = message("ops", "> build **green**", format="markdown", title="CI", options={"mentioned_list": ["wangqing"]})
    result = await bot(http, emu).send(msg)
    assert emu.calls[0].verified and result.detail == {"msgtype": "markdown"}
    assert emu.calls[0].json() == {
        "msgtype": "markdown",
        "markdown": {"content": "**CI**\n\n> build **green**\n<@wangqing>"},
    }


CARD = Card(
    title="CPU high on web-3",
    text="Load above 90% for 10 minutes",
    fields=[CardField(title="Host", value="web-3"), CardField(title="Load", value="0.97")],
    url="https://grafana.example.com/d/abc",
    button="Open dashboard",
    color="red",
)


async def test_card_is_a_text_notice_template_card(http, emu):
    result = await bot(http, emu).send(message("ops", "", format="card", card=CARD))
    assert emu.calls[0].verified and result.detail == {"msgtype": "template_card"}
    assert emu.calls[0].json() == {
        "msgtype": "template_card",
        "template_card": {
            "card_type": "text_notice",
            "main_title": {"title": "CPU high on web-3"},
            "sub_title_text": "Load above 90% for 10 minutes",
            "horizontal_content_list": [{"keyname": "Host", "value": "web-3"}, {"keyname": "Load", "value": "0.97"}],
            "jump_list": [{"type": 1, "title": "Open dashboard", "url": "https://grafana.example.com/d/abc"}],
            "card_action": {"type": 1, "url": "https://grafana.example.com/d/abc"},
        },
    }


async def test_card_without_url_goes_as_coloured_markdown(http, emu):
    card = Card(title="Backup done", text="nightly", fields=[CardField(title="Size", value="3 GB")], color="green")
    result = await bot(http, emu).send(message("ops", "", format="card", card=card))
    assert emu.calls[0].verified and result.detail == {"msgtype": "markdown"}
    assert (
        emu.calls[0].json()["markdown"]["content"] == '<font color="info">**Backup done**</font>\nnightly\n> Size: 3 GB'
    )


async def test_card_with_seven_fields_or_mentions_goes_as_markdown(http, emu):
    many = CARD.model_copy(update={"fields": [CardField(title=f"f{i}", value=str(i)) for i in range(7)], "color": None})
    await bot(http, emu).send(message("ops", "", format="card", card=many))
    await bot(http, emu).send(message("ops", "", format="card", card=CARD, options={"mentioned_list": ["wangqing"]}))
    first, second = (c.json() for c in emu.calls)
    assert first["msgtype"] == "markdown" and first["markdown"]["content"].startswith("**CPU high on web-3**\n")
    assert "> f6: 6" in first["markdown"]["content"]
    assert second["markdown"]["content"] == (
        '<font color="warning">**CPU high on web-3**</font>\nLoad above 90% for 10 minutes\n> Host: web-3\n'
        "> Load: 0.97\n[Open dashboard](https://grafana.example.com/d/abc)\n<@wangqing>"
    )
    assert all(c.verified for c in emu.calls)


async def test_card_on_a_text_send_is_flattened(http, emu):
    await bot(http, emu).send(message("ops", "", format="text", card=CARD))
    assert emu.calls[0].json()["text"]["content"] == (
        "CPU high on web-3\nLoad above 90% for 10 minutes\nHost: web-3\nLoad: 0.97\nhttps://grafana.example.com/d/abc"
    )


@pytest.mark.parametrize(
    ("options", "fmt", "named"),
    [
        ({"mentioned_list": "wangqing"}, "text", "mentioned_list"),
        ({"mentioned_list": ["a b"]}, "text", "mentioned_list.0"),
        ({"mentioned_mobile_list": ["phone"]}, "text", "mentioned_mobile_list.0"),
        ({"mentioned_mobile_list": ["13800001111"]}, "markdown", "mentioned_mobile_list"),
        ({"mentioned_list": ["@all"]}, "markdown", "mentioned_list"),
    ],
)
async def test_invalid_options_are_refused_naming_the_option(http, emu, options, fmt, named):
    with pytest.raises(Permanent) as err:
        await bot(http, emu).send(message("ops", format=fmt, options=options))
    assert f"option {named}:" in str(err.value) and err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    assert emu.calls == []


async def test_content_over_the_documented_sizes_is_refused_before_sending(http, emu):
    with pytest.raises(Permanent) as err:
        await bot(http, emu).send(message("ops", "字" * 683))  # 2049 bytes
    assert "2048" in str(err.value)
    with pytest.raises(Permanent) as err:
        await bot(http, emu).send(message("ops", "x" * 4097, format="markdown"))
    assert "4096" in str(err.value) and emu.calls == []
    await bot(http, emu).send(message("ops", "字" * 682))  # 2046 bytes: accepted
    assert emu.calls[0].verified


async def test_emulator_refuses_a_text_notice_without_card_action(http, emu):
    card = {"card_type": "text_notice", "main_title": {"title": "t"}}
    response = await http.post(emu.webhook_url, json={"msgtype": "template_card", "template_card": card})
    assert response.json()["errcode"] == 40058
    assert emu.calls[0].problems == ["card_action with type 1 or 2 is required"]


def test_config_needs_exactly_one_key():
    with pytest.raises(ValidationError):
        WeComBot.Config()
    with pytest.raises(ValidationError):
        WeComBot.Config(key="a", webhook_url="https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=a")
    with pytest.raises(ValidationError) as err:
        WeComBot.Config(webhook_url="https://qyapi.weixin.qq.com/cgi-bin/webhook/send?k=s3cr3tvalue")
    assert "s3cr3tvalue" not in str(err.value)
