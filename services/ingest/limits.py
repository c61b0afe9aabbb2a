"""Request rate limits and monthly quotas, both counted in Redis so that every ingest replica
shares them.

Rate limits use the ``limits`` library's sliding-window-counter strategy (two fixed windows
weighted by overlap: no burst of twice the limit at a window boundary, two Redis keys per
identity). Requests with a valid token are limited per API key by the key's tier; all others
(no token, a bad one, and ``POST /api/v1/auth/token``) per client IP. Answers carry the
``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset`` and ``RateLimit-Policy``
headers (IETF httpapi-ratelimit-headers draft); a refusal is 429 / 1007 with ``Retry-After``.

Quotas count accepted messages per tenant, channel and calendar month (UTC). The counter is
taken and checked in one Lua step; a missing counter (a new month, or a Redis that lost its
data) is seeded from ``message_records`` first, so a Redis restart does not hand out a fresh
month.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.db import DB_UNAVAILABLE
from shared.metrics import LIMIT_BYPASSED, LIMITED
from shared.settings import Settings

log = logging.getLogger("herald.ingest.limits")

# Redis could not be asked (down, refusing, slow).
REDIS_DOWN: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the window has room again
    window_s: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [
            (b"ratelimit-limit", str(self.limit).encode()),
            (b"ratelimit-remaining", str(self.remaining).encode()),
            (b"ratelimit-reset", str(self.reset_s).encode()),
            (b"ratelimit-policy", f"{self.limit};w={self.window_s}".encode()),
        ]
        if not self.allowed:
            out.append((b"retry-after", str(max(1, self.reset_s)).encode()))
        return out


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        url = settings.redis_url.get_secret_value()
        self.storage = RedisStorage(
            "async+" + url,
            implementation="redispy",
            key_prefix="herald:rl",
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        self.strategy = SlidingWindowCounterRateLimiter(self.storage)
        self.ip_item = parse(settings.rate_limit_ip)
        self.tiers: dict[str, RateLimitItem | None] = {
            name: (parse(value) if value else None) for name, value in settings.rate_limit_tiers.items()
        }
        self.fail_open = settings.rate_limit_fail_open

    def tier_item(self, tier: str) -> RateLimitItem | None:
        if tier not in self.tiers:
            # An unknown tier (a setting removed after keys were made) gets the strictest one.
            return min((i for i in self.tiers.values() if i is not None), key=_per_second, default=self.ip_item)
        return self.tiers[tier]

    async def take(self, item: RateLimitItem, kind: str, identity: str) -> Decision | None:
        """One request against ``item`` for ``identity``; None when Redis could not be asked
        and the limiter fails open."""
        try:
            allowed = await self.strategy.hit(item, kind, identity)
            stats = await self.strategy.get_window_stats(item, kind, identity)
        except REDIS_DOWN:
            if not self.fail_open:
                raise
            LIMIT_BYPASSED.labels(kind).inc()
            log.warning("rate limit of %s not checked: Redis unavailable", kind)
            return None
        if not allowed:
            LIMITED.labels(kind).inc()
        window_s = item.get_expiry()
        reset_s = max(0, math.ceil(stats.reset_time - time.time()))
        return Decision(allowed, item.amount, max(0, stats.remaining), reset_s, window_s)


def _per_second(item: RateLimitItem) -> float:
    return item.amount / item.get_expiry()


# --- quotas ------------------------------------------------------------------------------------

_TAKE = """
local used = redis.call('GET', KEYS[1])
if not used then return -1 end
local count = tonumber(ARGV[3] or '1')
if tonumber(used) + count > tonumber(ARGV[1]) then return -2 - tonumber(used) end
local now = redis.call('INCRBY', KEYS[1], count)
redis.call('EXPIREAT', KEYS[1], ARGV[2])
return now
"""


class QuotaExceeded(Exception):
    def __init__(self, channel: str, limit: int, used: int, resets_at: datetime) -> None:
        super().__init__(channel)
        self.channel, self.limit, self.used, self.resets_at = channel, limit, used, resets_at


def month_bounds(now: datetime) -> tuple[datetime, datetime]:
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


def _expiry(month_end: datetime) -> int:
    """A month's counter stays readable for a week after the month."""
    return int(month_end.timestamp()) + 7 * 86400


class Quotas:
    def __init__(self, redis: Redis, pool: asyncpg.Pool, fail_open: bool = True) -> None:
        self.redis = redis
        self.pool = pool
        self.fail_open = fail_open
        self._take = redis.register_script(_TAKE)

    @staticmethod
    def key(tenant: str, channel: str, start: datetime) -> str:
        return f"herald:quota:{tenant}:{channel}:{start:%Y-%m}"

    async def take(self, tenant: str, channel: str, limit: int | None, count: int = 1) -> bool:
        """Count ``count`` messages against the month's quota, all or none: raise
        :class:`QuotaExceeded` (and count nothing) when they do not all fit. Answers whether it
        counted: not for an unlimited channel, nor when Redis (or PostgreSQL, to seed the counter)
        could not be asked and quotas fail open."""
        if limit is None:
            return False
        start, end = month_bounds(datetime.now(UTC))
        key = self.key(tenant, channel, start)
        try:
            for _ in range(2):
                result = int(await self._take(keys=[key], args=[limit, _expiry(end), count]))
                if result >= 0:
                    return True
                if result != -1:
                    raise QuotaExceeded(channel, limit, -2 - result, end)
                await self._seed(tenant, channel, start, end)
        except (*REDIS_DOWN, *DB_UNAVAILABLE):
            if not self.fail_open:
                raise
            LIMIT_BYPASSED.labels("quota").inc()
            log.warning("quota of %s not checked: Redis or PostgreSQL unavailable", channel)
        return False

    async def _seed(self, tenant: str, channel: str, start: datetime, end: datetime) -> int:
        """The month's count from the records, for a counter Redis does not have."""
        used = await self.pool.fetchval(
            """SELECT count(*) FROM message_records WHERE tenant_id = $1 AND message_type = $2
               AND created_at >= $3 AND created_at < $4 AND state NOT IN ('rejected', 'cancelled')""",
            tenant,
            channel,
            start,
            end,
        )
        await self.redis.set(self.key(tenant, channel, start), used, nx=True, exat=_expiry(end))
        return int(used)

    async def give_back(self, tenant: str, channel: str, count: int = 1) -> None:
        """Messages counted but not accepted after all (the broker refused them, or replays)."""
        start, _ = month_bounds(datetime.now(UTC))
        try:
            await self.redis.decrby(self.key(tenant, channel, start), count)
        except REDIS_DOWN:
            log.warning("quota of %s not given back: Redis unavailable", channel)

    async def used(self, tenant: str, channel: str) -> int | None:
        """This month's count (None: Redis unavailable)."""
        start, end = month_bounds(datetime.now(UTC))
        try:
            value = await self.redis.get(self.key(tenant, channel, start))
            return int(value) if value is not None else await self._seed(tenant, channel, start, end)
        except (*REDIS_DOWN, *DB_UNAVAILABLE):
            return None
