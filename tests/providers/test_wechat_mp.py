"""WeChat Official Account template messages against the emulated token and send endpoints."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.senders.base import Permanent, Retryable
from services.senders.plugins.base import QuotaExceeded
from services.senders.wechat_mp.template import WeChatConfig, WeChatTemplate
from shared.errors import ErrorCode
from tests.emulators.wechat_mp import WeChatMpApi
from tests.providers.conftest import message

OPENID = "oABCD1234efgh5678ijkl9012mnop"


@pytest.fixture
async def api():
    async with WeChatMpApi() as emu:
        yield emu


def mp(api, http, **fields) -> WeChatTemplate:
    config = WeChatConfig(
        app_id=fields.pop("app_id", api.app_id),
        app_secret=fields.pop("app_secret", api.app_secret),
        api_base=api.url,
        **fields,
    )
    return WeChatTemplate(config, http)


async def test_send_with_data(api, http):
    plugin = mp(api, http)
    options = {
        "template_id": "TPL_ORDER_0002",
        "data": {"first": {"value": "Order shipped", "color": "#173177"}, "keyword1": "A-1001", "keyword2": "2 boxes",
                 "remark": "thanks"},
        "url": "https://shop.example.com/o/1001",
        "miniprogram": {"appid": "wxaabbccddeeff0011", "pagepath": "pages/o?id=1001"},
    }  # fmt: skip
    result = await plugin.send(message(OPENID, "ignored when data is given", options=options))
    token_call, send_call = api.calls
    assert token_call.method == "POST" and token_call.path == "/cgi-bin/stable_token"
    assert token_call.json() == {"grant_type": "client_credential", "appid": api.app_id, "secret": api.app_secret,
                                 "force_refresh": False}  # fmt: skip
    assert send_call.verified and send_call.method == "POST" and send_call.path == "/cgi-bin/message/template/send"
    assert send_call.query == {"access_token": api.token}
    assert send_call.json() == {
        "touser": OPENID,
        "template_id": "TPL_ORDER_0002",
        "client_msg_id": "msg_20261202_abcdef",
        "data": {
            "first": {"value": "Order shipped", "color": "#173177"},
            "keyword1": {"value": "A-1001"},
            "keyword2": {"value": "2 boxes"},
            "remark": {"value": "thanks"},
        },
        "url": "https://shop.example.com/o/1001",
        "miniprogram": {"appid": "wxaabbccddeeff0011", "pagepath": "pages/o?id=1001"},
    }
    assert result.provider_message_id == str(api._msgid)


async def test_default_template_and_data_from_message(api, http):
    plugin = mp(api, http, default_template_id="TPL_ALERT_0001")
    await plugin.send(message(OPENID, "disk full on db1", title="Alert"))
    assert api.calls[-1].json()["data"] == {"first": {"value": "Alert"}, "content": {"value": "disk full on db1"}}
    assert api.calls[-1].json()["template_id"] == "TPL_ALERT_0001" and api.calls[-1].verified


async def test_token_cached(api, http):
    plugin = mp(api, http, default_template_id="TPL_ALERT_0001")
    await plugin.send(message(OPENID))
    await plugin.send(message(OPENID, message_id="msg_2"))
    assert api.token_requests == 1 and len(api.sent) == 2


async def test_token_refreshed_before_expiry(api, http):
    now = [1_000_000.0]
    config = WeChatConfig(
        app_id=api.app_id, app_secret=api.app_secret, api_base=api.url, default_template_id="TPL_ALERT_0001"
    )
    plugin = WeChatTemplate(config, http, clock=lambda: now[0])
    await plugin.send(message(OPENID))
    now[0] += 7200 - 301  # still 5 minutes and 1 second before expiry: cached
    await plugin.send(message(OPENID, message_id="msg_2"))
    assert api.token_requests == 1
    now[0] += 2  # within the last 5 minutes: fetched again
    await plugin.send(message(OPENID, message_id="msg_3"))
    assert api.token_requests == 2


@pytest.mark.parametrize("how", ["expire_tokens", "invalidate_tokens"])
async def test_refresh_once_on_expired_or_invalid_token(api, http, how):
    plugin = mp(api, http, default_template_id="TPL_ALERT_0001")
    await plugin.send(message(OPENID))
    old = api.token
    getattr(api, how)()
    result = await plugin.send(message(OPENID, message_id="msg_2"))
    assert result.provider_message_id
    statuses = [(c.path, c.verified) for c in api.calls]
    assert statuses == [
        ("/cgi-bin/stable_token", True),
        ("/cgi-bin/message/template/send", True),
        ("/cgi-bin/message/template/send", False),  # 42001 / 40001
        ("/cgi-bin/stable_token", True),
        ("/cgi-bin/message/template/send", True),
    ]
    assert api.token != old and api.calls[-1].query == {"access_token": api.token}
    assert api.calls[2].problems == ["expired" if how == "expire_tokens" else "token"]


async def test_forced_refresh_when_same_token_handed_back(api, http):
    # The send refuses a token the stable endpoint still hands out in normal mode: the plugin
    # forces a new one (force_refresh true), once.
    plugin = mp(api, http, default_template_id="TPL_ALERT_0001")
    await plugin.send(message(OPENID))
    old = api.token
    api.revoke_token()
    result = await plugin.send(message(OPENID, message_id="msg_2"))
    assert result.provider_message_id and api.token != old and api.calls[-1].verified
    assert [c.json()["force_refresh"] for c in api.calls if c.path.endswith("stable_token")] == [False, False, True]
    assert api.calls[-1].query == {"access_token": api.token}


async def test_wrong_secret_and_appid(api, http):
    with pytest.raises(Permanent) as err:
        await mp(api, http, app_secret="ffffffffffffffffffffffffffffffff", default_template_id="TPL_ALERT_0001").send(
            message(OPENID)
        )
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault and "40125" in err.value.message
    assert "ffffffff" not in err.value.message
    with pytest.raises(Permanent) as err:
        await mp(api, http, app_id="wx0000000000000000", default_template_id="TPL_ALERT_0001").send(message(OPENID))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and "40013" in err.value.message
    assert not any(c.path.endswith("/send") for c in api.calls)


async def test_recipients(api, http):
    plugin = mp(api, http, default_template_id="TPL_ALERT_0001")
    for openid, code in (("oUNSUB1234efgh5678ijkl9012mn", "43004"), ("oNOBODY234efgh5678ijkl9012mn", "40003")):
        with pytest.raises(Permanent) as err:
            await plugin.send(message(openid))
        assert (
            err.value.code == ErrorCode.RECIPIENT_INVALID and not err.value.sender_fault and code in err.value.message
        )


async def test_template_errors(api, http):
    with pytest.raises(Permanent) as err:
        await mp(api, http).send(message(OPENID, options={"template_id": "TPL_UNKNOWN"}))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED and err.value.sender_fault and "40037" in err.value.message
    with pytest.raises(Permanent) as err:  # the template needs keyword1, keyword2 ...
        await mp(api, http).send(message(OPENID, options={"template_id": "TPL_ORDER_0002"}))
    assert (
        err.value.code == ErrorCode.CHANNEL_SEND_FAILED and not err.value.sender_fault and "47003" in err.value.message
    )


async def test_invalid_options(api, http):
    with pytest.raises(Permanent) as err:
        await mp(api, http).send(message(OPENID))
    assert "template_id" in err.value.message
    for options, name in (
        ({"template_id": "T", "data": {"k": {"value": "v", "color": "red"}}}, "color"),
        ({"template_id": "T", "url": "javascript:alert(1)"}, "url"),
        ({"template_id": "T", "data": {"1bad": "v"}}, "data"),
        ({"template_id": "T", "colour": "x"}, "colour"),
    ):
        with pytest.raises(Permanent) as err:
            await mp(api, http).send(message(OPENID, options=options))
        assert name in err.value.message and err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    assert api.calls == []


async def test_injected_failures(api, http):
    plugin = mp(api, http, default_template_id="TPL_ALERT_0001")
    api.fail("rate_limited")
    with pytest.raises(Retryable) as err:
        await plugin.send(message(OPENID))
    assert err.value.code == ErrorCode.RATE_LIMITED and err.value.retry_after == 60.0
    assert not isinstance(err.value, QuotaExceeded)

    api.fail("quota")
    with pytest.raises(QuotaExceeded) as err:
        await plugin.send(message(OPENID))
    assert err.value.code == ErrorCode.QUOTA_EXCEEDED and err.value.sender_fault

    api.fail("invalid_recipient")
    with pytest.raises(Permanent) as err:
        await plugin.send(message(OPENID))
    assert err.value.code == ErrorCode.RECIPIENT_INVALID and not err.value.sender_fault

    api.fail("auth")
    with pytest.raises(Permanent) as err:
        await plugin.send(message(OPENID))
    assert err.value.code == ErrorCode.PROVIDER_AUTH_FAILED and err.value.sender_fault

    api.fail("server_error")
    with pytest.raises(Retryable) as err:
        await plugin.send(message(OPENID))
    assert err.value.code == ErrorCode.CHANNEL_SEND_FAILED
    # The token endpoint consumed none of them: one token fetch, five injected sends.
    assert api.token_requests == 1
    assert [c.injected for c in api.calls if c.path.endswith("/send")] == [
        "rate_limited", "quota", "invalid_recipient", "auth", "server_error"
    ]  # fmt: skip


async def test_connection_refused(http):
    emu = WeChatMpApi()
    await emu.start()
    base = emu.url
    await emu.stop()
    config = WeChatConfig(app_id=emu.app_id, app_secret=emu.app_secret, api_base=base, default_template_id="T")
    with pytest.raises(Retryable):
        await WeChatTemplate(config, http).send(message(OPENID))


def test_config():
    with pytest.raises(ValidationError):
        WeChatConfig(app_id="not-an-appid", app_secret="0123456789abcdef0123456789abcdef")
    config = WeChatConfig(app_id="wx1234567890abcdef", app_secret="0123456789abcdef0123456789abcdef")
    assert config.api_base == "https://api.weixin.qq.com"
