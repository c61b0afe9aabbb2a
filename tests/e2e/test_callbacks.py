"""Status callbacks (issue 11) against the running pipeline and a real HTTP receiver (aiohttp, in
this process): endpoints registered per tenant with an event filter and auth, per-message
``callback_url``, the Standard Webhooks wire format checked with the ``standardwebhooks``
library as a receiver checks it, retries (3 then failed; a retry then success), every try in the
delivery log, SSRF refusals at registration and at delivery, tenant isolation, and secrets that
are answered once and never again (nor logged, nor audited).

The suite's HERALD_CALLBACK_RETRY_DELAYS_S is 0.2,0.3,0.4 (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from standardwebhooks.webhooks import Webhook

from devstack import access
from tests.callback_receiver import Receiver, receiving
from tests.conftest import Pipeline
from tests.e2e.helpers import SEND, own_tenant, uniq

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

HOOKS = "/api/v1/webhooks"
DELIVERIES = "/api/v1/webhooks/deliveries"
SIGNING = "/api/v1/webhooks/signing-secret"
PAYLOAD_KEYS = {"message_id", "state", "status", "channel", "provider", "attempt", "error_code", "error",
                "occurred_at", "category", "request_id"}  # fmt: skip


# --- the receiver (tests/callback_receiver.py) ----------------------------------------------------


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving(ok=204) as rec:
        yield rec


# --- tenants of their own, with a mailbox at the suite's SMTP sink -----------------------------------


@pytest.fixture(scope="module")
async def tenant_a(pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    client = await own_tenant(pipeline, "cba-", mailbox=True)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
async def tenant_b(pipeline: Pipeline) -> AsyncIterator[httpx.AsyncClient]:
    client = await own_tenant(pipeline, "cbb-", mailbox=True)
    yield client
    await client.aclose()


async def _endpoint(client: httpx.AsyncClient, url: str, **body) -> dict:
    r = await client.post(HOOKS, json={"callback_url": url, **body})
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    access.ISSUED.append(data["signing_secret"])  # the session's log scan looks for it
    if body.get("auth_token"):
        access.ISSUED.append(body["auth_token"])
    return data


async def _send(client: httpx.AsyncClient, **extra) -> str:
    r = await client.post(SEND, json={"to": "someone@example.com", "subject": uniq("cb "), "content": "<p>hi</p>",
                                      "dedup": False, **extra})  # fmt: skip
    assert r.status_code == 202, r.text
    return r.json()["data"]["message_id"]


async def _deliveries(client: httpx.AsyncClient, message_id: str, want: int, settled: bool = True,
                      timeout: float = 20) -> list[dict]:  # fmt: skip
    """The message's deliveries once there are ``want`` (and none is pending, when ``settled``)."""
    deadline = time.monotonic() + timeout
    records: list[dict] = []
    while time.monotonic() < deadline:
        r = await client.get(DELIVERIES, params={"message_id": message_id})
        assert r.status_code == 200, r.text
        records = r.json()["data"]["records"]
        if len(records) >= want and not (settled and any(d["status"] == "pending" for d in records)):
            return records
        await asyncio.sleep(0.1)
    raise AssertionError(f"deliveries of {message_id}: {records}")


def _refused(r: httpx.Response, field: str = "callback_url") -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == 1001 and body["errors"][0]["field"] == field, body


# --- tests -----------------------------------------------------------------------------------------


async def test_signed_callback_wire_format_auth_and_delivery_log(
    tenant_a: httpx.AsyncClient, receiver: Receiver, db: asyncpg.Pool
) -> None:
    token = "tok-" + uniq() + uniq()
    # A query is delivered whole, but shown masked in the delivery log.
    in_query = "q-" + uniq() + uniq()
    hook = await _endpoint(tenant_a, receiver.url("/a/all") + f"?k={in_query}&ref=1", events=["*"],
                           auth_type="bearer", auth_token=token, description="everything")  # fmt: skip
    secret = hook["signing_secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    assert hook["auth_token_set"] is True and hook["events"] == ["*"] and token not in str(hook)
    try:
        message_id = await _send(tenant_a, category="otp")
        (got,) = await receiver.wait("/a/all", message_id)
        # The wire format, exactly.
        assert got.headers["content-type"] == "application/json"
        assert receiver.queries["/a/all"][-1] == f"k={in_query}&ref=1"
        assert got.headers["user-agent"] == "Herald-Callbacks/1.0"
        assert got.headers["authorization"] == f"Bearer {token}"
        assert got.headers["webhook-id"].startswith("cbd_")
        assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 30
        assert got.headers["webhook-signature"].startswith("v1,") and " " not in got.headers["webhook-signature"]
        payload = Webhook(secret).verify(got.body, got.headers)  # the library's own check
        assert payload == got.json and list(payload) == ["type", "timestamp", "data"]
        assert payload["type"] == "message.sent"
        data = payload["data"]
        assert set(data) == PAYLOAD_KEYS
        assert data["message_id"] == message_id and data["state"] == "sent" and data["status"] == "success"
        assert data["channel"] == "email" and data["attempt"] == 1 and data["category"] == "otp"
        assert data["error"] is None and data["request_id"]
        assert payload["timestamp"] == data["occurred_at"]
        assert "someone@example.com" not in got.body.decode() and tenant_a.tenant not in got.body.decode()
        # Only status changes: nothing for accepted, routed, sending.
        assert [g.json["type"] for g in receiver.at("/a/all", message_id)] == ["message.sent"]

        (delivery,) = await _deliveries(tenant_a, message_id, 1)
        assert delivery["status"] == "delivered" and delivery["webhook_id"] == hook["id"]
        assert delivery["url"] == receiver.url("/a/all") + "?k=***&ref=***"
        r = await tenant_a.get(DELIVERIES, params={"message_id": message_id})
        assert in_query not in r.text
        assert delivery["webhook_msg_id"] == got.headers["webhook-id"] and delivery["event_type"] == "message.sent"
        assert delivery["attempt_count"] == 1 and delivery["payload"] == payload
        (attempt,) = delivery["attempts"]
        assert attempt["status_code"] == 204 and attempt["error"] is None and attempt["attempt"] == 1
        assert attempt["url"] == receiver.url("/a/all") + "?k=***&ref=***" and attempt["duration_ms"] >= 0
        # Latency: from the fold's transaction (the delivery's creation) to the receiver.
        created = await db.fetchval("SELECT extract(epoch FROM created_at) FROM callback_deliveries WHERE id = $1",
                                    delivery["id"])  # fmt: skip
        latency = got.at - float(created)
        print(f"\ncallback latency after the fold: {latency * 1000:.0f} ms")
        assert latency < 2.0
    finally:
        assert (await tenant_a.delete(f"{HOOKS}/{hook['id']}")).status_code == 200


async def test_three_retries_then_failed_and_a_retry_then_success(
    tenant_a: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.plan["/a/down"] = [500] * 10
    receiver.plan["/a/flaky"] = [503, 500]
    down = await _endpoint(tenant_a, receiver.url("/a/down"), events=["sent"])
    flaky = await _endpoint(tenant_a, receiver.url("/a/flaky"), events=["sent"], auth_type="basic",
                            auth_token="herald:pa:ss")  # fmt: skip
    try:
        message_id = await _send(tenant_a)
        records = await _deliveries(tenant_a, message_id, 2)
        by_hook = {d["webhook_id"]: d for d in records}

        failed = by_hook[down["id"]]
        assert failed["status"] == "failed" and failed["attempt_count"] == 4 and failed["last_status_code"] == 500
        assert [a["status_code"] for a in failed["attempts"]] == [500, 500, 500, 500]
        assert [a["attempt"] for a in failed["attempts"]] == [1, 2, 3, 4]
        assert failed["last_error"] == "HTTP 500" and failed["next_attempt_at"] is None
        tries = receiver.at("/a/down", message_id)
        assert len(tries) == 4
        assert len({g.headers["webhook-id"] for g in tries}) == 1  # the same id on every try
        gaps = [b.at - a.at for a, b in zip(tries, tries[1:], strict=False)]
        assert all(gap >= delay - 0.05 for gap, delay in zip(gaps, (0.2, 0.3, 0.4), strict=True)), gaps
        for g in tries:
            Webhook(down["signing_secret"]).verify(g.body, g.headers)

        ok = by_hook[flaky["id"]]
        assert ok["status"] == "delivered" and ok["attempt_count"] == 3 and ok["delivered_at"]
        assert [a["status_code"] for a in ok["attempts"]] == [503, 500, 204]
        tries = receiver.at("/a/flaky", message_id)
        assert len(tries) == 3 and len({g.headers["webhook-id"] for g in tries}) == 1
        assert tries[-1].headers["authorization"] == "Basic " + base64.b64encode(b"herald:pa:ss").decode()
    finally:
        for hook in (down, flaky):
            await tenant_a.delete(f"{HOOKS}/{hook['id']}")


async def test_event_filter_cancellation_and_410_disables(tenant_a: httpx.AsyncClient, receiver: Receiver) -> None:
    cancelled_only = await _endpoint(tenant_a, receiver.url("/a/cancelled"), events=["cancelled"])
    delivered_only = await _endpoint(tenant_a, receiver.url("/a/delivered"), events=["delivered"])
    receiver.plan["/a/gone"] = [410]
    gone = await _endpoint(tenant_a, receiver.url("/a/gone"), events=["sent", "failed", "dead"])
    try:
        sent_id = await _send(tenant_a)
        later_id = await _send(tenant_a, delay="1h")
        r = await tenant_a.post(f"/api/v1/messages/{later_id}/cancel")
        assert r.status_code == 200, r.text
        (got,) = await receiver.wait("/a/cancelled", later_id)
        assert got.json["type"] == "message.cancelled" and got.json["data"]["status"] == "failed"
        Webhook(cancelled_only["signing_secret"]).verify(got.body, got.headers)

        # 410 Gone: failed at once, and the endpoint is disabled.
        sent_deliveries = await _deliveries(tenant_a, sent_id, 1)
        (gone_delivery,) = [d for d in sent_deliveries if d["webhook_id"] == gone["id"]]
        assert gone_delivery["status"] == "failed" and gone_delivery["attempt_count"] == 1
        assert "410" in gone_delivery["last_error"]
        hook = (await tenant_a.get(f"{HOOKS}/{gone['id']}")).json()["data"]
        assert hook["is_active"] is False and "410" in hook["disabled_reason"]
        # The filters: neither the cancelled-only endpoint nor the delivered-only one has a delivery
        # of the sent message (enqueued with the fold, or never), nor heard of it.
        assert [d["webhook_id"] for d in sent_deliveries] == [gone["id"]]
        assert receiver.at("/a/cancelled", sent_id) == [] and receiver.at("/a/delivered", sent_id) == []
        assert len(receiver.at("/a/gone")) == 1
        # Changing the filter through PUT.
        r = await tenant_a.put(f"{HOOKS}/{delivered_only['id']}", json={"events": ["sent", "sent"]})
        assert r.status_code == 200 and r.json()["data"]["events"] == ["sent"]
        again = await _send(tenant_a)
        await receiver.wait("/a/delivered", again)
    finally:
        for h in (cancelled_only, delivered_only, gone):
            await tenant_a.delete(f"{HOOKS}/{h['id']}")


async def test_redirects_are_not_followed(tenant_a: httpx.AsyncClient, receiver: Receiver) -> None:
    """A receiver answering 302: the try is recorded as the 302 (a failed try, retried), the
    redirect is not followed: not to the cloud metadata address (a followed redirect there would be
    recorded as the SSRF guard's refusal), nor to an allowed address (which would have heard of it)."""
    receiver.redirect["/a/to-metadata"] = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    receiver.redirect["/a/to-here"] = receiver.url("/a/redirected")
    hooks = [await _endpoint(tenant_a, receiver.url(p), events=["sent"]) for p in ("/a/to-metadata", "/a/to-here")]
    try:
        message_id = await _send(tenant_a)
        records = await _deliveries(tenant_a, message_id, 2)
        assert sorted(d["webhook_id"] for d in records) == sorted(h["id"] for h in hooks)
        for delivery in records:
            assert delivery["status"] == "failed" and delivery["attempt_count"] == 4, delivery
            assert delivery["last_status_code"] == 302
            assert [(a["status_code"], a["error"]) for a in delivery["attempts"]] == [
                (302, "HTTP 302 (redirects are not followed)")] * 4  # fmt: skip
        assert len(receiver.at("/a/to-metadata", message_id)) == len(receiver.at("/a/to-here", message_id)) == 4
        assert receiver.at("/a/redirected") == []  # no request of any method
    finally:
        for hook in hooks:
            await tenant_a.delete(f"{HOOKS}/{hook['id']}")


async def test_per_message_callback_url_and_the_tenant_signing_secret(
    tenant_b: httpx.AsyncClient, receiver: Receiver, producer: AIOKafkaProducer
) -> None:
    url = receiver.url("/b/message")
    # No signing secret yet: refused, naming the field.
    r = await tenant_b.post(SEND, json={"to": "x@example.com", "subject": "s", "content": "c", "callback_url": url})
    _refused(r)
    assert "signing-secret" in r.json()["message"]

    r = await tenant_b.post(SIGNING)
    assert r.status_code == 201, r.text
    first = r.json()["data"]["signing_secret"]
    access.ISSUED.append(first)
    assert first.startswith("whsec_") and r.json()["data"]["previous_secret_valid_until"] is None

    for bad in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/hook", "http://[::1]:8080/x"):
        _refused(await tenant_b.post(SEND, json={"to": "x@example.com", "subject": "s", "content": "c",
                                                 "callback_url": bad}))  # fmt: skip
    _refused(
        await tenant_b.post(
            "/api/v1/messages/send",
            json={
                "channel": "email",
                "to": "x@example.com",
                "subject": "s",
                "content": "c",
                "callback_url": "ftp://a.b/c",
            },
        )
    )

    message_id = await _send(tenant_b, callback_url=url)
    (got,) = await receiver.wait("/b/message", message_id)
    assert Webhook(first).verify(got.body, got.headers)["type"] == "message.sent"
    assert "authorization" not in got.headers
    (delivery,) = await _deliveries(tenant_b, message_id, 1)
    assert delivery["webhook_id"] is None and delivery["url"] == url and delivery["status"] == "delivered"

    # A rotation: the new secret answered once; both sign during the grace period.
    r = await tenant_b.post(SIGNING)
    assert r.status_code == 200, r.text
    second = r.json()["data"]["signing_secret"]
    access.ISSUED.append(second)
    assert second != first and r.json()["data"]["previous_secret_valid_until"]
    # The generic send, and a direct publisher's request (its snapshot brings the URL to the record).
    r = await tenant_b.post("/api/v1/messages/send", json={"channel": "email", "to": "y@example.com", "subject": "g",
                                                           "content": "c", "callback_url": url})  # fmt: skip
    assert r.status_code == 202, r.text
    generic_id = r.json()["data"]["message_id"]
    direct_id = f"msg_{time.strftime('%Y%m%d')}_{uniq()}"
    request = {
        "schema": "notify.request.v1",
        "message_id": direct_id,
        "tenant_id": tenant_b.tenant,
        "channel": "email",
        "to": ["z@example.com"],
        "subject": "direct",
        "content": "c",
        "callback_url": url,
    }
    await producer.send_and_wait("notify.requests", orjson.dumps(request), key=f"{tenant_b.tenant}:z".encode())
    # A batch send: each of its messages calls back on its own.
    r = await tenant_b.post("/api/v1/messages/batch", json={"recipients": ["b1@example.com", "b2@example.com"],
                                                            "subject": uniq("batch "), "content": "<p>b</p>",
                                                            "callback_url": url})  # fmt: skip
    assert r.status_code == 202, r.text
    batch_ids = [m["message_id"] for m in r.json()["data"]["messages"]]
    for mid in (generic_id, direct_id, *batch_ids):
        (got,) = await receiver.wait("/b/message", mid)
        assert len(got.headers["webhook-signature"].split(" ")) == 2
        assert Webhook(second).verify(got.body, got.headers)["data"]["message_id"] == mid
        assert Webhook(first).verify(got.body, got.headers)["data"]["message_id"] == mid
    _refused(
        await tenant_b.post(
            "/api/v1/messages/batch",
            json={"recipients": ["b3@example.com"], "subject": "s", "content": "c", "callback_url": "http://10.1.2.3/"},
        )
    )


async def test_ssrf_is_refused_at_registration_and_at_delivery(
    tenant_b: httpx.AsyncClient, receiver: Receiver, db: asyncpg.Pool, producer: AIOKafkaProducer
) -> None:
    for bad in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://0.0.0.0/x"):
        _refused(await tenant_b.post(HOOKS, json={"callback_url": bad}))
    _refused(await tenant_b.post(HOOKS, json={"callback_url": "https://user:pw@example.com/x"}))
    hook = await _endpoint(tenant_b, receiver.url("/b/rebound"), events=["sent"])
    _refused(await tenant_b.put(f"{HOOKS}/{hook['id']}", json={"callback_url": "http://10.0.0.1/"}))
    try:
        # The name now leads somewhere private (a DNS answer that changed, an allow-list narrowed):
        # the try is refused when it connects, recorded, and not retried.
        await db.execute("UPDATE webhook_configs SET callback_url = 'http://169.254.169.254/hook' WHERE id = $1",
                         hook["id"])  # fmt: skip
        message_id = await _send(tenant_b)
        # A direct publisher's request is not checked by ingest: its URL meets the guard at delivery.
        direct_id = f"msg_{time.strftime('%Y%m%d')}_{uniq()}"
        request = {"schema": "notify.request.v1", "message_id": direct_id, "tenant_id": tenant_b.tenant,
                   "channel": "email", "to": ["z@example.com"], "subject": "d", "content": "c",
                   "callback_url": "http://10.0.0.1/hook"}  # fmt: skip
        await producer.send_and_wait("notify.requests", orjson.dumps(request), key=f"{tenant_b.tenant}:z".encode())
        for mid, webhook_id, address in ((message_id, hook["id"], "169.254.169.254"), (direct_id, None, "10.0.0.1")):
            (delivery,) = [d for d in await _deliveries(tenant_b, mid, 1) if d["webhook_id"] == webhook_id]
            assert delivery["status"] == "failed" and delivery["attempt_count"] == 1, delivery
            (attempt,) = delivery["attempts"]
            assert attempt["status_code"] is None and attempt["error"].startswith("refused: ")
            assert address in attempt["error"] and "not a public address" in attempt["error"]
        assert receiver.at("/b/rebound") == []
    finally:
        await tenant_b.delete(f"{HOOKS}/{hook['id']}")


async def test_isolation_secrets_never_shown_again_audit_and_logs(
    pipeline: Pipeline, tenant_a: httpx.AsyncClient, tenant_b: httpx.AsyncClient, receiver: Receiver
) -> None:
    token = "secret-token-" + uniq() + uniq()
    mine = await _endpoint(tenant_a, receiver.url("/a/iso"), events=["sent"], auth_type="bearer", auth_token=token)
    theirs = await _endpoint(tenant_b, receiver.url("/b/iso"), events=["*"])
    try:
        message_id = await _send(tenant_a)
        await receiver.wait("/a/iso", message_id)
        # Reads never show a secret or a token.
        reads = [await tenant_a.get(HOOKS), await tenant_a.get(f"{HOOKS}/{mine['id']}"),
                 await tenant_a.get(DELIVERIES, params={"message_id": message_id}),
                 await tenant_a.put(f"{HOOKS}/{mine['id']}", json={"description": "changed"})]  # fmt: skip
        for r in reads:
            assert r.status_code == 200, r.text
            assert mine["signing_secret"] not in r.text and token not in r.text and "whsec_" not in r.text
            assert "signing_secret" not in r.json()["data"]
        r = await tenant_a.post(f"{HOOKS}/{mine['id']}/rotate-secret")
        rotated = r.json()["data"]["signing_secret"]
        access.ISSUED.append(rotated)
        assert (
            r.status_code == 200
            and rotated != mine["signing_secret"]
            and r.json()["data"]["previous_secret_valid_until"]
        )
        # Changing the token's type needs a token of that type.
        _refused(await tenant_a.put(f"{HOOKS}/{mine['id']}", json={"auth_type": "basic"}), "auth_token")
        _refused(await tenant_a.post(HOOKS, json={"callback_url": receiver.url("/x"), "auth_type": "bearer"}),
                 "auth_token")  # fmt: skip
        # The audit log names the changes, never a secret.
        audit = (await tenant_a.get("/api/v1/audit-logs", params={"target_type": "webhook"})).text
        assert "webhook.create" in audit and "webhook.rotate_secret" in audit and "webhook.update" in audit
        assert token not in audit and "whsec_" not in audit and '"auth_token":"<set>"' in audit

        # Another tenant's: 404, never listed; their endpoint never heard of A's message.
        for method, url in (
            ("GET", f"{HOOKS}/{mine['id']}"),
            ("PUT", f"{HOOKS}/{mine['id']}"),
            ("DELETE", f"{HOOKS}/{mine['id']}"),
            ("POST", f"{HOOKS}/{mine['id']}/rotate-secret"),
        ):
            r = await tenant_b.request(method, url, json={"description": "x"} if method == "PUT" else None)
            assert r.status_code == 404, (method, url, r.text)
        listed = await tenant_b.get(HOOKS)
        assert f'"id":{mine["id"]},' not in listed.text and f'"id":{theirs["id"]},' in listed.text
        r = await tenant_b.get(DELIVERIES, params={"message_id": message_id})
        assert r.json()["data"]["total"] == 0
        assert receiver.at("/b/iso", message_id) == []
        assert (await tenant_a.get(f"{HOOKS}/{mine['id']}")).json()["data"]["description"] == "changed"
    finally:
        await tenant_a.delete(f"{HOOKS}/{mine['id']}")
        await tenant_b.delete(f"{HOOKS}/{theirs['id']}")
    assert (await tenant_a.get(f"{HOOKS}/{mine['id']}")).status_code == 404
    # No secret or token of this module in any service's log (the session's scan checks again).
    logs = pipeline.logs() + "".join(s.logs() for s in pipeline.services.values())
    for secret in (token, mine["signing_secret"], rotated, theirs["signing_secret"]):
        assert secret not in logs
