"""Frequency caps and digests at the router's edge: the Redis scripts, and :meth:`Frequency.apply`,
the step every message ``plan()`` routed goes through before its dispatch is sent (so only valid
messages count). The decisions are pure (:mod:`services.router.caps`, :mod:`services.router.digests`);
this module only asks Redis.

In order, for a message of a category:

1. a digest message coming back from the scheduler: its bucket is frozen and its messages listed
   in one delivery (then 2 applies to that delivery);
2. a message that a digest rule collects: stored in its bucket, ``digested`` (caps count
   deliveries, and a digested message is not one);
3. every cap of its tenant, category and channel: counted, or suppressed / deferred.

A delivery attempt after the first (a replayed dead letter) was counted when first routed and is
not checked again. **Redis away: fail open.** A message is routed unchecked (logged, counted in
``herald_frequency_unchecked_total``) rather than held up: caps protect recipients from floods,
and an outage of the counter should not become an outage of delivery; a digest rule then delivers
each message on its own. A digest due while Redis is away is parked again for
:data:`RELEASE_RETRY`: its messages are in Redis and only there.

Windows live in Redis, so they survive router restarts (and are shared by every router).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.router import caps as cap_rules
from services.router import digests
from services.router.caps import Held
from services.router.routing import Parked, Rejected, Routed
from shared.events import utcnow
from shared.frequency import DigestRule, FrequencyCap, RuleStore
from shared.logging import log_event
from shared.metrics import (
    DIGEST_ITEMS,
    DIGEST_RELEASE_FAILED,
    DIGESTS_DELIVERED,
    FREQUENCY_CAPPED,
    FREQUENCY_UNCHECKED,
)
from shared.settings import Settings
from shared.template_store import TemplateStore
from shared.templates import Renderer

log = logging.getLogger("herald.router.frequency")

REDIS_DOWN: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
# A digest due while Redis cannot be asked is tried again this much later.
RELEASE_RETRY = timedelta(seconds=30)

# Check a message against its caps' windows and count it in all of them, or in none if one is
# full. KEYS: one sorted set per cap. ARGV: member (message id), now (ms), then each cap's limit
# and window (ms). Answers {counted, then per cap: already counted (0/1), count, frees at (ms, or
# -1)}. "Frees at" is when the window has room for one more: when the entry at rank
# count - limit (0-based, oldest first) leaves it; that is the oldest unless a cap was lowered.
COUNT_SCRIPT = """
local member, now = ARGV[1], tonumber(ARGV[2])
local out, full = {0}, false
for i, key in ipairs(KEYS) do
    local limit, window = tonumber(ARGV[2 * i + 1]), tonumber(ARGV[2 * i + 2])
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
    local seen = redis.call('ZSCORE', key, member) and 1 or 0
    local count = redis.call('ZCARD', key)
    local frees = -1
    if seen == 0 and count >= limit then
        full = true
        local entry = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
        frees = tonumber(entry[2]) + window
    end
    out[#out + 1] = seen
    out[#out + 1] = count
    out[#out + 1] = frees
end
if not full then
    for i, key in ipairs(KEYS) do
        redis.call('ZADD', key, 'NX', now, member)
        local window = tonumber(ARGV[2 * i + 2])
        if redis.call('PTTL', key) < window then  -- never shorter: a reserved slot may end later
            redis.call('PEXPIRE', key, window)
        end
    end
    out[1] = 1
end
return out
"""

# Reserve a deferred message's slot at the moment it is parked until, in each of its caps' windows:
# messages arriving meanwhile see the window full (and wait behind it, in order), and the message
# itself, back at that moment, is found there and goes. Without it every deferred message of a
# recipient wakes at the same moment and all but one are parked again (N² releases), and fresh
# messages can take each freed slot first. KEYS: the caps' sets. ARGV: member, at (ms), now (ms),
# then each cap's window (ms).
RESERVE_SCRIPT = """
local member, at, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i, key in ipairs(KEYS) do
    redis.call('ZADD', key, at, member)
    local keep = at + tonumber(ARGV[i + 3]) - now
    if redis.call('PTTL', key) < keep then
        redis.call('PEXPIRE', key, keep)
    end
end
return #KEYS
"""

# Store a message in its bucket's open digest, opening one (named ARGV[2]) when there is none or
# it is full. KEYS[1]: the bucket's open digest; KEYS[2]: which digest this message went into.
# ARGV: message id, digest id to open, its until (ms), window (ms), keep (s), max items, the item,
# the prefix of digest keys (the digest's keys share the bucket's hash tag). Answers {digest id,
# until (ms, -1 if unknown), state, the message that opened it ('' if unknown)}; a message stored
# before answers its digest again, unchanged.
ADD_SCRIPT = """
local prefix = ARGV[8]
local known = redis.call('GET', KEYS[2])
if known then
    local meta = redis.call('HMGET', prefix .. known, 'until', 'state', 'opener')
    return {known, tonumber(meta[1]) or -1, meta[2] or 'gone', meta[3] or ''}
end
local digest = redis.call('GET', KEYS[1])
if digest then
    local meta = redis.call('HMGET', prefix .. digest, 'state', 'n')
    if meta[1] ~= 'open' or tonumber(meta[2] or 0) >= tonumber(ARGV[6]) then
        digest = false
    end
end
local keep = tonumber(ARGV[5])
if not digest then
    digest = ARGV[2]
    redis.call('HSET', prefix .. digest, 'until', ARGV[3], 'state', 'open', 'n', 0, 'opener', ARGV[1])
    redis.call('EXPIRE', prefix .. digest, keep)
    redis.call('SET', KEYS[1], digest, 'PX', ARGV[4])
end
redis.call('HSET', prefix .. digest .. ':items', ARGV[1], ARGV[7])
redis.call('EXPIRE', prefix .. digest .. ':items', keep)
redis.call('HINCRBY', prefix .. digest, 'n', 1)
redis.call('SET', KEYS[2], digest, 'EX', keep)
local meta = redis.call('HMGET', prefix .. digest, 'until', 'opener')
return {digest, tonumber(meta[1]), 'open', meta[2] or ''}
"""

# Freeze a digest (no message joins it any more) and answer its messages; the same answer every
# time. KEYS: the bucket's open digest, the digest's state, its items. ARGV: digest id, keep (s).
FREEZE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
end
if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HSET', KEYS[2], 'state', 'frozen')
    redis.call('EXPIRE', KEYS[2], ARGV[2])
    redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return redis.call('HGETALL', KEYS[3])
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Frequency:
    """Frequency caps and digests of the rules in ``rules`` (fed by ``notify.config``)."""

    def __init__(
        self, redis: Redis, rules: RuleStore, templates: TemplateStore, renderer: Renderer, settings: Settings
    ) -> None:
        self.redis = redis
        self.rules = rules
        self.templates = templates
        self.renderer = renderer
        self.max_items = settings.digest_max_items
        self.keep_s = settings.digest_keep_s
        self._count = redis.register_script(COUNT_SCRIPT)
        self._reserve = redis.register_script(RESERVE_SCRIPT)
        self._add = redis.register_script(ADD_SCRIPT)
        self._freeze = redis.register_script(FREEZE_SCRIPT)

    # --- the step -------------------------------------------------------------------------------

    async def apply(
        self, routed: Routed, raw: bytes | None, now: datetime | None = None
    ) -> Routed | Parked | Held | Rejected:
        """What becomes of a routed message: routed as it is, routed as a digest's listing,
        held (suppressed, digested), parked (deferred) or rejected (a digest whose messages are gone)."""
        now = now or utcnow()
        request = routed.request
        # A later attempt (a replayed dead letter) was decided when it was first routed.
        later_attempt = request.later_attempt
        if request.digest is not None:
            released = await self._release(routed, raw, now)
            if not isinstance(released, Routed):
                return released
            routed, request = released, released.request
        elif later_attempt:
            return routed
        elif request.category is not None:
            rule = self.rules.digest_for(request.tenant_id, request.category, request.channel.value)
            if rule is not None and digests.eligible(request):
                held = await self._collect(routed, rule, now)
                if held is not None:
                    return held
        if request.category is None or later_attempt:
            return routed
        caps = self.rules.caps_for(request.tenant_id, request.category, request.channel.value)
        if not caps:
            return routed
        member = request.message_id or routed.dispatch.message_id
        try:
            _, counts = await self.count(request.tenant_id, request.to[0], member, caps, now)
        except REDIS_DOWN as exc:
            FREQUENCY_UNCHECKED.labels("cap").inc()
            log_event(log, logging.WARNING, "frequency caps not checked: Redis unavailable", message_id=member,
                      error=type(exc).__name__)  # fmt: skip
            return routed
        verdict = cap_rules.decide(counts)
        if isinstance(verdict, cap_rules.Suppress):
            FREQUENCY_CAPPED.labels("suppress").inc()
            log_event(log, logging.INFO, "message suppressed by a frequency cap", message_id=member,
                      cap_id=verdict.cap.cap_id, count=verdict.count)  # fmt: skip
            return cap_rules.suppressed(routed, verdict, now)
        if isinstance(verdict, cap_rules.Defer):
            try:
                await self.reserve(request.tenant_id, request.to[0], member, caps, verdict.until, now)
            except REDIS_DOWN as exc:  # deferred all the same; it competes for the slot when it returns
                log_event(log, logging.WARNING, "deferred without a reserved slot: Redis unavailable",
                          message_id=member, error=type(exc).__name__)  # fmt: skip
            FREQUENCY_CAPPED.labels("defer").inc()
            log_event(log, logging.INFO, "message deferred by a frequency cap", message_id=member,
                      cap_id=verdict.cap.cap_id, until=verdict.until.isoformat())  # fmt: skip
            return cap_rules.deferred(cap_rules.unrendered(raw, routed), verdict, now)
        return routed

    async def _collect(self, routed: Routed, rule: DigestRule, now: datetime) -> Held | None:
        """Store a message in its digest (None: Redis away, deliver it on its own)."""
        request = routed.request
        message_id = request.message_id or routed.dispatch.message_id
        tag = digests.bucket_tag(request.tenant_id, rule.rule_id, request.to[0])
        args = (tag, message_id, digests.digest_message_id(message_id), now, rule.window_s,
                digests.item_of(request, now))  # fmt: skip
        try:
            try:
                digest_id, until_ms, state, opener = await self.add(*args)
            except REDIS_DOWN:
                # Once more before failing open: a reply lost after the script ran would leave a
                # digest opened by this message and parked by nobody (the script answers a message
                # it already stored with its digest again, so the retry changes nothing else).
                digest_id, until_ms, state, opener = await self.add(*args)
        except REDIS_DOWN as exc:
            FREQUENCY_UNCHECKED.labels("digest").inc()
            log_event(log, logging.WARNING, "digest skipped, message delivered on its own: Redis unavailable",
                      message_id=message_id, error=type(exc).__name__)  # fmt: skip
            return None
        DIGEST_ITEMS.inc()
        log_event(log, logging.INFO, "message collected for a digest", message_id=message_id,
                  digest_message_id=digest_id, rule_id=rule.rule_id)  # fmt: skip
        return digests.hold(routed, rule, digest_id, until_ms, state, now, opener or None)

    async def _release(self, routed: Routed, raw: bytes | None, now: datetime) -> Routed | Parked | Rejected:
        """A digest message that came back: its bucket frozen, its messages rendered as one delivery."""
        request = routed.request
        ref = request.digest
        assert ref is not None
        message_id = request.message_id or routed.dispatch.message_id
        tag = digests.bucket_tag(request.tenant_id, ref.rule_id, request.to[0])
        try:
            items = digests.items_of(await self.freeze(tag, message_id))
        except REDIS_DOWN as exc:
            DIGEST_RELEASE_FAILED.labels("redis").inc()
            log_event(log, logging.WARNING, "digest postponed: Redis unavailable", message_id=message_id,
                      error=type(exc).__name__)  # fmt: skip
            return digests.retry_later(cap_rules.unrendered(raw, routed), now + RELEASE_RETRY, now)
        if not items:
            DIGEST_RELEASE_FAILED.labels("lost").inc()
            log_event(log, logging.ERROR, "digest has no messages left in Redis", message_id=message_id)
            return digests.lost(routed, now)
        rendered, how = digests.render(request, items, self.templates, self.renderer)
        DIGESTS_DELIVERED.observe(len(items))
        log_event(log, logging.INFO, "digest routed", message_id=message_id, count=len(items), rendered_with=how)
        return digests.deliver(routed, items, rendered, how, now)

    # --- the scripts ----------------------------------------------------------------------------

    async def count(
        self, tenant_id: str, recipient: str, member: str, caps: list[FrequencyCap], now: datetime
    ) -> tuple[bool, list[cap_rules.CapCount]]:
        """Check ``member`` against ``caps`` for ``recipient``, counting it if none is full."""
        keys = [cap_rules.counter_key(tenant_id, cap.cap_id, recipient) for cap in caps]
        reply = await self._count(keys=keys, args=cap_rules.script_args(member, now, caps))
        return cap_rules.read_counts(caps, reply)

    async def reserve(
        self, tenant_id: str, recipient: str, member: str, caps: list[FrequencyCap], at: datetime, now: datetime
    ) -> None:
        """Hold ``member``'s place at ``at`` in each of ``caps``' windows (see RESERVE_SCRIPT)."""
        keys = [cap_rules.counter_key(tenant_id, cap.cap_id, recipient) for cap in caps]
        args = [member, int(at.timestamp() * 1000), int(now.timestamp() * 1000), *(c.window_s * 1000 for c in caps)]
        await self._reserve(keys=keys, args=args)

    async def add(
        self, tag: str, message_id: str, candidate: str, now: datetime, window_s: int, item: bytes
    ) -> tuple[str, int, str, str]:
        """Store a message in its bucket: (digest id, its until in ms or -1, open/frozen/gone, the
        id of the message that opened it or '')."""
        now_ms = int(now.timestamp() * 1000)
        window_ms = window_s * 1000
        reply = await self._add(
            keys=[digests.open_key(tag), digests.member_key(tag, message_id)],
            args=[message_id, candidate, now_ms + window_ms, window_ms, window_s + self.keep_s, self.max_items,
                  item, digests.digest_prefix(tag)],
        )  # fmt: skip
        opener = _text(reply[3]) if len(reply) > 3 else ""
        return _text(reply[0]), int(reply[1]), _text(reply[2]), opener

    async def freeze(self, tag: str, digest_id: str) -> dict[Any, Any]:
        """Freeze a digest and answer its stored messages (message id → item)."""
        prefix = digests.digest_prefix(tag)
        reply = await self._freeze(
            keys=[digests.open_key(tag), prefix + digest_id, prefix + digest_id + ":items"],
            args=[digest_id, self.keep_s],
        )
        return {reply[i]: reply[i + 1] for i in range(0, len(reply), 2)}
