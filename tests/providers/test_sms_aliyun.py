"""Aliyun SMS plugin against its emulator (tests/emulators/aliyun.py)."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from urllib.parse import parse_qsl

import httpx
import pytest

from services.senders.base import Permanent, Retryable
from services.senders.plugins import plugin
from services.senders.plugins.base import Card, CardField, Costs, QuotaExceeded
from services.senders.sms.aliyun import AliyunSms, AliyunSmsConfig, phone_number, sign, string_to_sign
from shared.errors import ErrorCode
from tests.emulators.aliyun import AliyunSmsEmulator
from tests.providers.conftest import message

KEY_ID = "LTAI5tHeraldTestKey"
SECRET = "herald-test-secret"


def make(http: httpx.AsyncClient, emu: AliyunSmsEmulator, secret: str = SECRET, nonce: str = "nonce-1") -> AliyunSms:
    config = AliyunSmsConfig(
        access_key_id=KEY_ID, access_key_secret=secret, sign_name="Herald", endpoint=emu.url + "/"
    )
    now = float(int(time.time()))  # pinned per plugin, current: the emulator checks the time window
    return AliyunSms(config, http, clock=lambda: now, nonce=lambda: nonce)


def form(call) -> dict[str, str]:
    return dict(parse_qsl(call.body.decode(), keep_blank_values=True))


def sms(to: str = "+8613800138000", **options):
    return message(to, options={"template_code": "SMS_154950909", **options})


# --- the documentation's worked examples -----------------------------------------------------


def test_signature_reproduces_the_rpc_worked_example():
    # "Request syntax and signature method V2 for RPC APIs" (ECS DescribeRegions; AccessKeyId
    # testid, AccessKeySecret testsecret): signing key "testsecret&", signature
    # CT9X0VtwR86fNWSnsc6v8YGOjuE=. (Some copies of the page print the StringToSign with "&"
    # where "%26" belongs; the published signature is the HMAC of the %26 form below.)
    params = {
        "TimeStamp": "2016-02-23T12:46:24Z",
        "Format": "XML",
        "AccessKeyId": "testid",
        "Action": "DescribeRegions",
        "SignatureMethod": "HMAC-SHA1",
        "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
        "Version": "2014-05-26",
        "SignatureVersion": "1.0",
    }
    assert string_to_sign("GET", params) == (
        "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions%26Format%3DXML%26SignatureMethod%3DHMAC-SHA1"
        "%26SignatureNonce%3D3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf%26SignatureVersion%3D1.0"
        "%26TimeStamp%3D2016-02-23T12%253A46%253A24Z%26Version%3D2014-05-26"
    )
    assert sign("testsecret", "GET", params) == "CT9X0VtwR86fNWSnsc6v8YGOjuE="


def test_signature_reproduces_the_sms_worked_example():
    # The SMS guide's SendSms example (AccessKeyId testId, AccessKeySecret testSecret, signature
    # zJDF+Lrzhj/ThnlvIToysFRq6t4=): UTF-8 sign name, JSON template param, colons in the time.
    params = {
        "AccessKeyId": "testId",
        "Action": "SendSms",
        "Format": "XML",
        "OutId": "123",
        "PhoneNumbers": "15300000001",
        "RegionId": "cn-hangzhou",
        "SignName": "阿里云短信测试专用",
        "SignatureMethod": "HMAC-SHA1",
        "SignatureNonce": "45e25e9b-0a6f-4070-8c85-2956eda1b466",
        "SignatureVersion": "1.0",
        "TemplateCode": "SMS_71390007",
        "TemplateParam": '{"customer":"test"}',
        "Timestamp": "2017-07-12T02:42:19Z",
        "Version": "2017-05-25",
    }
    assert string_to_sign("GET", params) == (
        "GET&%2F&AccessKeyId%3DtestId%26Action%3DSendSms%26Format%3DXML%26OutId%3D123%26PhoneNumbers%3D15300000001"
        "%26RegionId%3Dcn-hangzhou%26SignName%3D%25E9%2598%25BF%25E9%2587%258C%25E4%25BA%2591%25E7%259F%25AD"
        "%25E4%25BF%25A1%25E6%25B5%258B%25E8%25AF%2595%25E4%25B8%2593%25E7%2594%25A8%26SignatureMethod%3DHMAC-SHA1"
        "%26SignatureNonce%3D45e25e9b-0a6f-4070-8c85-2956eda1b466%26SignatureVersion%3D1.0"
        "%26TemplateCode%3DSMS_71390007%26TemplateParam%3D%257B%2522customer%2522%253A%2522test%2522%257D"
        "%26Timestamp%3D2017-07-12T02%253A42%253A19Z%26Version%3D2017-05-25"
    )
    assert sign("testSecret", "GET", params) == "zJDF+Lrzhj/ThnlvIToysFRq6t4="


def test_percent_encoding_of_space_star_and_tilde():
    # "空格编码成%20，而不是加号(+)"; "*" -> %2A; "~" stays.
    assert string_to_sign("POST", {"a": "x y*~"}) == "POST&%2F&a%3Dx%2520y%252A~"


def test_catalogue_points_here():
    assert plugin("sms", "aliyun") is AliyunSms


# --- a send over the wire --------------------------------------------------------------------


async def test_send_wire_format(http):
    async with AliyunSmsEmulator(KEY_ID, SECRET) as emu:
        plug = make(http, emu)
        result = await plug.send(sms(params={"code": "1234", "minutes": 5}))
    [call] = emu.calls
    assert call.verified and call.status == 200 and not call.problems
    assert (call.method, call.path, call.query) == ("POST", "/", {})
    assert call.headers["content-type"] == "application/x-www-form-urlencoded"
    sent = form(call)
    signature = sent.pop("Signature")
    assert sent == {
        "AccessKeyId": KEY_ID,
        "Action": "SendSms",
        "Format": "JSON",
        "OutId": "msg_20261202_abcdef:1",
        "PhoneNumbers": "13800138000",
        "RegionId": "cn-hangzhou",
        "SignName": "Herald",
        "SignatureMethod": "HMAC-SHA1",
        "SignatureNonce": "nonce-1",
        "SignatureVersion": "1.0",
        "TemplateCode": "SMS_154950909",
        "TemplateParam": '{"code":"1234","minutes":"5"}',
        "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(plug.clock())),
        "Version": "2017-05-25",
    }
    assert signature == sign(SECRET, "POST", sent)
    assert result.provider_message_id == "9006197469364984001^0"
    assert result.detail["request_id"]
    assert "13800138000" not in json.dumps(result.detail)


@pytest.mark.parametrize(
    ("to", "sent"),
    [("+8613800138000", "13800138000"), ("+85291234567", "85291234567"), ("+14155550100", "14155550100")],
)
async def test_recipient_forms(http, to, sent):
    assert phone_number(to) == sent
    async with AliyunSmsEmulator(KEY_ID, SECRET) as emu:
        await make(http, emu).send(sms(to))
    assert form(emu.calls[0])["PhoneNumbers"] == sent
    assert emu.calls[0].verified


async def test_sign_name_option_overrides_the_configured_one(http):
    async with AliyunSmsEmulator(KEY_ID, SECRET, sign_names={"Herald Ops"}) as emu:
        await make(http, emu).send(sms(sign_name="Herald Ops"))
    assert form(emu.calls[0])["SignName"] == "Herald Ops"
    assert emu.calls[0].verified


# --- credentials and classification ----------------------------------------------------------


async def test_wrong_secret_is_an_auth_failure(http):
    async with AliyunSmsEmulator(KEY_ID, SECRET) as emu:
        with pytest.raises(Permanent) as info:
            await make(http, emu, secret="not-the-secret").send(sms())
    assert info.value.code == ErrorCode.PROVIDER_AUTH_FAILED and info.value.sender_fault
    assert "not-the-secret" not in str(info.value)
    [call] = emu.calls
    assert not call.verified and call.status == 400
    assert call.problems[0].startswith("SignatureDoesNotMatch")


async def test_replayed_nonce_is_refused_then_retryable(http):
    async with AliyunSmsEmulator(KEY_ID, SECRET) as emu:
        plug = make(http, emu, nonce="same-nonce")
        await plug.send(sms())
        with pytest.raises(Retryable) as info:
            await plug.send(sms())
    assert emu.calls[1].problems[0].startswith("SignatureNonceUsed")
    assert not isinstance(info.value, QuotaExceeded)


async def test_unapproved_template_is_the_providers_fault(http):
    async with AliyunSmsEmulator(KEY_ID, SECRET, template_codes={"SMS_1"}) as emu:
        with pytest.raises(Permanent) as info:
            await make(http, emu).send(sms())
    assert info.value.code == ErrorCode.CHANNEL_SEND_FAILED and info.value.sender_fault
    assert "isv.SMS_TEMPLATE_ILLEGAL" in str(info.value)


async def test_injected_failures(http):
    async with AliyunSmsEmulator(KEY_ID, SECRET) as emu:
        plug = make(http, emu)
        nonces = iter(range(100))
        plug.nonce = lambda: f"n{next(nonces)}"

        emu.fail("rate_limited")
        with pytest.raises(Retryable) as info:
            await plug.send(sms())
        assert info.value.code == ErrorCode.RATE_LIMITED and info.value.retry_after == 60.0
        assert info.value.sender_fault

        emu.fail("quota")
        with pytest.raises(QuotaExceeded) as info:
            await plug.send(sms())
        assert info.value.code == ErrorCode.QUOTA_EXCEEDED

        emu.fail("invalid_recipient")
        with pytest.raises(Permanent) as info:
            await plug.send(sms())
        assert info.value.code == ErrorCode.RECIPIENT_INVALID and not info.value.sender_fault

        emu.fail("server_error")
        with pytest.raises(Retryable) as info:
            await plug.send(sms())
        assert info.value.code == ErrorCode.CHANNEL_SEND_FAILED and not isinstance(info.value, QuotaExceeded)

        emu.fail("auth")
        with pytest.raises(Permanent) as info:
            await plug.send(sms())
        assert info.value.code == ErrorCode.PROVIDER_AUTH_FAILED and info.value.sender_fault

        result = await plug.send(sms())  # recovered
    assert result.provider_message_id
    injected = [c.injected for c in emu.calls]
    assert injected == ["rate_limited", "quota", "invalid_recipient", "server_error", "auth", None]
    assert all(c.verified for c in emu.calls)


@pytest.mark.parametrize(
    ("code", "status", "text", "kind", "error_code", "sender_fault", "retry_after"),
    [
        ("isv.BUSINESS_LIMIT_CONTROL", 200, "触发小时级流控Permits:5", Retryable, ErrorCode.RATE_LIMITED, True, 3600.0),
        ("isv.BUSINESS_LIMIT_CONTROL", 200, "触发天级流控Permits:10", Retryable, ErrorCode.RATE_LIMITED, True, 86400.0),
        ("Throttling.User", 400, "Request was denied due to user flow control.", Retryable, ErrorCode.RATE_LIMITED,
         True, 1.0),
        ("isv.DAY_LIMIT_CONTROL", 200, "触发日发送限额", QuotaExceeded, ErrorCode.QUOTA_EXCEEDED, True, None),
        ("isv.OUT_OF_SERVICE", 200, "业务停机", QuotaExceeded, ErrorCode.QUOTA_EXCEEDED, True, None),
        ("isv.ACCOUNT_NOT_EXISTS", 200, "账户不存在", Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True, None),
        ("isv.SMS_SIGNATURE_ILLEGAL", 200, "签名不合法", Permanent, ErrorCode.CHANNEL_SEND_FAILED, True, None),
        ("isv.BLACK_KEY_CONTROL_LIMIT", 200, "黑名单管控", Permanent, ErrorCode.RECIPIENT_INVALID, False, None),
        ("isv.TEMPLATE_MISSING_PARAMETERS", 200, "模板缺少变量", Permanent, ErrorCode.CHANNEL_SEND_FAILED, False,
         None),
        ("isp.SYSTEM_ERROR", 200, "系统错误", Retryable, ErrorCode.CHANNEL_SEND_FAILED, True, None),
    ],
)
def test_error_codes(code, status, text, kind, error_code, sender_fault, retry_after):
    response = httpx.Response(status, json={"Code": code, "Message": text, "RequestId": "R"})
    plug = AliyunSms(AliyunSmsConfig(access_key_id=KEY_ID, access_key_secret=SECRET, sign_name="H"), None)
    with pytest.raises(kind) as info:
        plug.parse(sms(), response)
    assert type(info.value) is kind
    assert info.value.code == error_code and info.value.sender_fault is sender_fault
    if retry_after is not None:
        assert info.value.retry_after == retry_after


async def test_emulator_down_is_retryable(http):
    emu = AliyunSmsEmulator(KEY_ID, SECRET)
    await emu.start()
    plug = make(http, emu)
    await emu.stop()
    with pytest.raises(Retryable) as info:
        await plug.send(sms())
    assert info.value.code == ErrorCode.CHANNEL_SEND_FAILED and info.value.sender_fault


# --- content and options ---------------------------------------------------------------------


async def test_formats_fill_the_content_param(http):
    card = Card(title="Disk full", text="**db-1** at 97%", fields=[CardField(title="host", value="db-1")],
                url="https://ops.example.com/d/1")  # fmt: skip
    cases = [
        (message("+8613800138000", "plain text", options={}), "plain text"),
        (message("+8613800138000", "**bold** _md_", format="markdown", title="Alert"), "Alert\n**bold** _md_"),
        (message("+8613800138000", "", format="card", card=card),
         "Disk full\n**db-1** at 97%\nhost: db-1\nhttps://ops.example.com/d/1"),
    ]  # fmt: skip
    async with AliyunSmsEmulator(KEY_ID, SECRET) as emu:
        for i, (msg, _) in enumerate(cases):
            msg.options = {"template_code": "SMS_1", "content_param": "content", "params": {"n": i}}
            await make(http, emu, nonce=f"n{i}").send(msg)
    for i, (call, (_, text)) in enumerate(zip(emu.calls, cases, strict=True)):
        assert call.verified
        assert json.loads(form(call)["TemplateParam"]) == {"n": str(i), "content": text}


async def test_without_params_no_template_param_is_sent(http):
    async with AliyunSmsEmulator(KEY_ID, SECRET) as emu:
        await make(http, emu).send(sms())
    assert "TemplateParam" not in form(emu.calls[0])


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({}, "template_code"),
        ({"template_code": ""}, "template_code"),
        ({"template_code": "SMS_1", "params": ["a"]}, "params"),
        ({"template_code": "SMS_1", "params": {"a": True}}, "params"),
        ({"template_code": "SMS_1", "sign_name": ""}, "sign_name"),
    ],
)
def test_invalid_options_name_the_option(options, named):
    plug = AliyunSms(AliyunSmsConfig(access_key_id=KEY_ID, access_key_secret=SECRET, sign_name="H"), None)
    with pytest.raises(Permanent) as info:
        plug.build(message("+8613800138000", options=options))
    assert info.value.code == ErrorCode.CHANNEL_SEND_FAILED and not info.value.sender_fault
    assert f"'{named}'" in str(info.value)


def test_options_for_other_providers_are_ignored():
    plug = AliyunSms(AliyunSmsConfig(access_key_id=KEY_ID, access_key_secret=SECRET, sign_name="H"), None)
    call = plug.build(message("+8613800138000", options={"template_code": "SMS_1", "with_content": True}))
    assert call.form["TemplateCode"] == "SMS_1"


def test_secret_is_a_secret():
    config = AliyunSmsConfig(access_key_id=KEY_ID, access_key_secret=SECRET, sign_name="H")
    assert SECRET not in repr(config) and SECRET not in config.model_dump_json()
    assert config.endpoint == "https://dysmsapi.aliyuncs.com/"


def test_cost_by_country():
    costs = Costs(by_country={"86": Decimal("0.045"), "1": Decimal("0.0079"), "852": Decimal("0.35")})
    assert AliyunSms.cost(costs, "+8613800138000") == Decimal("0.045")
    assert AliyunSms.cost(costs, "+14155550100") == Decimal("0.0079")
    assert AliyunSms.cost(costs, "+85291234567") == Decimal("0.35")
    assert AliyunSms.cost(costs, "+447700900123") == AliyunSms.default_cost == Decimal("0.045")
    assert AliyunSms.cost(Costs(default=Decimal("0.05"), by_country=costs.by_country), "+447700900123") == Decimal(
        "0.05"
    )
    assert AliyunSms.cost(None, "+8613800138000") == Decimal("0.045")
