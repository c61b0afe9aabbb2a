"""Recipient profiles (issue 10) against the running pipeline: created, replaced, patched, listed
and deleted per tenant with addresses stored normalised and bad input refused naming the field;
and sends to a user: with a channel the profile's address is used (and delivered), without one
the message is recorded for the routing rules (or refused, leaving nothing, when they can never
route it), and an unknown user is refused with nothing recorded; what ``read`` keys see of a
message to a user names the user, not their profile."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import orjson
import pytest

from tests.conftest import Pipeline
from tests.e2e.helpers import auth, by_message_id, make_key, own_tenant, uniq, wait_for_mail, wait_for_state

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

RECIPIENTS = "/api/v1/recipients"
SEND = "/api/v1/messages/send"
AUDIT = "/api/v1/audit-logs"
RULES = "/api/v1/routing/rules"


@pytest.fixture(scope="module")
async def other_tenant(pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    async with await own_tenant(pipeline, "rc-") as c:
        yield c


async def _profile(client: httpx.AsyncClient, user_id: str, **body: object) -> dict:
    r = await client.put(f"{RECIPIENTS}/{user_id}", json=body)
    assert r.status_code in (200, 201), r.text
    return r.json()["data"]


async def test_a_profile_is_created_replaced_patched_listed_and_deleted(
    client: httpx.AsyncClient, other_tenant: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    user = uniq("alice-")
    r = await client.put(f"{RECIPIENTS}/{user}", json={
        "addresses": {"sms": "+86 138-0013-8000", "email": "Alice@Example.COM", "telegram": "@alice_ops"},
        "locale": "zh-CN", "timezone": "Asia/Shanghai", "opt_outs": {"categories": ["marketing"]},
        "quiet_hours": {"start": "22:00", "end": "07:00"}, "attributes": {"team": "ops", "level": 3, "vip": True},
    })  # fmt: skip
    assert r.status_code == 201, r.text
    created = r.json()["data"]
    assert created["user_id"] == user
    assert created["addresses"] == {"sms": "+8613800138000", "email": "Alice@example.com", "telegram": "@alice_ops"}
    assert created["opt_outs"] == {"categories": ["marketing"], "channels": []}
    assert created["attributes"] == {"team": "ops", "level": 3, "vip": True} and created["locale"] == "zh-CN"
    assert (await client.get(f"{RECIPIENTS}/{user}")).json()["data"] == created

    # PUT replaces the whole profile (left-out fields take their defaults): 200 now.
    r = await client.put(f"{RECIPIENTS}/{user}", json={"addresses": {"email": "alice@example.com"}})
    assert r.status_code == 200, r.text
    replaced = r.json()["data"]
    assert replaced["addresses"] == {"email": "alice@example.com"} and replaced["timezone"] == "UTC"
    assert replaced["quiet_hours"] is None and replaced["attributes"] == {} and replaced["locale"] is None

    # PATCH merges addresses and attributes (null removes one) and replaces the rest.
    r = await client.patch(f"{RECIPIENTS}/{user}", json={
        "addresses": {"sms": "+1 (202) 555-0123"}, "attributes": {"team": "web", "level": 1},
        "timezone": "Europe/Paris", "quiet_hours": {"start": "23:30", "end": "06:00"},
    })  # fmt: skip
    assert r.status_code == 200, r.text
    r = await client.patch(f"{RECIPIENTS}/{user}", json={"addresses": {"email": None}, "attributes": {"level": None}})
    patched = r.json()["data"]
    assert patched["addresses"] == {"sms": "+12025550123"} and patched["attributes"] == {"team": "web"}
    assert patched["timezone"] == "Europe/Paris" and patched["quiet_hours"] == {"start": "23:30", "end": "06:00"}
    r = await client.patch(f"{RECIPIENTS}/{user}", json={"quiet_hours": None})
    assert r.json()["data"]["quiet_hours"] is None

    # Listed by user id, filtered by prefix and by channel, paged.
    prefix = uniq("grp-")
    for n in range(3):
        await _profile(client, f"{prefix}{n}", addresses={"email": f"{prefix}{n}@example.com"} if n else {})
    listed = (await client.get(RECIPIENTS, params={"prefix": prefix})).json()["data"]
    assert [x["user_id"] for x in listed["records"]] == [f"{prefix}0", f"{prefix}1", f"{prefix}2"]
    paged = (await client.get(RECIPIENTS, params={"prefix": prefix, "page": 2, "page_size": 2})).json()["data"]
    assert paged["total"] == 3 and [x["user_id"] for x in paged["records"]] == [f"{prefix}2"]
    emails = (await client.get(RECIPIENTS, params={"prefix": prefix, "channel": "email"})).json()["data"]
    assert [x["user_id"] for x in emails["records"]] == [f"{prefix}1", f"{prefix}2"]

    # Another tenant neither sees nor changes them; its user of the same id is another person.
    for method, body in (("GET", None), ("PATCH", {"locale": "en"}), ("DELETE", None)):
        r = await other_tenant.request(method, f"{RECIPIENTS}/{user}", json=body)
        assert (r.status_code, r.json()["code"], r.json()["data"]) == (404, 1004, None), (method, r.text)
    assert (await other_tenant.get(RECIPIENTS, params={"prefix": prefix})).json()["data"]["total"] == 0
    r = await other_tenant.put(f"{RECIPIENTS}/{user}", json={"addresses": {"email": "someone.else@example.com"}})
    assert r.status_code == 201, r.text  # created in its own tenant, not a replacement of ours
    assert (await client.get(f"{RECIPIENTS}/{user}")).json()["data"]["addresses"] == {"sms": "+12025550123"}

    r = await client.delete(f"{RECIPIENTS}/{user}")
    assert r.status_code == 200 and r.json()["data"] == {"user_id": user, "deleted": True}
    r = await client.get(f"{RECIPIENTS}/{user}")
    assert (r.status_code, r.json()["code"], r.json()["errors"][0]["field"]) == (404, 1004, "user_id")
    assert await db.fetchval("SELECT count(*) FROM recipients WHERE user_id = $1", user) == 1  # the other tenant's

    # Audited, without the addresses themselves.
    r = await client.get(AUDIT, params={"target_type": "recipient", "page_size": 100})
    entries = [a for a in r.json()["data"]["items"] if a["target_id"] == user]
    actions = sorted(a["action"] for a in entries)
    assert actions == ["recipient.create", "recipient.delete", "recipient.replace", *["recipient.update"] * 3]
    # (Their details only: request ids and times are random enough to contain "8000" now and then.)
    text = orjson.dumps([a["details"] for a in entries]).decode()
    assert "8000" not in text and "Example" not in text and "555" not in text and "alice_ops" not in text
    create = next(a for a in entries if a["action"] == "recipient.create")["details"]
    details = create if isinstance(create, dict) else orjson.loads(create)
    assert details["addresses"] == {"sms": "<set>", "email": "<set>", "telegram": "<set>"}


@pytest.mark.parametrize(
    ("user_id", "body", "field"),
    [
        ("u-ok", {"addresses": {"sms": "13800138000"}}, "addresses.sms"),
        ("u-ok", {"addresses": {"email": "not-an-address"}}, "addresses.email"),
        ("u-ok", {"addresses": {"pigeon": "coo"}}, "addresses.pigeon"),
        ("u-ok", {"addresses": {"telegram": "alice"}}, "addresses.telegram"),
        ("u-ok", {"timezone": "Mars/Olympus_Mons"}, "timezone"),
        ("u-ok", {"quiet_hours": {"start": "22:00", "end": "22:00"}}, "quiet_hours.end"),
        ("u-ok", {"quiet_hours": {"start": "10pm", "end": "07:00"}}, "quiet_hours.start"),
        ("u-ok", {"opt_outs": {"channels": ["fax"]}}, "opt_outs.channels.0"),
        ("u-ok", {"locale": "english please"}, "locale"),
        ("u-ok", {"attributes": {"team": ["a", "b"]}}, "attributes.team"),
        ("u-ok", {"phone": "+8613800138000"}, "phone"),
        ("bad id", {}, "user_id"),
        ("-dash-first", {}, "user_id"),
    ],
)
async def test_a_bad_profile_is_refused_naming_the_field_and_nothing_is_stored(
    client: httpx.AsyncClient, db: asyncpg.Pool, user_id: str, body: dict, field: str
) -> None:
    user_id = user_id.replace("u-ok", uniq("u-"))
    r = await client.put(f"{RECIPIENTS}/{user_id}", json=body)
    assert (r.status_code, r.json()["code"], r.json()["data"]) == (400, 1001, None), r.text
    assert field in [e["field"] for e in r.json()["errors"]], r.text
    assert await db.fetchval("SELECT count(*) FROM recipients WHERE user_id = $1", user_id) == 0
    # Nor does a PATCH of an existing profile change it.
    if field != "user_id" and field != "phone":
        stored = await _profile(client, user_id, addresses={"email": f"{user_id}@example.com"})
        r = await client.patch(f"{RECIPIENTS}/{user_id}", json=body)
        assert (r.status_code, r.json()["code"]) == (400, 1001), r.text
        assert (await client.get(f"{RECIPIENTS}/{user_id}")).json()["data"] == stored
        await client.delete(f"{RECIPIENTS}/{user_id}")


# --- sends to a user -----------------------------------------------------------------------------


async def test_a_send_to_a_user_on_a_channel_goes_to_the_profiles_address(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    user = uniq("bob-")
    stored = f"{user}@example.com"
    await _profile(client, user, addresses={"email": f"{user}@Example.COM"}, attributes={"team": "ops"})
    subject = uniq("to a user ")
    body = {"channel": "email", "to": {"user_id": user}, "subject": subject, "content": "<p>hi</p>", "priority": "high"}
    r = await client.post(SEND, json=body)
    assert r.status_code == 202, r.text
    message_id = r.json()["data"]["message_id"]
    record = await db.fetchrow(
        "SELECT message_type, recipient, recipients::text AS recipients, request::text AS request "
        "FROM message_records WHERE message_id = $1",
        message_id,
    )
    assert (record["message_type"], record["recipient"]) == ("email", stored)
    assert orjson.loads(record["recipients"]) == {"to": [stored], "user_id": [user]}
    request = orjson.loads(record["request"])
    assert request["to"] == [stored] and request["channel"] == "email" and request["priority"] == "high"
    assert request["recipient"]["user_id"] == user and request["recipient"]["attributes"] == {"team": "ops"}
    history = (await client.get("/api/v1/messages", params={"recipient": user})).json()["data"]["records"]
    assert [m["message_id"] for m in history] == [message_id]  # found by the user as well as the address
    mail = await wait_for_mail(pipeline, by_message_id(message_id))
    assert mail.rcpt_tos == [stored]
    await wait_for_state(client, message_id, "sent")

    # The same send again is a duplicate (the fingerprint names the user and the priority).
    r = await client.post(SEND, json=body)
    assert (r.status_code, r.json()["code"]) == (409, 1006), r.text
    r = await client.post(SEND, json={**body, "priority": "low"})
    assert r.status_code == 202, r.text
    # An idempotency key replays its first answer; with another body it is refused.
    keyed = {**body, "subject": uniq("keyed "), "idempotency_key": uniq("idem-")}
    first = await client.post(SEND, json=keyed)
    assert first.status_code == 202, first.text
    replay = await client.post(SEND, json=keyed)
    assert replay.status_code == 202 and replay.headers.get("idempotent-replayed") == "true", replay.text
    assert replay.json()["data"]["message_id"] == first.json()["data"]["message_id"]
    r = await client.post(SEND, json={**keyed, "priority": "urgent"})
    assert (r.status_code, r.json()["code"]) == (409, 1006), r.text

    # Scheduled: the profile's address is taken now, the message waits.
    r = await client.post(SEND, json={**body, "subject": uniq("later "), "delay": "1h"})
    assert r.status_code == 202 and r.json()["data"]["state"] == "scheduled", r.text
    later = r.json()["data"]["message_id"]
    assert await db.fetchval("SELECT recipient FROM message_records WHERE message_id = $1", later) == stored
    assert (await client.post(f"/api/v1/messages/{later}/cancel")).status_code == 200


async def test_a_send_to_a_user_without_a_channel_is_recorded_for_the_routing_rules(
    other_tenant: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    client = other_tenant  # a tenant of this module's, with a rule for its alerts
    r = await client.post(RULES, json={"name": uniq("alerts-"), "match": {"categories": ["alerts"]},
                                       "channels": ["sms", "email"]})  # fmt: skip
    assert r.status_code == 201, r.text
    user = uniq("carol-")
    await _profile(client, user, addresses={"email": f"{user}@example.com", "sms": "+8613800138001"},
                   timezone="Asia/Shanghai")  # fmt: skip
    r = await client.post(SEND, json={"to": {"user_id": user}, "subject": "deploy", "content": "db down",
                                      "priority": "urgent", "category": "alerts", "delay": "2h"})  # fmt: skip
    assert r.status_code == 202, r.text
    message_id = r.json()["data"]["message_id"]
    record = await db.fetchrow(
        "SELECT message_type, recipient, content_type, request::text AS request FROM message_records "
        "WHERE message_id = $1",
        message_id,
    )
    # Recorded as the channel its rule gives it now (its quota's), to the user, until it is routed.
    assert (record["message_type"], record["recipient"], record["content_type"]) == ("sms", user, "text")
    request = orjson.loads(record["request"])
    assert "channel" not in request and request["to"] == [] and request["priority"] == "urgent"
    assert request["recipient"]["addresses"] == {"email": f"{user}@example.com", "sms": "+8613800138001"}
    assert (await client.get(f"/api/v1/messages/{message_id}")).json()["data"]["message_type"] == "sms"
    assert (await client.post(f"/api/v1/messages/{message_id}/cancel")).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"channel": "email", "to": {"user_id": "nobody-here"}, "subject": "s", "content": "c"}, 404, 1004,
         "to.user_id"),
        ({"to": {"user_id": "nobody-here"}, "content": "c"}, 404, 1004, "to.user_id"),
        ({"channel": "sms", "to": {"user_id": "{known}"}, "content": "c"}, 400, 1001, "to.user_id"),
        ({"to": {"user_id": "bad id"}, "content": "c"}, 400, 1001, "to.user_id"),
        ({"to": {"user": "x"}, "content": "c"}, 400, 1001, "to.user_id"),
        ({"to": {"user_id": "{known}"}, "content": "c", "priority": "asap"}, 400, 1001, "priority"),
        ({"to": {"user_id": "{known}"}}, 400, 1001, "content"),
        ({"to": {"user_id": "{known}"}, "content": "c", "email": {"cc": ["a@example.com"]}}, 400, 1001, "email"),
        ({"to": {"user_id": "{known}"}, "content": "c", "provider": "ali-main"}, 400, 1001, "provider"),
        ({"to": "+8613800138000", "content": "c"}, 400, 1001, "channel"),
    ],
)  # fmt: skip
async def test_a_send_to_an_unknown_user_or_without_an_address_is_refused_and_not_recorded(
    client: httpx.AsyncClient, db: asyncpg.Pool, body: dict, status: int, code: int, field: str
) -> None:
    known = uniq("dave-")
    await _profile(client, known, addresses={"email": f"{known}@example.com"})
    body = orjson.loads(orjson.dumps(body).replace(b"{known}", known.encode()))
    before = await db.fetchval("SELECT count(*) FROM message_records")
    r = await client.post(SEND, json=body)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text
    assert field in [e["field"] for e in r.json()["errors"]], r.text
    if field == "to.user_id" and code == 1001 and "channel" in body:
        assert "no sms address" in r.json()["message"]
    assert await db.fetchval("SELECT count(*) FROM message_records") == before


async def test_a_send_without_a_channel_that_can_never_be_routed_is_refused_and_leaves_nothing(
    other_tenant: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    client, category = other_tenant, uniq("never-")
    user = uniq("erin-")
    await _profile(client, user, addresses={"email": f"{user}@example.com"})
    body = {"to": {"user_id": user}, "content": "c", "category": category, "delay": "1h"}

    async def recorded() -> int:
        return await db.fetchval("SELECT count(*) FROM message_records WHERE recipient = $1", user)

    # No rule of the tenant matches: refused naming channel (not accepted, then rejected).
    r = await client.post(SEND, json=body)
    assert (r.status_code, r.json()["code"], r.json()["errors"][0]["field"]) == (400, 1001, "channel"), r.text
    # The rule that matches gives channels the profile has no address on: refused naming to.user_id.
    r = await client.post(RULES, json={"name": uniq("never-"), "match": {"categories": [category]},
                                       "channels": ["sms", "wecom"]})  # fmt: skip
    assert r.status_code == 201, r.text
    rule = r.json()["data"]
    r = await client.post(SEND, json=body)
    assert (r.status_code, r.json()["code"], r.json()["errors"][0]["field"]) == (400, 1001, "to.user_id"), r.text
    assert "no address on sms, wecom" in r.json()["message"] and rule["name"] in r.json()["message"], r.text
    assert await recorded() == 0
    # Once the rule gives a channel it has, the same send is accepted at once: the refusals left no
    # duplicate fingerprint behind (and this ingest reads the changed rule without waiting).
    r = await client.patch(f"{RULES}/{rule['id']}", json={"channels": ["sms", "email"]})
    assert r.status_code == 200, r.text
    r = await client.post(SEND, json=body)
    assert r.status_code == 202, r.text
    assert await recorded() == 1
    assert (await client.post(f"/api/v1/messages/{r.json()['data']['message_id']}/cancel")).status_code == 200

    # A recipient who opted out of every channel the rule gives is accepted: the router records
    # the message as suppressed.
    quiet = uniq("frank-")
    await _profile(client, quiet, addresses={"email": f"{quiet}@example.com"}, opt_outs={"channels": ["email"]})
    r = await client.post(SEND, json={**body, "to": {"user_id": quiet}, "delay": None})
    assert r.status_code == 202, r.text
    record = await wait_for_state(client, r.json()["data"]["message_id"], "suppressed", timeout=15)
    assert "opted out" in record["error_message"], record


async def test_read_keys_see_the_user_of_a_message_held_for_quiet_hours_not_their_profile(
    client: httpx.AsyncClient,
) -> None:
    user, phone = uniq("gina-"), "+8613800138077"
    now = datetime.now(UTC)
    await _profile(client, user, addresses={"email": f"{user}@example.com", "sms": phone},
                   attributes={"team": "secret-team"}, quiet_hours={
                       "start": (now - timedelta(minutes=5)).strftime("%H:%M"),
                       "end": (now + timedelta(hours=2)).strftime("%H:%M")})  # fmt: skip
    r = await client.post(SEND, json={"channel": "email", "to": {"user_id": user}, "subject": "s", "content": "c"})
    assert r.status_code == 202, r.text
    message_id = r.json()["data"]["message_id"]
    await wait_for_state(client, message_id, "scheduled", timeout=15)  # held by the router until they end
    reader = await make_key(client, ["read"])
    async with httpx.AsyncClient(base_url=str(client.base_url), headers=auth(reader["token"]), timeout=30) as read:
        timeline = await read.get(f"/api/v1/messages/{message_id}/timeline")
        detail = await read.get(f"/api/v1/messages/{message_id}")
    assert timeline.status_code == 200 and detail.status_code == 200, (timeline.text, detail.text)
    held = next(e for e in timeline.json()["data"]["events"] if (e["detail"] or {}).get("reason") == "quiet_hours")
    request = held["detail"]["request"]
    assert request["recipient"] == {"user_id": user}, held
    assert request["to"] == [f"{user}@example.com"] and request["subject"] == "s"  # the rest is kept
    for answer in (timeline.text, detail.text):
        assert phone not in answer and "secret-team" not in answer, answer
    await client.post(f"/api/v1/messages/{message_id}/cancel")
