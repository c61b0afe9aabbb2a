"""Dead letters: listed with their reasons, replayed one at a time or in bulk; retry_logs."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.conftest import Pipeline
from tests.e2e.helpers import SEND, by_message_id, wait_for_mail, wait_for_state

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

LETTERS = "/api/v1/dead-letters"


async def letters_for(client: httpx.AsyncClient, message_id: str, count: int = 1, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = (await client.get(LETTERS, params={"message_id": message_id})).json()["data"]["records"]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"fewer than {count} dead letters for {message_id}")


async def test_a_dead_message_is_listed_with_its_retry_log_and_replayed(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    saved = await db.fetch("SELECT id, is_active FROM email_accounts WHERE tenant_id='default'")
    await db.execute("UPDATE email_accounts SET is_active = false WHERE tenant_id='default'")
    try:
        r = await client.post(
            SEND, json={"to": "replay@example.com", "subject": f"r {uuid.uuid4().hex}", "content": "c"}
        )
        message_id = r.json()["data"]["message_id"]
        record = await wait_for_state(client, message_id, "dead", timeout=40)
        (letter,) = await letters_for(client, message_id)
        assert letter["reason"] == "retries_exhausted" and letter["replayed_at"] is None
        assert (await client.get(f"{LETTERS}/{letter['id']}")).json()["data"]["id"] == letter["id"]
        logs = orjson.loads(await db.fetchval("SELECT retry_logs FROM message_records WHERE message_id=$1", message_id))
        assert [entry["state"] for entry in logs] == ["retrying", "retrying", "retrying", "dead"]
        assert all(entry["error_code"] == 2002 and entry["at"] for entry in logs)
        assert logs[0]["next_attempt_at"]
        assert record["retry_count"] == 3
    finally:
        for row in saved:
            await db.execute("UPDATE email_accounts SET is_active=$2 WHERE id=$1", row["id"], row["is_active"])
    replay = await client.post(f"{LETTERS}/{letter['id']}/replay")
    assert replay.status_code == 200 and replay.json()["data"]["topic"] == "notify.requests"
    await wait_for_mail(pipeline, by_message_id(message_id))
    sent = await wait_for_state(client, message_id, "sent")
    assert sent["attempt"] == 5
    again = (await client.get(f"{LETTERS}/{letter['id']}")).json()["data"]
    assert again["replay_count"] == 1 and again["replayed_at"]


async def test_malformed_requests_are_listed_by_reason_and_replayed_in_bulk(
    client: httpx.AsyncClient, producer: AIOKafkaProducer
) -> None:
    marker = uuid.uuid4().hex
    for i in range(3):
        bad = {"channel": "email", "to": [f"not-an-address-{i}"], "subject": marker, "content": "c"}
        await producer.send_and_wait("notify.requests", orjson.dumps(bad))
    deadline = time.monotonic() + 30
    while True:
        page = (await client.get(LETTERS, params={"reason": "invalid_request", "replayed": "false",
                                                  "page_size": 100})).json()["data"]  # fmt: skip
        mine = [r for r in page["records"] if marker in r["payload"]]
        if len(mine) == 3 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert len(mine) == 3 and all(r["service"] == "router" and r["errors"] for r in mine)
    bulk = await client.post(f"{LETTERS}/replay", json={"ids": [r["id"] for r in mine]})
    assert bulk.status_code == 200 and bulk.json()["data"]["replayed"] == 3
    # Still malformed: each comes back as a new dead letter, and the old ones are marked.
    deadline = time.monotonic() + 30
    while True:
        page = (await client.get(LETTERS, params={"reason": "invalid_request", "page_size": 100})).json()["data"]
        mine_now = [r for r in page["records"] if marker in r["payload"]]
        if len(mine_now) >= 6 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert len(mine_now) == 6
    assert sum(1 for r in mine_now if r["replay_count"] == 1) == 3
    missing = await client.post(f"{LETTERS}/999999999/replay")
    assert missing.status_code == 404 and missing.json()["code"] == 1004
    empty = await client.post(f"{LETTERS}/replay", json={})
    assert empty.status_code == 400


async def test_a_letter_of_a_request_to_a_user_names_the_user_not_their_profile(
    client: httpx.AsyncClient, producer: AIOKafkaProducer
) -> None:
    marker, phone = uuid.uuid4().hex, "+8613800138099"
    profile = {"user_id": "dl-user", "addresses": {"sms": phone}, "attributes": {"team": "secret-team"}}
    bad = {"channel": "email", "to": ["not-an-address"], "subject": marker, "content": "c", "recipient": profile}
    await producer.send_and_wait("notify.requests", orjson.dumps(bad))
    deadline = time.monotonic() + 30
    while True:
        page = (await client.get(LETTERS, params={"reason": "invalid_request", "page_size": 100})).json()["data"]
        mine = [r for r in page["records"] if marker in r["payload"]]
        if mine or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert len(mine) == 1, page
    one = (await client.get(f"{LETTERS}/{mine[0]['id']}")).json()["data"]
    for letter in (mine[0], one):
        payload = orjson.loads(letter["payload"])
        assert payload["recipient"] == {"user_id": "dl-user"} and payload["subject"] == marker, letter
        assert phone not in orjson.dumps(letter).decode() and "secret-team" not in letter["payload"]
