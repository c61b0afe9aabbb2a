"""Huawei Cloud SMS plugin against its emulator (tests/emulators/huawei.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from decimal import Decimal
from urllib.parse import parse_qsl

import httpx
import pytest

from services.senders.base import Permanent, Retryable
from services.senders.plugins import plugin
from services.senders.plugins.base import Card, Costs, QuotaExceeded
from services.senders.sms.huawei import HuaweiSms, HuaweiSmsConfig, password_digest, wsse_header
from shared.errors import ErrorCode
from tests.emulators.huawei import HuaweiSmsEmulator
from tests.providers.conftest import message

APP_KEY = "c8RWg3ggEcydHeraldTestKey"
APP_SECRET = "herald-test-app-secret"
SENDER = "8824110605000"
NONCE = "66C92B11FF8A425FB8D4CCFE0ED9ED1F"


def make(http, emu: HuaweiSmsEmulator, secret: str = APP_SECRET, clock=None, **extra) -> HuaweiSms:
    config = HuaweiSmsConfig(app_key=APP_KEY, app_secret=secret, sender=SENDER, endpoint=emu.url, **extra)
    now = float(int(time.time()))  # pinned per plugin, current: the emulator checks the time window
    return HuaweiSms(config, http, clock=clock or (lambda: now), nonce=lambda: NONCE)


def form(call) -> dict[str, str]:
    return dict(parse_qsl(call.body.decode(), keep_blank_values=True))


def sms(to: str = "+8613800138000", **options):
    return message(to, options={"template_code": "8ff55eac1d0b478ab3c06c3c6a492300", **options})


# --- X-WSSE ----------------------------------------------------------------------------------


def test_password_digest_follows_the_documented_formula():
    # "PasswordDigest = Base64 (SHA256 (Nonce + Created + Password))" -- the docs publish no
    # worked value, so the formula is spelled out here with the documentation's sample nonce
    # and Created (66C92B11FF8A425FB8D4CCFE0ED9ED1F, 2018-02-12T15:30:20Z).
    digest = password_digest(NONCE, "2018-02-12T15:30:20Z", "secret")
    assert digest == base64.b64encode(
        hashlib.sha256(b"66C92B11FF8A425FB8D4CCFE0ED9ED1F2018-02-12T15:30:20Zsecret").digest()
    ).decode()
    # the same value from outside Python: printf '%s' '<nonce><created>secret' | openssl dgst -sha256 -binary | base64
    assert digest == "kDRNkr5dAqha/R7NU4vr6Wa8ZDA0j5Z+VAc6XZ0Vm2k="
    assert wsse_header("key", "secret", NONCE, "2018-02-12T15:30:20Z") == (
        f'UsernameToken Username="key",PasswordDigest="{digest}",Nonce="{NONCE}",Created="2018-02-12T15:30:20Z"'
    )


def test_catalogue_points_here():
    assert plugin("sms", "huawei") is HuaweiSms


# --- a send over the wire --------------------------------------------------------------------


async def test_send_wire_format(http):
    async with HuaweiSmsEmulator(APP_KEY, APP_SECRET, sender=SENDER) as emu:
        plug = make(http, emu, signature="华为云短信测试", status_callback="https://hooks.example.com/sms")
        result = await plug.send(sms(params=["3", "人民公园正门"]))
    [call] = emu.calls
    assert call.verified and call.status == 200 and not call.problems
    assert (call.method, call.path, call.query) == ("POST", "/sms/batchSendSms/v1", {})
    assert call.headers["content-type"] == "application/x-www-form-urlencoded"
    assert call.headers["authorization"] == 'WSSE realm="SDP",profile="UsernameToken",type="Appkey"'
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(plug.clock()))
    assert call.headers["x-wsse"] == (
        f'UsernameToken Username="{APP_KEY}",PasswordDigest="{password_digest(NONCE, stamp, APP_SECRET)}",'
        f'Nonce="{NONCE}",Created="{stamp}"'
    )
    assert form(call) == {
        "from": SENDER,
        "to": "+8613800138000",
        "templateId": "8ff55eac1d0b478ab3c06c3c6a492300",
        "templateParas": '["3", "人民公园正门"]',
        "statusCallback": "https://hooks.example.com/sms",
        "signature": "华为云短信测试",
    }
    assert re.fullmatch(r"4b4b34e7-1a9e-42ac-b309-d10997148905_\d+", result.provider_message_id)
    assert result.detail == {"country": "CN"}


async def test_minimal_form(http):
    async with HuaweiSmsEmulator(APP_KEY, APP_SECRET, sender=SENDER) as emu:
        await make(http, emu).send(sms("+14155550100"))
    template = "8ff55eac1d0b478ab3c06c3c6a492300"
    assert form(emu.calls[0]) == {"from": SENDER, "to": "+14155550100", "templateId": template}
    assert emu.calls[0].verified


# --- credentials and classification ----------------------------------------------------------


async def test_wrong_secret_is_an_auth_failure(http):
    async with HuaweiSmsEmulator(APP_KEY, APP_SECRET, sender=SENDER) as emu:
        with pytest.raises(Permanent) as info:
            await make(http, emu, secret="not-the-secret").send(sms())
    assert info.value.code == ErrorCode.PROVIDER_AUTH_FAILED and info.value.sender_fault
    assert "not-the-secret" not in str(info.value)
    [call] = emu.calls
    assert not call.verified and call.status == 401 and call.problems[0].startswith("E000101")


async def test_created_a_day_off_is_refused(http):
    async with HuaweiSmsEmulator(APP_KEY, APP_SECRET, sender=SENDER) as emu:
        with pytest.raises(Permanent) as info:
            await make(http, emu, clock=lambda: time.time() - 25 * 3600).send(sms())
    assert info.value.code == ErrorCode.PROVIDER_AUTH_FAILED
    assert emu.calls[0].problems[0].startswith("E000110")


async def test_wrong_channel_number_is_the_providers_fault(http):
    async with HuaweiSmsEmulator(APP_KEY, APP_SECRET, sender="1069000000") as emu:
        with pytest.raises(Permanent) as info:
            await make(http, emu).send(sms())
    assert info.value.code == ErrorCode.CHANNEL_SEND_FAILED and info.value.sender_fault
    assert "E200018" in str(info.value)


async def test_injected_failures(http):
    async with HuaweiSmsEmulator(APP_KEY, APP_SECRET, sender=SENDER) as emu:
        plug = make(http, emu)

        emu.fail("rate_limited")
        with pytest.raises(Retryable) as info:
            await plug.send(sms())
        assert info.value.code == ErrorCode.RATE_LIMITED and info.value.retry_after == 600.0
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


def _answer(status: int, code: str, per_number: str | None = None) -> httpx.Response:
    body: dict = {"code": code, "description": "d"}
    if per_number:
        body["result"] = [{"originTo": "+8613800138000", "smsMsgId": "", "status": per_number}]
    return httpx.Response(status, json=body)


@pytest.mark.parametrize(
    ("response", "kind", "error_code", "sender_fault"),
    [
        (_answer(400, "E000000"), Permanent, ErrorCode.CHANNEL_SEND_FAILED, False),
        (_answer(400, "E000503"), Permanent, ErrorCode.CHANNEL_SEND_FAILED, False),
        (_answer(401, "E000102"), Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True),
        (_answer(401, "E000112"), Permanent, ErrorCode.PROVIDER_AUTH_FAILED, True),
        (_answer(403, "E000620"), Permanent, ErrorCode.CHANNEL_SEND_FAILED, True),
        (_answer(403, "E000630"), QuotaExceeded, ErrorCode.QUOTA_EXCEEDED, True),
        (_answer(200, "E000510", "E200028"), Permanent, ErrorCode.CHANNEL_SEND_FAILED, False),
        (_answer(200, "E000510", "E200030"), Permanent, ErrorCode.CHANNEL_SEND_FAILED, True),
        (_answer(200, "E000510", "E200022"), Permanent, ErrorCode.RECIPIENT_INVALID, False),
        (httpx.Response(503, text="busy"), Retryable, ErrorCode.CHANNEL_SEND_FAILED, True),
    ],
)
def test_error_codes(response, kind, error_code, sender_fault):
    plug = HuaweiSms(HuaweiSmsConfig(app_key=APP_KEY, app_secret=APP_SECRET, sender=SENDER), None)
    with pytest.raises(kind) as info:
        plug.parse(sms(), response)
    assert type(info.value) is kind
    assert info.value.code == error_code and info.value.sender_fault is sender_fault


async def test_emulator_down_is_retryable(http):
    emu = HuaweiSmsEmulator(APP_KEY, APP_SECRET, sender=SENDER)
    await emu.start()
    plug = make(http, emu)
    await emu.stop()
    with pytest.raises(Retryable) as info:
        await plug.send(sms())
    assert info.value.code == ErrorCode.CHANNEL_SEND_FAILED


# --- content and options ---------------------------------------------------------------------


async def test_formats_with_content(http):
    cases = [
        (message("+8613800138000", "plain text"), "plain text"),
        (message("+8613800138000", "## heading", format="markdown"), "## heading"),
        (message("+8613800138000", "", format="card", card=Card(title="Backup done", text="42 GB")),
         "Backup done\n42 GB"),
    ]  # fmt: skip
    async with HuaweiSmsEmulator(APP_KEY, APP_SECRET, sender=SENDER) as emu:
        for msg, _ in cases:
            msg.options = {"template_code": "t1", "params": {"n": 7}, "with_content": True}
            await make(http, emu).send(msg)
    assert [json.loads(form(c)["templateParas"]) for c in emu.calls] == [["7", text] for _, text in cases]
    assert all(c.verified for c in emu.calls)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({}, "template_code"),
        ({"template_code": "x" * 33}, "template_code"),
        ({"template_code": "t1", "params": [True]}, "params"),
        ({"template_code": "t1", "sign_name": ""}, "sign_name"),
    ],
)
def test_invalid_options_name_the_option(options, named):
    plug = HuaweiSms(HuaweiSmsConfig(app_key=APP_KEY, app_secret=APP_SECRET, sender=SENDER), None)
    with pytest.raises(Permanent) as info:
        plug.build(message("+8613800138000", options=options))
    assert info.value.code == ErrorCode.CHANNEL_SEND_FAILED and not info.value.sender_fault
    assert f"'{named}'" in str(info.value)


def test_config():
    config = HuaweiSmsConfig(app_key=APP_KEY, app_secret=APP_SECRET, sender=SENDER)
    assert APP_SECRET not in repr(config) and APP_SECRET not in config.model_dump_json()
    call = HuaweiSms(config, None, nonce=lambda: "a-b_c").build(sms())
    assert call.url == "https://smsapi.cn-north-4.myhuaweicloud.com:443/sms/batchSendSms/v1"
    assert 'Nonce="abc"' in call.headers["X-WSSE"]  # only letters and digits


def test_cost_by_country():
    costs = Costs(default=Decimal("0.04"), by_country={"86": Decimal("0.045")})
    assert HuaweiSms.cost(costs, "+8613800138000") == Decimal("0.045")
    assert HuaweiSms.cost(costs, "+6591234567") == Decimal("0.04")
    assert HuaweiSms.cost(None, "+6591234567") == HuaweiSms.default_cost


async def test_emulator_accepts_the_samples_hex_digest_variant(http):
    # Huawei's Python/PHP samples Base64-encode the hex string of the SHA-256 digest (the Java
    # sample and the API reference the raw digest); the service accepts both, so does the emulator.
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    hexed = base64.b64encode(hashlib.sha256(f"{NONCE}{stamp}{APP_SECRET}".encode()).hexdigest().encode()).decode()
    async with HuaweiSmsEmulator(APP_KEY, APP_SECRET, sender=SENDER) as emu:
        response = await http.post(
            emu.url + "/sms/batchSendSms/v1",
            data={"from": SENDER, "to": "+8613800138000", "templateId": "t1"},
            headers={
                "Authorization": 'WSSE realm="SDP",profile="UsernameToken",type="Appkey"',
                "X-WSSE": f'UsernameToken Username="{APP_KEY}",PasswordDigest="{hexed}",Nonce="{NONCE}",'
                f'Created="{stamp}"',
            },
        )
    assert response.status_code == 200 and response.json()["code"] == "000000"
    assert emu.calls[0].verified
