"""The mailbox pool through the whole pipeline: the accounts API, retries when every mailbox is
spent, auto-disable of a failing mailbox, permanent and transient refusals, dead letters.

The services run with retry delays of 1, 2 and 3 seconds (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from devstack.servers import free_port
from tests.conftest import Pipeline
from tests.e2e.helpers import SEND, by_message_id, wait_for_mail, wait_for_state

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

ACCOUNTS = "/api/v1/email-accounts"


@pytest.fixture
async def pool_state(db: asyncpg.Pool) -> AsyncIterator[None]:
    """Every test here may bend the default tenant's pool; it is put back afterwards."""
    saved = await db.fetch("SELECT id, is_active, daily_sent_count, last_reset_date, failure_count FROM email_accounts")
    yield
    keep = [r["id"] for r in saved]
    await db.execute("DELETE FROM email_accounts WHERE tenant_id='default' AND NOT (id = ANY($1::bigint[]))", keep)
    for r in saved:
        await db.execute(
            "UPDATE email_accounts SET is_active=$2, daily_sent_count=$3, last_reset_date=$4, failure_count=$5 "
            "WHERE id=$1",
            *r.values(),
        )


async def timeline(client: httpx.AsyncClient, message_id: str) -> list[dict]:
    return (await client.get(f"/api/v1/messages/{message_id}/timeline")).json()["data"]["events"]


async def wait_for_event(client: httpx.AsyncClient, message_id: str, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in await timeline(client, message_id):
            if e["state"] == state:
                return e
        await asyncio.sleep(0.1)
    raise AssertionError(f"{message_id}: no {state} event")


async def send(client: httpx.AsyncClient, to: str, subject: str) -> str:
    r = await client.post(SEND, json={"to": to, "subject": subject, "content": "<p>pool</p>"})
    assert r.status_code == 202, r.text
    return r.json()["data"]["message_id"]


async def test_accounts_api_never_returns_the_password_and_stores_it_encrypted(
    client: httpx.AsyncClient, db: asyncpg.Pool, pool_state: None
) -> None:
    body = {
        "email": f"ops-{uuid.uuid4().hex[:6]}@example.org",
        "smtp_host": "smtp.example.org",
        "smtp_port": 587,
        "smtp_username": "ops",
        "smtp_password": "correct horse battery staple",
        "display_name": "运维 Ops",
        "daily_limit": 200,
        "priority": -5,
        "is_active": False,
    }
    r = await client.post(ACCOUNTS, json=body)
    assert r.status_code == 201, r.text
    created = r.json()["data"]
    account_id = created["id"]
    assert "smtp_password" not in created and created["has_password"] is True
    assert created["tls_mode"] == "starttls" and created["daily_sent_count"] == 0
    assert "correct horse" not in r.text
    stored = await db.fetchval("SELECT smtp_password FROM email_accounts WHERE id=$1", account_id)
    assert stored.startswith("v1:") and "correct horse" not in stored

    listed = (await client.get(ACCOUNTS, params={"is_active": "false"})).json()["data"]
    assert account_id in [a["id"] for a in listed["records"]]
    assert all("smtp_password" not in a for a in listed["records"])
    got = (await client.get(f"{ACCOUNTS}/{account_id}")).json()["data"]
    assert got["display_name"] == "运维 Ops" and got["priority"] == -5

    r = await client.patch(f"{ACCOUNTS}/{account_id}", json={"smtp_password": "new one", "daily_limit": 10})
    assert r.status_code == 200 and r.json()["data"]["daily_limit"] == 10
    assert await db.fetchval("SELECT smtp_password FROM email_accounts WHERE id=$1", account_id) != stored

    assert (await client.post(f"{ACCOUNTS}/{account_id}/enable")).json()["data"]["is_active"] is True
    assert (await client.post(f"{ACCOUNTS}/{account_id}/disable")).json()["data"]["is_active"] is False

    dup = await client.post(ACCOUNTS, json=body)
    assert dup.status_code == 409 and dup.json()["code"] == 1006

    assert (await client.delete(f"{ACCOUNTS}/{account_id}")).status_code == 200
    missing = await client.get(f"{ACCOUNTS}/{account_id}")
    assert missing.status_code == 404 and missing.json()["code"] == 1004


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"display_name": "Evil\r\nBcc: victim@example.com"}, "display_name"),
        ({"smtp_username": "user\nRCPT TO:<x@example.com>"}, "smtp_username"),
        ({"smtp_host": "smtp.example.org\r\nQUIT"}, "smtp_host"),
        ({"smtp_port": 0}, "smtp_port"),
        ({"tls_mode": "ssl3"}, "tls_mode"),
        ({"email": "not an address"}, "email"),
        ({"daily_limit": -1}, "daily_limit"),
    ],
)
async def test_bad_account_input_is_refused(client: httpx.AsyncClient, change: dict, field: str) -> None:
    body = {"email": "x@example.org", "smtp_host": "smtp.example.org", "smtp_port": 25, **change}
    r = await client.post(ACCOUNTS, json=body)
    assert r.status_code == 400 and r.json()["code"] == 1001, r.text
    assert field in [e["field"] for e in r.json()["errors"]]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"subject": "Hi\r\nBcc: victim@example.com"}, "subject"),
        ({"from_name": "Bob\nX-Evil: 1"}, "from_name"),
    ],
)
async def test_header_injection_in_a_send_is_refused(client: httpx.AsyncClient, payload: dict, field: str) -> None:
    r = await client.post(SEND, json={"to": "a@example.com", "subject": "s", "content": "c", **payload})
    assert r.status_code == 400 and r.json()["code"] == 1001, r.text
    assert field in [e["field"] for e in r.json()["errors"]]


async def test_all_mailboxes_spent_then_retried_when_the_limit_resets(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool, pool_state: None
) -> None:
    await db.execute("UPDATE email_accounts SET daily_sent_count = daily_limit WHERE tenant_id='default'")
    message_id = await send(client, "reset@example.com", "after the limit resets")
    retrying = await wait_for_event(client, message_id, "retrying")
    assert retrying["error_code"] == 2002 and "no mailbox available" in retrying["error"]
    # A new day: yesterday's counters no longer apply.
    await db.execute("UPDATE email_accounts SET last_reset_date = last_reset_date - 1 WHERE tenant_id='default'")
    await wait_for_mail(pipeline, by_message_id(message_id), timeout=30)
    record = await wait_for_state(client, message_id, "sent")
    assert record["attempt"] >= 2 and record["retry_count"] == record["attempt"] - 1
    states = [e["state"] for e in await timeline(client, message_id)]
    assert states[:4] == ["accepted", "routed", "sending", "retrying"] and states[-1] == "sent"


async def test_all_mailboxes_disabled_then_retried_when_one_is_enabled(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool, pool_state: None
) -> None:
    ids = [r["id"] for r in await db.fetch("SELECT id FROM email_accounts WHERE tenant_id='default' AND is_active")]
    for account_id in ids:
        assert (await client.post(f"{ACCOUNTS}/{account_id}/disable")).status_code == 200
    message_id = await send(client, "enable@example.com", "after an account is enabled")
    assert (await wait_for_event(client, message_id, "retrying"))["error_code"] == 2002
    await client.post(f"{ACCOUNTS}/{ids[0]}/enable")
    await wait_for_mail(pipeline, by_message_id(message_id), timeout=30)
    assert (await wait_for_state(client, message_id, "sent"))["status"] == "success"


async def test_retries_exhausted_is_dead_and_dead_lettered(
    client: httpx.AsyncClient, db: asyncpg.Pool, pool_state: None
) -> None:
    await db.execute("UPDATE email_accounts SET is_active = false WHERE tenant_id='default'")
    message_id = await send(client, "never@example.com", "nowhere to send")
    record = await wait_for_state(client, message_id, "dead", timeout=40)
    assert record["status"] == "failed" and record["attempt"] == 4 and record["error_code"] == 2002
    states = [e["state"] for e in await timeline(client, message_id)]
    assert states.count("retrying") == 3 and states[-1] == "dead"
    letter = await _dead_letter(db, message_id)
    assert letter["reason"] == "retries_exhausted" and letter["service"] == "sender-email"


async def _dead_letter(db: asyncpg.Pool, message_id: str, timeout: float = 20) -> asyncpg.Record:
    deadline = time.monotonic() + timeout
    while not (letter := await db.fetchrow("SELECT * FROM dead_letters WHERE message_id=$1", message_id)):
        assert time.monotonic() < deadline, f"no dead letter for {message_id}"
        await asyncio.sleep(0.1)
    return letter


async def test_a_failing_mailbox_is_skipped_counted_and_disabled_after_three(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool, pool_state: None
) -> None:
    dead_port = free_port()  # nothing listens here: connection refused
    r = await client.post(
        ACCOUNTS,
        json={"email": "broken@example.org", "smtp_host": "127.0.0.1", "smtp_port": dead_port,
              "tls_mode": "none", "priority": 100},
    )  # fmt: skip
    broken = r.json()["data"]["id"]
    for i in range(3):
        message_id = await send(client, f"skip{i}@example.com", f"skip the broken one {i}")
        item = await wait_for_mail(pipeline, by_message_id(message_id))
        assert item.mail_from == "herald@example.org"  # delivered by the next account, same attempt
        record = await wait_for_state(client, message_id, "sent")
        assert record["attempt"] == 1
    account = (await client.get(f"{ACCOUNTS}/{broken}")).json()["data"]
    assert account["is_active"] is False and account["failure_count"] == 3
    assert "consecutive failures" in account["disabled_reason"] and account["last_error"]

    health = await _provider_health(pipeline.backing.bootstrap, f"email_account:{broken}")
    assert health["state"] == "disabled" and health["failures"] == 3 and health["account"] == "broken@example.org"

    enabled = (await client.post(f"{ACCOUNTS}/{broken}/enable")).json()["data"]
    assert enabled["is_active"] is True and enabled["failure_count"] == 0


async def _provider_health(bootstrap: str, identity: str, timeout: float = 20) -> dict:
    consumer = AIOKafkaConsumer(
        "notify.provider-health", bootstrap_servers=bootstrap, enable_auto_commit=False,
        auto_offset_reset="earliest",
    )  # fmt: skip
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for rec in records:
                    if rec.key == identity.encode():
                        return orjson.loads(rec.value)
    finally:
        await consumer.stop()
    raise AssertionError(f"no provider-health record for {identity}")


async def test_recipient_refusals_permanent_and_transient(
    client: httpx.AsyncClient, db: asyncpg.Pool, pool_state: None
) -> None:
    before = await db.fetchval("SELECT sum(failure_count) FROM email_accounts WHERE tenant_id='default'")
    bounced = await send(client, "bounce-me@example.com", "to nobody")
    record = await wait_for_state(client, bounced, "failed")
    assert record["status"] == "failed" and record["attempt"] == 1
    assert "550" in record["error_message"] and "does not exist" in record["error_message"]
    # Failed for good: dead-lettered with the full error, for the tenant, replayable.
    letter = await _dead_letter(db, bounced)
    assert letter["reason"] == "permanent_failure" and letter["tenant_id"] == "default"
    (error,) = orjson.loads(letter["errors"])
    assert error["code"] == record["error_code"] and "550" in error["message"]
    assert orjson.loads(letter["payload"])["dispatch_id"] == f"{bounced}:1"
    # A recipient's 550 is not the mailbox's fault.
    assert await db.fetchval("SELECT sum(failure_count) FROM email_accounts WHERE tenant_id='default'") == before

    full = await send(client, "full-box@example.com", "try later")
    retrying = await wait_for_event(client, full, "retrying")
    assert "452" in retrying["error"]


async def test_pool_gauges_are_exported(pipeline: Pipeline, client: httpx.AsyncClient) -> None:
    await wait_for_state(client, await send(client, "gauge@example.com", "gauge"), "sent")

    def value(text: str, prefix: str) -> float | None:
        found = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(found[0].split()[-1]) if found else None

    deadline = time.monotonic() + 20  # the gauges are refreshed every 5 s
    async with httpx.AsyncClient() as c:
        while True:
            text = (await c.get(f"{pipeline.services['sender-email'].url}/metrics")).text
            available = value(text, 'email_pool_available_accounts{tenant="default"}')
            sent = value(text, 'email_pool_daily_sent{account="herald@example.org"}')
            if (available or 0) >= 1 and (sent or 0) >= 1 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    assert available is not None and available >= 1
    assert sent is not None and sent >= 1
