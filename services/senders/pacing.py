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
nothing is reserved and the attempt is :class:`~services.senders.base.Retryable` (1007) with that
wait as ``retry_after``, so the message waits on a retry topic instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.senders.base import Retryable
from services.senders.plugins.base import RateLimit
from services.senders.plugins.config import Configured
from shared.errors import ErrorCode

log = logging.getLogger("herald.sender")

# KEYS[1] the reserved times (a sorted set, ms), KEYS[2] its member counter; ARGV[1] the window
# (ms), ARGV[2] the count, ARGV[3] the longest wait worth holding (ms). Answers the wait (ms) for
# the time it reserved, or minus the wait when that is longer than ARGV[3] (nothing reserved).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local slot = now
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if #last > 0 and tonumber(last[2]) > slot then slot = tonumber(last[2]) end
local n = redis.call('ZCARD', KEYS[1])
if n >= count then
    local kth = redis.call('ZRANGE', KEYS[1], n - count, n - count, 'WITHSCORES')
    local earliest = tonumber(kth[2]) + window
    if earliest > slot then slot = earliest end
end
if slot - now > tonumber(ARGV[3]) then return now - slot end
local member = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], slot, member)
local ttl = slot - now + window + 1000
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return slot - now
"""


def limit_key(entry: Configured, limit: RateLimit, index: int, to: str) -> str:
    """The limit's key; braces keep it and its counter in one Redis Cluster slot."""
    scope = f"{entry.id}.{index}"
    if limit.scope == "recipient":  # a digest of the address: no addresses in Redis keys
        scope += "." + hashlib.sha256(to.encode()).hexdigest()[:16]
    return f"herald:pace:{{{scope}}}"


class Pacer:
    def __init__(self, redis: Redis, max_wait_s: float = 30.0) -> None:
        self.redis = redis
        self.max_wait_ms = round(max_wait_s * 1000)
        self._reserve = redis.register_script(_RESERVE)

    async def wait(self, entry: Configured, to: str) -> float:
        """Reserve a slot under every limit of ``entry`` and sleep until it; the seconds waited."""
        longest = 0.0
        for index, limit in enumerate(entry.limits()):
            key = limit_key(entry, limit, index, to)
            try:
                waited_ms = int(await self._reserve(
                    keys=[key, f"{key}:n"], args=[round(limit.per_s * 1000), limit.count, self.max_wait_ms]
                ))  # fmt: skip
            except RedisError as exc:
                log.warning("rate limit of provider %s not counted (%s)", entry.id, exc.__class__.__name__)
                continue
            if waited_ms < 0:
                raise Retryable(
                    f"{entry.provider}: over its limit of {limit.count} per {limit.per_s:g} s"
                    + (" to this recipient" if limit.scope == "recipient" else "")
                    + f" for {-waited_ms / 1000:.0f} s more",
                    code=ErrorCode.RATE_LIMITED,
                    retry_after=-waited_ms / 1000,
                )
            longest = max(longest, waited_ms / 1000)
        if longest:
            await asyncio.sleep(longest)
        return longest
