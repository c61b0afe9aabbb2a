"""Batch sends through the whole pipeline (issue 8): one content to many recipients, each its own
message; bad items reported one by one while the others go out; templates fanned out with each
recipient's variables; idempotent replays; batches refused whole record nothing; progress counts;
tenants and scopes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import httpx
import orjson
import pytest

from devstack import access
from tests.conftest import Pipeline
from tests.e2e.helpers import auth, by_message_id, make_key, uniq, wait_for_mail

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

BATCH = "/api/v1/messages/batch"
BATCHES = "/api/v1/batches"


async def wait_for_progress(client: httpx.AsyncClient, batch_id: str, success: int, timeout: float = 120) -> dict:
    """The batch once ``success`` of its messages are sent and none is pending or sending."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        r = await client.get(f"{BATCHES}/{batch_id}")
        assert r.status_code == 200, r.text
        last = r.json()["data"]
        if last["progress"]["by_status"]["success"] >= success and last["progress"]["done"]:
            return last
        await asyncio.sleep(0.25)
    raise AssertionError(f"batch {batch_id} never reached {success} sent; last seen {last}")


@pytest.fixture
async def room_in_the_mailbox(db: asyncpg.Pool) -> AsyncIterator[None]:
    """The suite's mailbox allows 500 a day: room for a thousand more, and the counts put back
    afterwards so that later tests find the pool as it was."""
    saved = await db.fetch("SELECT id, daily_limit, daily_sent_count FROM email_accounts WHERE tenant_id='default'")
    await db.execute("UPDATE email_accounts SET daily_limit = daily_limit + 1000 WHERE tenant_id='default'")
    yield
    for row in saved:
        await db.execute("UPDATE email_accounts SET daily_limit=$2, daily_sent_count=$3 WHERE id=$1", *row.values())


@pytest.mark.usefixtures("room_in_the_mailbox")
async def test_a_thousand_with_three_bad_addresses_sends_997_once_and_itemises_the_three(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    tag = uniq()
    recipients: list = [f"r{i}-{tag}@example.com" for i in range(1000)]
    recipients[17] = "not-an-address"
    recipients[500] = f"r500-{tag}@@example.com"
    recipients[999] = {"to": f"r999-{tag}.example.com"}
    subject = f"batch {tag}"
    started = time.monotonic()
    r = await client.post(
        BATCH,
        json={"recipients": recipients, "subject": subject, "content": "<p>hello all</p>", "category": "newsletter"},
    )
    answered = time.monotonic() - started
    assert r.status_code == 202, r.text
    data = r.json()["data"]
    batch_id = data["batch_id"]
    assert batch_id.startswith("bat_" + time.strftime("%Y%m%d", time.gmtime()) + "_")
    assert (data["total"], data["accepted"], data["rejected"]) == (1000, 997, 3)
    assert [(e["index"], e["field"], e["code"]) for e in data["errors"]] == [
        (17, "recipients.17", 1001),
        (500, "recipients.500", 1001),
        (999, "recipients.999.to", 1001),
    ]
    assert all("email address" in e["message"] for e in data["errors"])
    assert data["errors"][0]["to"] == "not-an-address"
    messages = data["messages"]
    assert [m["index"] for m in messages] == [i for i in range(1000) if i not in (17, 500, 999)]
    assert all(m["to"] == recipients[m["index"]] for m in messages)
    ids = {m["message_id"]: m["to"] for m in messages}
    assert len(ids) == 997

    done = await wait_for_progress(client, batch_id, 997)
    print(f"batch of 1000: answered in {answered:.2f} s, 997 sent after {time.monotonic() - started:.2f} s")
    assert done["progress"]["by_status"] == {"pending": 0, "sending": 0, "success": 997, "failed": 0}
    assert done["progress"]["by_state"] == {"sent": 997} and done["progress"]["messages"] == 997
    assert (done["state"], done["total"], done["accepted"], done["rejected"]) == ("accepted", 1000, 997, 3)
    assert done["category"] == "newsletter" and done["subject"] == subject
    assert [e["index"] for e in done["errors"]] == [17, 500, 999]

    # Every one at the sink exactly once, to its own recipient.
    arrived = [m for m in list(pipeline.backing.smtp.messages) if any(tag in rcpt for rcpt in m.rcpt_tos)]
    seen = Counter(m.parsed()["X-Herald-Message-ID"] for m in arrived)
    assert set(seen) == set(ids) and set(seen.values()) == {1}
    assert all(m.rcpt_tos == [ids[m.parsed()["X-Herald-Message-ID"]]] for m in arrived)
    assert all(m.parsed()["Subject"] == subject for m in arrived[:20])

    rows = await db.fetch(
        "SELECT message_id, batch_id, category, state FROM message_records WHERE batch_id = $1", batch_id
    )
    assert {r["message_id"] for r in rows} == set(ids)
    assert {(r["category"], r["state"]) for r in rows} == {("newsletter", "sent")}

    page = await client.get(f"{BATCHES}/{batch_id}/messages", params={"status": "success", "page_size": 1000})
    assert page.status_code == 200 and page.json()["data"]["total"] == 997
    assert {m["message_id"] for m in page.json()["data"]["records"]} == set(ids)
    pending = (await client.get(f"{BATCHES}/{batch_id}/messages", params={"status": "pending"})).json()["data"]
    assert pending["total"] == 0 and pending["records"] == []
    listed = (await client.get(BATCHES, params={"category": "newsletter"})).json()["data"]
    mine = next(b for b in listed["records"] if b["batch_id"] == batch_id)
    assert mine["progress"]["by_status"]["success"] == 997 and "errors" not in mine


async def test_template_fan_out_with_each_recipients_variables(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    r = await client.post(
        "/api/v1/templates",
        json={
            "template_name": uniq("fanout-"),
            "template_type": "email",
            "subject": "Hello {{ name }}",
            "content": "<p>{{ greeting }} {{ name }}, your code is {{ code }}</p>",
            "variables": ["greeting", "name", "code"],
            "variants": [
                {
                    "channel": "email",
                    "locale": "zh",
                    "subject": "你好 {{ name }}",
                    "content": "<p>{{ name }}：{{ code }}</p>",
                }
            ],
        },
    )
    assert r.status_code == 201, r.text
    template = r.json()["data"]
    tag = uniq()
    body = {
        "template_id": template["id"],
        "template_vars": {"greeting": "Hi", "code": "common"},
        "recipients": [
            {"to": f"ann-{tag}@example.com", "template_vars": {"name": "Ann"}},
            {"to": f"bo-{tag}@example.com", "template_vars": {"name": "Bo", "code": "B-7"}},
            {"to": f"cy-{tag}@example.com", "template_vars": {"name": "Cy"}, "locale": "zh-CN"},
            f"di-{tag}@example.com",  # no name: refused, the others go
            {"to": f"ed-{tag}@example.com", "template_vars": {"name": "Ed & Co", "greeting": "Dear"}},
        ],
    }
    r = await client.post(BATCH, json=body)
    assert r.status_code == 202, r.text
    data = r.json()["data"]
    assert (data["accepted"], data["rejected"]) == (4, 1)
    assert data["errors"] == [
        {
            "index": 3,
            "field": "recipients.3.template_vars.name",
            "code": 2004,
            "message": "missing template variable: name",
            "to": f"di-{tag}@example.com",
        }
    ]
    expected = {
        0: ("Hello Ann", "Hi Ann, your code is common"),
        1: ("Hello Bo", "Hi Bo, your code is B-7"),
        2: ("你好 Cy", "Cy：common"),
        4: ("Hello Ed & Co", "Dear Ed &amp; Co, your code is common"),
    }
    for m in data["messages"]:
        mail = await wait_for_mail(pipeline, by_message_id(m["message_id"]))
        subject, html = expected[m["index"]]
        assert mail.rcpt_tos == [m["to"]]
        assert mail.parsed()["Subject"] == subject
        assert html in mail.parsed().get_body(("html",)).get_content()
    row = await db.fetchrow(
        "SELECT template_id, template_version, template_vars, locale FROM message_records WHERE message_id = $1",
        data["messages"][2]["message_id"],
    )
    assert (row["template_id"], row["template_version"], row["locale"]) == (template["id"], 1, "zh-CN")
    assert orjson.loads(row["template_vars"]) == {"greeting": "Hi", "code": "common", "name": "Cy"}
    done = await wait_for_progress(client, data["batch_id"], 4)
    assert done["template_id"] == template["id"] and done["template_version"] == 1


async def test_idempotent_replay_duplicates_and_dedup(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    tag = uniq()
    body = {
        "recipients": [f"a-{tag}@example.com", f"b-{tag}@example.com", f"c-{tag}@example.com"],
        "subject": f"idem {tag}",
        "content": "<p>once</p>",
    }
    key = uniq("batch-key-")
    first = await client.post(BATCH, json={**body, "idempotency_key": key})
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    # The same key (in the header this time) and body: the first answer again, nothing new.
    again = await client.post(BATCH, json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["data"] == first.json()["data"]
    batch_id = first.json()["data"]["batch_id"]
    assert await db.fetchval("SELECT count(*) FROM message_records WHERE batch_id = $1", batch_id) == 3
    assert await db.fetchval("SELECT count(*) FROM batches WHERE idempotency_key = $1", key) == 1
    # The same key with another body.
    other = await client.post(BATCH, json={**body, "subject": "changed", "idempotency_key": key})
    assert other.status_code == 409 and other.json()["code"] == 1006
    assert other.json()["errors"][0]["field"] == "idempotency_key" and batch_id in other.json()["message"]
    clash = await client.post(BATCH, json={**body, "idempotency_key": key}, headers={"Idempotency-Key": "other"})
    assert clash.status_code == 400 and clash.json()["errors"][0]["field"] == "idempotency_key"

    # Without a key, the same emails within the dedup window are duplicates, item by item...
    fresh = {**body, "subject": f"dedup {tag}"}
    assert (await client.post(BATCH, json=fresh)).status_code == 202
    repeat = await client.post(BATCH, json={**fresh, "recipients": [*fresh["recipients"], f"d-{tag}@example.com"]})
    assert repeat.status_code == 202, repeat.text
    data = repeat.json()["data"]
    assert (data["accepted"], [m["index"] for m in data["messages"]]) == (1, [3])
    assert [(e["index"], e["code"]) for e in data["errors"]] == [(0, 1006), (1, 1006), (2, 1006)]
    assert "duplicate of msg_" in data["errors"][0]["message"]
    # ... a batch of nothing but duplicates is refused as one (409), and repeats within a batch too.
    everything = await client.post(BATCH, json=fresh)
    assert everything.status_code == 409 and everything.json()["code"] == 1006
    assert [e["index"] for e in everything.json()["errors"]] == [0, 1, 2]
    twice = await client.post(
        BATCH, json={**fresh, "subject": f"twice {tag}", "recipients": [f"e-{tag}@example.com", f"E-{tag}@example.com"]}
    )
    assert twice.status_code == 202 and twice.json()["data"]["errors"][0]["field"] == "recipients.1"
    # "dedup": false sends anyway.
    forced = await client.post(BATCH, json={**fresh, "dedup": False})
    assert forced.status_code == 202 and forced.json()["data"]["accepted"] == 3


async def test_a_keyed_batch_left_unfinished_is_taken_over_without_sending_anything_twice(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    """What a retry with the key finds after a 503 (batch 'failed') or an ingest that died mid-way
    ('accepting' for a minute): the same batch, its items already recorded answered as they were."""
    tag = uniq()
    body = {
        "recipients": [f"t{i}-{tag}@example.com" for i in range(3)],
        "subject": f"takeover {tag}",
        "content": "<p>t</p>",
        "idempotency_key": uniq("takeover-"),
    }
    first = await client.post(BATCH, json=body)
    assert first.status_code == 202, first.text
    batch_id = first.json()["data"]["batch_id"]
    await db.execute("UPDATE batches SET state = 'accepting', response = NULL WHERE batch_id = $1", batch_id)
    busy = await client.post(BATCH, json=body)
    assert busy.status_code == 409 and busy.headers["retry-after"] == "1" and busy.json()["code"] == 1006
    for change in ("updated_at = now() - interval '61 seconds'", "state = 'failed'"):
        await db.execute(f"UPDATE batches SET {change}, response = NULL WHERE batch_id = $1", batch_id)
        again = await client.post(BATCH, json=body)
        assert again.status_code == 202 and "idempotent-replayed" not in again.headers, again.text
        assert again.json()["data"] == first.json()["data"]
    assert await db.fetchval("SELECT count(*) FROM message_records WHERE batch_id = $1", batch_id) == 3
    keys = await db.fetch("SELECT idempotency_key FROM message_records WHERE batch_id = $1", batch_id)
    assert sorted(k["idempotency_key"] for k in keys) == [f"{batch_id}:{i}" for i in range(3)]
    replay = await client.post(BATCH, json=body)
    assert replay.headers["idempotent-replayed"] == "true" and replay.json()["data"] == first.json()["data"]


BAD_BATCHES = [
    pytest.param({"recipients": []}, 400, 1001, "recipients", id="no-recipients"),
    pytest.param({"recipients": [f"x{i}@example.com" for i in range(1001)]}, 400, 1001, "recipients", id="1001"),
    pytest.param({"recipients": "x@example.com"}, 400, 1001, "recipients", id="not-a-list"),
    pytest.param({"subject": None}, 400, 1001, "subject", id="no-subject"),
    pytest.param({"scheduled_time": "tomorrow"}, 400, 1001, "scheduled_time", id="bad-time"),
    pytest.param({"scheduled_time": "2020-01-01T00:00:00Z"}, 400, 1001, "scheduled_time", id="past"),
    pytest.param({"delay": "400d"}, 400, 1001, "delay", id="beyond-horizon"),
    pytest.param({"delay": "1h", "scheduled_time": "2099-01-01T00:00:00Z"}, 400, 1001, "delay", id="both"),
    pytest.param({"timezone": "Mars/Base"}, 400, 1001, "timezone", id="bad-zone"),
    pytest.param(
        {"subject": None, "content": None, "template_id": 987654321}, 404, 2003, "template_id", id="unknown-template"
    ),
    pytest.param({"attachment_ids": ["att_20260101_nothing"]}, 404, 2006, "attachment_ids", id="unknown-attachment"),
    pytest.param({"channel": "sms"}, 400, 1001, "channel", id="other-channel"),
    pytest.param({"cc": ["x@example.com"]}, 400, 1001, "cc", id="unknown-field"),
    pytest.param({"recipients": ["nope", {"to": "a@@b.com"}, 3]}, 400, 1001, "recipients.0", id="all-invalid"),
]


@pytest.mark.parametrize(("changes", "status", "code", "field"), BAD_BATCHES)
async def test_a_batch_refused_whole_names_the_field_and_records_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, changes: dict, status: int, code: int, field: str
) -> None:
    tag = uniq()
    body = {"recipients": [f"ok-{tag}@example.com"], "subject": f"refused {tag}", "content": "<p>x</p>", **changes}
    r = await client.post(BATCH, json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == status, r.text
    answer = r.json()
    assert answer["code"] == code and answer["data"] is None
    assert answer["errors"][0]["field"] == field, answer
    assert await db.fetchval("SELECT count(*) FROM batches WHERE subject = $1", f"refused {tag}") == 0
    assert await db.fetchval("SELECT count(*) FROM message_records WHERE subject = $1", f"refused {tag}") == 0
    if field == "recipients.0":  # every item itemised
        assert [(e["index"], e["field"]) for e in answer["errors"]] == [
            (0, "recipients.0"),
            (1, "recipients.1.to"),
            (2, "recipients.2"),
        ]


async def test_a_scheduled_batch_waits_and_can_be_cancelled(client: httpx.AsyncClient) -> None:
    tag = uniq()
    r = await client.post(
        BATCH,
        json={
            "recipients": [f"s1-{tag}@example.com", f"s2-{tag}@example.com"],
            "subject": f"later {tag}",
            "content": "<p>later</p>",
            "delay": "1h",
        },
    )
    assert r.status_code == 202, r.text
    data = r.json()["data"]
    assert data["scheduled_at"].endswith("Z") and data["accepted"] == 2
    batch = (await client.get(f"{BATCHES}/{data['batch_id']}")).json()["data"]
    assert batch["scheduled_at"] is not None
    assert batch["progress"]["by_state"] == {"scheduled": 2} and batch["progress"]["by_status"]["pending"] == 2
    assert batch["progress"]["done"] is False
    first, second = data["messages"]
    assert (await client.post(f"/api/v1/messages/{first['message_id']}/cancel")).status_code == 200
    # The rest of the batch at once; a second time there is nothing left to cancel.
    r = await client.post(f"{BATCHES}/{data['batch_id']}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["data"] == {"batch_id": data["batch_id"], "cancelled": 1, "message_ids": [second["message_id"]]}
    r = await client.post(f"{BATCHES}/{data['batch_id']}/cancel")
    assert r.status_code == 409 and r.json()["code"] == 1009 and r.json()["errors"][0]["field"] == "batch_id"
    batch = (await client.get(f"{BATCHES}/{data['batch_id']}")).json()["data"]
    assert batch["progress"]["by_state"] == {"cancelled": 2} and batch["progress"]["done"] is True


async def test_other_tenants_batches_answer_404_and_quota_is_all_or_nothing(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    env = pipeline.backing.env
    tenant = uniq("bq-")
    await asyncio.to_thread(access.admin, env, "create-tenant", tenant, "--name", f"Batches {tenant}")
    await asyncio.to_thread(access.admin, env, "set-quota", tenant, "email", "3")
    headers = await asyncio.to_thread(access.admin_headers, env, pipeline.ingest_url, tenant=tenant)
    r = await client.post(
        BATCH, json={"recipients": [f"{uniq('t-')}@example.com"], "subject": uniq(), "content": "<p>mine</p>"}
    )
    batch_id = r.json()["data"]["batch_id"]
    tag = uniq()
    async with httpx.AsyncClient(base_url=pipeline.ingest_url, timeout=30, headers=headers) as other:
        for url in (f"{BATCHES}/{batch_id}", f"{BATCHES}/{batch_id}/messages"):
            r = await other.get(url)
            assert r.status_code == 404 and r.json()["code"] == 1004 and r.json()["data"] is None, r.text
        r = await other.post(f"{BATCHES}/{batch_id}/cancel")
        assert r.status_code == 404 and r.json()["code"] == 1004, r.text
        assert batch_id not in (await other.get(BATCHES)).text

        # Four valid items (and a bad one) do not fit a quota of three: nothing is recorded.
        four = [f"q{i}-{tag}@example.com" for i in range(4)]
        r = await other.post(BATCH, json={"recipients": [*four, "bad"], "subject": "q", "content": "<p>q</p>"})
        assert r.status_code == 429 and r.json()["code"] == 1008, r.text
        assert "does not cover this batch's 4" in r.json()["message"]
        assert await db.fetchval("SELECT count(*) FROM message_records WHERE tenant_id = $1", tenant) == 0
        assert await db.fetchval("SELECT count(*) FROM batches WHERE tenant_id = $1", tenant) == 0
        r = await other.post(BATCH, json={"recipients": four[:3], "subject": "q", "content": "<p>q</p>"})
        assert r.status_code == 202 and r.json()["data"]["accepted"] == 3, r.text
        usage = (await other.get(f"/api/v1/tenants/{tenant}")).json()["data"]["usage"]["used"]["email"]
        assert usage == 3
        assert (await client.get(f"{BATCHES}/{r.json()['data']['batch_id']}")).status_code == 404


async def test_scopes(client: httpx.AsyncClient) -> None:
    read_only = await make_key(client, ["read"])
    send_only = await make_key(client, ["send"])
    body = {"recipients": [f"{uniq('scope-')}@example.com"], "subject": uniq(), "content": "<p>s</p>"}
    r = await client.post(BATCH, json=body, headers=auth(read_only["token"]))
    assert r.status_code == 403 and r.json()["code"] == 1003 and "send" in r.json()["message"]
    r = await client.post(BATCH, json=body, headers=auth(send_only["token"]))
    assert r.status_code == 202, r.text
    batch_id = r.json()["data"]["batch_id"]
    for url in (f"{BATCHES}/{batch_id}", BATCHES, f"{BATCHES}/{batch_id}/messages"):
        r = await client.get(url, headers=auth(send_only["token"]))
        assert r.status_code == 403 and "read" in r.json()["message"], url
        assert (await client.get(url, headers=auth(read_only["token"]))).status_code == 200, url
    r = await client.get(f"{BATCHES}/{batch_id}/messages", params={"status": "nonsense"})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "status"
