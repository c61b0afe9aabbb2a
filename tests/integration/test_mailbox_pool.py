"""The mailbox pool against a real PostgreSQL: order, limits under concurrency, day rollover,
failure accounting. Two MailboxPool objects on two connection pools stand for two senders."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.senders.email.pool import PASSWORD_PURPOSE, MailboxPool, ensure_bootstrap_account
from shared.crypto import SecretBox
from shared.db import apply_migrations, create_pool
from shared.settings import Settings
from tests.conftest import TEST_ENCRYPTION_KEY, Backing

TZ = "Asia/Shanghai"
BOX = SecretBox.from_setting(TEST_ENCRYPTION_KEY)


@pytest.fixture(scope="module")
async def pools(backing: Backing) -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Pool]]:
    await asyncio.to_thread(apply_migrations, backing.dsn)
    settings = Settings(database_url=backing.dsn, db_pool_min=1, db_pool_max=8)
    a, b = await create_pool(settings), await create_pool(settings)
    yield a, b
    await a.close()
    await b.close()


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def add(pool: asyncpg.Pool, tenant: str, name: str, *, priority: int = 0, limit: int = 500,
              sent: int = 0, active: bool = True, password: str = "") -> int:  # fmt: skip
    return await pool.fetchval(
        """INSERT INTO email_accounts (tenant_id, email, smtp_host, smtp_port, smtp_password, priority,
               daily_limit, daily_sent_count, is_active, last_reset_date)
           VALUES ($1, $2, '127.0.0.1', 25, $3, $4, $5, $6, $7, (now() AT TIME ZONE $8)::date) RETURNING id""",
        tenant, f"{name}@example.org", BOX.encrypt(password, PASSWORD_PURPOSE) if password else "",
        priority, limit, sent, active, TZ,
    )  # fmt: skip


def mailboxes(pool: asyncpg.Pool) -> MailboxPool:
    return MailboxPool(pool, BOX, TZ, failure_threshold=3)


async def test_highest_priority_then_least_used_and_limits_skipped(pools, tenant) -> None:
    pool = pools[0]
    low = await add(pool, tenant, "low", priority=1, sent=0)
    busy = await add(pool, tenant, "busy", priority=5, sent=10)
    idle = await add(pool, tenant, "idle", priority=5, sent=3, password="s3cret")
    full = await add(pool, tenant, "full", priority=9, limit=4, sent=4)
    await add(pool, tenant, "off", priority=9, active=False)
    m = mailboxes(pool)
    first = await m.reserve(tenant)
    assert first is not None and first.id == idle and first.password == "s3cret"
    assert first.daily_sent_count == 4
    # idle (now 4) catches up with busy (10); then the tie goes to the older account.
    picks = [(await m.reserve(tenant)).id for _ in range(8)]
    assert picks == [idle] * 6 + [busy, idle]
    assert full not in picks and low not in picks
    assert (await m.reserve(tenant, {idle, busy})).id == low


async def test_two_senders_never_push_an_account_past_its_limit(pools, tenant) -> None:
    a_id = await add(pools[0], tenant, "a", priority=2, limit=40)
    b_id = await add(pools[0], tenant, "b", priority=1, limit=25)
    one, two = mailboxes(pools[0]), mailboxes(pools[1])

    async def grab(m: MailboxPool) -> int | None:
        account = await m.reserve(tenant)
        return account.id if account else None

    results = await asyncio.gather(*(grab(one if i % 2 else two) for i in range(120)))
    counts = Counter(r for r in results if r is not None)
    assert counts == {a_id: 40, b_id: 25}
    assert results.count(None) == 55
    rows = await pools[0].fetch("SELECT id, daily_sent_count FROM email_accounts WHERE tenant_id=$1", tenant)
    assert {r["id"]: r["daily_sent_count"] for r in rows} == {a_id: 40, b_id: 25}


async def test_counter_resets_on_first_use_of_a_new_day_in_the_pool_timezone(pools, tenant) -> None:
    pool = pools[0]
    account = await add(pool, tenant, "daily", limit=5, sent=5)
    m = mailboxes(pool)
    assert await m.reserve(tenant) is None  # at its limit today
    await pool.execute("UPDATE email_accounts SET last_reset_date = last_reset_date - 1 WHERE id=$1", account)
    again = await m.reserve(tenant)
    assert again is not None and again.daily_sent_count == 1
    row = await pool.fetchrow(
        "SELECT daily_sent_count, last_reset_date = (now() AT TIME ZONE $2)::date AS today "
        "FROM email_accounts WHERE id=$1",
        account,
        TZ,
    )
    assert row["daily_sent_count"] == 1 and row["today"]


async def test_release_gives_the_reservation_back(pools, tenant) -> None:
    pool = pools[0]
    await add(pool, tenant, "r", limit=1)
    m = mailboxes(pool)
    account = await m.reserve(tenant)
    assert account is not None and await m.reserve(tenant) is None
    await m.release(account)
    assert await m.reserve(tenant) is not None


async def test_three_consecutive_failures_disable_and_a_success_resets(pools, tenant) -> None:
    pool = pools[0]
    account_id = await add(pool, tenant, "flaky")
    m = mailboxes(pool)
    account = await m.reserve(tenant)
    assert await m.failed(account, "535 bad credentials") is None
    assert await m.failed(account, "535 bad credentials") is None
    refreshed = await m.reserve(tenant)
    assert refreshed.failure_count == 2
    await m.succeeded(refreshed)
    assert await pool.fetchval("SELECT failure_count FROM email_accounts WHERE id=$1", account_id) == 0
    for _ in range(2):
        assert await m.failed(account, "connection refused") is None
    disabled = await m.failed(account, "connection refused")
    assert disabled is not None and disabled.failures == 3 and disabled.account_id == account_id
    row = await pool.fetchrow("SELECT is_active, disabled_reason, last_error FROM email_accounts WHERE id=$1",
                              account_id)  # fmt: skip
    assert row["is_active"] is False and "3 consecutive failures" in row["disabled_reason"]
    assert await m.reserve(tenant) is None


async def test_bootstrap_account_only_fills_an_empty_default_pool(pools, backing: Backing) -> None:
    pool = pools[0]
    # The e2e services may already have bootstrapped the default tenant; start from empty.
    async with pool.acquire() as conn, conn.transaction():
        saved = await conn.fetch("SELECT * FROM email_accounts WHERE tenant_id='default'")
        await conn.execute("DELETE FROM email_accounts WHERE tenant_id='default'")
        settings = Settings(smtp_host="127.0.0.1", smtp_port=2525, smtp_from_address="boot@example.org",
                            smtp_password="pw", smtp_tls_mode="none")  # fmt: skip
        try:
            assert await ensure_bootstrap_account(conn, BOX, settings) is True
            assert await ensure_bootstrap_account(conn, BOX, settings) is False
            row = await conn.fetchrow("SELECT * FROM email_accounts WHERE tenant_id='default'")
            assert row["email"] == "boot@example.org" and row["smtp_port"] == 2525
            assert row["smtp_password"] != "pw" and BOX.decrypt(row["smtp_password"], PASSWORD_PURPOSE) == "pw"
        finally:
            await conn.execute("DELETE FROM email_accounts WHERE tenant_id='default'")
            for r in saved:
                cols = list(r.keys())
                await conn.execute(
                    f"INSERT INTO email_accounts ({', '.join(cols)}) VALUES "
                    f"({', '.join(f'${i}' for i in range(1, len(cols) + 1))})",
                    *r.values(),
                )


async def test_leased_slots_keep_the_limit_and_unused_ones_go_back(pools, tenant) -> None:
    a_id = await add(pools[0], tenant, "a", priority=2, limit=40)
    b_id = await add(pools[0], tenant, "b", priority=1, limit=25)
    one = MailboxPool(pools[0], BOX, TZ, 3, lease_size=8)
    two = MailboxPool(pools[1], BOX, TZ, 3, lease_size=8)

    async def grab(m: MailboxPool) -> int | None:
        account = await m.reserve(tenant)
        return account.id if account else None

    results = await asyncio.gather(*(grab(one if i % 3 else two) for i in range(50)))
    taken = Counter(r for r in results if r is not None)
    assert sum(taken.values()) == 50 and taken[a_id] <= 40 and taken[b_id] <= 25
    await one.close()
    await two.close()  # unused leased slots go back
    rows = await pools[0].fetch("SELECT id, daily_sent_count FROM email_accounts WHERE tenant_id=$1", tenant)
    assert {r["id"]: r["daily_sent_count"] for r in rows} == {a_id: taken[a_id], b_id: taken[b_id]}
    # Exhaust both, whatever is leased where: never more than the limits in total.
    rest = await asyncio.gather(*(grab(one if i % 2 else two) for i in range(100)))
    await one.close()
    await two.close()
    total = Counter(r for r in [*results, *rest] if r is not None)
    assert total[a_id] <= 40 and total[b_id] <= 25
    rows = await pools[0].fetch("SELECT id, daily_sent_count FROM email_accounts WHERE tenant_id=$1", tenant)
    assert {r["id"]: r["daily_sent_count"] for r in rows} == {a_id: total[a_id], b_id: total[b_id]}
