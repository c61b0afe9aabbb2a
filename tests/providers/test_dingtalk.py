"""DingTalk custom robot against its emulator (tests/emulators/dingtalk.py)."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from services.senders.base import Permanent, Retryable
from services.senders.dingtalk.bot import DingTalkBot, dingtalk_sign, signed_query
from services.senders.plugins import plugin
from services.senders.plugins.base import Card, CardField, QuotaExceeded
from shared.errors import ErrorCode
from tests.emulators.dingtalk import DingTalkEmulator
from tests.providers.conftest import message

NOW = 1_760_000_001.0
SECRET = "SEC3b1f8c2d7e9a4b6c0d5e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2c"
# openssl dgst -sha256 -hmac "$SECRET" -binary <<< "1760000001000\n$SECRET" (no newline) | base64:
# it has "+", "/" and "=", so it only survives the query if it was URL-encoded.
SIGN_AT_NOW = "AdqmYGC1GdvLLA6tbQGZBpK/bCGmZzjFsiyAe++KawA="


@pytest.fixture
async def emu():
    async with DingTalkEmulator(secret=SECRET, clock=lambda: NOW) as e:
        yield e


def bot(http: httpx.AsyncClient, emu: DingTalkEmulator, *, secret: str | None = SECRET, clock: float = NOW, **cfg):
    if "webhook_url" not in cfg:
        cfg.setdefault("endpoint", emu.endpoint)
        cfg.setdefault("access_token", emu.access_token)
    return DingTalkBot(DingTalkBot.Config(secret=secret, **cfg), http, clock=lambda: clock)


def test_catalogue_and_declarations():
    assert plugin("dingtalk", "dingtalk") is DingTalkBot
    [limit] = DingTalkBot.rate_limits
    assert (limit.count, limit.per_s, limit.scope) == (20, 60.0, "provider")
    assert limit.source.startswith("https://open.dingtalk.com/")
    assert DingTalkBot.default_cost == 0
    assert DingTalkBot.Config.model_fields["endpoint"].default == "https://oapi.dingtalk.com/robot/send"


def test_signature_of_the_documentation_example():
    # The security settings page signs with secret "this is secret" at the current time in
    # milliseconds and prints no value; at 1599360473000 the value was computed independently:
    #   printf '1599360473000\nthis is secret' | openssl dgst -sha256 -hmac 'this is secret' -binary | base64
    assert dingtalk_sign(1599360473000, "this is secret") == "hXZTWifRGHclNuZSKxoXc//sh51SWfVfRIhcdeKs63I="
    assert signed_query(1599360473000, "this is secret") == (
        "timestamp=1599360473000&sign=hXZTWifRGHclNuZSKxoXc%2F%2Fsh51SWfVfRIhcdeKs63I%3D"
    )


async def test_signed_text_with_mentions_wire_format(http, emu):
    msg = message("ops-alerts", "disk full", options={"at_mobiles": ["13800138000"], "at_user_ids": ["manager4756"]})
    result = await bot(http, emu).send(msg)

    [call] = emu.calls
    assert call.verified and not call.problems
    assert call.method == "POST" and call.path == "/robot/send"
    assert call.query == {"access_token": emu.access_token, "timestamp": "1760000001000", "sign": SIGN_AT_NOW}
    assert call.headers["content-type"] == "application/json; charset=utf-8"
    assert call.json() == {
        "msgtype": "text",
        "text": {"content": "disk full @13800138000 @manager4756"},
        "at": {"atMobiles": ["13800138000"], "atUserIds": ["manager4756"], "isAtAll": False},
    }
    assert result.provider_message_id is None and result.detail == {"msgtype": "text"}
    assert "13800138000" not in str(result.detail)


async def test_whole_webhook_url_instead_of_token(http, emu):
    await bot(http, emu, webhook_url=emu.webhook_url).send(message("ops", "hello", options={"at_all": True}))
    [call] = emu.calls
    assert call.verified and call.query["access_token"] == emu.access_token and call.query["sign"] == SIGN_AT_NOW
    assert call.json() == {"msgtype": "text", "text": {"content": "hello"}, "at": {"isAtAll": True}}


async def test_unsigned_robot(http):
    async with DingTalkEmulator() as emu:
        await bot(http, emu, secret=None).send(message("ops", "hello"))
    [call] = emu.calls
    assert call.verified and call.query == {"access_token": emu.access_token}
    assert call.json() == {"msgtype": "text", "text": {"content": "hello"}}


async def test_wrong_secret_is_refused_as_bad_credentials(http, emu):
    wrong = "SEC" + "0" * 64
    with pytest.raises(Permanent) as err:
        await bot(http, emu, secret=wrong).send(message("ops"))
    assert emu.calls[0].problems == ["sign mismatch"] and not emu.calls[0].verified
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert wrong not in str(err.value) and SECRET not in str(err.value)


async def test_timestamp_more_than_an_hour_off_is_refused(http, emu):
    with pytest.raises(Permanent) as err:
        await bot(http, emu, clock=NOW + 3601).send(message("ops"))
    assert emu.calls[0].problems == ["timestamp is not within one hour"]
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault


async def test_unknown_token_is_bad_credentials(http, emu):
    with pytest.raises(Permanent) as err:
        await bot(http, emu, access_token="0" * 64).send(message("ops"))
    assert emu.calls[0].problems == ["unknown access_token"]
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault
    assert "0" * 64 not in str(err.value)


async def test_keyword_filter_refusal_is_the_robots_configuration(http):
    async with DingTalkEmulator(keywords=["告警"]) as emu:
        with pytest.raises(Permanent) as err:
            await bot(http, emu, secret=None).send(message("ops", "disk full"))
        assert emu.calls[0].problems == ["no keyword"]
        assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED and err.value.sender_fault


@pytest.mark.parametrize(
    ("kind", "expected", "code", "sender_fault", "wait"),
    [
        # "超过20条，会限流10分钟": the robot is blocked for ten minutes.
        ("rate_limited", Retryable, ErrorCode.RATE_LIMITED, True, 600.0),
        # A custom robot has no quota: the emulator answers "quota" as the send-rate limit.
        ("quota", Retryable, ErrorCode.RATE_LIMITED, True, 600.0),
        ("auth", Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True, None),
        ("invalid_recipient", Permanent, ErrorCode.RECIPIENT_INVALID, False, None),
        ("server_error", Retryable, ErrorCode.CHANNEL_SEND_FAILED, True, None),
    ],
)
async def test_injected_failures_are_classified(http, emu, kind, expected, code, sender_fault, wait):
    emu.fail(kind)
    with pytest.raises(expected) as err:
        await bot(http, emu).send(message("ops"))
    assert type(err.value) is expected and not isinstance(err.value, QuotaExceeded)
    assert err.value.code == code and err.value.sender_fault is sender_fault
    assert getattr(err.value, "retry_after", None) == wait
    assert emu.calls[0].verified and emu.calls[0].injected == kind
    await bot(http, emu).send(message("ops"))


@pytest.mark.parametrize(
    ("errcode", "errmsg", "code", "sender_fault"),
    [
        (400102, "机器人已停用", ErrorCode.RECIPIENT_INVALID, False),
        (400101, "access_token不存在", ErrorCode.PROVIDER_AUTH_FAILED, True),
        (310000, "ip 1.2.3.4 not in whitelist", ErrorCode.PROVIDER_AUTH_FAILED, True),
        (300001, "param error", ErrorCode.CHANNEL_SEND_FAILED, False),
        (430102, "含有不合适的文本", ErrorCode.CHANNEL_SEND_FAILED, False),
    ],
)
def test_other_documented_errcodes(errcode, errmsg, code, sender_fault):
    config = DingTalkBot.Config(access_token="t0ken")
    response = httpx.Response(200, json={"errcode": errcode, "errmsg": errmsg})
    with pytest.raises(Permanent) as err:
        DingTalkBot(config, httpx.AsyncClient()).parse(message("ops"), response)
    assert err.value.code == code and err.value.sender_fault is sender_fault


async def test_unreachable_service_is_retryable(http):
    emu = DingTalkEmulator()
    await emu.start()
    endpoint = emu.endpoint
    await emu.stop()
    config = DingTalkBot.Config(endpoint=endpoint, access_token="t0ken")
    with pytest.raises(Retryable) as err:
        await DingTalkBot(config, http).send(message("ops"))
    assert err.value.sender_fault and not isinstance(err.value, QuotaExceeded)


async def test_markdown(http, emu):
    msg = message(
        "ops", "- a\n- [b](https://b.example.com)", format="markdown", title="Deploy", options={"at_all": True}
    )
    result = await bot(http, emu).send(msg)
    assert emu.calls[0].verified and result.detail == {"msgtype": "markdown"}
    assert emu.calls[0].json() == {
        "msgtype": "markdown",
        "markdown": {"title": "Deploy", "text": "**Deploy**\n\n- a\n- [b](https://b.example.com)"},
        "at": {"isAtAll": True},
    }


async def test_markdown_without_title_previews_its_first_line(http, emu):
    await bot(http, emu).send(message("ops", "## Build *green*\nall good", format="markdown"))
    assert emu.calls[0].json()["markdown"] == {"title": "Build *green", "text": "## Build *green*\nall good"}


CARD = Card(
    title="CPU high on web-3",
    text="Load above **90%**",
    fields=[CardField(title="Host", value="web-3"), CardField(title="Load", value="0.97")],
    url="https://grafana.example.com/d/abc",
    button="Open dashboard",
    color="red",
)


async def test_card_is_an_action_card(http, emu):
    result = await bot(http, emu).send(message("ops", "", format="card", card=CARD))
    assert emu.calls[0].verified and result.detail == {"msgtype": "actionCard"}
    assert emu.calls[0].json() == {
        "msgtype": "actionCard",
        "actionCard": {
            "title": "CPU high on web-3",
            "text": "### CPU high on web-3\n\nLoad above **90%**\n\n- **Host**: web-3\n- **Load**: 0.97",
            "btnOrientation": "0",
            "singleTitle": "Open dashboard",
            "singleURL": "https://grafana.example.com/d/abc",
        },
    }


async def test_card_without_url_or_with_mentions_goes_as_markdown(http, emu):
    await bot(http, emu).send(message("ops", "", format="card", card=Card(title="Backup done", text="3 GB")))
    await bot(http, emu).send(message("ops", "", format="card", card=CARD, options={"at_mobiles": ["13800138000"]}))
    first, second = (c.json() for c in emu.calls)
    assert first == {"msgtype": "markdown", "markdown": {"title": "Backup done", "text": "### Backup done\n\n3 GB"}}
    assert second["msgtype"] == "markdown" and second["at"] == {"atMobiles": ["13800138000"], "isAtAll": False}
    assert second["markdown"]["text"] == (
        "### CPU high on web-3\n\nLoad above **90%**\n\n- **Host**: web-3\n- **Load**: 0.97\n\n"
        "[Open dashboard](https://grafana.example.com/d/abc)\n\n@13800138000"
    )
    assert all(c.verified for c in emu.calls)


async def test_card_on_a_text_send_is_flattened(http, emu):
    await bot(http, emu).send(message("ops", "", format="text", card=CARD))
    assert emu.calls[0].json()["text"]["content"] == (
        "CPU high on web-3\nLoad above **90%**\nHost: web-3\nLoad: 0.97\nhttps://grafana.example.com/d/abc"
    )


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"at_mobiles": "13800138000"}, "at_mobiles"),
        ({"at_mobiles": ["call me"]}, "at_mobiles.0"),
        ({"at_all": "everyone"}, "at_all"),
        ({"at_user_ids": ["a b"]}, "at_user_ids.0"),
    ],
)
async def test_invalid_options_are_refused_naming_the_option(http, emu, options, named):
    with pytest.raises(Permanent) as err:
        await bot(http, emu).send(message("ops", options=options))
    assert f"option {named}:" in str(err.value) and err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    assert emu.calls == []


async def test_body_over_20000_bytes_is_refused_before_sending(http, emu):
    with pytest.raises(Permanent) as err:
        await bot(http, emu).send(message("ops", "x" * 20_001))
    assert "20000" in str(err.value) and emu.calls == []


async def test_emulator_refuses_an_action_card_without_button(http, emu):
    url = f"{emu.webhook_url}&{signed_query(int(NOW * 1000), SECRET)}"
    response = await http.post(url, json={"msgtype": "actionCard", "actionCard": {"title": "t", "text": "x"}})
    assert response.json()["errcode"] == 40035
    assert emu.calls[0].problems == ["missing or invalid actionCard.singleTitle/singleURL or actionCard.btns"]


def test_config_needs_exactly_one_token_and_a_sec_secret():
    with pytest.raises(ValidationError):
        DingTalkBot.Config()
    with pytest.raises(ValidationError):
        DingTalkBot.Config(access_token="a", webhook_url="https://oapi.dingtalk.com/robot/send?access_token=a")
    with pytest.raises(ValidationError) as err:
        DingTalkBot.Config(webhook_url="https://oapi.dingtalk.com/robot/send?token=s3cr3tvalue")
    assert "s3cr3tvalue" not in str(err.value)
    with pytest.raises(ValidationError) as err:
        DingTalkBot.Config(access_token="a", secret="n0tasecretformat")
    assert "n0tasecretformat" not in str(err.value)
