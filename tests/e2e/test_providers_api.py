"""Providers through the API and the whole pipeline (issue 9): configured per tenant with
their secrets encrypted and never shown; a generic send refused before anything is recorded
when nobody could deliver it; an SMS through the router and the channel's sender to a local
emulation of Aliyun, which checks the RPC signature; vendor failures classified (retried or
failed, named); a tenant's own rate limit waited for, never dropping a message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import orjson
import pytest

from devstack import access
from tests.conftest import Pipeline
from tests.e2e.helpers import uniq, wait_for_state
from tests.emulators.aliyun import AliyunSmsEmulator
from tests.emulators.webhook import WebhookReceiver

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

PROVIDERS = "/api/v1/providers"
SEND = "/api/v1/messages/send"
KEY_ID, SECRET = "LTAI5tE2eKey", "e2e-aliyun-secret-Zq81"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture(scope="module")
async def aliyun() -> AsyncIterator[AliyunSmsEmulator]:
    async with AliyunSmsEmulator(KEY_ID, SECRET) as emu:
        yield emu  # type: ignore[misc]


@pytest.fixture(scope="module")
async def fresh_tenant(pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    """A tenant with no provider configured (the suite configures the default tenant's)."""
    tenant = uniq("pv-")
    env = pipeline.backing.env
    await asyncio.to_thread(access.admin, env, "create-tenant", tenant, "--name", f"Providers {tenant}")
    headers = await asyncio.to_thread(access.admin_headers, pipeline.backing.env, pipeline.ingest_url, tenant=tenant)
    async with httpx.AsyncClient(base_url=pipeline.ingest_url, timeout=30, headers=headers) as c:
        yield c


async def _aliyun_provider(client: httpx.AsyncClient, emu: AliyunSmsEmulator, **extra: object) -> dict:
    body = {
        "channel": "sms",
        "provider": "aliyun",
        "name": uniq("ali-"),
        "config": {"access_key_id": KEY_ID, "access_key_secret": SECRET, "sign_name": "Herald",
                   "endpoint": emu.url + "/"},  # fmt: skip
        **extra,
    }
    r = await client.post(PROVIDERS, json=body)
    assert r.status_code == 201, r.text
    return r.json()["data"]


async def _sent_through(client: httpx.AsyncClient, body: dict) -> str:
    r = await client.post(SEND, json=body)
    assert r.status_code == 202, r.text
    return r.json()["data"]["message_id"]


async def test_a_provider_is_stored_with_its_secret_encrypted_and_never_shown(
    client: httpx.AsyncClient, fresh_tenant: httpx.AsyncClient, db: asyncpg.Pool, aliyun: AliyunSmsEmulator
) -> None:
    created = await _aliyun_provider(client, aliyun, costs={"default": "0.05", "by_country": {"86": "0.045"}})
    # Another tenant neither sees, changes nor sends through it.
    for method, body in (("GET", None), ("PATCH", {"priority": 1}), ("DELETE", None)):
        r = await fresh_tenant.request(method, f"{PROVIDERS}/{created['id']}", json=body)
        assert (r.status_code, r.json()["code"]) == (404, 1004), (method, r.text)
    assert created["name"] not in (await fresh_tenant.get(PROVIDERS)).text
    r = await fresh_tenant.post(SEND, json={"channel": "sms", "to": "+8613800138000", "content": "x",
                                            "provider": created["name"]})  # fmt: skip
    assert (r.status_code, r.json()["code"]) == (404, 2011), r.text
    assert created["secrets"] == {"access_key_secret": True}
    assert SECRET not in str(created) and created["config"]["access_key_id"] == KEY_ID
    row = await db.fetchrow("SELECT config::text AS config, secrets FROM providers WHERE id = $1", created["id"])
    assert SECRET not in row["config"] and SECRET not in row["secrets"] and row["secrets"].startswith("v1:")
    # A change of another field keeps the secret; a new secret is a new ciphertext.
    r = await client.patch(f"{PROVIDERS}/{created['id']}", json={"config": {"sign_name": "Herald Ops"}, "priority": 5})
    assert r.status_code == 200, r.text
    changed = r.json()["data"]
    assert changed["config"]["sign_name"] == "Herald Ops" and changed["priority"] == 5
    assert changed["secrets"] == {"access_key_secret": True} and changed["revision"] == created["revision"] + 1
    assert await db.fetchval("SELECT secrets FROM providers WHERE id = $1", created["id"]) == row["secrets"]
    r = await client.patch(f"{PROVIDERS}/{created['id']}", json={"config": {"access_key_secret": "rotated-Zq82"}})
    assert r.status_code == 200 and "rotated" not in r.text
    assert await db.fetchval("SELECT secrets FROM providers WHERE id = $1", created["id"]) != row["secrets"]
    audit = await db.fetch("SELECT details::text AS d FROM audit_log WHERE target_type = 'provider' AND target_id = $1",
                           str(created["id"]))  # fmt: skip
    assert len(audit) == 3 and not any(SECRET in a["d"] or "rotated-Zq82" in a["d"] for a in audit)
    # Pointing it elsewhere needs the secret again: the stored one never follows a new endpoint.
    r = await client.patch(f"{PROVIDERS}/{created['id']}", json={"config": {"endpoint": "https://collect.example.com/"}})
    assert (r.status_code, r.json()["code"]) == (400, 1001), r.text
    assert r.json()["errors"][0]["field"] == "config.access_key_secret"
    assert (await client.get(f"{PROVIDERS}/{created['id']}")).json()["data"]["config"]["endpoint"] == aliyun.url + "/"
    # Nulls are refused, not stored.
    r = await client.patch(f"{PROVIDERS}/{created['id']}", json={"priority": None})
    assert (r.status_code, r.json()["errors"][0]["field"]) == (400, "priority"), r.text
    listed = (await client.get(PROVIDERS, params={"channel": "sms"})).json()["data"]["records"]
    assert created["id"] in [p["id"] for p in listed] and "rotated" not in str(listed)
    assert (await client.delete(f"{PROVIDERS}/{created['id']}")).status_code == 200
    assert (await client.get(f"{PROVIDERS}/{created['id']}")).json()["code"] == 1004
    assert await db.fetchval("SELECT secrets FROM providers WHERE id = $1", created["id"]) == ""


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"channel": "sms", "provider": "nexmo", "name": "x", "config": {}}, "provider", 1001),
        ({"channel": "email", "provider": "smtp", "name": "x", "config": {}}, "channel", 1001),
        ({"channel": "fax", "provider": "x", "name": "x"}, "channel", 1001),
        ({"channel": "sms", "provider": "aliyun", "name": "x", "config": {"access_key_id": "a", "sign_name": "s"}},
         "config.access_key_secret", 1001),
        ({"channel": "sms", "provider": "aliyun", "name": "x",
          "config": {"access_key_id": "a", "access_key_secret": "b", "sign_name": "s", "endpoint": "ftp://x"}},
         "config.endpoint", 1001),
        ({"channel": "sms", "provider": "aliyun", "name": "bad\nname", "config": {}}, "name", 1001),
    ],
)  # fmt: skip
async def test_bad_configurations_are_refused_naming_the_field(
    client: httpx.AsyncClient, db: asyncpg.Pool, body: dict, field: str, code: int
) -> None:
    before = await db.fetchval("SELECT count(*) FROM providers")
    r = await client.post(PROVIDERS, json=body)
    assert r.status_code == 400 and r.json()["code"] == code, r.text
    assert field in [e["field"] for e in r.json()["errors"]], r.text
    assert await db.fetchval("SELECT count(*) FROM providers") == before


async def test_the_catalogue_lists_every_provider_with_its_schema(client: httpx.AsyncClient) -> None:
    r = await client.get(f"{PROVIDERS}/catalogue")
    assert r.status_code == 200, r.text
    channels = {c["channel"]: c for c in r.json()["data"]["channels"]}
    names = {(c, p["provider"]) for c, entry in channels.items() for p in entry["providers"]}
    for expected in [("sms", "aliyun"), ("sms", "tencent"), ("sms", "huawei"), ("sms", "twilio"),
                     ("feishu", "feishu"), ("dingtalk", "dingtalk"), ("wecom", "wecom"), ("slack", "slack"),
                     ("teams", "teams"), ("discord", "discord"), ("telegram", "telegram"), ("flomo", "flomo"),
                     ("webhook", "webhook"), ("push", "fcm"), ("push", "apns"), ("wechat_mp", "wechat_mp"),
                     ("bark", "bark"), ("ntfy", "ntfy"), ("gotify", "gotify"), ("pushdeer", "pushdeer")]:  # fmt: skip
        assert expected in names, expected
    aliyun = next(p for p in channels["sms"]["providers"] if p["provider"] == "aliyun")
    assert aliyun["secrets"] == ["access_key_secret"] and aliyun["docs"]
    assert aliyun["config_schema"]["properties"]["access_key_secret"]["writeOnly"] is True
    dingtalk = channels["dingtalk"]["providers"][0]
    assert {"count": 20, "per_s": 60.0} in [{"count": x["count"], "per_s": x["per_s"]} for x in dingtalk["rate_limits"]]
    assert channels["feishu"]["to_names_provider"] is True and channels["sms"]["to_names_provider"] is False


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"channel": "sms", "to": "13800138000", "content": "x"}, 400, 1001, "to"),
        ({"channel": "sms", "to": ["+8613800138000", "+8613800138001"], "content": "x"}, 400, 1001, "to"),
        ({"channel": "sms", "to": "+8613800138000", "content": "<b>x</b>", "content_type": "html"}, 400, 1001,
         "content_type"),
        ({"channel": "telegram", "to": "123456", "content_type": "card"}, 400, 1001, "card"),
        ({"channel": "feishu", "to": "no-such-bot", "content": "x"}, 404, 2011, "to"),
        ({"channel": "bark", "to": "abcdefgh12345678", "content": "x"}, 404, 2011, "channel"),
        ({"channel": "sms", "to": "+8613800138000", "content": "x", "provider": "nobody"}, 404, 2011, "provider"),
        ({"to": "+8613800138000", "content": "x"}, 400, 1001, "channel"),
        ({"channel": "sms", "to": "+8613800138000", "content": "x", "email": {"cc": ["a@b.org"]}}, 400, 1001, "email"),
        ({"channel": "sms", "to": "+8613800138000"}, 400, 1001, "content"),
        ({"channel": "sms", "to": "+8613800138000", "content": "x" * 1001}, 400, 1001, "content"),
    ],
)  # fmt: skip
async def test_a_send_nobody_could_deliver_is_refused_and_not_recorded(
    fresh_tenant: httpx.AsyncClient, db: asyncpg.Pool, body: dict, status: int, code: int, field: str
) -> None:
    before = await db.fetchval("SELECT count(*) FROM message_records")
    r = await fresh_tenant.post(SEND, json=body)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text
    assert field in [e["field"] for e in r.json().get("errors", [])], r.text
    assert await db.fetchval("SELECT count(*) FROM message_records") == before


async def test_an_sms_goes_through_the_pipeline_to_aliyun_signed(
    client: httpx.AsyncClient, db: asyncpg.Pool, aliyun: AliyunSmsEmulator
) -> None:
    provider = await _aliyun_provider(client, aliyun, costs={"by_country": {"86": "0.045"}}, priority=0)
    calls = len(aliyun.calls)
    message_id = await _sent_through(client, {
        "channel": "sms", "to": "+86 138-0013-8000", "provider": provider["name"], "content": "Your code is 4321",
        "options": {"template_code": "SMS_154950909", "params": {"code": "4321"}},
    })  # fmt: skip
    record = await wait_for_state(client, message_id, "sent")
    assert record["recipient"] == "+8613800138000" and record["message_type"] == "sms"
    call = aliyun.calls[calls]
    assert call.verified and call.method == "POST", call.problems
    form = dict(x.split("=", 1) for x in call.body.decode().split("&"))
    assert form["PhoneNumbers"] == "13800138000" and form["TemplateCode"] == "SMS_154950909"
    assert form["Action"] == "SendSms" and form["SignatureMethod"] == "HMAC-SHA1"
    sent = await db.fetchrow(
        "SELECT provider, detail FROM message_events WHERE message_id = $1 AND state = 'sent'", message_id
    )
    detail = orjson.loads(sent["detail"])
    assert sent["provider"] == "aliyun"
    assert detail["provider_id"] == provider["id"] and detail["cost"] == "0.045" and detail["provider_message_id"]


async def test_vendor_failures_are_classified_through_the_pipeline(
    client: httpx.AsyncClient, db: asyncpg.Pool, aliyun: AliyunSmsEmulator
) -> None:
    provider = await _aliyun_provider(client, aliyun)
    base = {"channel": "sms", "provider": provider["name"], "content": "x",
            "options": {"template_code": "SMS_154950909"}, "dedup": False}  # fmt: skip
    # An invalid number (the vendor's isv.MOBILE_NUMBER_ILLEGAL): failed at once, not retried.
    aliyun.fail("invalid_recipient")
    failed = await _sent_through(client, {**base, "to": "+8613800138002"})
    record = await wait_for_state(client, failed, "failed")
    assert record["error_code"] == 2013 and record["attempt"] == 1
    # Throttled once (isv.BUSINESS_LIMIT_CONTROL): retried, then sent.
    aliyun.fail("rate_limited")
    retried = await _sent_through(client, {**base, "to": "+8613800138003"})
    record = await wait_for_state(client, retried, "sent", timeout=40)
    assert record["attempt"] == 2
    states = [r["state"] for r in await db.fetch(
        "SELECT state FROM message_events WHERE message_id = $1 ORDER BY occurred_at, id", retried)]  # fmt: skip
    assert "retrying" in states and states[-1] == "sent"


async def test_a_tenants_rate_limit_delays_messages_and_drops_none(client: httpx.AsyncClient) -> None:
    async with WebhookReceiver(WEBHOOK_SECRET) as hook:
        name = uniq("hook-")
        r = await client.post(PROVIDERS, json={
            "channel": "webhook", "provider": "webhook", "name": name,
            "config": {"url": hook.endpoint, "secret": WEBHOOK_SECRET},
            "rate_limit": {"count": 2, "per_s": 1.0},
        })  # fmt: skip
        assert r.status_code == 201, r.text
        ids = [await _sent_through(client, {"channel": "webhook", "to": name, "content": f"tick {i}", "dedup": False})
               for i in range(6)]  # fmt: skip
        for message_id in ids:
            await wait_for_state(client, message_id, "sent", timeout=30)
        arrivals = sorted(c.at for c in hook.calls if c.verified)
        assert len(arrivals) == 6
        # Never more than 2 in any second: the 3rd and 5th waited for the window.
        assert arrivals[2] - arrivals[0] >= 0.95 and arrivals[4] - arrivals[2] >= 0.95, arrivals


async def test_a_long_rate_limit_wait_is_deferred_as_the_same_attempt(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    """One message per 6 s and waits over 2 s deferred (the suite's HERALD_PACING_MAX_WAIT_S): the
    second message goes through a retry topic, comes back as attempt 1, and is sent 6 s after the
    first; its retries are untouched."""
    async with WebhookReceiver(WEBHOOK_SECRET) as hook:
        name = uniq("slow-")
        r = await client.post(PROVIDERS, json={
            "channel": "webhook", "provider": "webhook", "name": name,
            "config": {"url": hook.endpoint, "secret": WEBHOOK_SECRET}, "rate_limit": {"count": 1, "per_s": 6},
        })  # fmt: skip
        assert r.status_code == 201, r.text
        ids = [await _sent_through(client, {"channel": "webhook", "to": name, "content": f"slow {i}", "dedup": False})
               for i in range(2)]  # fmt: skip
        records = [await wait_for_state(client, message_id, "sent", timeout=30) for message_id in ids]
        assert [r["attempt"] for r in records] == [1, 1]
        arrivals = sorted(c.at for c in hook.calls if c.verified)
        assert len(arrivals) == 2 and arrivals[1] - arrivals[0] >= 5.9, arrivals
        deferred = await db.fetch(
            "SELECT detail FROM message_events WHERE message_id = ANY($1::text[]) AND state = 'retrying'", ids
        )
        assert deferred and all(orjson.loads(d["detail"])["deferred"] for d in deferred)


async def test_seed_wechat_mp_send_names_the_seeds_fields(fresh_tenant: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    before = await db.fetchval("SELECT count(*) FROM message_records")
    body = {"openid": "o6_bmjrPTlm6_2sgVt7hMZOPfL2M", "template_id": "TM0001", "data": {"keyword1": {"value": "x"}}}
    r = await fresh_tenant.post("/api/v1/messages/wechat-mp/send", json={**body, "openid": "x!"})
    assert (r.status_code, r.json()["errors"][0]["field"]) == (400, "openid"), r.text
    r = await fresh_tenant.post("/api/v1/messages/wechat-mp/send", json=body)  # no provider configured
    assert (r.status_code, r.json()["code"], r.json()["errors"][0]["field"]) == (404, 2011, "channel"), r.text
    assert await db.fetchval("SELECT count(*) FROM message_records") == before
