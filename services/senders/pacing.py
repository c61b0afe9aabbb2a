"""Providers' rate limits, respected by waiting, never by dropping.

Each limit ("20 messages a minute per DingTalk bot", "1 a second per Telegram chat") is a sliding
log of *reserved* send times in Redis, shared by every replica of the sender: a message takes the
earliest time at which sending keeps every window of ``per_s`` seconds at ``count`` messages or
fewer, and never before a reservation already made (so waiting messages keep their order); one
atomic script on Redis's own clock, one round trip. It then sleeps until the latest of its
limits' times. A burst of ``count`` goes at once, the next one when the oldest of them leaves
the window: exactly the vendors' "N per window", which a token bucket's burst-plus-refill would
exceed (20 at once and then one every 3 s is 40 in the first minute). Without Redis nothing can
be counted: the message goes at once (the vendor's throttling answer is then retried).

A wait longer than ``HERALD_PACING_MAX_WAIT_S`` (a daily per-number limit, a deep backlog on one
bot) is not held in the sender (it would hold a delivery slot and outlive the dispatch's claim):
nothing is reserved and the dispatch is :class:`~services.senders.base.Deferred` (1007): it waits on
a retry topic and comes back as the same attempt (a deferral never uses up its retries). Every
limit of a message is reserved in one script, at the latest time any of them allows, so the
message is sent when all of them allow it and none keeps an unused reservation.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.senders.base import Deferred
from services.senders.plugins.base import RateLimit
from services.senders.plugins.config import Configured
from shared.errors import ErrorCode

log = logging.getLogger("herald.sender")

# For each limit i of one message: KEYS[2i-1] its reserved times (a sorted set, ms), KEYS[2i] its
# member counter; ARGV[1] the longest wait worth holding (ms), then per limit ARGV[2i] its window
# (ms) and ARGV[2i+1] its count. The time is the latest each limit allows, reserved in every
# limit's log at once (or in none): answers the wait (ms), or minus it when it is longer than
# ARGV[1] and nothing was reserved.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limits = #KEYS / 2
local slot = now
for i = 1, limits do
    local log = KEYS[2 * i - 1]
    local window = tonumber(ARGV[2 * i])
    local count = tonumber(ARGV[2 * i + 1])
    redis.call('ZREMRANGEBYSCORE', log, '-inf', now - window)
    local last = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
    if #last > 0 and tonumber(last[2]) > slot then slot = tonumber(last[2]) end
    local n = redis.call('ZCARD', log)
    if n >= count then
        local kth = redis.call('ZRANGE', log, n - count, n - count, 'WITHSCORES')
        local earliest = tonumber(kth[2]) + window
        if earliest > slot then slot = earliest end
    end
end
if slot - now > tonumber(ARGV[1]) then return now - slot end
for i = 1, limits do
    local member = redis.call('INCR', KEYS[2 * i])
    redis.call('ZADD', KEYS[2 * i - 1], slot, member)
    local ttl = slot - now + tonumber(ARGV[2 * i]) + 1000
    redis.call('PEXPIRE', KEYS[2 * i - 1], ttl)
    redis.call('PEXPIRE', KEYS[2 * i], ttl)
end
return slot - now
"""


def limit_key(entry: Configured, limit: RateLimit, index: int, to: str) -> str:
    """The limit's key; the braces put every limit of one provider in one Redis Cluster slot
    (one script reserves them together)."""
    key = f"herald:pace:{{{entry.id}}}:{index}"
    if limit.scope == "recipient":  # a digest of the address: no addresses in Redis keys
        key += ":" + hashlib.sha256(to.encode()).hexdigest()[:16]
    return key


class Pacer:
    def __init__(self, redis: Redis, max_wait_s: float = 30.0) -> None:
        self.redis = redis
        self.max_wait_ms = round(max_wait_s * 1000)
        self._reserve = redis.register_script(_RESERVE)

    async def wait(self, entry: Configured, to: str) -> float:
        """Reserve one time under every limit of ``entry`` and sleep until it; the seconds
        waited. :class:`Deferred` (nothing reserved) when that is more than the longest wait."""
        waited = await self.reserve(entry, to)
        if waited:
            await asyncio.sleep(waited)
        return waited

    async def reserve(self, entry: Configured, to: str) -> float:
        """Reserve the time (see :meth:`wait`) and answer how far ahead it is, without waiting."""
        limits = entry.limits()
        if not limits:
            return 0.0
        keys: list[str] = []
        args: list[int] = [self.max_wait_ms]
        for index, limit in enumerate(limits):
            key = limit_key(entry, limit, index, to)
            keys += [key, f"{key}:n"]
            args += [round(limit.per_s * 1000), limit.count]
        try:
            waited_ms = int(await self._reserve(keys=keys, args=args))
        except RedisError as exc:
            log.warning("rate limits of provider %s not counted (%s)", entry.id, exc.__class__.__name__)
            return 0.0
        if waited_ms < 0:
            raise Deferred(
                f"{entry.provider}: rate limit ({_describe(limits)}) has no slot for {-waited_ms / 1000:.0f} s",
                code=ErrorCode.RATE_LIMITED,
                retry_after=-waited_ms / 1000,
            )
        return waited_ms / 1000


def _describe(limits: list[RateLimit]) -> str:
    return ", ".join(f"{x.count} per {x.per_s:g} s" + (" per recipient" if x.scope == "recipient" else "")
                     for x in limits)  # fmt: skip
