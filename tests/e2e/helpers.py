"""Helpers of the end-to-end tests: waiting for mail at the sink, for a message's state, and
reading a topic's end offsets."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from devstack import access
from devstack.sinks import Received
from tests.conftest import Pipeline

SEND = "/api/v1/messages/email/send"


async def wait_for_mail(pipeline: Pipeline, predicate, timeout: float = 30) -> Received:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for item in list(pipeline.backing.smtp.messages):
            if predicate(item):
                return item
        await asyncio.sleep(0.1)
    raise AssertionError("no matching message reached the SMTP sink")


async def wait_for_mails(pipeline: Pipeline, message_ids: list[str], timeout: float = 60) -> dict[str, Received]:
    """Wait until every one of ``message_ids`` reached the SMTP sink; answers each one's first
    arrival. Reads each arrival once (the sink holds the whole suite's mail: parsing all of it
    for every id on every poll starves the event loop); raises naming the ones missing."""
    wanted, found, read = set(message_ids), {}, 0
    deadline = time.monotonic() + timeout
    while True:
        arrived = list(pipeline.backing.smtp.messages)
        for item in arrived[read:]:
            message_id = item.parsed()["X-Herald-Message-ID"]
            if message_id in wanted and message_id not in found:
                found[message_id] = item
        read = len(arrived)
        if len(found) == len(wanted) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    if len(found) < len(wanted):
        raise AssertionError(f"not at the SMTP sink after {timeout} s: {sorted(wanted - set(found))[:10]}")
    return found


def by_message_id(message_id: str):
    return lambda item: item.parsed()["X-Herald-Message-ID"] == message_id


async def wait_for_state(client: httpx.AsyncClient, message_id: str, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        r = await client.get(f"/api/v1/messages/{message_id}")
        if r.status_code == 200:
            last = r.json()["data"]
            if last["state"] == state:
                return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{message_id} never reached {state}; last seen {last}")


async def request_end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not parts:
            await consumer.topics()
            parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        offsets = await consumer.end_offsets(parts)
        return {tp.partition: o for tp, o in offsets.items()}
    finally:
        await consumer.stop()


def dispatch_command(message_id: str, to: str, subject: str, content: str) -> dict:
    """A ``notify.dispatch.v1`` command (attempt 1) as the router would publish it."""
    return {
        "schema": "notify.dispatch.v1",
        "dispatch_id": f"{message_id}:1",
        "message_id": message_id,
        "tenant_id": "default",
        "channel": "email",
        "attempt": 1,
        "to": [to],
        "subject": subject,
        "content": content,
    }


KEYS = "/api/v1/api-keys"
TOKEN = "/api/v1/auth/token"


def uniq(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def make_key(client: httpx.AsyncClient, scopes: list[str], tier: str = "unlimited", **extra) -> dict:
    """A key of the caller's tenant made through the API, and a token for it."""
    r = await client.post(KEYS, json={"key_name": uniq("k-"), "scopes": scopes, "tier": tier, **extra})
    assert r.status_code == 201, r.text
    key = r.json()["data"]
    access.ISSUED.append(key["api_secret"])
    r = await client.post(TOKEN, json={"api_key": key["api_key"], "api_secret": key["api_secret"]})
    assert r.status_code == 200, r.text
    key["token"] = r.json()["data"]["access_token"]
    access.ISSUED.append(key["token"])
    return key


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def own_tenant(pipeline: Pipeline, prefix: str, *, mailbox: bool = False) -> httpx.AsyncClient:
    """A client of a new tenant (its key ``prefix`` + a unique part, in ``client.tenant``) with an
    all-scopes key; ``mailbox``: with a mailbox of its own at the suite's SMTP sink, so it can send
    email. The caller closes the client."""
    tenant = uniq(prefix)
    env = pipeline.backing.env
    await asyncio.to_thread(access.admin, env, "create-tenant", tenant, "--name", f"Tenant {tenant}")
    headers = await asyncio.to_thread(access.admin_headers, env, pipeline.ingest_url, tenant=tenant)
    client = httpx.AsyncClient(base_url=pipeline.ingest_url, timeout=30, headers=headers)
    client.tenant = tenant  # type: ignore[attr-defined]
    if mailbox:
        r = await client.post("/api/v1/email-accounts", json={
            "email": f"{tenant}@example.org", "smtp_host": "127.0.0.1", "smtp_port": pipeline.backing.smtp_port,
            "tls_mode": "none", "daily_limit": 100_000})  # fmt: skip
        assert r.status_code == 201, r.text
    return client
