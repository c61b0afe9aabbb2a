"""Idempotency keys and content fingerprints (seed 004 §3.1.3), with Redis up and down.

The services run with HERALD_IDEMPOTENCY_TTL_S=5 (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from devstack import servers
from services.ingest.dedup import request_hash
from services.ingest.publish import NewRecord, Publisher, RecordBatcher
from services.ingest.routes.messages import EmailSendRequest
from shared.errors import HeraldError
from shared.events import RequestV1, utcnow
from shared.ids import new_message_id
from shared.kafka import Trace
from tests.conftest import Pipeline
from tests.e2e.helpers import SEND, auth, make_key, wait_for_state

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]


def body(**changes: object) -> dict:
    return {"to": "idem@example.com", "subject": f"s {uuid.uuid4().hex}", "content": "<p>c</p>", **changes}


async def test_same_key_same_body_replays_the_first_response(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    key = f"k-{uuid.uuid4().hex}"
    payload = body()
    first = await client.post(SEND, json=payload, headers={"Idempotency-Key": key})
    again = await client.post(SEND, json={**payload, "idempotency_key": key})  # body field, same key
    assert first.status_code == again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert again.json()["data"] == first.json()["data"]
    assert await db.fetchval("SELECT count(*) FROM message_records WHERE idempotency_key=$1", key) == 1


async def test_same_key_different_body_is_409(client: httpx.AsyncClient) -> None:
    key = f"k-{uuid.uuid4().hex}"
    first = await client.post(SEND, json=body(idempotency_key=key))
    other = await client.post(SEND, json=body(idempotency_key=key))  # another subject
    assert other.status_code == 409 and other.json()["code"] == 1006
    assert first.json()["data"]["message_id"] in other.json()["message"]


async def test_header_and_body_keys_must_agree(client: httpx.AsyncClient) -> None:
    r = await client.post(SEND, json=body(idempotency_key="a"), headers={"Idempotency-Key": "b"})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "idempotency_key"


async def test_concurrent_requests_with_one_key_make_one_message(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    key = f"k-{uuid.uuid4().hex}"
    payload = body(idempotency_key=key)
    answers = await asyncio.gather(*(client.post(SEND, json=payload) for _ in range(20)))
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["data"]["message_id"] for a in answers}) == 1
    assert sum(1 for a in answers if "idempotent-replayed" not in a.headers) == 1
    assert await db.fetchval("SELECT count(*) FROM message_records WHERE idempotency_key=$1", key) == 1


async def test_a_key_is_free_again_after_its_time_to_live(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    key = f"k-{uuid.uuid4().hex}"
    first = await client.post(SEND, json=body(idempotency_key=key))
    await asyncio.sleep(6)
    later = await client.post(SEND, json=body(idempotency_key=key))  # another body is fine now
    assert later.status_code == 202 and "idempotent-replayed" not in later.headers
    assert later.json()["data"]["message_id"] != first.json()["data"]["message_id"]
    assert await db.fetchval("SELECT count(*) FROM message_records WHERE idempotency_key=$1", key) == 1


async def test_same_content_within_the_window_is_a_duplicate(client: httpx.AsyncClient) -> None:
    payload = body(to=["fp1@example.com", "fp2@example.com"])
    first = await client.post(SEND, json=payload)
    assert first.status_code == 202
    dup = await client.post(SEND, json={**payload, "to": ["fp2@example.com", "fp1@example.com"]})
    assert dup.status_code == 409 and dup.json()["code"] == 1006
    assert first.json()["data"]["message_id"] in dup.json()["message"]
    forced = await client.post(SEND, json={**payload, "dedup": False})
    assert forced.status_code == 202
    other = await client.post(SEND, json={**payload, "content": "<p>different</p>"})
    assert other.status_code == 202


async def test_redis_down_keys_still_hold_and_dedup_fails_open(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    run = uuid.uuid4().hex[:8]
    keys = [f"down-{run}-{i}" for i in range(100)]
    limited = await make_key(client, ["read"], tier="standard")
    pipeline.backing.redis.stop()
    try:
        semaphore = asyncio.Semaphore(50)

        async def one(i: int) -> httpx.Response:
            async with semaphore:
                key = keys[i % 100]
                return await client.post(SEND, json={"to": "down@example.com", "subject": key, "content": "c",
                                                     "idempotency_key": key})  # fmt: skip

        answers = await asyncio.gather(*(one(i) for i in range(1000)))
        assert {a.status_code for a in answers} == {202}, {a.status_code for a in answers}
        messages = await db.fetchval(
            "SELECT count(*) FROM message_records WHERE idempotency_key = ANY($1::text[])", keys
        )
        print(f"redis down: 1000 requests over 100 keys -> {messages} messages")
        assert messages == 100
        # Without a key the fingerprint check cannot ask Redis: accepted, marked, counted.
        r = await client.post(SEND, json={"to": "open@example.com", "subject": f"open {run}", "content": "c"})
        assert r.status_code == 202
        mid = r.json()["data"]["message_id"]
        assert await db.fetchval("SELECT dedup_skipped FROM message_records WHERE message_id=$1", mid) is True
        # Rate limits cannot be counted either: requests pass unlimited (and are counted so).
        r = await client.get("/api/v1/messages", headers=auth(limited["token"]))
        assert r.status_code == 200 and "ratelimit-limit" not in r.headers
        r = await client.get("/api/v1/messages", headers={"Authorization": "Bearer nonsense"})
        assert r.status_code == 401 and "ratelimit-limit" not in r.headers
        metrics = (await client.get("/metrics")).text
        assert "herald_dedup_skipped_total" in metrics
        assert 'herald_rate_limit_bypassed_total{kind="key"}' in metrics
        assert 'herald_rate_limit_bypassed_total{kind="ip"}' in metrics
    finally:
        pipeline.backing.restart_redis()


async def test_retrying_a_503_with_its_key_sends_the_message_once(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    """The broker does not take a request: 503 and the record is withdrawn (3003). The client
    retries with the same key once the broker is back: the same message is accepted again and
    delivered once. (Ingest's own broker cannot be stopped under the session's pipeline, so a
    Publisher on the pipeline's database writes through a broker that is then stopped.)"""
    key = f"k-{uuid.uuid4().hex}"
    payload = body(idempotency_key=key)
    doomed = servers.start_tansu(servers.free_port())
    producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{doomed.port}", acks="all", request_timeout_ms=2000)
    await producer.start()
    doomed.stop()
    batcher = RecordBatcher(db, 16, 1.0)
    batcher.start()
    try:
        request = RequestV1(
            message_id=new_message_id(),
            channel="email",
            to=[payload["to"]],
            subject=payload["subject"],
            content=payload["content"],
            idempotency_key=key,
            recorded=True,
        )
        digest = request_hash(EmailSendRequest.model_validate(payload).model_dump(mode="json", by_alias=True))
        record = NewRecord(request, {"to": request.to, "cc": [], "bcc": []}, utcnow(), request_hash=digest)
        with pytest.raises(HeraldError) as refused:
            await Publisher(db, producer, batcher, publish_timeout_s=1.0).accept(record, Trace())
        assert refused.value.http_status == 503
    finally:
        await batcher.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 3)
    row = await db.fetchrow("SELECT state, error_code FROM message_records WHERE message_id=$1", request.message_id)
    assert (row["state"], row["error_code"]) == ("rejected", 3003)

    retried = await client.post(SEND, json=payload)
    assert retried.status_code == 202, retried.text
    data = retried.json()["data"]
    assert data["message_id"] == request.message_id and data["state"] == "accepted"
    await wait_for_state(client, request.message_id, "sent")
    await asyncio.sleep(1)  # a second copy, if any, would arrive within this
    copies = [
        m for m in list(pipeline.backing.smtp.messages) if m.parsed()["X-Herald-Message-ID"] == request.message_id
    ]
    assert len(copies) == 1
    again = await client.post(SEND, json=payload)  # and now an ordinary replay
    assert again.headers["idempotent-replayed"] == "true" and again.json()["data"]["message_id"] == request.message_id


async def test_the_fingerprint_window_is_set_per_tenant(client: httpx.AsyncClient) -> None:
    tenant = "/api/v1/tenants/default"
    default = (await client.get(tenant)).json()["data"]
    assert default["dedup_window_s"] is None and default["effective_dedup_window_s"] == 300
    try:
        off = await client.patch(tenant, json={"dedup_window_s": 0})
        assert off.status_code == 200 and off.json()["data"]["effective_dedup_window_s"] == 0
        payload = body()
        assert [(await client.post(SEND, json=payload)).status_code for _ in range(2)] == [202, 202]

        await client.patch(tenant, json={"dedup_window_s": 2})
        payload = body()
        assert (await client.post(SEND, json=payload)).status_code == 202
        dup = await client.post(SEND, json=payload)
        assert dup.status_code == 409 and "within 2 s" in dup.json()["message"]
        await asyncio.sleep(2.5)
        assert (await client.post(SEND, json=payload)).status_code == 202  # the window has passed
    finally:
        back = await client.patch(tenant, json={"dedup_window_s": None})
    assert back.json()["data"]["effective_dedup_window_s"] == 300
    bad = await client.patch(tenant, json={"dedup_window_s": 86401})
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "dedup_window_s"
    other = await client.get("/api/v1/tenants/someone-else")
    assert other.status_code == 404 and other.json()["code"] == 1004
    assert (await client.patch("/api/v1/tenants/someone-else", json={"dedup_window_s": 0})).status_code == 404
