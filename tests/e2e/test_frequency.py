"""Frequency caps and digests through the whole pipeline (issue 8): the sixth capped message is
suppressed and recorded so, a deferred one goes out when its window has room and not before, a
digest of five messages arrives as one email listing them; the rules' API."""

from __future__ import annotations

import asyncio
import time
from email import policy
from email.parser import BytesParser

import asyncpg
import httpx
import pytest

from tests.conftest import Pipeline
from tests.e2e.helpers import SEND, by_message_id, uniq, wait_for_mail, wait_for_state

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

CAPS = "/api/v1/frequency-caps"
DIGESTS = "/api/v1/digest-rules"
TEMPLATES = "/api/v1/templates"


async def _router_has(pipeline: Pipeline, revision: int, timeout: float = 30) -> None:
    """Wait until the router has applied a rule change (its revision gauge), as a sender would
    wait a moment after changing a rule."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=pipeline.services["router"].url, timeout=5) as router:
        while time.monotonic() < deadline:
            for line in (await router.get("/metrics")).text.splitlines():
                if line.startswith("herald_frequency_rule_revision ") and float(line.split()[1]) >= revision:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError(f"the router never applied rule revision {revision}")


async def _rule(pipeline: Pipeline, client: httpx.AsyncClient, path: str, **body: object) -> dict:
    r = await client.post(path, json=body)
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    await _router_has(pipeline, data["revision"])
    return data


async def _send(client: httpx.AsyncClient, to: str, category: str, subject: str | None = None, **extra) -> str:
    body = {"to": to, "subject": subject or uniq("subject "), "content": f"<p>{uniq('body ')}</p>",
            "category": category, **extra}  # fmt: skip
    r = await client.post(SEND, json=body)
    assert r.status_code == 202, r.text
    return r.json()["data"]["message_id"]


def _mails_to(pipeline: Pipeline, address: str) -> list:
    return [m for m in pipeline.backing.smtp.messages if address in m.rcpt_tos]


def _html(item) -> str:
    return BytesParser(policy=policy.default).parsebytes(item.data).get_body(("html",)).get_content()


async def _timeline(client: httpx.AsyncClient, message_id: str) -> list[dict]:
    return (await client.get(f"/api/v1/messages/{message_id}/timeline")).json()["data"]["events"]


async def test_the_sixth_capped_message_is_suppressed_and_other_recipients_are_unaffected(
    pipeline: Pipeline, client: httpx.AsyncClient
) -> None:
    category = uniq("promo")
    cap = await _rule(pipeline, client, CAPS, category=category, max_count=5, window_s=3600, action="suppress")
    alice, bob = f"{uniq('alice-')}@example.com", f"{uniq('bob-')}@example.com"
    ids = [await _send(client, alice, category) for _ in range(6)]
    suppressed = await wait_for_state(client, ids[5], "suppressed")
    assert suppressed["status"] == "failed" and suppressed["error_code"] == 1007
    assert f"frequency cap {cap['id']}" in suppressed["error_message"] and suppressed["category"] == category
    event = next(e for e in await _timeline(client, ids[5]) if e["state"] == "suppressed")
    assert event["detail"]["cap_id"] == cap["id"] and event["detail"]["max_count"] == 5
    for message_id in ids[:5]:
        await wait_for_state(client, message_id, "sent")
    assert sorted(m.parsed()["X-Herald-Message-ID"] for m in _mails_to(pipeline, alice)) == sorted(ids[:5])
    # Another recipient has a window of its own; a message without the category is not counted.
    await wait_for_state(client, await _send(client, bob, category), "sent")
    await wait_for_state(client, await _send(client, alice, uniq("other")), "sent")

    # The rule's API: read, change, delete (after which alice is not capped any more).
    assert (await client.get(f"{CAPS}/{cap['id']}")).json()["data"]["max_count"] == 5
    listed = (await client.get(CAPS, params={"category": category})).json()["data"]
    assert [c["id"] for c in listed["records"]] == [cap["id"]]
    r = await client.patch(f"{CAPS}/{cap['id']}", json={"description": "five a day", "max_count": 6})
    assert r.status_code == 200 and r.json()["data"]["max_count"] == 6, r.text
    r = await client.delete(f"{CAPS}/{cap['id']}")
    assert r.status_code == 200
    assert (await client.get(f"{CAPS}/{cap['id']}")).status_code == 404
    audits = (await client.get("/api/v1/audit-logs", params={"target_type": "frequency_cap"})).json()["data"]
    assert {"frequency_cap.create", "frequency_cap.update", "frequency_cap.delete"} <= {
        a["action"] for a in audits["items"] if a["target_id"] == str(cap["id"])
    }
    await _router_has(pipeline, r.json()["data"]["revision"])
    await wait_for_state(client, await _send(client, alice, category), "sent")


async def test_rules_are_validated(client: httpx.AsyncClient) -> None:
    bad = [
        ({"category": "Promo!", "max_count": 1, "window_s": 60, "action": "suppress"}, "category"),
        ({"category": "promo", "max_count": 0, "window_s": 60, "action": "suppress"}, "max_count"),
        ({"category": "promo", "max_count": 1, "window_s": 0, "action": "suppress"}, "window_s"),
        ({"category": "promo", "max_count": 1, "window_s": 60, "action": "drop"}, "action"),
        ({"category": "promo", "max_count": 1, "window_s": 60, "action": "defer", "channel": "pigeon"}, "channel"),
    ]
    for body, field in bad:
        r = await client.post(CAPS, json=body)
        assert r.status_code == 400 and r.json()["code"] == 1001, r.text
        assert r.json()["errors"][0]["field"] == field
    assert (await client.patch(f"{CAPS}/987654321", json={"max_count": 2})).status_code == 404
    r = await client.post(CAPS, json={"category": "promo", "max_count": 1, "window_s": 60, "action": "defer"})
    assert r.status_code == 201
    cap_id = r.json()["data"]["id"]
    r = await client.patch(f"{CAPS}/{cap_id}", json={"max_count": None})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "max_count"
    assert (await client.delete(f"{CAPS}/{cap_id}")).status_code == 200

    category = uniq("news")
    r = await client.post(TEMPLATES, json={"template_name": uniq("wrong-"), "subject": "Hi {{ name }}",
                                           "content": "{{ name }}"})  # fmt: skip
    wrong = r.json()["data"]["id"]
    r = await client.post(DIGESTS, json={"category": category, "window_s": 60, "template_id": wrong})
    assert r.status_code == 400 and r.json()["code"] == 2004 and r.json()["errors"][0]["field"] == "template_id"
    r = await client.post(DIGESTS, json={"category": category, "window_s": 60, "template_id": 987654321})
    assert r.status_code == 404 and r.json()["code"] == 2003
    assert (await client.post(DIGESTS, json={"category": category, "window_s": 60})).status_code == 201
    r = await client.post(DIGESTS, json={"category": category, "window_s": 30})
    assert r.status_code == 409 and r.json()["errors"][0]["field"] == "category"


async def test_a_deferred_message_is_delivered_after_its_window_and_not_before(
    pipeline: Pipeline, client: httpx.AsyncClient
) -> None:
    category = uniq("otp")
    cap = await _rule(pipeline, client, CAPS, category=category, max_count=1, window_s=3, action="defer")
    to = f"{uniq('otp-')}@example.com"
    started = time.time()  # the first message is counted after this, so its window ends 3 s after
    first = await _send(client, to, category)
    second = await _send(client, to, category)
    mail = await wait_for_mail(pipeline, by_message_id(second), timeout=30)
    assert mail.received_at >= started + 3, f"delivered {started + 3 - mail.received_at:.3f} s early"
    await wait_for_state(client, first, "sent")
    await wait_for_state(client, second, "sent")
    parked = next(e for e in await _timeline(client, second) if e["state"] == "scheduled")
    assert parked["detail"]["reason"] == "deferred" and parked["detail"]["cap_id"] == cap["id"]
    assert len(_mails_to(pipeline, to)) == 2


async def test_a_digest_of_five_messages_arrives_as_one_email_listing_them(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    category = uniq("news")
    rule = await _rule(pipeline, client, DIGESTS, category=category, window_s=4)
    to = f"{uniq('reader-')}@example.com"
    subjects = [uniq(f"headline {i} ") for i in range(5)]
    ids = [await _send(client, to, category, subject) for subject in subjects]
    digest_ids = set()
    for message_id in ids:
        record = await wait_for_state(client, message_id, "digested")
        assert record["status"] == "success"
        event = next(e for e in await _timeline(client, message_id) if e["state"] == "digested")
        assert event["detail"]["rule_id"] == rule["id"]
        digest_ids.add(event["detail"]["digest_message_id"])
    assert len(digest_ids) == 1
    digest_id = digest_ids.pop()
    # A digest is not cancelled or moved through the messages API (its messages are in it):
    # 409 whether it is still waiting or already released, and it is delivered all the same.
    for action, body in (("cancel", None), ("reschedule", {"delay": "1h"})):
        r = await client.post(f"/api/v1/messages/{digest_id}/{action}", json=body)
        assert r.status_code == 409 and r.json()["code"] == 1009, r.text
    mail = await wait_for_mail(pipeline, by_message_id(digest_id), timeout=30)
    body = _html(mail)
    for subject in subjects:
        assert subject in body
    assert mail.parsed()["Subject"] == f"5 {category} messages"
    digest = await wait_for_state(client, digest_id, "sent")
    assert digest["category"] == category and digest["recipient"] == to
    assert digest["subject"] == f"5 {category} messages"  # the listing, not the placeholder it opened with
    stored = await db.fetchval("SELECT content FROM message_records WHERE message_id=$1", digest_id)
    assert all(subject in stored for subject in subjects), stored[:300]
    routed = next(e for e in await _timeline(client, digest_id) if e["state"] == "routed")
    assert sorted(routed["detail"]["digest"]["message_ids"]) == sorted(ids)
    assert [m.parsed()["X-Herald-Message-ID"] for m in _mails_to(pipeline, to)] == [digest_id]


async def test_a_digest_template_renders_the_listed_messages(pipeline: Pipeline, client: httpx.AsyncClient) -> None:
    r = await client.post(TEMPLATES, json={
        "template_name": uniq("digest-"), "subject": "Your {{ count }} updates",
        "content": "<h1>{{ category }}</h1>{% for i in items %}<h2>{{ i.subject }}</h2>{{ i.content }}{% endfor %}",
        "variables": ["items", "count", "category"]})  # fmt: skip
    assert r.status_code == 201, r.text
    category = uniq("weekly")
    await _rule(pipeline, client, DIGESTS, category=category, window_s=2, template_id=r.json()["data"]["id"])
    to = f"{uniq('weekly-')}@example.com"
    ids = [await _send(client, to, category, subject, content=f"<em>item {i}</em>")
           for i, subject in enumerate(["First & foremost", "Second"])]  # fmt: skip
    await wait_for_state(client, ids[0], "digested")
    digest_id = next(e for e in await _timeline(client, ids[0]) if e["state"] == "digested")["detail"][
        "digest_message_id"
    ]
    mail = await wait_for_mail(pipeline, by_message_id(digest_id), timeout=30)
    assert mail.parsed()["Subject"] == "Your 2 updates"
    body = _html(mail)
    assert f"<h1>{category}</h1>" in body
    assert "<h2>First &amp; foremost</h2><em>item 0</em><h2>Second</h2><em>item 1</em>" in body


async def test_another_tenant_neither_sees_nor_changes_the_rules(pipeline: Pipeline, client: httpx.AsyncClient) -> None:
    from devstack import access

    category = uniq("iso")
    cap = await _rule(pipeline, client, CAPS, category=category, max_count=1, window_s=60, action="suppress")
    digest = await _rule(pipeline, client, DIGESTS, category=category, window_s=60)
    env, tenant = pipeline.backing.env, uniq("fq-")
    await asyncio.to_thread(access.admin, env, "create-tenant", tenant, "--name", f"Rules {tenant}")
    headers = await asyncio.to_thread(access.admin_headers, env, pipeline.ingest_url, tenant=tenant)
    async with httpx.AsyncClient(base_url=pipeline.ingest_url, timeout=30, headers=headers) as other:
        for path, rule in ((CAPS, cap), (DIGESTS, digest)):
            for method, body in (("GET", None), ("PATCH", {"description": "taken"}), ("DELETE", None)):
                r = await other.request(method, f"{path}/{rule['id']}", json=body)
                assert r.status_code == 404 and r.json()["code"] == 1004, (method, path, r.text)
            assert f'"id":{rule["id"]},' not in (await other.get(path)).text
    # ... and nothing of the first tenant's changed.
    assert (await client.get(f"{CAPS}/{cap['id']}")).json()["data"]["description"] is None
    assert (await client.get(f"{DIGESTS}/{digest['id']}")).json()["data"]["description"] is None
    for path, rule in ((CAPS, cap), (DIGESTS, digest)):
        assert (await client.delete(f"{path}/{rule['id']}")).status_code == 200
