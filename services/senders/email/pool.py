"""The SMTP mailbox pool (seed 004 §3.1.1): which account sends the next email.

Selection per attempt: active accounts of the tenant, highest ``priority`` first, then the
lowest ``daily_sent_count``; accounts at ``daily_limit`` are skipped. Choosing and counting are
one statement (:data:`_RESERVE`): the chosen row is locked, re-checked against its current
version and incremented before the lock is released, so two senders can never push an account
past its limit. The counter resets on the first use of a new day in the configured timezone
(the seed's ``BEFORE SELECT`` trigger does not exist in PostgreSQL). A reservation whose send
fails is given back (:meth:`MailboxPool.release`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import asyncpg

from shared.crypto import SecretBox
from shared.logging import log_event
from shared.settings import Settings

log = logging.getLogger("herald.sender.pool")

PASSWORD_PURPOSE = "email_accounts.smtp_password"


# $1 tenant, $2 timezone, $3 account ids to leave out, $4 slots wanted. Effective count: 0 when
# the stored counter belongs to an earlier day. Grants up to $4 slots of the chosen account.
_RESERVE = """
WITH today AS (SELECT (now() AT TIME ZONE $2)::date AS d),
pick AS (
    SELECT a.id, (CASE WHEN a.last_reset_date < today.d THEN 0 ELSE a.daily_sent_count END) AS used
    FROM email_accounts a, today
    WHERE a.tenant_id = $1 AND a.is_active AND NOT (a.id = ANY($3::bigint[]))
      AND (CASE WHEN a.last_reset_date < today.d THEN 0 ELSE a.daily_sent_count END) < a.daily_limit
    ORDER BY a.priority DESC,
             (CASE WHEN a.last_reset_date < today.d THEN 0 ELSE a.daily_sent_count END) ASC,
             a.id
    LIMIT 1
    FOR UPDATE OF a {skip}
)
UPDATE email_accounts a SET
    daily_sent_count = pick.used + LEAST($4, a.daily_limit - pick.used),
    last_reset_date = today.d
FROM pick, today
WHERE a.id = pick.id
RETURNING a.id, a.tenant_id, a.email, a.smtp_host, a.smtp_port, a.smtp_username, a.smtp_password,
          a.tls_mode, a.display_name, a.daily_limit, a.daily_sent_count, a.failure_count,
          LEAST($4, a.daily_limit - pick.used) AS granted
"""
_RESERVE_SKIP = _RESERVE.format(skip="SKIP LOCKED")
_RESERVE_WAIT = _RESERVE.format(skip="")

_RELEASE = """
UPDATE email_accounts SET daily_sent_count = GREATEST(daily_sent_count - $3, 0)
WHERE id = $1 AND last_reset_date = (now() AT TIME ZONE $2)::date
"""

_FAILURE = """
UPDATE email_accounts SET
    failure_count = failure_count + 1,
    last_failure_at = now(),
    last_error = $2,
    is_active = CASE WHEN failure_count + 1 >= $3 THEN false ELSE is_active END,
    disabled_reason = CASE WHEN failure_count + 1 >= $3 AND is_active
                           THEN 'disabled after ' || (failure_count + 1) || ' consecutive failures: ' || $2
                           ELSE disabled_reason END,
    updated_at = now()
WHERE id = $1
RETURNING failure_count, is_active
"""

_SUCCESS = "UPDATE email_accounts SET failure_count = 0, updated_at = now() WHERE id = $1 AND failure_count > 0"

_GAUGES = """
SELECT id, email, tenant_id, is_active,
       CASE WHEN last_reset_date < (now() AT TIME ZONE $1)::date THEN 0 ELSE daily_sent_count END AS sent,
       daily_limit
FROM email_accounts
"""


@dataclass(frozen=True, slots=True)
class Account:
    """One mailbox, password decrypted; ``key`` changes when its connection settings do."""

    id: int
    tenant_id: str
    email: str
    host: str
    port: int
    username: str
    password: str
    tls_mode: str
    display_name: str | None
    daily_limit: int
    daily_sent_count: int
    failure_count: int

    @property
    def key(self) -> tuple:
        return (self.id, self.host, self.port, self.username, self.password, self.tls_mode)


@dataclass(frozen=True, slots=True)
class Disabled:
    account_id: int
    email: str
    tenant_id: str
    failures: int
    reason: str


@dataclass(slots=True)
class _Lease:
    """Slots of one account counted in the database and not yet used by this process."""

    account: Account
    left: int
    until: float


class MailboxPool:
    """Hands out accounts, ``lease_size`` slots at a time per database round trip.

    Slots are counted in the database when leased, so the limit holds across processes; unused
    ones go back after ``lease_ttl`` seconds or at :meth:`close`. With ``lease_size`` 1 every
    email is one reservation and the order (priority, then least used) is exact; with more, it
    is exact per lease, and near a limit another process may briefly hold the last slots.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        box: SecretBox,
        timezone: str,
        failure_threshold: int,
        *,
        lease_size: int = 1,
        lease_ttl: float = 2.0,
    ) -> None:
        self.pool = pool
        self.box = box
        self.timezone = timezone
        self.failure_threshold = failure_threshold
        self.lease_size = lease_size
        self.lease_ttl = lease_ttl
        self._leases: dict[str, _Lease] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def reserve(self, tenant_id: str, exclude: set[int] | frozenset[int] = frozenset()) -> Account | None:
        """Choose an account and count this attempt against its daily limit; None when every
        active account of the tenant is at its limit (or excluded)."""
        lock = self._locks.setdefault(tenant_id, asyncio.Lock())
        async with lock:
            lease = self._leases.get(tenant_id)
            if lease is not None:
                if lease.left > 0 and lease.account.id not in exclude and time.monotonic() < lease.until:
                    lease.left -= 1
                    return lease.account
                await self._give_back(tenant_id)
            want = 1 if exclude else self.lease_size
            row = await self._lease(tenant_id, exclude, want)
            if row is None:
                return None
            account = self._account(row)
            if row["granted"] > 1:
                self._leases[tenant_id] = _Lease(account, row["granted"] - 1, time.monotonic() + self.lease_ttl)
            return account

    async def _lease(self, tenant_id: str, exclude: set[int] | frozenset[int], want: int) -> asyncpg.Record | None:
        args = (tenant_id, self.timezone, list(exclude), want)
        row = await self.pool.fetchrow(_RESERVE_SKIP, *args)
        if row is None:
            # Rows locked by a concurrent reservation were skipped: ask again, waiting for them.
            row = await self.pool.fetchrow(_RESERVE_WAIT, *args)
        return row

    def _account(self, row: asyncpg.Record) -> Account:
        password = self.box.decrypt(row["smtp_password"], PASSWORD_PURPOSE) if row["smtp_password"] else ""
        return Account(
            id=row["id"],
            tenant_id=row["tenant_id"],
            email=row["email"],
            host=row["smtp_host"],
            port=row["smtp_port"],
            username=row["smtp_username"],
            password=password,
            tls_mode=row["tls_mode"],
            display_name=row["display_name"],
            daily_limit=row["daily_limit"],
            daily_sent_count=row["daily_sent_count"],
            failure_count=row["failure_count"],
        )

    async def _give_back(self, tenant_id: str) -> None:
        lease = self._leases.pop(tenant_id, None)
        if lease is not None and lease.left > 0:
            await self.pool.execute(_RELEASE, lease.account.id, self.timezone, lease.left)

    async def release(self, account: Account) -> None:
        """Give back a reservation whose send did not go through."""
        lease = self._leases.get(account.tenant_id)
        if lease is not None and lease.account.id == account.id and time.monotonic() < lease.until:
            lease.left += 1
            return
        await self.pool.execute(_RELEASE, account.id, self.timezone, 1)

    async def drop_lease(self, account: Account) -> None:
        """Stop using an account's leased slots (it just failed)."""
        lease = self._leases.get(account.tenant_id)
        if lease is not None and lease.account.id == account.id:
            async with self._locks.setdefault(account.tenant_id, asyncio.Lock()):
                await self._give_back(account.tenant_id)

    async def close(self) -> None:
        """Return every unused leased slot."""
        for tenant_id in list(self._leases):
            await self._give_back(tenant_id)

    async def succeeded(self, account: Account) -> None:
        if account.failure_count:
            await self.pool.execute(_SUCCESS, account.id)

    async def failed(self, account: Account, error: str) -> Disabled | None:
        """Count a failure that is the account's fault; answers what was disabled, if it was."""
        row = await self.pool.fetchrow(_FAILURE, account.id, error[:500], self.failure_threshold)
        if row is None or row["is_active"]:
            return None
        disabled = Disabled(account.id, account.email, account.tenant_id, row["failure_count"], error[:500])
        if row["failure_count"] == self.failure_threshold:  # log once, when it happens
            log_event(
                log,
                logging.WARNING,
                "mailbox disabled after consecutive failures",
                account_id=account.id,
                account=account.email,
                failures=row["failure_count"],
                error=error[:200],
            )
        return disabled

    async def gauges(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(_GAUGES, self.timezone)


async def ensure_bootstrap_account(pool: asyncpg.Pool, box: SecretBox, settings: Settings) -> bool:
    """Add the account of ``HERALD_SMTP_*`` to the default tenant's pool when that pool is
    empty (``make run`` points it at the local sink). Answers whether one was added."""
    if not settings.smtp_host:
        return False
    password = settings.smtp_password.get_secret_value()
    added = await pool.fetchval(
        """INSERT INTO email_accounts (tenant_id, email, smtp_host, smtp_port, smtp_username, smtp_password,
               tls_mode, display_name, daily_limit)
           SELECT 'default', $1, $2, $3, $4, $5, $6, $7, $8
           WHERE NOT EXISTS (SELECT 1 FROM email_accounts WHERE tenant_id = 'default')
           ON CONFLICT DO NOTHING
           RETURNING id""",
        settings.smtp_from_address,
        settings.smtp_host,
        settings.smtp_port,
        settings.smtp_username,
        box.encrypt(password, PASSWORD_PURPOSE) if password else "",
        settings.smtp_tls_mode,
        settings.smtp_from_name,
        settings.smtp_daily_limit,
    )
    if added:
        log.info("bootstrap mailbox %s added to the default tenant's pool", settings.smtp_from_address)
    return added is not None
