"""Tencent Cloud SMS plugin against its emulator (tests/emulators/tencent.py)."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import httpx
import pytest

from services.senders.base import Permanent, Retryable
from services.senders.plugins import plugin
from services.senders.plugins.base import Card, CardField, Costs, QuotaExceeded
from services.senders.sms.tencent import (
    TencentSms,
    TencentSmsConfig,
    authorization,
    canonical_request,
    signature,
    string_to_sign,
)
from shared.errors import ErrorCode
from tests.emulators.tencent import TencentSmsEmulator
from tests.providers.conftest import message

SECRET_ID = "AKIDHeraldTestSecretId"
SECRET_KEY = "herald-test-secret-key"
APP_ID = "1400006666"

# The worked example of "签名方法 v3" (CVM DescribeInstances in ap-guangzhou, timestamp 1551113065).
DOC_PAYLOAD = b'{"Limit": 1, "Filters": [{"Values": ["\\u672a\\u547d\\u540d"], "Name": "instance-name"}]}'
DOC_HEADERS = {
    "Content-Type": "application/json; charset=utf-8",
    "Host": "cvm.tencentcloudapi.com",
    "X-TC-Action": "DescribeInstances",
}


def make(http: httpx.AsyncClient, emu: TencentSmsEmulator, secret: str = SECRET_KEY, clock=None) -> TencentSms:
    config = TencentSmsConfig(
        secret_id=SECRET_ID, secret_key=secret, sdk_app_id=APP_ID, sign_name="Herald", endpoint=emu.url
    )
    # The live clock by default: the emulator, like Tencent, refuses timestamps 5 minutes off.
    return TencentSms(config, http, clock=clock or time.time)


def sms(to: str = "+8613800138000", **options):
    return message(to, options={"template_code": "1110", **options})


# --- the documentation's worked example ------------------------------------------------------


def test_tc3_reproduces_the_worked_example_content_type_and_host():
    # The version of the example with SecretId AKIDz8krbsJ5yKBZQpn74WFkmLPx3******* and SecretKey
    # Gu5t9xGARNpq86cd98joQYCN3******* (masked as published), signing content-type;host.
    canonical = canonical_request("POST", "/", "", DOC_HEADERS, ["content-type", "host"], DOC_PAYLOAD)
    assert canonical == (
        "POST\n/\n\ncontent-type:application/json; charset=utf-8\nhost:cvm.tencentcloudapi.com\n\n"
        "content-type;host\n35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
    )
    to_sign = string_to_sign(1551113065, "cvm", canonical)
    assert to_sign == (
        "TC3-HMAC-SHA256\n1551113065\n2019-02-25/cvm/tc3_request\n"
        "5ffe6a04c0664d6b969fab9a13bdab201d63ee709638e2749d62a09ca18d7031"
    )
    sig = signature("Gu5t9xGARNpq86cd98joQYCN3*******", 1551113065, "cvm", to_sign)
    assert sig == "2230eefd229f582d8b1b891af7107b91597240707d778ab3738f756258d7652c"
    assert authorization(
        "AKIDz8krbsJ5yKBZQpn74WFkmLPx3*******", "Gu5t9xGARNpq86cd98joQYCN3*******", "cvm", 1551113065,
        DOC_HEADERS, DOC_PAYLOAD, signed=["content-type", "host"],
    ) == (
        "TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3*******/2019-02-25/cvm/tc3_request, "
        "SignedHeaders=content-type;host, Signature=2230eefd229f582d8b1b891af7107b91597240707d778ab3738f756258d7652c"
    )  # fmt: skip


def test_tc3_reproduces_the_current_worked_example_with_x_tc_action():
    # The current version of the page also signs x-tc-action (value lower-cased) and masks the
    # keys as 32 asterisks; the published signature is 10b1a37a...
    canonical = canonical_request("POST", "/", "", DOC_HEADERS, ["content-type", "host", "x-tc-action"], DOC_PAYLOAD)
    assert canonical == (
        "POST\n/\n\ncontent-type:application/json; charset=utf-8\nhost:cvm.tencentcloudapi.com\n"
        "x-tc-action:describeinstances\n\ncontent-type;host;x-tc-action\n"
        "35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
    )
    to_sign = string_to_sign(1551113065, "cvm", canonical)
    assert to_sign.endswith("\n7019a55be8395899b900fb5564e4200d984910f34794a27cb3fb7d10ff6a1e84")
    assert authorization("AKID" + "*" * 32, "*" * 32, "cvm", 1551113065, DOC_HEADERS, DOC_PAYLOAD) == (
        "TC3-HMAC-SHA256 Credential=AKID********************************/2019-02-25/cvm/tc3_request, "
        "SignedHeaders=content-type;host;x-tc-action, "
        "Signature=10b1a37a7301a02ca19a647ad722d5e43b4b3cff309d421d85b46093f6ab6c4f"
    )


def test_catalogue_points_here():
    assert plugin("sms", "tencent") is TencentSms


# --- a send over the wire --------------------------------------------------------------------


async def test_send_wire_format(http):
    async with TencentSmsEmulator(SECRET_ID, SECRET_KEY, sdk_app_id=APP_ID) as emu:
        now = int(time.time())
        result = await make(http, emu, clock=lambda: now).send(sms(params=["4370", 5]))
    [call] = emu.calls
    assert call.verified and not call.problems
    assert (call.method, call.path, call.query) == ("POST", "/", {})
    h = call.headers
    assert h["content-type"] == "application/json; charset=utf-8"
    assert h["host"] == f"127.0.0.1:{emu.port}"
    assert (h["x-tc-action"], h["x-tc-version"], h["x-tc-region"], h["x-tc-timestamp"]) == (
        "SendSms", "2021-01-11", "ap-guangzhou", str(now),
    )  # fmt: skip
    assert h["authorization"] == authorization(
        SECRET_ID, SECRET_KEY, "sms", now,
        {"Content-Type": h["content-type"], "Host": h["host"], "X-TC-Action": "SendSms"}, call.body,
    )  # fmt: skip
    assert h["authorization"].startswith(
        f"TC3-HMAC-SHA256 Credential={SECRET_ID}/{time.strftime('%Y-%m-%d', time.gmtime(now))}/sms/tc3_request, "
        "SignedHeaders=content-type;host;x-tc-action, Signature="
    )
    assert call.json() == {
        "PhoneNumberSet": ["+8613800138000"],
        "SmsSdkAppId": APP_ID,
        "TemplateId": "1110",
        "SessionContext": "msg_20261202_abcdef:1",
        "SignName": "Herald",
        "TemplateParamSet": ["4370", "5"],
    }
    assert result.provider_message_id == "5000:1045710669157053657800001"
    assert result.detail["fee"] == 1 and result.detail["iso_code"] == "CN"
    assert "13800138000" not in json.dumps(result.detail)


async def test_params_mapping_and_sign_name_option(http):
    async with TencentSmsEmulator(SECRET_ID, SECRET_KEY, sign_names={"Herald Ops"}) as emu:
        await make(http, emu).send(sms("+14155550100", params={"b": "2", "a": "1"}, sign_name="Herald Ops"))
    body = emu.calls[0].json()
    assert body["TemplateParamSet"] == ["2", "1"]  # the mapping's order
    assert body["SignName"] == "Herald Ops" and body["PhoneNumberSet"] == ["+14155550100"]
    assert emu.calls[0].verified


# --- credentials and classification ----------------------------------------------------------


async def test_wrong_secret_is_an_auth_failure(http):
    async with TencentSmsEmulator(SECRET_ID, SECRET_KEY) as emu:
        with pytest.raises(Permanent) as info:
            await make(http, emu, secret="not-the-key").send(sms())
    assert info.value.code == ErrorCode.PROVIDER_AUTH_FAILED and info.value.sender_fault
    assert "not-the-key" not in str(info.value)
    [call] = emu.calls
    assert not call.verified and call.problems[0].startswith("AuthFailure.SignatureFailure")


async def test_skewed_clock_is_an_expired_signature(http):
    async with TencentSmsEmulator(SECRET_ID, SECRET_KEY) as emu:
        with pytest.raises(Permanent) as info:
            await make(http, emu, clock=lambda: time.time() - 600).send(sms())
    assert info.value.code == ErrorCode.PROVIDER_AUTH_FAILED and info.value.sender_fault
    assert emu.calls[0].problems[0].startswith("AuthFailure.SignatureExpire")


async def test_unapproved_template_is_the_providers_fault(http):
    async with TencentSmsEmulator(SECRET_ID, SECRET_KEY, templates={"9999"}) as emu:
        with pytest.raises(Permanent) as info:
            await make(http, emu).send(sms())
    assert info.value.code == ErrorCode.CHANNEL_SEND_FAILED and info.value.sender_fault


async def test_injected_failures(http):
    async with TencentSmsEmulator(SECRET_ID, SECRET_KEY) as emu:
        plug = make(http, emu)

        emu.fail("rate_limited")
        with pytest.raises(Retryable) as info:
            await plug.send(sms())
        assert info.value.code == ErrorCode.RATE_LIMITED and info.value.retry_after == 30.0
        assert info.value.sender_fault

        emu.fail("quota")
        with pytest.raises(QuotaExceeded):
            await plug.send(sms())

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

        assert (await plug.send(sms())).provider_message_id
    injected = [c.injected for c in emu.calls]
    assert injected == ["rate_limited", "quota", "invalid_recipient", "server_error", "auth", None]
    assert all(c.verified for c in emu.calls)


def _status(code: str) -> httpx.Response:
    return httpx.Response(200, json={"Response": {"SendStatusSet": [{"Code": code, "Message": "m", "SerialNo": ""}],
                                                  "RequestId": "r"}})  # fmt: skip


def _error(code: str) -> httpx.Response:
    return httpx.Response(200, json={"Response": {"Error": {"Code": code, "Message": "m"}, "RequestId": "r"}})


@pytest.mark.parametrize(
    ("response", "kind", "error_code", "sender_fault", "retry_after"),
    [
        (_status("LimitExceeded.PhoneNumberOneHourLimit"), Retryable, ErrorCode.RATE_LIMITED, True, 3600.0),
        (_status("LimitExceeded.PhoneNumberDailyLimit"), Retryable, ErrorCode.RATE_LIMITED, True, 86400.0),
        (_error("RequestLimitExceeded"), Retryable, ErrorCode.RATE_LIMITED, True, 1.0),
        (_status("LimitExceeded.AppDailyLimit"), QuotaExceeded, ErrorCode.QUOTA_EXCEEDED, True, None),
        (_error("UnauthorizedOperation.SerivceSuspendDueToArrears"), QuotaExceeded, ErrorCode.QUOTA_EXCEEDED, True,
         None),
        (_status("FailedOperation.PhoneNumberInBlacklist"), Permanent, ErrorCode.RECIPIENT_INVALID, False, None),
        (_error("AuthFailure.SignatureFailure"), Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True, None),
        (_error("UnauthorizedOperation.SmsSdkAppIdVerifyFail"), Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True,
         None),
        (_status("FailedOperation.SignatureIncorrectOrUnapproved"), Permanent, ErrorCode.CHANNEL_SEND_FAILED, True,
         None),
        (_status("FailedOperation.ContainSensitiveWord"), Permanent, ErrorCode.CHANNEL_SEND_FAILED, False, None),
        (_error("InternalError.Timeout"), Retryable, ErrorCode.CHANNEL_SEND_FAILED, True, None),
        (httpx.Response(502, text="bad gateway"), Retryable, ErrorCode.CHANNEL_SEND_FAILED, True, None),
    ],
)
def test_error_codes(response, kind, error_code, sender_fault, retry_after):
    plug = TencentSms(TencentSmsConfig(secret_id=SECRET_ID, secret_key=SECRET_KEY, sdk_app_id=APP_ID), None)
    with pytest.raises(kind) as info:
        plug.parse(sms(), response)
    assert type(info.value) is kind
    assert info.value.code == error_code and info.value.sender_fault is sender_fault
    if retry_after is not None:
        assert info.value.retry_after == retry_after


async def test_emulator_down_is_retryable(http):
    emu = TencentSmsEmulator(SECRET_ID, SECRET_KEY)
    await emu.start()
    plug = make(http, emu)
    await emu.stop()
    with pytest.raises(Retryable) as info:
        await plug.send(sms())
    assert info.value.code == ErrorCode.CHANNEL_SEND_FAILED


# --- content and options ---------------------------------------------------------------------


async def test_formats_with_content(http):
    card = Card(title="Disk full", text="db-1 at 97%", fields=[CardField(title="host", value="db-1")])
    cases = [
        (message("+8613800138000", "plain text"), "plain text"),
        (message("+8613800138000", "**bold**", format="markdown", title="Alert"), "Alert\n**bold**"),
        (message("+8613800138000", "", format="card", card=card), "Disk full\ndb-1 at 97%\nhost: db-1"),
    ]
    async with TencentSmsEmulator(SECRET_ID, SECRET_KEY) as emu:
        for msg, _ in cases:
            msg.options = {"template_code": "1110", "params": ["x"], "with_content": True}
            await make(http, emu).send(msg)
    assert [c.json()["TemplateParamSet"] for c in emu.calls] == [["x", text] for _, text in cases]
    assert all(c.verified for c in emu.calls)


async def test_no_params_no_param_set(http):
    async with TencentSmsEmulator(SECRET_ID, SECRET_KEY) as emu:
        await make(http, emu).send(sms())
    assert "TemplateParamSet" not in emu.calls[0].json()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({}, "template_code"),
        ({"template_code": "1110", "params": "4370"}, "params"),
        ({"template_code": "1110", "params": [None]}, "params"),
        ({"template_code": "1110", "with_content": "maybe"}, "with_content"),
    ],
)
def test_invalid_options_name_the_option(options, named):
    plug = TencentSms(TencentSmsConfig(secret_id=SECRET_ID, secret_key=SECRET_KEY, sdk_app_id=APP_ID), None)
    with pytest.raises(Permanent) as info:
        plug.build(message("+8613800138000", options=options))
    assert info.value.code == ErrorCode.CHANNEL_SEND_FAILED and not info.value.sender_fault
    assert f"'{named}'" in str(info.value)


def test_config():
    config = TencentSmsConfig(secret_id=SECRET_ID, secret_key=SECRET_KEY, sdk_app_id=APP_ID)
    assert SECRET_KEY not in repr(config) and SECRET_KEY not in config.model_dump_json()
    assert (config.endpoint, config.region) == ("https://sms.tencentcloudapi.com", "ap-guangzhou")
    call = TencentSms(config, None, clock=lambda: 1551113065).build(sms())
    assert call.url == "https://sms.tencentcloudapi.com/"
    assert call.headers["Host"] == "sms.tencentcloudapi.com"
    assert "/2019-02-25/sms/tc3_request" in call.headers["Authorization"]


def test_cost_by_country():
    costs = Costs(by_country={"86": Decimal("0.05"), "1": Decimal("0.06")})
    assert TencentSms.cost(costs, "+8613800138000") == Decimal("0.05")
    assert TencentSms.cost(costs, "+14155550100") == Decimal("0.06")
    assert TencentSms.cost(costs, "+33612345678") == TencentSms.default_cost
