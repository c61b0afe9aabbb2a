"""Smart routing through the whole pipeline (issue 10), against the vendors' local emulations told
to fail, slow down or recover: ingest → router (rules, profile, cost, quality, breakers) → the
channel's sender (failover across providers, then across channels) → the emulations; the tracker
computes each provider's quality and breaker and publishes them back to the routers.

The suite runs with short quality settings (tests/conftest.py): a 10-second window, breakers that
open after 3 consecutive failures and cool down for 3 seconds. Each test has a tenant of its own,
so its providers start without history. Messages are sent one after another, each waited for, and
the provider every one went through is read from its 'sent' event: the counts below are messages,
not seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import orjson
import pytest

from devstack import access
from tests.conftest import Pipeline
from tests.e2e.helpers import uniq, wait_for_state
from tests.emulators.aliyun import AliyunSmsEmulator
from tests.emulators.feishu import FeishuEmulator
from tests.emulators.tencent import TencentSmsEmulator

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

ALIYUN_ID, ALIYUN_SECRET = "LTAI5tRoutingKey", "e2e-routing-aliyun-secret"
TENCENT_ID, TENCENT_KEY, TENCENT_APP = "AKIDRoutingSecretId", "e2e-routing-tencent-key", "1400007777"
FEISHU_SECRET = "qZ8tW2xR5yN1vB7mRouting"
PHONE = "+8613800138055"
# Each SMS vendor approves templates of its own: a message that may fail over names both.
SMS_OPTIONS = {"providers": {"aliyun": {"template_code": "SMS_154950909", "params": {"product": "Herald"}},
                             "tencent": {"template_code": "1110", "params": ["5"]}}}  # fmt: skip


@dataclass
class Tenant:
    client: httpx.AsyncClient
    key: str  # the tenant's
    cheap: dict  # the Aliyun account, 0.03 a message
    dear: dict  # the Tencent account, 0.05 a message


@pytest.fixture(scope="module")
async def vendors() -> AsyncIterator[tuple[AliyunSmsEmulator, TencentSmsEmulator, FeishuEmulator]]:
    async with (
        AliyunSmsEmulator(ALIYUN_ID, ALIYUN_SECRET) as aliyun,
        TencentSmsEmulator(TENCENT_ID, TENCENT_KEY, sdk_app_id=TENCENT_APP) as tencent,
        FeishuEmulator(secret=FEISHU_SECRET) as feishu,
    ):
        yield aliyun, tencent, feishu  # type: ignore[misc]


@pytest.fixture
async def tenant(pipeline: Pipeline, vendors) -> AsyncIterator[Tenant]:
    """A tenant of its own with two SMS providers, the cheaper at Aliyun."""
    aliyun, tencent, _ = vendors
    for emu in vendors:
        emu.recover()
    name = uniq("rt-")
    env = pipeline.backing.env
    await asyncio.to_thread(access.admin, env, "create-tenant", name, "--name", f"Routing {name}")
    await asyncio.to_thread(access.admin, env, "set-quota", name, "sms", "unlimited")
    headers = await asyncio.to_thread(access.admin_headers, env, pipeline.ingest_url, tenant=name)
    async with httpx.AsyncClient(base_url=pipeline.ingest_url, timeout=30, headers=headers) as client:
        cheap = await _provider(client, "aliyun", "cheap", "0.03",
                                {"access_key_id": ALIYUN_ID, "access_key_secret": ALIYUN_SECRET,
                                 "sign_name": "Herald", "endpoint": aliyun.url + "/"})  # fmt: skip
        dear = await _provider(client, "tencent", "dear", "0.05",
                               {"secret_id": TENCENT_ID, "secret_key": TENCENT_KEY, "sdk_app_id": TENCENT_APP,
                                "sign_name": "Herald", "endpoint": tencent.url})  # fmt: skip
        yield Tenant(client, name, cheap, dear)
    for emu in vendors:
        emu.recover()


async def _provider(client: httpx.AsyncClient, plugin: str, name: str, cost: str, config: dict) -> dict:
    # "dear" is first by priority: only the router's ranking puts "cheap" first.
    body = {"channel": "sms", "provider": plugin, "name": name, "config": config, "costs": {"default": cost},
            "priority": 1 if name == "dear" else 2}  # fmt: skip
    r = await client.post("/api/v1/providers", json=body)
    assert r.status_code == 201, r.text
    return r.json()["data"]


async def _sent_by(client: httpx.AsyncClient, db: asyncpg.Pool, body: dict) -> tuple[str, str, dict]:
    """Send ``body``, wait for 'sent'; the message id, the provider that delivered it, and the
    router's decision on its 'routed' event."""
    r = await client.post("/api/v1/messages/send", json=body)
    assert r.status_code == 202, r.text
    message_id = r.json()["data"]["message_id"]
    await wait_for_state(client, message_id, "sent", timeout=30)
    rows = await db.fetch("SELECT state, detail FROM message_events WHERE message_id = $1 AND state IN "
                          "('sent', 'routed')", message_id)  # fmt: skip
    detail = {row["state"]: orjson.loads(row["detail"]) for row in rows}
    return message_id, detail["sent"]["provider_name"], detail["routed"].get("routing", {})


def _sms(text: str) -> dict:
    return {"channel": "sms", "to": PHONE, "content": text, "content_type": "text", "options": SMS_OPTIONS,
            "dedup": False}  # fmt: skip


async def _known(t: Tenant, db: asyncpg.Pool, min_success_rate: float = 0.9) -> None:
    """Until the routers know both providers and the tenant's policy (they follow the config
    topic): the first messages may still be the sender's own choice."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        _, _, decision = await _sent_by(t.client, db, _sms(uniq("warm-up ")))
        step = decision.get("steps", [{}])[0]
        if len(step.get("candidates", [])) == 2 and step["policy"]["min_success_rate"] == min_success_rate:
            return
    raise AssertionError("the router never learnt the tenant's two providers")


async def test_the_cheaper_of_two_healthy_providers_takes_the_traffic(tenant: Tenant, db, vendors) -> None:
    aliyun, tencent, _ = vendors
    await _known(tenant, db)
    before = len(tencent.calls)
    used = [(await _sent_by(tenant.client, db, _sms(f"m{i}")))[1] for i in range(8)]
    assert used == ["cheap"] * 8 and len(tencent.calls) == before
    _, _, decision = await _sent_by(tenant.client, db, _sms("why"))
    step = decision["steps"][0]
    assert step["chosen"] == "cheap" and step["reason"].startswith("cheapest provider that meets the threshold")
    assert [(c["name"], c["cost"]) for c in step["candidates"]] == [("cheap", "0.03"), ("dear", "0.05")]


async def test_a_provider_failing_30_percent_loses_the_traffic_and_gets_it_back(tenant: Tenant, db, vendors) -> None:
    aliyun, tencent, _ = vendors
    await _known(tenant, db)
    aliyun.fail_ratio("server_error", 0.3)
    first: list[str] = []  # the provider the router put first for each message
    tried: list[bool] = []  # whether each message was tried at the cheap provider
    for i in range(30):
        before = len(aliyun.calls)
        _, _, decision = await _sent_by(tenant.client, db, _sms(f"flaky {i}"))  # each one sent: failover
        first.append(decision["steps"][0]["chosen"])
        tried.append(len(aliyun.calls) > before)
    shift = first.index("dear") + 1  # messages until the router first put the other one first
    after = tried[shift:]
    share = sum(after) / len(after)
    print(f"\n30 % failures: the router moved traffic away after {shift} messages; then the cheap provider got "
          f"{sum(after)} of {len(after)} messages ({share:.0%}), each time its failures had left the window")
    assert 4 <= shift <= 15, first  # 3 failures of the first ≤ 10 tries tell it cannot reach 90 %
    assert share <= 0.4, tried  # from 100 % of the traffic before
    # Recovered: once its failures leave the quality window (10 s), it takes the traffic again.
    aliyun.recover()
    started, sent = time.monotonic(), 0
    while True:
        sent += 1
        if (await _sent_by(tenant.client, db, _sms(f"recovered {sent}")))[1] == "cheap":
            break
        assert time.monotonic() - started < 40, "traffic never came back to the recovered provider"
        await asyncio.sleep(0.3)
    back = [(await _sent_by(tenant.client, db, _sms(f"steady {i}")))[1] for i in range(5)]
    print(f"30 % failures: traffic back after recovery in {sent} messages ({time.monotonic() - started:.1f} s); "
          f"then {back.count('cheap')}/5 through it")  # fmt: skip
    assert back.count("cheap") >= 4, back


async def test_a_dead_provider_opens_its_breaker_loses_nothing_and_gets_traffic_back(tenant, db, vendors) -> None:
    aliyun, tencent, _ = vendors
    # A tenant that tolerates a flaky provider (50 %): only the breaker takes a broken one out.
    r = await tenant.client.put("/api/v1/routing/policy", json={"min_success_rate": 0.5})
    assert r.status_code == 200, r.text
    await _known(tenant, db, min_success_rate=0.5)
    aliyun.fail("server_error", times=-1)
    messages: list[str] = []
    tried: list[bool] = []
    for i in range(15):
        before = len(aliyun.calls)
        message_id, used, _ = await _sent_by(tenant.client, db, _sms(f"outage {i}"))
        messages.append(message_id)
        tried.append(len(aliyun.calls) > before)
        assert used == "dear"  # failed over within the attempt: sent, not retried later
    opened = tried.index(False)  # the first message the router no longer sent there
    probes = sum(tried[opened:])  # after that: one probe per cooldown (3 s), each failing again
    print(f"\n100 % failures: breaker open, traffic gone after {opened} messages; {probes} probes in the next "
          f"{len(tried) - opened}")  # fmt: skip
    assert 3 <= opened <= 6, tried  # 3 consecutive failures open it; one or two more while the news travels
    assert probes <= 4, tried
    # The failed tries are on the messages' timelines, each naming the provider and why.
    failover = await db.fetchrow("SELECT detail FROM message_events WHERE message_id = $1 AND state = 'retrying'",
                                 messages[0])  # fmt: skip
    assert failover is not None and orjson.loads(failover["detail"])["failover"] is True
    decision = (await _sent_by(tenant.client, db, _sms("while open")))[2]["steps"][0]
    cheap = next(c for c in decision["candidates"] if c["name"] == "cheap")
    assert cheap["breaker"] in ("open", "half_open") and decision["candidates"][-1]["name"] == "cheap", decision
    # Recovery: after the cooldown (3 s) one message probes it, succeeds, and the breaker closes.
    aliyun.recover()
    started, sent = time.monotonic(), 0
    while True:
        sent += 1
        if (await _sent_by(tenant.client, db, _sms(f"back {sent}")))[1] == "cheap":
            break
        assert time.monotonic() - started < 30, "traffic never came back after the breaker's cooldown"
        await asyncio.sleep(0.3)
    # Then it keeps the traffic (its statistics started afresh when the breaker closed).
    after = [(await _sent_by(tenant.client, db, _sms(f"steady {i}")))[1] for i in range(5)]
    print(f"100 % failures: traffic back {time.monotonic() - started:.1f} s after recovery, in {sent} messages; "
          f"then {after.count('cheap')}/5 through it")  # fmt: skip
    assert after.count("cheap") >= 4, after
    assert all(r["state"] == "sent" for r in await db.fetch(
        "SELECT state FROM message_records WHERE message_id = ANY($1::text[])", messages))  # fmt: skip


# --- recipients and rules ----------------------------------------------------------------------


async def _feishu_bot(t: Tenant, feishu: FeishuEmulator) -> str:
    name = uniq("bot-")
    r = await t.client.post("/api/v1/providers", json={"channel": "feishu", "provider": "feishu", "name": name,
                            "config": {"webhook_url": feishu.webhook_url, "secret": FEISHU_SECRET}})  # fmt: skip
    assert r.status_code == 201, r.text
    return name


async def _profile(t: Tenant, user_id: str, **fields) -> None:
    r = await t.client.put(f"/api/v1/recipients/{user_id}", json={"addresses": {"sms": PHONE}, **fields})
    assert r.status_code in (200, 201), r.text


async def test_a_failing_im_channel_falls_back_to_sms(tenant: Tenant, db, vendors) -> None:
    aliyun, _, feishu = vendors
    bot = await _feishu_bot(tenant, feishu)
    await _profile(tenant, "oncall", addresses={"feishu": bot, "sms": PHONE}, timezone="Asia/Shanghai")
    r = await tenant.client.post("/api/v1/routing/rules", json={
        "name": "ops: IM, then SMS", "match": {"categories": ["ops"]}, "channels": ["feishu", "sms"],
        "strategy": "first_success", "step_timeout_s": 60})  # fmt: skip
    assert r.status_code == 201, r.text
    feishu.fail("auth", times=-1)  # the bot's secret was rotated: every post refused
    before = len(aliyun.verified())
    r = await tenant.client.post("/api/v1/messages/send", json={
        "to": {"user_id": "oncall"}, "category": "ops", "content": "db down", "content_type": "text",
        "options": SMS_OPTIONS})  # fmt: skip
    assert r.status_code == 202, r.text
    message_id = r.json()["data"]["message_id"]
    record = await wait_for_state(tenant.client, message_id, "sent", timeout=30)
    info = record["sender_info"] if isinstance(record["sender_info"], dict) else orjson.loads(record["sender_info"])
    assert len(aliyun.verified()) == before + 1 and info["channel"] == "sms", record
    events = (await tenant.client.get(f"/api/v1/messages/{message_id}/timeline")).json()["data"]["events"]
    routed = next(e for e in events if e["state"] == "routed")["detail"]["routing"]
    assert routed["rule"]["name"] == "ops: IM, then SMS" and routed["channels"] == ["feishu", "sms"]
    fallback = next(e for e in events if (e["detail"] or {}).get("fallback"))
    assert fallback["channel"] == "feishu" and fallback["error_code"] == 2012
    assert fallback["detail"]["fallback"] == {"reason": "failed", "from": "feishu", "to": "sms", "step": 2,
                                              "attempt": 2}  # fmt: skip
    assert [e["channel"] for e in events if e["state"] == "sent"] == ["sms"]
    shown = (await tenant.client.get(f"/api/v1/messages/{message_id}")).json()["data"]["routing"]
    assert shown["decision"] == routed
    assert [(h["kind"], h["channel"], h["to"], h["error_code"]) for h in shown["handovers"]] == [
        ("next_channel", "feishu", "sms", 2012)
    ]


async def test_quiet_hours_hold_a_normal_message_and_let_an_urgent_one_through(tenant: Tenant, db, vendors) -> None:
    aliyun, _, _ = vendors
    zone = ZoneInfo("America/New_York")
    here = datetime.now(zone)
    end = (here + timedelta(seconds=6)).replace(microsecond=0)
    quiet = {"start": (here - timedelta(minutes=5)).strftime("%H:%M:%S"), "end": end.strftime("%H:%M:%S")}
    await _profile(tenant, "sleeper", timezone="America/New_York", quiet_hours=quiet)
    await _known(tenant, db)

    async def send(priority: str) -> str:
        r = await tenant.client.post("/api/v1/messages/send", json={
            "to": {"user_id": "sleeper"}, "channel": "sms", "priority": priority, "content": f"{priority} news",
            "content_type": "text", "options": SMS_OPTIONS})  # fmt: skip
        assert r.status_code == 202, r.text
        return r.json()["data"]["message_id"]

    normal, urgent = await send("normal"), await send("urgent")
    sent = await wait_for_state(tenant.client, urgent, "sent", timeout=15)
    held = await wait_for_state(tenant.client, normal, "scheduled", timeout=15)
    assert datetime.fromisoformat(sent["sent_at"].replace("Z", "+00:00")) < end
    assert datetime.fromisoformat(held["scheduled_at"].replace("Z", "+00:00")) == end.astimezone(UTC)
    released = await wait_for_state(tenant.client, normal, "sent", timeout=30)
    assert datetime.fromisoformat(released["sent_at"].replace("Z", "+00:00")) >= end


async def test_an_opted_out_category_is_not_sent_and_recorded_as_such(tenant: Tenant, db, vendors) -> None:
    aliyun, tencent, _ = vendors
    await _profile(tenant, "no-ads", opt_outs={"categories": ["marketing"]})
    calls = len(aliyun.calls) + len(tencent.calls)
    r = await tenant.client.post("/api/v1/messages/send", json={
        "to": {"user_id": "no-ads"}, "channel": "sms", "category": "marketing", "content": "50 % off",
        "content_type": "text", "options": SMS_OPTIONS})  # fmt: skip
    assert r.status_code == 202, r.text
    message_id = r.json()["data"]["message_id"]
    record = await wait_for_state(tenant.client, message_id, "suppressed", timeout=15)
    assert "opted out" in record["error_message"], record
    events = (await tenant.client.get(f"/api/v1/messages/{message_id}/timeline")).json()["data"]["events"]
    suppressed = next(e for e in events if e["state"] == "suppressed")
    assert suppressed["detail"] == {"reason": "opted_out", "category": "marketing"}
    await asyncio.sleep(1)  # nothing may follow: no vendor hears of it
    assert len(aliyun.calls) + len(tencent.calls) == calls


async def test_a_send_without_channel_counts_against_the_quota_of_the_channel_its_rule_gives(
    tenant: Tenant, pipeline: Pipeline
) -> None:
    await asyncio.to_thread(access.admin, pipeline.backing.env, "set-quota", tenant.key, "sms", "1")
    await _profile(tenant, "counted")
    r = await tenant.client.post("/api/v1/routing/rules", json={"name": "sms only", "channels": ["sms"]})
    assert r.status_code == 201, r.text
    body = {"to": {"user_id": "counted"}, "content": "one", "content_type": "text", "options": SMS_OPTIONS}
    assert (await tenant.client.post("/api/v1/messages/send", json=body)).status_code == 202
    r = await tenant.client.post("/api/v1/messages/send", json={**body, "content": "two"})
    assert (r.status_code, r.json()["code"]) == (429, 1008), r.text
    assert "sms quota" in r.json()["message"]


async def test_an_all_rule_delivers_on_every_channel_as_linked_messages(tenant: Tenant, db, vendors) -> None:
    aliyun, _, feishu = vendors
    bot = await _feishu_bot(tenant, feishu)
    await _profile(tenant, "everywhere", addresses={"feishu": bot, "sms": PHONE})
    r = await tenant.client.post("/api/v1/routing/rules", json={
        "name": "urgent: everything", "match": {"priorities": ["urgent"]}, "channels": ["feishu", "sms"],
        "strategy": "all"})  # fmt: skip
    assert r.status_code == 201, r.text
    token = uniq("all-")
    r = await tenant.client.post("/api/v1/messages/send", json={
        "to": {"user_id": "everywhere"}, "priority": "urgent", "content": f"fire {token}", "content_type": "text",
        "options": SMS_OPTIONS})  # fmt: skip
    assert r.status_code == 202, r.text
    message_id = r.json()["data"]["message_id"]
    record = await wait_for_state(tenant.client, message_id, "sent", timeout=30)
    assert record["message_type"] == "feishu"
    [child] = record["routing"]["decision"]["children"]
    assert child["channel"] == "sms"
    other = await wait_for_state(tenant.client, child["message_id"], "sent", timeout=30)
    assert other["message_type"] == "sms" and other["recipient"] == PHONE
    assert any(token in str(c.json()) for c in feishu.verified())
    stored = await db.fetchval("SELECT request->>'parent_id' FROM message_records WHERE message_id = $1",
                               child["message_id"])  # fmt: skip
    assert stored == message_id  # its request is kept: the sweeper can publish it again
