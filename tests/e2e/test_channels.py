"""Every provider plugin through the whole pipeline (issue 9): a provider configured through
``POST /api/v1/providers``, one message sent through ingest's ``POST /api/v1/messages/send``,
routed through Kafka to the channel's sender process, delivered to a local emulation of the
vendor's API (which checks what the real service checks: signatures, tokens, body shapes) and
recorded as 'sent' naming the provider, its configuration and the message's cost. The IM
channels whose plugins render cards get a card too; a vendor's refusal ends the message
'failed' with the vendor's reason."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import httpx
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.senders.plugins import CATALOGUE, plugin
from tests.conftest import Pipeline
from tests.e2e.helpers import uniq, wait_for_state
from tests.emulators.aliyun import AliyunSmsEmulator
from tests.emulators.apns import ApnsEmulator
from tests.emulators.bark import BarkEmulator
from tests.emulators.base import Call, Emulator
from tests.emulators.dingtalk import DingTalkEmulator
from tests.emulators.discord import DiscordWebhookApi
from tests.emulators.fcm import FcmEmulator
from tests.emulators.feishu import FeishuEmulator
from tests.emulators.flomo import FlomoApi
from tests.emulators.gotify import GotifyEmulator
from tests.emulators.huawei import HuaweiSmsEmulator
from tests.emulators.ntfy import NtfyEmulator
from tests.emulators.pushdeer import PushDeerEmulator
from tests.emulators.slack import SlackEmulator
from tests.emulators.teams import TeamsWebhookApi
from tests.emulators.telegram import TelegramBotApi
from tests.emulators.tencent import TencentSmsEmulator
from tests.emulators.twilio import TwilioEmulator
from tests.emulators.webhook import WebhookReceiver
from tests.emulators.wechat_mp import WeChatMpApi
from tests.emulators.wecom import WeComEmulator

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

PROVIDERS = "/api/v1/providers"
SEND = "/api/v1/messages/send"
COST = "0.0137"  # every provider here is configured with this cost: the sent event must carry it

# Credentials of the emulated accounts (throw-away values, known to the emulators only).
ALIYUN_KEY_ID, ALIYUN_SECRET = "LTAI5tChannelsKey", "e2e-channels-aliyun-secret"
TENCENT_ID, TENCENT_KEY, TENCENT_APP = "AKIDChannelsSecretId", "e2e-channels-tencent-key", "1400006666"
HUAWEI_KEY, HUAWEI_SECRET, HUAWEI_SENDER = "c8RWg3ggEcydChannelsKey", "e2e-channels-huawei-secret", "8824110605000"
TWILIO_SID, TWILIO_TOKEN, TWILIO_FROM = "AC" + "0123456789abcdef" * 2, "e2e-channels-twilio-token", "+15005550006"
FEISHU_SECRET = "qZ8tW2xR5yN1vB7mChannels"
DINGTALK_SECRET = "SEC7c1f8c2d7e9a4b6c0d5e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2d"
TELEGRAM_TOKEN = "987654321:AAHdqTcvCH1vGWJxfSeofSAs0K5PALChnl"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
FCM_PROJECT, FCM_KEY_ID = "herald-channels", "8c3f0b1e2a7d4c5b9e6f1a2b3c4d5e6f7a8b9c0d"
FCM_EMAIL = "herald-sender@herald-channels.iam.gserviceaccount.com"
FCM_DEVICE = "fGx7Yt3qR0e:APA91bH-channels_registration-token.0123456789"
APNS_TEAM, APNS_KEY, APNS_BUNDLE = "DEF123GHIJ", "ABC123DEFG", "app.herald.channels"
APNS_DEVICE = "b4f1c09b7e5d4a2b8c6e0f1d2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5e"
WECHAT_APP, WECHAT_SECRET = "wx1234567890abcdef", "e2eChannelsWeChatAppSecret042"
WECHAT_OPENID = "oABCD1234efgh5678ijkl9012mnop"  # a follower of the emulated account
FLOMO_TOKEN = "e2e-channels-flomo-token-7f3a"
BARK_KEY, BARK_USER, BARK_PASSWORD = "Hx7Yt3qR0eB4k9Lm", "herald", "e2e-channels-bark-password"
NTFY_TOKEN, NTFY_TOPIC = "tk_e2echannels0123456789abcdef", "herald-alerts"
GOTIFY_TOKEN, GOTIFY_APP_ID = "AbCdEf.gotify-channels", 7
PUSHDEER_KEY = "PDU1234TChannelsKey9876"

TITLE = "Deploy finished"


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@dataclass
class Vendors:
    """The emulators of the module (by provider name) and the keys of the accounts that need one."""

    emus: dict[str, Any]
    fcm_private_pem: str
    apns_private_pem: str


@pytest.fixture(scope="module")
async def vendors() -> AsyncIterator[Vendors]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    emus: dict[str, Any] = {
        "aliyun": AliyunSmsEmulator(ALIYUN_KEY_ID, ALIYUN_SECRET),
        "tencent": TencentSmsEmulator(TENCENT_ID, TENCENT_KEY, sdk_app_id=TENCENT_APP),
        "huawei": HuaweiSmsEmulator(HUAWEI_KEY, HUAWEI_SECRET, sender=HUAWEI_SENDER),
        "twilio": TwilioEmulator(TWILIO_SID, TWILIO_TOKEN, numbers={TWILIO_FROM}),
        "feishu": FeishuEmulator(secret=FEISHU_SECRET),
        "dingtalk": DingTalkEmulator(secret=DINGTALK_SECRET),
        "wecom": WeComEmulator(),
        "slack": SlackEmulator(),
        "teams": TeamsWebhookApi(),
        "discord": DiscordWebhookApi(),
        "telegram": TelegramBotApi(TELEGRAM_TOKEN),
        "flomo": FlomoApi(token=FLOMO_TOKEN),
        "webhook": WebhookReceiver(WEBHOOK_SECRET),
        "fcm": FcmEmulator(
            public_key_pem=_public_pem(rsa_key), project_id=FCM_PROJECT, client_email=FCM_EMAIL, key_id=FCM_KEY_ID
        ),
        "apns": ApnsEmulator(
            team_id=APNS_TEAM, key_id=APNS_KEY, public_key_pem=_public_pem(ec_key), bundle_id=APNS_BUNDLE
        ),
        "wechat_mp": WeChatMpApi(WECHAT_APP, WECHAT_SECRET),
        "bark": BarkEmulator(device_keys={BARK_KEY}, username=BARK_USER, password=BARK_PASSWORD),
        "ntfy": NtfyEmulator(tokens={NTFY_TOKEN}, protected={NTFY_TOPIC}),
        "gotify": GotifyEmulator(app_tokens={GOTIFY_TOKEN: GOTIFY_APP_ID}),
        "pushdeer": PushDeerEmulator(keys={PUSHDEER_KEY: 2}),
    }
    async with contextlib.AsyncExitStack() as stack:
        for emu in emus.values():
            await emu.start()
            stack.push_async_callback(emu.stop)
        yield Vendors(emus, _pem(rsa_key), _pem(ec_key))


def _service_account(v: Vendors) -> str:
    return json.dumps({
        "type": "service_account", "project_id": FCM_PROJECT, "private_key_id": FCM_KEY_ID,
        "private_key": v.fcm_private_pem, "client_email": FCM_EMAIL, "client_id": "109876543210987654321",
        "token_uri": v.emus["fcm"].token_url, "universe_domain": "googleapis.com",
    })  # fmt: skip


# --- what one send is and what the vendor must have received ---------------------------------


@dataclass
class Sent:
    """One message as sent, and what the pipeline recorded of it."""

    message_id: str
    token: str  # unique to the message: in its content, so the vendor's copy is this one
    content: str
    provider: dict  # the configured provider (API answer)
    detail: dict  # the 'sent' event's detail
    emu: Any
    card: dict | None = None


@dataclass(frozen=True)
class Case:
    channel: str
    provider: str
    config: Callable[[Vendors], dict[str, Any]]
    check: Callable[[Call, Sent], None]  # the vendor's request carries the message
    to: str | None = None  # None: the configured provider's name (endpoint channels)
    markdown: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    title: str | None = TITLE
    delivery_path: str | None = None  # only requests to this path deliver (token endpoints aside)


def _markdown(token: str) -> str:
    return f"**Deploy** {token} finished\n[details](https://ci.example.com/runs/{token})"


def _text(token: str) -> str:
    return f"Order {token} is on its way"


def _form(call: Call) -> dict[str, str]:
    return dict(parse_qsl(call.body.decode(), keep_blank_values=True))


# SMS: the template providers carry the text in a template variable (content_param / with_content).


def _aliyun(call: Call, s: Sent) -> None:
    form = _form(call)
    assert form["Action"] == "SendSms" and form["AccessKeyId"] == ALIYUN_KEY_ID, form
    assert form["PhoneNumbers"] == "13800138021" and form["SignName"] == "Herald", form
    assert form["TemplateCode"] == "SMS_154950909", form
    assert json.loads(form["TemplateParam"]) == {"product": "Herald", "content": s.content}, form
    assert form["OutId"] == f"{s.message_id}:1", form
    assert s.detail["provider_message_id"] and s.detail["request_id"], s.detail


def _tencent(call: Call, s: Sent) -> None:
    body = call.json()
    assert call.headers["x-tc-action"] == "SendSms" and call.headers["authorization"].startswith("TC3-HMAC-SHA256")
    assert body["PhoneNumberSet"] == ["+8613800138022"] and body["SmsSdkAppId"] == TENCENT_APP, body
    assert body["TemplateId"] == "1110" and body["SignName"] == "Herald", body
    assert body["TemplateParamSet"] == ["5", s.content], body
    assert body["SessionContext"] == f"{s.message_id}:1", body
    assert s.detail["provider_message_id"] and s.detail["iso_code"] == "CN", s.detail


def _huawei(call: Call, s: Sent) -> None:
    form = _form(call)
    assert call.path == "/sms/batchSendSms/v1" and call.headers["x-wsse"].startswith("UsernameToken"), call.headers
    assert form["from"] == HUAWEI_SENDER and form["to"] == "+8613800138023", form
    assert form["templateId"] == "8ff55eac1d0b478ab3c06c3c6a492300" and form["signature"] == "Herald", form
    assert json.loads(form["templateParas"]) == [s.content], form
    assert s.detail["provider_message_id"], s.detail


def _twilio(call: Call, s: Sent) -> None:
    assert call.path == f"/2010-04-01/Accounts/{TWILIO_SID}/Messages.json", call.path
    assert _form(call) == {"To": "+14155550123", "From": TWILIO_FROM, "Body": s.content}
    assert s.detail["provider_message_id"].startswith("SM") and s.detail["status"] == "queued", s.detail


# IM bots and webhooks: markdown with a title.


def _feishu(call: Call, s: Sent) -> None:
    body = call.json()
    assert body["msg_type"] == "post" and body["sign"] and body["timestamp"], body
    post = body["content"]["post"]["zh_cn"]
    assert post["title"] == TITLE, post
    assert post["content"] == [
        [{"tag": "text", "text": "Deploy", "style": ["bold"]}, {"tag": "text", "text": f" {s.token} finished"}],
        [{"tag": "a", "text": "details", "href": f"https://ci.example.com/runs/{s.token}"}],
    ], post


def _dingtalk(call: Call, s: Sent) -> None:
    assert call.query["access_token"] == s.emu.access_token and call.query["sign"], call.query
    assert call.json() == {"msgtype": "markdown", "markdown": {"title": TITLE, "text": f"**{TITLE}**\n\n{s.content}"}}


def _wecom(call: Call, s: Sent) -> None:
    assert call.query == {"key": s.emu.key}, call.query
    assert call.json() == {"msgtype": "markdown", "markdown": {"content": f"**{TITLE}**\n\n{s.content}"}}


def _slack(call: Call, s: Sent) -> None:
    assert call.path == f"/services/{s.emu.team}/{s.emu.bot}/{s.emu.secret}", call.path
    link = f"<https://ci.example.com/runs/{s.token}|details>"
    assert call.json() == {"text": f"*{TITLE}*\n\n*Deploy* {s.token} finished\n{link}"}


def _teams(call: Call, s: Sent) -> None:
    assert call.query["sig"] == s.emu.sig, call.query
    [attachment] = call.json()["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive", attachment
    assert attachment["content"]["body"] == [
        {"type": "TextBlock", "text": TITLE, "weight": "Bolder", "size": "Medium", "wrap": True},
        {"type": "TextBlock", "text": s.content, "wrap": True},
    ], attachment


def _discord(call: Call, s: Sent) -> None:
    assert call.query == {"wait": "true"}, call.query
    body = call.json()
    assert body["content"] == f"**{TITLE}**\n{s.content}" and body["allowed_mentions"] == {"parse": []}, body
    assert s.detail["provider_message_id"] == s.emu.messages[-1]["id"], s.detail


def _telegram(call: Call, s: Sent) -> None:
    assert call.path == f"/bot{TELEGRAM_TOKEN}/sendMessage", call.path
    link = f'<a href="https://ci.example.com/runs/{s.token}">details</a>'
    assert call.json() == {
        "chat_id": -1001234567890,
        "text": f"<b>{TITLE}</b>\n<b>Deploy</b> {s.token} finished\n{link}",
        "parse_mode": "HTML",
    }
    assert s.detail["provider_message_id"] == str(s.emu.sent[-1]["message_id"]), s.detail
    assert s.detail["chat_type"] == "supergroup", s.detail


def _flomo(call: Call, s: Sent) -> None:
    assert call.json() == {"content": f"**{TITLE}**\n\n{s.content}\n#herald"}
    assert s.detail["provider_message_id"] == s.emu.memos[-1]["slug"] and s.detail["tags"] == ["herald"], s.detail


def _webhook(call: Call, s: Sent) -> None:
    assert call.headers["webhook-id"] == s.message_id and call.headers["webhook-signature"].startswith("v1,")
    body = call.json()
    assert body["type"] == "message" and body["timestamp"], body
    assert body["data"] == {"message_id": s.message_id, "title": TITLE, "content": s.content, "format": "markdown"}


# Push: plain-text notifications, each with its OAuth / provider token.


def _fcm(call: Call, s: Sent) -> None:
    token = call.headers["authorization"].removeprefix("Bearer ")
    assert token in s.emu.access_tokens, call.headers
    message = call.json()["message"]
    assert message["token"] == FCM_DEVICE, message
    assert message["notification"] == {"title": "Order shipped", "body": s.content}, message
    assert s.detail["provider_message_id"] == s.emu.sent[-1], s.detail
    assert s.detail["provider_message_id"].startswith(f"projects/{FCM_PROJECT}/messages/"), s.detail


def _apns(call: Call, s: Sent) -> None:
    assert call.http_version == "2" and call.path == f"/3/device/{APNS_DEVICE}", (call.http_version, call.path)
    assert call.headers["apns-topic"] == APNS_BUNDLE and call.headers["apns-push-type"] == "alert", call.headers
    assert call.headers["authorization"].startswith("bearer "), call.headers
    assert call.json() == {"aps": {"alert": {"title": "Order shipped", "body": s.content}}}
    assert s.detail["provider_message_id"] == call.headers["apns-id"], s.detail
    uuid.UUID(s.detail["provider_message_id"])


def _wechat_mp(call: Call, s: Sent) -> None:
    assert call.query == {"access_token": s.emu.token}, call.query
    assert call.json() == {
        "touser": WECHAT_OPENID,
        "template_id": "TPL_ALERT_0001",
        "client_msg_id": s.message_id[:64],
        "data": {"content": {"value": s.content}},
    }
    assert s.detail["provider_message_id"] == str(s.emu._msgid), s.detail


def _bark(call: Call, s: Sent) -> None:
    assert call.headers["authorization"].startswith("Basic "), call.headers
    assert call.json() == {"device_key": BARK_KEY, "title": TITLE, "body": s.content, "markdown": s.content}


def _ntfy(call: Call, s: Sent) -> None:
    assert call.headers["authorization"] == f"Bearer {NTFY_TOKEN}", call.headers
    assert call.json() == {"topic": NTFY_TOPIC, "title": TITLE, "message": s.content, "markdown": True}
    assert s.detail["provider_message_id"] == s.emu.published[-1]["id"] and s.detail["topic"] == NTFY_TOPIC


def _gotify(call: Call, s: Sent) -> None:
    assert call.headers["x-gotify-key"] == GOTIFY_TOKEN, call.headers
    assert call.json() == {"title": TITLE, "message": s.content, "priority": 8,
                           "extras": {"client::display": {"contentType": "text/markdown"}}}  # fmt: skip
    assert s.detail["provider_message_id"] == str(s.emu.messages[-1]["id"]), s.detail
    assert s.detail["appid"] == GOTIFY_APP_ID, s.detail


def _pushdeer(call: Call, s: Sent) -> None:
    assert _form(call) == {"pushkey": PUSHDEER_KEY, "text": TITLE, "desp": s.content, "type": "markdown"}
    assert s.detail["devices"] == 2, s.detail


CASES = [
    Case("sms", "aliyun", lambda v: {"access_key_id": ALIYUN_KEY_ID, "access_key_secret": ALIYUN_SECRET,
                                     "sign_name": "Herald", "endpoint": v.emus["aliyun"].url + "/"},
         _aliyun, to="+86 138-0013-8021", markdown=False, title=None,
         options={"template_code": "SMS_154950909", "params": {"product": "Herald"}, "content_param": "content"}),
    Case("sms", "tencent", lambda v: {"secret_id": TENCENT_ID, "secret_key": TENCENT_KEY, "sdk_app_id": TENCENT_APP,
                                      "sign_name": "Herald", "endpoint": v.emus["tencent"].url},
         _tencent, to="+8613800138022", markdown=False, title=None,
         options={"template_code": "1110", "params": ["5"], "with_content": True}),
    Case("sms", "huawei", lambda v: {"app_key": HUAWEI_KEY, "app_secret": HUAWEI_SECRET, "sender": HUAWEI_SENDER,
                                     "signature": "Herald", "endpoint": v.emus["huawei"].url},
         _huawei, to="+8613800138023", markdown=False, title=None,
         options={"template_code": "8ff55eac1d0b478ab3c06c3c6a492300", "with_content": True}),
    Case("sms", "twilio", lambda v: {"account_sid": TWILIO_SID, "auth_token": TWILIO_TOKEN,
                                     "from_number": TWILIO_FROM, "api_base": v.emus["twilio"].url},
         _twilio, to="+14155550123", markdown=False, title=None),
    Case("feishu", "feishu", lambda v: {"webhook_url": v.emus["feishu"].webhook_url, "secret": FEISHU_SECRET},
         _feishu),
    Case("dingtalk", "dingtalk", lambda v: {"endpoint": v.emus["dingtalk"].endpoint,
                                            "access_token": v.emus["dingtalk"].access_token,
                                            "secret": DINGTALK_SECRET},
         _dingtalk),
    Case("wecom", "wecom", lambda v: {"endpoint": v.emus["wecom"].endpoint, "key": v.emus["wecom"].key}, _wecom),
    Case("slack", "slack", lambda v: {"webhook_url": v.emus["slack"].webhook_url}, _slack),
    Case("teams", "teams", lambda v: {"webhook_url": v.emus["teams"].workflow_url}, _teams),
    Case("discord", "discord", lambda v: {"webhook_url": v.emus["discord"].webhook_url}, _discord),
    Case("telegram", "telegram", lambda v: {"bot_token": TELEGRAM_TOKEN, "api_base": v.emus["telegram"].url},
         _telegram, to="-1001234567890"),
    Case("flomo", "flomo", lambda v: {"api_url": v.emus["flomo"].api_url}, _flomo, options={"tags": ["herald"]}),
    Case("webhook", "webhook", lambda v: {"url": v.emus["webhook"].endpoint, "secret": WEBHOOK_SECRET}, _webhook),
    Case("push", "fcm", lambda v: {"service_account": _service_account(v), "endpoint": v.emus["fcm"].url},
         _fcm, to=FCM_DEVICE, markdown=False, title="Order shipped",
         delivery_path=f"/v1/projects/{FCM_PROJECT}/messages:send"),
    Case("push", "apns", lambda v: {"team_id": APNS_TEAM, "key_id": APNS_KEY, "private_key": v.apns_private_pem,
                                    "bundle_id": APNS_BUNDLE, "endpoint": v.emus["apns"].url,
                                    "ca_pem": Path(v.emus["apns"].ca_file).read_text()},
         _apns, to=APNS_DEVICE, markdown=False, title="Order shipped"),
    Case("wechat_mp", "wechat_mp", lambda v: {"app_id": WECHAT_APP, "app_secret": WECHAT_SECRET,
                                              "api_base": v.emus["wechat_mp"].url,
                                              "default_template_id": "TPL_ALERT_0001"},
         _wechat_mp, to=WECHAT_OPENID, markdown=False, title=None, delivery_path="/cgi-bin/message/template/send"),
    Case("bark", "bark", lambda v: {"server": v.emus["bark"].url, "username": BARK_USER, "password": BARK_PASSWORD},
         _bark, to=BARK_KEY),
    Case("ntfy", "ntfy", lambda v: {"server": v.emus["ntfy"].url, "token": NTFY_TOKEN}, _ntfy, to=NTFY_TOPIC),
    Case("gotify", "gotify", lambda v: {"server": v.emus["gotify"].url, "app_token": GOTIFY_TOKEN, "priority": 8},
         _gotify),
    Case("pushdeer", "pushdeer", lambda v: {"server": v.emus["pushdeer"].url}, _pushdeer, to=PUSHDEER_KEY),
]  # fmt: skip
BY_PROVIDER = {c.provider: c for c in CASES}


# --- the exchange through the API -------------------------------------------------------------


async def _configure(client: httpx.AsyncClient, case: Case, vendors: Vendors) -> dict:
    r = await client.post(PROVIDERS, json={
        "channel": case.channel, "provider": case.provider, "name": uniq(f"{case.provider}-"),
        "config": case.config(vendors), "costs": {"default": COST},
    })  # fmt: skip
    assert r.status_code == 201, r.text
    return r.json()["data"]


async def _accepted(client: httpx.AsyncClient, body: dict) -> str:
    r = await client.post(SEND, json=body)
    assert r.status_code == 202, r.text
    return r.json()["data"]["message_id"]


def _deliveries(emu: Emulator, before: int, path: str | None) -> list[Call]:
    return [c for c in emu.calls[before:] if path is None or c.path == path]


async def _event(db: asyncpg.Pool, message_id: str, state: str) -> tuple[str, dict]:
    rows = await db.fetch("SELECT provider, detail FROM message_events WHERE message_id = $1 AND state = $2",
                          message_id, state)  # fmt: skip
    assert len(rows) == 1, f"{len(rows)} {state!r} events of {message_id}"
    return rows[0]["provider"], orjson.loads(rows[0]["detail"])


async def _deliver(client: httpx.AsyncClient, db: asyncpg.Pool, vendors: Vendors, case: Case,
                   body: dict[str, Any], token: str, content: str) -> tuple[Call, Sent]:  # fmt: skip
    """Configure ``case``'s provider, send ``body`` through it, wait for 'sent'; the vendor's one
    request and what was recorded."""
    emu = vendors.emus[case.provider]
    provider = await _configure(client, case, vendors)
    body = {"channel": case.channel, "to": case.to or provider["name"], **body}
    if case.to is not None:
        body["provider"] = provider["name"]
    before = len(emu.calls)
    message_id = await _accepted(client, body)
    record = await wait_for_state(client, message_id, "sent", timeout=30)
    assert record["message_type"] == case.channel and record["error_code"] in (None, 0), record
    deliveries = _deliveries(emu, before, case.delivery_path)
    assert len(deliveries) == 1, [(c.path, c.status, c.problems) for c in deliveries]
    [call] = deliveries
    assert call.verified and not call.problems and call.injected is None, call.problems
    assert call.method in ("POST", "PUT"), call.method
    provider_column, detail = await _event(db, message_id, "sent")
    assert provider_column == case.provider, provider_column
    assert detail["provider_id"] == provider["id"] and detail["provider_name"] == provider["name"], detail
    assert detail["cost"] == COST, detail
    return call, Sent(message_id, token, content, provider, detail, emu, body.get("card"))


@pytest.mark.parametrize("case", CASES, ids=[c.provider for c in CASES])
async def test_a_message_goes_through_the_pipeline_to_the_vendor(
    client: httpx.AsyncClient, db: asyncpg.Pool, vendors: Vendors, case: Case
) -> None:
    token = uniq()
    content = _markdown(token) if case.markdown else _text(token)
    body: dict[str, Any] = {"content": content, "content_type": "markdown" if case.markdown else "text"}
    if case.title is not None:
        body["title"] = case.title
    if case.options:
        body["options"] = case.options
    call, sent = await _deliver(client, db, vendors, case, body, token, content)
    case.check(call, sent)


def test_every_catalogued_provider_has_a_pipeline_test() -> None:
    catalogued = {(channel, name) for channel, names in CATALOGUE.items() for name in names}
    assert catalogued == {(c.channel, c.provider) for c in CASES}


# --- cards ------------------------------------------------------------------------------------


def _card(token: str) -> dict[str, Any]:
    return {
        "title": f"Deploy {token}",
        "text": "All checks **passed**",
        "fields": [{"title": "Host", "value": f"web-{token}"}, {"title": "Region", "value": "eu-west-1"}],
        "url": f"https://ci.example.com/runs/{token}",
        "button": "Open run",
        "color": "green",
    }


def _feishu_card(call: Call, s: Sent) -> None:
    body = call.json()
    assert body["msg_type"] == "interactive", body
    card = body["card"]
    assert card["header"] == {"title": {"tag": "plain_text", "content": s.card["title"]}, "template": "green"}, card
    [div] = [e for e in card["elements"] if e["tag"] == "div"]
    assert {"is_short": True, "text": {"tag": "lark_md", "content": f"**Host**\nweb-{s.token}"}} in div["fields"]
    [action] = [e for e in card["elements"] if e["tag"] == "action"]
    assert action["actions"][0]["url"] == s.card["url"] and action["actions"][0]["text"]["content"] == "Open run"


def _dingtalk_card(call: Call, s: Sent) -> None:
    body = call.json()
    assert body["msgtype"] == "actionCard", body
    card = body["actionCard"]
    assert card["title"] == s.card["title"] and card["singleURL"] == s.card["url"], card
    assert card["text"].startswith(f"### {s.card['title']}") and f"- **Host**: web-{s.token}" in card["text"], card


def _wecom_card(call: Call, s: Sent) -> None:
    body = call.json()
    assert body["msgtype"] == "template_card", body
    card = body["template_card"]
    assert card["card_type"] == "text_notice" and card["main_title"] == {"title": s.card["title"]}, card
    assert {"keyname": "Host", "value": f"web-{s.token}"} in card["horizontal_content_list"], card
    assert card["card_action"] == {"type": 1, "url": s.card["url"]}, card


def _slack_card(call: Call, s: Sent) -> None:
    body = call.json()
    [attachment] = body["attachments"]  # a coloured card: the blocks in an attachment with the colour bar
    blocks = attachment["blocks"]
    assert blocks[0] == {"type": "header", "text": {"type": "plain_text", "text": s.card["title"], "emoji": True}}
    fields = [f["text"] for b in blocks if b["type"] == "section" for f in b.get("fields", [])]
    assert f"*Host*\nweb-{s.token}" in fields, blocks
    assert s.card["title"] in body["text"], body  # the notification's plain-text fallback


def _teams_card(call: Call, s: Sent) -> None:
    content = call.json()["attachments"][0]["content"]
    assert content["body"][0]["text"] == s.card["title"] and content["body"][0]["weight"] == "Bolder", content
    [facts] = [b for b in content["body"] if b["type"] == "FactSet"]
    assert {"title": "Host", "value": f"web-{s.token}"} in facts["facts"], facts
    assert content["actions"] == [{"type": "Action.OpenUrl", "title": "Open run", "url": s.card["url"]}], content


def _discord_card(call: Call, s: Sent) -> None:
    [embed] = call.json()["embeds"]
    assert embed["title"] == s.card["title"] and embed["url"] == s.card["url"], embed
    assert {"name": "Host", "value": f"web-{s.token}", "inline": False} in embed["fields"], embed
    assert isinstance(embed["color"], int), embed


def _telegram_card(call: Call, s: Sent) -> None:
    body = call.json()
    assert body["chat_id"] == 123456789 and body["parse_mode"] == "HTML", body
    assert body["text"].startswith(f"<b>{s.card['title']}</b>") and f"<b>Host</b>: web-{s.token}" in body["text"]
    assert body["reply_markup"] == {"inline_keyboard": [[{"text": "Open run", "url": s.card["url"]}]]}, body


def _webhook_card(call: Call, s: Sent) -> None:
    data = call.json()["data"]
    assert data["format"] == "card" and data["card"] == s.card and data["content"] == s.content, data


CARD_CASES = [
    (BY_PROVIDER["feishu"], _feishu_card),
    (BY_PROVIDER["dingtalk"], _dingtalk_card),
    (BY_PROVIDER["wecom"], _wecom_card),
    (BY_PROVIDER["slack"], _slack_card),
    (BY_PROVIDER["teams"], _teams_card),
    (BY_PROVIDER["discord"], _discord_card),
    (BY_PROVIDER["telegram"], _telegram_card),
    (BY_PROVIDER["webhook"], _webhook_card),
]


@pytest.mark.parametrize(("case", "check"), CARD_CASES, ids=[c.provider for c, _ in CARD_CASES])
async def test_a_card_is_rendered_as_the_vendors_card(
    client: httpx.AsyncClient, db: asyncpg.Pool, vendors: Vendors, case: Case, check: Callable[[Call, Sent], None]
) -> None:
    token = uniq()
    # Telegram paces one message a second per chat: the card goes to another chat than the text.
    to = {"telegram": "123456789"}.get(case.provider, case.to)
    card_case = Case(case.channel, case.provider, case.config, check, to=to)
    # With a plain-text fallback beside the card (a card alone: test_a_card_alone_is_delivered).
    fallback = f"Deploy {token}: all checks passed"
    body = {"content_type": "card", "card": _card(token), "content": fallback}
    call, sent = await _deliver(client, db, vendors, card_case, body, token, fallback)
    check(call, sent)


def test_every_channel_whose_plugin_renders_cards_has_a_card_test() -> None:
    with_cards = {c.provider for c in CASES if "card" in plugin(c.channel, c.provider).formats}
    assert with_cards == {c.provider for c, _ in CARD_CASES}


# --- a vendor's refusal -----------------------------------------------------------------------


async def test_a_vendors_refusal_fails_the_message_naming_the_vendors_reason(
    client: httpx.AsyncClient, db: asyncpg.Pool, vendors: Vendors
) -> None:
    case = BY_PROVIDER["dingtalk"]
    emu: DingTalkEmulator = vendors.emus["dingtalk"]
    provider = await _configure(client, case, vendors)
    before = len(emu.calls)
    emu.fail("auth")  # the robot answers errcode 310000 "sign not match"
    try:
        message_id = await _accepted(client, {"channel": "dingtalk", "to": provider["name"], "title": TITLE,
                                              "content": _markdown(uniq()), "content_type": "markdown"})  # fmt: skip
        await wait_for_state(client, message_id, "failed", timeout=30)
    finally:
        emu.recover()
    r = await client.get(f"/api/v1/messages/{message_id}")
    assert r.status_code == 200, r.text
    record = r.json()["data"]
    assert record["state"] == "failed" and record["error_code"] == 2012 and record["attempt"] == 1, record
    assert "310000" in (record["error_message"] or ""), record
    [call] = emu.calls[before:]  # refused once: a credentials failure is not retried
    assert call.verified and call.injected == "auth", call.problems
    provider_column, detail = await _event(db, message_id, "failed")
    assert provider_column == "dingtalk", provider_column
    assert detail["provider_id"] == provider["id"] and detail["provider_name"] == provider["name"], detail
    states = [row["state"] for row in await db.fetch("SELECT state FROM message_events WHERE message_id = $1",
                                                     message_id)]  # fmt: skip
    assert "sent" not in states and "retrying" not in states, states


# --- a card alone -----------------------------------------------------------------------------


async def test_a_card_alone_is_delivered(client: httpx.AsyncClient, db: asyncpg.Pool, vendors: Vendors) -> None:
    """Ingest accepts a card without content (``SendRequest``: content, a card or a template);
    the pipeline must deliver it as such."""
    token = uniq()
    case = Case("feishu", "feishu", BY_PROVIDER["feishu"].config, _feishu_card)
    call, sent = await _deliver(client, db, vendors, case, {"content_type": "card", "card": _card(token)}, token, "")
    _feishu_card(call, sent)


# --- the credentials stay out of the logs -----------------------------------------------------


def test_no_provider_credential_reaches_the_services_logs(pipeline: Pipeline, vendors: Vendors) -> None:
    """Secret fields of a provider's configuration are never logged (plugins/base.py), nor are
    the credentials their plugins put in a request's URL (webhook tokens, access tokens). Runs
    after the sends above."""
    emus = vendors.emus
    credentials = {
        "aliyun access_key_secret": ALIYUN_SECRET,
        "tencent secret_key": TENCENT_KEY,
        "huawei app_secret": HUAWEI_SECRET,
        "twilio auth_token": TWILIO_TOKEN,
        "feishu secret": FEISHU_SECRET,
        "feishu webhook token": emus["feishu"].token,
        "dingtalk access_token": emus["dingtalk"].access_token,
        "dingtalk secret": DINGTALK_SECRET,
        "wecom key": emus["wecom"].key,
        "slack webhook secret": emus["slack"].secret,
        "teams sig": emus["teams"].sig,
        "discord webhook token": emus["discord"].token,
        "telegram bot_token": TELEGRAM_TOKEN,
        "flomo token": FLOMO_TOKEN,
        "webhook secret": WEBHOOK_SECRET,
        "wechat_mp app_secret": WECHAT_SECRET,
        "wechat_mp access_token": emus["wechat_mp"].token,
        "bark password": BARK_PASSWORD,
        "ntfy token": NTFY_TOKEN,
        "gotify app_token": GOTIFY_TOKEN,
    }
    lines = [f"{name}: {line}" for name, s in pipeline.services.items() for line in s.logs().splitlines()]
    leaked = {what: [line[:400] for line in lines if value in line][:2] for what, value in credentials.items()}
    leaked = {what: found for what, found in leaked.items() if found}
    assert not leaked, "credentials in the logs:\n" + "\n".join(f"{w}: {found[0]}" for w, found in leaked.items())
