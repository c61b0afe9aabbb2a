"""Live quality and circuit breakers of configured providers (issue 10, the tracker's half).

Senders report every try of a configured provider on ``notify.events`` (``detail.provider_id``):
a ``sent`` event is a success with the vendor's answer time (``detail.provider_ms``); a
``retrying``/``failed``/``dead`` event with ``detail.provider_fault`` true is the provider's
failure (5xx, network, credentials, quota). A failure that is the recipient's or the content's
says nothing about the provider and is not counted, nor is a rate-limit wait (``deferred``).

Two halves, because several trackers fold the partitions of ``notify.events`` between them:

- :class:`QualityBook` (every tracker, after each batch is folded) counts tries in Redis: per
  provider and time bucket (of the event's ``occurred_at``) successes, faults and a latency
  histogram; per provider its consecutive faults and the time of its latest success and fault.
  Each event id counts once (events are redelivered). Redis away: a warning, and folding goes on
  (quality is advisory; the messages' records are not).
- :class:`QualityPublisher` (one tracker at a time, holding a Redis lease) sums each provider's
  buckets over the window, steps its breaker (:func:`step`, a pure function; the state lives in
  Redis so the next leader continues it) and publishes :class:`ProviderHealthV1` to the compacted
  ``notify.provider-health`` topic when a value changed, and every provider seen in the window or
  with an open breaker again at least every ``quality_refresh_s`` (:func:`refresh_due`). Routers
  keep the latest record of each provider and route on it (``shared.routing.score``); one older
  than 4 x ``quality_refresh_s`` they take for unknown (Tansu never compacts the topic: each
  refresh is one more record there, so refreshes are few).

Redis keys (``<p>`` the prefix, "herald"; ``{...}`` are Redis Cluster hash tags: a provider's keys
share one slot, as the counting script needs, and so do the publisher's own):

- ``<p>:quality:{<id>}:seen:<event id>``: string, an event counted (TTL window + bucket);
- ``<p>:quality:{<id>}:b:<bucket start ms>``: hash ``ok``, ``fault``, ``h<bound>``/``hinf``
  (successes by answer time) (TTL window + bucket);
- ``<p>:quality:{<id>}:facts``: hash ``consecutive``, ``last_ok_ms``, ``last_fault_ms``,
  ``tenant_id``, ``channel``, ``provider`` (TTL a week, or 4 windows, refreshed by each try);
- ``<p>:{quality}:index``: sorted set, provider id → its latest try (ms); a provider leaves it
  two windows after its latest try, but one with an open breaker only when its facts expire;
- ``<p>:{quality}:breakers``: hash, provider id → its breaker (JSON);
- ``<p>:{quality}:leader``: string, the publishing tracker (PX lease).

Approximations, on purpose:

- the window is whole buckets: the buckets starting within the last ``window_s`` (so it covers
  between ``window_s - bucket_s`` and ``window_s``), plus one bucket ahead of now for senders
  whose clock is a little ahead;
- p95 is the upper bound of the histogram bucket where the cumulative count reaches 95 % of the
  timed successes: an over-estimate by at most that bucket's width (answers of 120 ms read as
  200); beyond the last bound it reads as that bound (30 s: the p95 is at least that);
- consecutive faults follow ``occurred_at`` where batches interleave: a fault older than the
  latest success does not count, a success older than the latest fault does not reset;
- closing a breaker restarts the statistics at the first bucket boundary after the close (the
  bucket holding the close also holds the failures that opened it);
- an open breaker closes on a success at or after its cooldown, taken for a probe's: a send
  routed before the routers heard it opened but sent after the cooldown (a sender far behind its
  topic) closes it too;
- tries are placed by their ``occurred_at`` (the senders' clocks) and breakers judged by the
  publisher's clock: hosts are assumed synchronised well within a bucket and a cooldown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.events import EventV1, ProviderHealthV1, State, utcnow
from shared.logging import log_event
from shared.metrics import PROVIDER_BREAKER_OPEN, PROVIDER_SUCCESS_RATE
from shared.redis_scripts import RELEASE_IF_OWNER
from shared.routing import health_identity
from shared.settings import Settings

log = logging.getLogger("herald.tracker.quality")

REDIS_DOWN: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
PUBLISH_FAILED: tuple[type[BaseException], ...] = (KafkaError, OSError, TimeoutError)

# Upper bounds (ms) of the latency histogram's buckets; a last one, "inf", holds the rest.
LATENCY_BOUNDS_MS: tuple[int, ...] = (50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 30000)
LATENCY_FIELDS: tuple[str, ...] = (*(f"h{b}" for b in LATENCY_BOUNDS_MS), "hinf")
FAULT_STATES = frozenset({State.RETRYING, State.FAILED, State.DEAD})
# A provider's facts outlive its buckets: a breaker needs its latest success and fault.
FACTS_KEEP_S = 7 * 86400

# Count one try, once. KEYS: its event's marker, the provider's facts, the try's bucket. ARGV:
# TTL (s) of the marker and bucket, TTL (s) of the facts, 1 success / 0 fault, occurred at (ms),
# the latency field ('' for none), tenant, channel, plugin name. Answers 1 if counted, 0 if the
# event was counted before.
RECORD_SCRIPT = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
    return 0
end
local at = tonumber(ARGV[4])
local last_ok = tonumber(redis.call('HGET', KEYS[2], 'last_ok_ms') or '0')
local last_fault = tonumber(redis.call('HGET', KEYS[2], 'last_fault_ms') or '0')
if ARGV[3] == '1' then
    redis.call('HINCRBY', KEYS[3], 'ok', 1)
    if ARGV[5] ~= '' then
        redis.call('HINCRBY', KEYS[3], ARGV[5], 1)
    end
    if at >= last_fault then
        redis.call('HSET', KEYS[2], 'consecutive', 0)
    end
    if at > last_ok then
        redis.call('HSET', KEYS[2], 'last_ok_ms', at)
    end
else
    redis.call('HINCRBY', KEYS[3], 'fault', 1)
    if at >= last_ok then
        redis.call('HINCRBY', KEYS[2], 'consecutive', 1)
    end
    if at > last_fault then
        redis.call('HSET', KEYS[2], 'last_fault_ms', at)
    end
end
redis.call('EXPIRE', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[2], 'tenant_id', ARGV[6], 'channel', ARGV[7], 'provider', ARGV[8])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

# Take or keep the publisher's lease: SET NX PX, renewed by its owner only. KEYS: the lease.
# ARGV: owner, lease (ms). Answers 1 while this owner holds it.
LEASE_SCRIPT = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
if not owner then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""

# The lease is given up (shutdown), if still ours, with shared.redis_scripts.RELEASE_IF_OWNER.

# Store a breaker, only while holding the lease: a leader paused past its lease must not undo
# what the next one decided. KEYS: the lease, the breakers. ARGV: owner, provider id, breaker.
SAVE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# Forget providers without a try for two windows, only while holding the lease, and only those
# still without one (a try counted meanwhile raised their score). KEYS: the lease, the index, the
# breakers. ARGV: owner, cutoff (ms), then per provider its id and 1 to drop its breaker (closed)
# or 0 to keep it. Answers the ids forgotten.
PRUNE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return {}
end
local cutoff = tonumber(ARGV[2])
local gone = {}
for i = 3, #ARGV, 2 do
    local score = redis.call('ZSCORE', KEYS[2], ARGV[i])
    if score and tonumber(score) < cutoff then
        redis.call('ZREM', KEYS[2], ARGV[i])
        if ARGV[i + 1] == '1' then
            redis.call('HDEL', KEYS[3], ARGV[i])
        end
        gone[#gone + 1] = ARGV[i]
    end
end
return gone
"""


# --- keys ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QualityKeys:
    """The Redis key layout (module doc); tests give each run its own prefix."""

    prefix: str = "herald"

    def seen(self, provider_id: int, event_id: str) -> str:
        return f"{self.prefix}:quality:{{{provider_id}}}:seen:{event_id}"

    def bucket(self, provider_id: int, start_ms: int) -> str:
        return f"{self.prefix}:quality:{{{provider_id}}}:b:{start_ms}"

    def facts(self, provider_id: int) -> str:
        return f"{self.prefix}:quality:{{{provider_id}}}:facts"

    @property
    def index(self) -> str:
        return f"{self.prefix}:{{quality}}:index"

    @property
    def breakers(self) -> str:
        return f"{self.prefix}:{{quality}}:breakers"

    @property
    def leader(self) -> str:
        return f"{self.prefix}:{{quality}}:leader"


# --- tries --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Try:
    """One try of a configured provider, as its event tells it."""

    event_id: str
    provider_id: int
    ok: bool
    at_ms: int
    latency_ms: float | None
    tenant_id: str
    channel: str
    provider: str


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _at(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def _provider_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _latency(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def try_of(event: EventV1) -> Try | None:
    """The try an event reports, or None when it is none (module doc: which events count)."""
    detail = event.detail
    if not isinstance(detail, dict) or detail.get("deferred") is True:
        return None
    provider_id = _provider_id(detail.get("provider_id"))
    if provider_id is None:
        return None
    if event.state is State.SENT:
        ok, latency = True, _latency(detail.get("provider_ms"))
    elif event.state in FAULT_STATES and detail.get("provider_fault") is True:
        ok, latency = False, None
    else:
        return None
    return Try(event.event_id, provider_id, ok, _ms(event.occurred_at), latency, event.tenant_id,
               event.channel or "", event.provider or "")  # fmt: skip


def latency_field(latency_ms: float) -> str:
    """The histogram field counting an answer of ``latency_ms``."""
    for bound, name in zip(LATENCY_BOUNDS_MS, LATENCY_FIELDS, strict=False):
        if latency_ms <= bound:
            return name
    return LATENCY_FIELDS[-1]


# --- windows ------------------------------------------------------------------------------------


def bucket_start(at_ms: int, bucket_ms: int) -> int:
    return at_ms - at_ms % bucket_ms


def window_buckets(now_ms: int, window_ms: int, bucket_ms: int, since_ms: int | None = None) -> list[int]:
    """The starts of the buckets a provider is judged on: those starting within the window and
    not before ``since_ms`` (the breaker's last close), up to one bucket ahead of now."""
    first = -(-(now_ms - window_ms) // bucket_ms) * bucket_ms  # the first boundary in the window
    if since_ms is not None:
        first = max(first, -(-since_ms // bucket_ms) * bucket_ms)
    last = bucket_start(now_ms, bucket_ms) + bucket_ms
    return list(range(first, last + 1, bucket_ms))


@dataclass(frozen=True, slots=True)
class Counts:
    """Tries summed over buckets."""

    ok: int = 0
    fault: int = 0
    latency: tuple[int, ...] = (0,) * len(LATENCY_FIELDS)

    @property
    def samples(self) -> int:
        return self.ok + self.fault


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def sum_buckets(buckets: Iterable[Mapping[Any, Any]]) -> Counts:
    """Buckets as HGETALL answers them (bytes or text), summed."""
    ok = fault = 0
    latency = [0] * len(LATENCY_FIELDS)
    where = {name: i for i, name in enumerate(LATENCY_FIELDS)}
    for bucket in buckets:
        for key, value in bucket.items():
            name, count = _text(key), int(value)
            if name == "ok":
                ok += count
            elif name == "fault":
                fault += count
            elif name in where:
                latency[where[name]] += count
    return Counts(ok, fault, tuple(latency))


def p95_ms(latency: Sequence[int]) -> float | None:
    """The bound of the histogram bucket where the cumulative count reaches 95 % (module doc);
    None without timed successes."""
    total = sum(latency)
    if total <= 0:
        return None
    rank = math.ceil(0.95 * total)
    seen = 0
    for i, count in enumerate(latency):
        seen += count
        if seen >= rank:
            return float(LATENCY_BOUNDS_MS[min(i, len(LATENCY_BOUNDS_MS) - 1)])
    return float(LATENCY_BOUNDS_MS[-1])  # not reached


@dataclass(frozen=True, slots=True)
class Facts:
    """What the counting script keeps of a provider besides its buckets."""

    tenant_id: str | None = None
    channel: str | None = None
    provider: str | None = None
    consecutive: int = 0
    last_ok_ms: int | None = None
    last_fault_ms: int | None = None

    @classmethod
    def of(cls, stored: Mapping[Any, Any]) -> Facts:
        data = {_text(k): _text(v) for k, v in stored.items()}

        def number(name: str) -> int | None:
            value = data.get(name)
            return int(value) if value and value.lstrip("-").isdigit() and int(value) > 0 else None

        return cls(data.get("tenant_id"), data.get("channel"), data.get("provider"),
                   number("consecutive") or 0, number("last_ok_ms"), number("last_fault_ms"))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Stats:
    """A provider's quality now: what a breaker decides on and a health record carries."""

    samples: int = 0
    faults: int = 0
    success_rate: float | None = None
    p95_ms: float | None = None
    consecutive: int = 0
    last_ok_at: datetime | None = None
    last_fault_at: datetime | None = None

    @property
    def fault_rate(self) -> float:
        return self.faults / self.samples if self.samples else 0.0

    @classmethod
    def of(cls, counts: Counts, facts: Facts) -> Stats:
        rate = round(counts.ok / counts.samples, 4) if counts.samples else None
        return cls(counts.samples, counts.fault, rate, p95_ms(counts.latency), facts.consecutive,
                   _at(facts.last_ok_ms), _at(facts.last_fault_ms))  # fmt: skip


# --- the breaker --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BreakerRules:
    failures: int = 5
    error_rate: float = 0.5
    min_samples: int = 10
    cooldown_s: float = 30.0

    @classmethod
    def of(cls, settings: Settings) -> BreakerRules:
        return cls(settings.breaker_failures, settings.breaker_error_rate, settings.breaker_min_samples,
                   settings.breaker_cooldown_s)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Breaker:
    """A provider's breaker as stored: open since ``opened_at`` (and why), or closed; ``since``
    is when it last closed (its statistics start there)."""

    state: Literal["closed", "open"] = "closed"
    opened_at: datetime | None = None
    since: datetime | None = None
    reason: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps({
            "state": self.state,
            "opened_ms": None if self.opened_at is None else _ms(self.opened_at),
            "since_ms": None if self.since is None else _ms(self.since),
            "reason": self.reason,
        })  # fmt: skip

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> Breaker:
        """A stored breaker; closed when there is none or it cannot be read."""
        if not raw:
            return cls()
        try:
            data = orjson.loads(raw)
            state = "open" if data.get("state") == "open" else "closed"
            return cls(state, _at(data.get("opened_ms")), _at(data.get("since_ms")), data.get("reason"))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError, OverflowError):
            return cls()


def trip_reason(stats: Stats, rules: BreakerRules) -> str | None:
    """Why a closed breaker opens now, or None."""
    if stats.consecutive >= rules.failures:
        return f"{stats.consecutive} consecutive failures"
    if stats.samples >= rules.min_samples and stats.fault_rate >= rules.error_rate:
        return f"error rate {stats.fault_rate:.0%} over {stats.samples} tries"
    return None


def step(breaker: Breaker, stats: Stats, now: datetime, rules: BreakerRules) -> Breaker:
    """The breaker after looking at ``stats`` at ``now``:

    - closed → open when :func:`trip_reason` has one;
    - open → closed when a success happened at or after ``opened_at`` + cooldown (a router's
      probe got through): ``since`` = now, the statistics start afresh;
    - open → open again from now when a fault happened after ``opened_at`` + cooldown (a failed
      probe); a probe's success seen in the same look wins;
    - otherwise unchanged.

    Routers probe only after the cooldown, so a try within it is traffic that was on its way
    (started before the breaker opened, or routed before the routers heard of it): it neither
    closes the breaker nor opens it again. Closing on such a success would reset the statistics
    and let a provider failing most of its tries flap back in at once instead of being held out
    for the cooldown.
    """
    if breaker.state == "closed":
        why = trip_reason(stats, rules)
        return Breaker("open", now, breaker.since, why) if why else breaker
    probed_from = (breaker.opened_at or now) + timedelta(seconds=rules.cooldown_s)
    if stats.last_ok_at is not None and stats.last_ok_at >= probed_from:
        return Breaker("closed", None, now, None)
    if stats.last_fault_at is not None and stats.last_fault_at > probed_from:
        return Breaker("open", now, breaker.since, f"probe failed; {stats.consecutive} consecutive failures")
    return breaker


def refresh_due(sent_at: datetime, now: datetime, *, refresh_s: float, tick_s: float) -> bool:
    """Whether a live provider's unchanged record is published again now: when waiting for the
    next look (``tick_s`` on) would leave the latest one older than ``refresh_s``. Looking every
    ``tick_s``, a live provider's records are then at most ``refresh_s`` apart (or one tick, if
    that is longer); routers take a record older than 4 x ``refresh_s`` for unknown."""
    return (now - sent_at).total_seconds() + tick_s >= refresh_s


# --- the record ---------------------------------------------------------------------------------


def health_record(provider_id: int, facts: Facts, stats: Stats, breaker: Breaker, settings: Settings,
                  now: datetime) -> ProviderHealthV1:  # fmt: skip
    """What routers read of a provider (``shared.routing.score``)."""
    return ProviderHealthV1(
        provider=facts.provider or "",
        channel=facts.channel or "",
        identity=health_identity(provider_id),
        state="disabled" if breaker.state == "open" else "healthy",
        tenant_id=facts.tenant_id or "default",
        failures=stats.consecutive,
        reason=breaker.reason if breaker.state == "open" else None,
        occurred_at=now,
        provider_id=provider_id,
        samples=stats.samples,
        success_rate=stats.success_rate,
        p95_ms=stats.p95_ms,
        breaker=breaker.state,
        opened_at=breaker.opened_at if breaker.state == "open" else None,
        cooldown_s=settings.breaker_cooldown_s,
        window_s=float(settings.quality_window_s),
    )


def fingerprint(record: ProviderHealthV1) -> bytes:
    """A record without its time: two equal fingerprints say the same."""
    return orjson.dumps(record.model_dump(mode="json", exclude={"occurred_at"}), option=orjson.OPT_SORT_KEYS)


# --- counting (every tracker) -------------------------------------------------------------------


class QualityBook:
    """Counts the tries of each folded batch in Redis (module doc)."""

    def __init__(self, redis: Redis, settings: Settings, keys: QualityKeys | None = None) -> None:
        self.redis = redis
        self.keys = keys or QualityKeys()
        self.bucket_ms = settings.quality_bucket_s * 1000
        self.window_ms = settings.quality_window_s * 1000
        # Markers and buckets live as long as the window can look at them.
        self.ttl_s = settings.quality_window_s + settings.quality_bucket_s
        self.facts_s = max(FACTS_KEEP_S, 4 * settings.quality_window_s)
        self._script = redis.register_script(RECORD_SCRIPT)
        self._down = False

    async def record(self, events: Iterable[EventV1], now: datetime | None = None) -> int:
        """Count the batch's tries (one pipeline); answers how many were new. Never raises for
        Redis: a warning (once per outage) and the batch goes on without them."""
        cutoff = _ms(now or utcnow()) - self.window_ms
        # Older than the window: says nothing about now (and its marker may have expired).
        tries = [t for t in map(try_of, events) if t is not None and t.at_ms >= cutoff]
        if not tries:
            return 0
        latest: dict[int, int] = {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for t in tries:
                    latest[t.provider_id] = max(latest.get(t.provider_id, 0), t.at_ms)
                    timed = latency_field(t.latency_ms) if t.ok and t.latency_ms is not None else ""
                    keys = [self.keys.seen(t.provider_id, t.event_id), self.keys.facts(t.provider_id),
                            self.keys.bucket(t.provider_id, bucket_start(t.at_ms, self.bucket_ms))]  # fmt: skip
                    args = [self.ttl_s, self.facts_s, 1 if t.ok else 0, t.at_ms, timed, t.tenant_id, t.channel,
                            t.provider]  # fmt: skip
                    await self._script(keys=keys, args=args, client=pipe)
                pipe.zadd(self.keys.index, {str(p): at for p, at in latest.items()}, gt=True)
                replies = await pipe.execute()
        except REDIS_DOWN as exc:
            if not self._down:
                log.warning("provider quality not recorded: Redis unavailable (%s)", exc.__class__.__name__)
            self._down = True
            return 0
        if self._down:
            log.info("provider quality recorded again")
            self._down = False
        return sum(1 for r in replies[: len(tries)] if int(r) == 1)


# --- publishing (one tracker) -------------------------------------------------------------------

Publish = Callable[[bytes, bytes], Awaitable[None]]  # (key, value) onto notify.provider-health


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(slots=True)
class _Sent:
    fingerprint: bytes
    at: datetime


@dataclass(slots=True)
class _Provider:
    """One provider as a tick reads it."""

    provider_id: int
    seen_ms: int
    breaker: Breaker
    facts: Facts = field(default_factory=Facts)
    counts: Counts = field(default_factory=Counts)


class QualityPublisher:
    """Publishes every provider's quality and breaker, from the one tracker holding the lease."""

    def __init__(self, redis: Redis, settings: Settings, publish: Publish, *, owner: str | None = None,
                 keys: QualityKeys | None = None) -> None:  # fmt: skip
        self.redis = redis
        self.settings = settings
        self.publish = publish
        self.owner = owner or default_owner()
        self.keys = keys or QualityKeys()
        self.rules = BreakerRules.of(settings)
        self.bucket_ms = settings.quality_bucket_s * 1000
        self.window_ms = settings.quality_window_s * 1000
        # A leader that stops renewing is replaced within this (a few ticks).
        self.lease_ms = int(max(3 * settings.quality_tick_s, 2.0) * 1000)
        self._lease = redis.register_script(LEASE_SCRIPT)
        self._release = redis.register_script(RELEASE_IF_OWNER)
        self._forget = redis.register_script(PRUNE_SCRIPT)
        self._save = redis.register_script(SAVE_SCRIPT)
        self._sent: dict[int, _Sent] = {}
        self._leading = False
        self._stopping = asyncio.Event()

    @property
    def leading(self) -> bool:
        return self._leading

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Tick every ``quality_tick_s`` until :meth:`stop`; then give the lease up."""
        loop = asyncio.get_running_loop()
        down = False
        while not self._stopping.is_set():
            started = loop.time()
            try:
                await self.tick()
                if down:
                    log.info("provider quality published again")
                down = False
            except REDIS_DOWN as exc:
                if not down:
                    log.warning("provider quality not published: Redis unavailable (%s)", exc.__class__.__name__)
                down = True
                self._step_down()  # another tracker may take over meanwhile: publish all when back
            except Exception:
                # Quality is advisory: a fault here must not end the tracker's folding.
                log.exception("provider quality tick failed")
                self._step_down()
            wait = max(self.settings.quality_tick_s - (loop.time() - started), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)
        await self.release()

    async def release(self) -> None:
        """Give the lease up (the next tracker takes over at once, not after it expires)."""
        with contextlib.suppress(*REDIS_DOWN):
            await self._release(keys=[self.keys.leader], args=[self.owner])
        self._step_down()

    async def tick(self, now: datetime | None = None) -> list[ProviderHealthV1]:
        """One look at every provider; answers the records published. Raises for Redis (the
        loop logs it); a record the broker did not take is published at the next tick."""
        if not await self._hold():
            return []
        now = _at(_ms(now or utcnow()))  # as stored: a breaker read back compares equal
        providers = await self._read(_ms(now))
        published: list[ProviderHealthV1] = []
        for p in providers:
            if not p.facts.provider or not p.facts.channel:
                continue  # its facts expired: nothing to name it by
            judged = await self._judge(p, now)
            if judged is None:
                return published  # the lease was lost meanwhile
            p.breaker = judged[1]  # as stored now
            record = health_record(p.provider_id, p.facts, *judged, self.settings, now)
            self._gauges(p.provider_id, record)
            if not self._due(p, record, now):
                continue
            try:
                await self.publish(health_identity(p.provider_id).encode(), record.to_bytes())
            except PUBLISH_FAILED as exc:
                log.warning("provider health not published (%s); next tick tries again", exc.__class__.__name__)
                break
            self._sent[p.provider_id] = _Sent(fingerprint(record), now)
            published.append(record)
        await self._prune(_ms(now), providers)
        return published

    async def _judge(self, p: _Provider, now: datetime) -> tuple[Stats, Breaker] | None:
        """The provider's statistics and breaker now; a breaker that moved is stored first (None:
        not stored, the lease is someone else's)."""
        stats = Stats.of(p.counts, p.facts)
        breaker = step(p.breaker, stats, now, self.rules)
        if breaker == p.breaker:
            return stats, breaker
        args = [self.owner, str(p.provider_id), breaker.to_json()]
        if not await self._save(keys=[self.keys.leader, self.keys.breakers], args=args):
            self._step_down()
            return None
        self._log_transition(p, breaker, stats)
        if breaker.state == "closed":
            stats = Stats.of(Counts(), p.facts)  # closing starts the statistics afresh
        return stats, breaker

    async def _hold(self) -> bool:
        held = int(await self._lease(keys=[self.keys.leader], args=[self.owner, self.lease_ms])) == 1
        if held and not self._leading:
            log_event(log, logging.INFO, "publishing provider quality", owner=self.owner)
            self._leading = True
        elif not held and self._leading:
            log_event(log, logging.INFO, "another tracker publishes provider quality now", owner=self.owner)
            self._step_down()
        return held

    def _step_down(self) -> None:
        """Not the publisher (any more): forget what was sent (a leader publishes everything on
        its first tick) and leave the gauges to the one that is."""
        self._leading = False
        self._sent.clear()
        PROVIDER_BREAKER_OPEN.clear()
        PROVIDER_SUCCESS_RATE.clear()

    async def _read(self, now_ms: int) -> list[_Provider]:
        """Every provider of the index with its breaker, facts and window (two round trips)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrange(self.keys.index, 0, -1, withscores=True)
            pipe.hgetall(self.keys.breakers)
            index, breakers = await pipe.execute()
        stored = {_text(k): v for k, v in breakers.items()}
        providers: list[_Provider] = []
        for member, score in index:
            provider_id = _provider_id(_text(member))
            if provider_id is not None:
                breaker = Breaker.from_json(stored.get(str(provider_id)))
                providers.append(_Provider(provider_id, int(score), breaker))
        if not providers:
            return []
        starts: list[list[int]] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for p in providers:
                pipe.hgetall(self.keys.facts(p.provider_id))
                since = None if p.breaker.since is None else _ms(p.breaker.since)
                starts.append(window_buckets(now_ms, self.window_ms, self.bucket_ms, since))
                for start in starts[-1]:
                    pipe.hgetall(self.keys.bucket(p.provider_id, start))
            replies = iter(await pipe.execute())
        for p, wanted in zip(providers, starts, strict=True):
            p.facts = Facts.of(next(replies))
            p.counts = sum_buckets(next(replies) for _ in wanted)
        return providers

    def _due(self, p: _Provider, record: ProviderHealthV1, now: datetime) -> bool:
        """Publish what changed; refresh what is live (seen in the window, or an open breaker)."""
        sent = self._sent.get(p.provider_id)
        if sent is None or sent.fingerprint != fingerprint(record):
            return True
        live = p.seen_ms >= _ms(now) - self.window_ms or record.breaker == "open"
        return live and refresh_due(sent.at, now, refresh_s=self.settings.quality_refresh_s,
                                    tick_s=self.settings.quality_tick_s)  # fmt: skip

    async def _prune(self, now_ms: int, providers: list[_Provider]) -> None:
        """Forget providers without a try for two windows (their last record, published when
        they left the window, says 0 samples; routers soon take it for unknown, which says the
        same). A provider whose breaker is open stays, and is refreshed (:meth:`_due`): its
        record must not age into unknown, which routers would send traffic to; it goes only
        when its facts expire (no try for a week), its breaker kept in the hash so that the try
        that brings it back into the index finds it."""
        cutoff = now_ms - 2 * self.window_ms
        unnamed = {p.provider_id for p in providers if not p.facts.provider or not p.facts.channel}
        gone = [p for p in providers
                if p.seen_ms < cutoff and (p.breaker.state == "closed" or p.provider_id in unnamed)]  # fmt: skip
        if not gone:
            return
        args: list[str | int] = [self.owner, cutoff]
        for p in gone:
            args += [str(p.provider_id), 1 if p.breaker.state == "closed" else 0]
        forgotten = await self._forget(keys=[self.keys.leader, self.keys.index, self.keys.breakers], args=args)
        for member in forgotten:
            provider_id = int(_text(member))  # one of the ids given
            self._sent.pop(provider_id, None)
            with contextlib.suppress(KeyError):
                PROVIDER_BREAKER_OPEN.remove(str(provider_id))
            with contextlib.suppress(KeyError):
                PROVIDER_SUCCESS_RATE.remove(str(provider_id))

    @staticmethod
    def _gauges(provider_id: int, record: ProviderHealthV1) -> None:
        PROVIDER_BREAKER_OPEN.labels(str(provider_id)).set(1 if record.breaker == "open" else 0)
        if record.success_rate is not None:
            PROVIDER_SUCCESS_RATE.labels(str(provider_id)).set(record.success_rate)

    @staticmethod
    def _log_transition(p: _Provider, breaker: Breaker, stats: Stats) -> None:
        context = {"provider_id": p.provider_id, "provider": p.facts.provider, "samples": stats.samples,
                   "success_rate": stats.success_rate, "failures": stats.consecutive}  # fmt: skip
        if breaker.state == "closed":
            log_event(log, logging.INFO, "provider breaker closed: a probe got through", **context)
        elif p.breaker.state == "open":
            log_event(log, logging.WARNING, "provider breaker opened again: the probe failed", **context)
        else:
            log_event(log, logging.WARNING, f"provider breaker opened: {breaker.reason}", **context)
