"""Status callbacks (issue 11; docs/callbacks.md): producers hear about their messages' status
changes, signed per Standard Webhooks (https://www.standardwebhooks.com/).

Two halves, joined by the ``callback_deliveries`` outbox (migration 0016):

- :func:`enqueue` runs inside the fold's transaction with the events stored for the first time,
  and inserts one delivery per (status-change event, target) in one set-based statement: the tenant's
  active endpoints (``webhook_configs``) whose ``events`` filter takes the event's state, and the
  message's own ``callback_url`` when the tenant has a signing secret. A batch whose tenants have
  neither costs one small statement (two index probes per tenant on tiny tables), and nothing
  while its answer is remembered (``LIVE_TENANTS_TTL_S``); a batch without status events costs
  nothing. The transaction commits the deliveries with the events,
  or neither; ``pg_notify('herald_callbacks')`` wakes the workers at the commit. (Ingest calls
  it too, in a cancellation's transaction: the fold never sees those.)
- :class:`CallbackWorker` (a task of every tracker) claims due deliveries with
  ``FOR UPDATE SKIP LOCKED`` (several trackers share the work; each target, an endpoint or a
  tenant's callback_url host, gets at most a quarter of a worker's slots), leasing them for longer
  than a try can last (a try is cut at ``HERALD_CALLBACK_TIMEOUT_S`` whole: DNS, connections, a
  receiver that trickles its answer), POSTs them through the SSRF-guarded client
  (:mod:`shared.outbound`: every connection goes to an address checked after DNS resolution),
  reads at most ``ANSWER_READ_MAX_BYTES`` of the answer, records the try in ``callback_attempts``
  and either marks the delivery ``delivered`` (2xx), schedules the next try
  (``HERALD_CALLBACK_RETRY_DELAYS_S``, a receiver's ``Retry-After`` on 429/502/503/504 when
  longer), or marks it ``failed`` after the last (4 tries by default) or at once for what no retry
  mends (a private address, ``410 Gone`` which also disables the endpoint).

A worker that dies mid-try leaves its delivery leased; the lease ends and another try is made
with the same ``webhook-id`` (receivers deduplicate on it): at least once, never lost. A try's
outcome is recorded only while its worker still owns the delivery (the claim's lease, unchanged):
a worker that outlived its lease (stalled) cannot overwrite what the next owner recorded.

URLs are stored and shown with their query's values and token-like path segments masked
(:func:`display_url`) everywhere but where a try needs them (``callback_deliveries.url`` of a
message's own ``callback_url``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import orjson
from standardwebhooks.webhooks import Webhook

from shared.crypto import DecryptError, SecretBox
from shared.db import DB_UNAVAILABLE, follow_notifications
from shared.events import SEED_STATUS, EventV1, State
from shared.logging import log_event, mask_text
from shared.metrics import CALLBACK_DURATION, CALLBACKS
from shared.outbound import UnsafeURL, guarded_client, retry_after
from shared.settings import Settings

log = logging.getLogger("herald.tracker.callbacks")

NOTIFY_CHANNEL = "herald_callbacks"
# The payload of a NOTIFY on that channel when ingest changed a tenant's endpoints or signing
# secret: the trackers forget which tenants have callbacks (see _live_tenants).
CONFIG_CHANGED = "config"

# The states a callback announces ("status changes"): every outcome, and a failed try that will be
# retried. Not the steps on the way (accepted, scheduled, routed, sending): a producer polls those
# if it cares, and announcing them would triple the traffic for nothing it can act on.
STATUS_STATES: tuple[State, ...] = (
    State.SENT,
    State.DELIVERED,
    State.FAILED,
    State.RETRYING,
    State.DEAD,
    State.REJECTED,
    State.CANCELLED,
    State.SUPPRESSED,
    State.DIGESTED,
)
_STATUS = frozenset(STATUS_STATES)

SECRET_PREFIX = "whsec_"
USER_AGENT = "Herald-Callbacks/1.0"


def new_signing_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and base64 of 32 random bytes (the spec: 24 to 64)."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode()


# What each ciphertext is bound to (shared/crypto.py's associated data).
def endpoint_secret_purpose(endpoint_id: int) -> str:
    return f"webhook_configs.signing_secret:{endpoint_id}"


def endpoint_token_purpose(endpoint_id: int) -> str:
    return f"webhook_configs.auth_token:{endpoint_id}"


def tenant_secret_purpose(tenant_id: str) -> str:
    return f"callback_signing_secrets:{tenant_id}"


# A path segment that looks like a token: long, of the characters tokens are made of, and random-
# looking (a digit, or both cases: "notifications-callback" is a word, "T0AB12CD3efGh4ijK5" is not).
_TOKEN_SEGMENT = re.compile(r"^(?=.{16,}$)(?=.*[0-9]|(?=.*[a-z])(?=.*[A-Z]))[A-Za-z0-9._~+=%-]+$")


def _masked_path(path: str) -> str:
    """The path with its token-like segments masked: webhook URLs of Slack
    (``/services/T…/B…/<secret>``), Discord (``/api/webhooks/<id>/<token>``), Feishu
    (``/open-apis/bot/v2/hook/<token>``) carry their secret in the path, webhook.site-like ones in
    the first segment."""
    return "/".join("***" if _TOKEN_SEGMENT.match(segment) else segment for segment in path.split("/"))


def display_url(url: str) -> str:
    """A callback URL as it is shown (the delivery log), logged and stored beside a try: the
    values of its query masked (``https://h.example/cb?token=***&ref=***``), user info too, path
    segments that look like tokens too (``https://discord.com/api/webhooks/***/***``),
    no fragment. No URL is a place for a credential (it is stored unencrypted, travels on
    ``notify.events``), but a producer may have put one there anyway."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return mask_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(p.split("=", 1)[0] + "=***" if "=" in p else "***" for p in parts.query.split("&") if p)
    return urlunsplit((parts.scheme, netloc, _masked_path(parts.path), query, ""))


# --- the payload and its signature ---------------------------------------------------------------


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def payload_of(event: EventV1, category: str | None = None) -> dict[str, Any]:
    """The body of an event's callback. No tenant (the receiver is the tenant's) and no
    recipient address: the producer knows its message by ``message_id``; an error text is masked
    as logs are (an SMTP answer may quote the address)."""
    return {
        "type": f"message.{event.state.value}",
        "timestamp": _iso(event.occurred_at),
        "data": {
            "message_id": event.message_id,
            "state": event.state.value,
            "status": SEED_STATUS[event.state].value,
            "channel": event.channel,
            "provider": event.provider,
            "attempt": event.attempt,
            "error_code": event.error_code,
            "error": mask_text(event.error)[:1000] if event.error else None,
            "occurred_at": _iso(event.occurred_at),
            "category": category,
            "request_id": event.request_id,
        },
    }


def sign(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature``: one ``v1,<base64>`` per secret, space-separated (the current secret
    and, during a rotation's grace period, the previous one; a receiver accepts any)."""
    at = datetime.fromtimestamp(timestamp, tz=UTC)
    text = body.decode()
    return " ".join(Webhook(secret).sign(msg_id, at, text) for secret in secrets)


def auth_header(auth_type: str, token: str | None) -> str | None:
    if not token or auth_type == "none":
        return None
    if auth_type == "bearer":
        return f"Bearer {token}"
    return "Basic " + base64.b64encode(token.encode()).decode()  # token is "user:password"


_DATA_KEYS = ("message_id", "state", "status", "channel", "provider", "attempt", "error_code", "error", "occurred_at",
              "category", "request_id")  # fmt: skip


def _ordered(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload in its documented key order (stored as jsonb, it comes back in jsonb's)."""
    data = payload.get("data") or {}
    ordered_data = {k: data[k] for k in _DATA_KEYS if k in data} | data
    head = {k: payload[k] for k in ("type", "timestamp") if k in payload}
    return head | {"data": ordered_data} | payload


def request_of(
    delivery_id: int,
    payload: dict[str, Any],
    secrets: list[str],
    timestamp: int,
    authorization: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one try: ``webhook-id`` is the delivery's (the same on every try),
    ``webhook-timestamp`` the try's."""
    msg_id = f"cbd_{delivery_id}"
    body = orjson.dumps(_ordered(payload))
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets, msg_id, timestamp, body),
    }
    if authorization:
        headers["authorization"] = authorization
    return body, headers


# --- enqueue (in the fold's transaction) ---------------------------------------------------------

# A direct publisher's message names its callback_url in its request, which the tracker does not
# keep: its 'accepted' event's snapshot brings it to the record (ingest's records have it from
# their stored request, by trigger).
_RECORD_URL = """
UPDATE message_records m SET callback_url = u.url
FROM unnest($1::text[], $2::text[], $3::text[]) AS u(message_id, tenant_id, url)
WHERE m.message_id = u.message_id AND m.tenant_id = u.tenant_id AND m.callback_url IS NULL
"""

# The cheap test first, once per tenant of the batch: those with no live endpoint and no signing
# secret (most) stop here, before any payload is built. Its answer is remembered per process
# (_live_tenants) for LIVE_TENANTS_TTL_S.
_LIVE_TENANTS = """
SELECT t FROM unnest($1::text[]) AS t
WHERE EXISTS (SELECT 1 FROM webhook_configs w WHERE w.tenant_id = t AND w.is_active AND w.deleted_at IS NULL)
   OR EXISTS (SELECT 1 FROM callback_signing_secrets s WHERE s.tenant_id = t)
"""

_ENQUEUE = """
WITH u AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
        AS u(event_id, message_id, tenant_id, state, payload)
), e AS (
    SELECT u.event_id, u.message_id, u.tenant_id, u.state, r.callback_url,
           jsonb_set(u.payload::jsonb, '{data,category}', COALESCE(to_jsonb(r.category), 'null'::jsonb)) AS body
    FROM u LEFT JOIN message_records r ON r.message_id = u.message_id AND r.tenant_id = u.tenant_id
), targets AS (
    SELECT e.event_id, e.message_id, e.tenant_id, e.state, e.body, w.id AS endpoint_id, w.callback_url AS url
    FROM e JOIN webhook_configs w ON w.tenant_id = e.tenant_id AND w.is_active AND w.deleted_at IS NULL
        AND (w.events ? e.state OR w.events ? '*')
    UNION ALL
    SELECT e.event_id, e.message_id, e.tenant_id, e.state, e.body, NULL::bigint, e.callback_url
    FROM e
    WHERE e.callback_url IS NOT NULL
      AND EXISTS (SELECT 1 FROM callback_signing_secrets s WHERE s.tenant_id = e.tenant_id)
), ins AS (
    INSERT INTO callback_deliveries (tenant_id, message_id, event_id, endpoint_id, url, event_type, payload)
    SELECT tenant_id, message_id, event_id, endpoint_id, url, 'message.' || state, body FROM targets
    ON CONFLICT DO NOTHING
    RETURNING 1
)
-- The workers are woken at the commit (a notification inside a transaction waits for it).
SELECT c.n FROM (SELECT count(*) AS n FROM ins) c
LEFT JOIN LATERAL (SELECT pg_notify('herald_callbacks', '') WHERE c.n > 0) x ON true
"""


# Which tenants have callbacks, remembered a few seconds per process: the fold asks on every batch
# with status events, and the answer changes only when ingest changes a tenant's endpoints or
# signing secret. Ingest then notifies the trackers (CONFIG_CHANGED: CallbackWorker.wake forgets
# it all); were the notification lost (a listener reconnecting), a new endpoint still takes effect
# within LIVE_TENANTS_TTL_S. A "yes" gone stale costs nothing but the enqueue statement (it checks
# the endpoints itself); a "no" is never trusted for a message with its own callback_url (below).
LIVE_TENANTS_TTL_S = 5.0
_live: dict[str, tuple[bool, float]] = {}  # tenant -> (has callbacks, until when, monotonic)
# Counts the forgettings: an answer is remembered only if nothing was forgotten while it was asked
# (a notification arriving during the query would otherwise be undone by the query's older "no").
_live_generation = 0


def forget_live_tenants(tenants: Iterable[str] | None = None, *, only_no: bool = False) -> None:
    """Forget what :func:`_live_tenants` remembers (of ``tenants``, or all; ``only_no``: only
    the tenants remembered as having no callbacks)."""
    global _live_generation
    _live_generation += 1
    if tenants is None:
        _live.clear()
        return
    for tenant in tenants:
        if not only_no or not _live.get(tenant, (True, 0.0))[0]:
            _live.pop(tenant, None)


async def _live_tenants(conn: asyncpg.Connection, tenants: set[str], recheck_no: set[str]) -> set[str]:
    """The tenants of ``tenants`` with a live endpoint or a signing secret; ``recheck_no``: those
    whose remembered "no" is asked again."""
    now = time.monotonic()
    live: set[str] = set()
    ask: list[str] = []
    for tenant in sorted(tenants):
        known = _live.get(tenant)
        if known is None or known[1] <= now or (not known[0] and tenant in recheck_no):
            ask.append(tenant)
        elif known[0]:
            live.add(tenant)
    if ask:
        generation = _live_generation
        found = {r[0] for r in await conn.fetch(_LIVE_TENANTS, ask)}
        # Something was forgotten meanwhile (an endpoint created, ingest's notification arrived
        # while the query ran): the answer may predate it, and serves this batch only.
        if generation == _live_generation:
            if len(_live) > 10_000:
                _live.clear()
            until = time.monotonic() + LIVE_TENANTS_TTL_S
            _live.update((tenant, (tenant in found, until)) for tenant in ask)
        live |= found
    return live


async def enqueue(conn: asyncpg.Connection, events: list[EventV1]) -> None:
    """Called by write_fold inside the fold's transaction with the events stored for the first time
    (and by ingest in a cancellation's)."""
    urls = [
        (e.message_id, e.tenant_id, e.message.callback_url)
        for e in events
        if e.state is State.ACCEPTED and e.message is not None and e.message.callback_url
    ]
    if urls:
        await conn.execute(_RECORD_URL, *[list(c) for c in zip(*urls, strict=True)])
        # A message with its own callback_url: its tenant had a signing secret when ingest took it,
        # perhaps created a moment ago. Its status events come after this 'accepted' one (events
        # are keyed by message: one partition, one tracker, in order), so a remembered "no" of its
        # tenant is dropped here and asked again then.
        forget_live_tenants({t for _, t, _ in urls}, only_no=True)
    changes = [e for e in events if e.state in _STATUS]
    if not changes:
        return
    # Cancellations (ingest's, rare) have no 'accepted' event before them here: asked afresh.
    recheck = {e.tenant_id for e in changes if e.state is State.CANCELLED}
    live = await _live_tenants(conn, {e.tenant_id for e in changes}, recheck)
    rows = [
        (e.event_id, e.message_id, e.tenant_id, e.state.value, orjson.dumps(payload_of(e)).decode())
        for e in changes
        if e.tenant_id in live
    ]
    if not rows:
        return
    await conn.fetchval(_ENQUEUE, *[list(c) for c in zip(*rows, strict=True)])


# --- the worker ------------------------------------------------------------------------------------

# Where a delivery goes, for sharing the slots fairly: its endpoint, or (a message's own
# callback_url) its tenant and the URL's scheme and host (a query or path naming the message must
# not make each delivery a target of its own).
_TARGET = """CASE WHEN endpoint_id IS NOT NULL THEN 'endpoint:' || endpoint_id
    ELSE 'url:' || tenant_id || ' ' || COALESCE(substring(url FROM '^[^:/?#]+://[^/?#]*'), url) END"""

# A target has at most 1/_TARGET_SHARE of a worker's slots in flight (at least one), so that a dead
# or slow endpoint with a backlog (each try waiting out the timeout) cannot take them all: the other
# targets' deliveries are claimed in the same round (a round claims again while a claim brought a
# target to its share). Due deliveries of a target already at its share are skipped (and not waited
# for: _NEXT_DUE ignores them too).
_TARGET_SHARE = 4
# How many due deliveries (of targets below their share) a claim looks at, oldest first.
_CLAIM_SCAN = 2000

# $1 free slots, $2 the lease, $3 a target's share, $4/$5 the targets with tries in flight in this
# worker and how many. Within the share, the oldest delivery of each target first, then the second
# of each, ... (round robin, so many targets each get a slot before one gets a second).
_CLAIM = f"""
WITH busy AS (
    SELECT * FROM unnest($4::text[], $5::int[]) AS b(target, n)
), candidates AS (
    SELECT id, next_attempt_at, {_TARGET} AS target FROM callback_deliveries
    WHERE status = 'pending' AND next_attempt_at <= now()
      AND {_TARGET} <> ALL(ARRAY(SELECT target FROM busy WHERE n >= $3))
    ORDER BY next_attempt_at
    LIMIT {_CLAIM_SCAN}
), ranked AS (
    SELECT c.id, c.next_attempt_at, c.target,
           COALESCE(b.n, 0) + row_number() OVER (PARTITION BY c.target ORDER BY c.next_attempt_at, c.id) AS rank
    FROM candidates c LEFT JOIN busy b ON b.target = c.target
), picked AS (
    SELECT id, target FROM ranked WHERE rank <= $3 ORDER BY rank, next_attempt_at LIMIT $1
), due AS (
    -- Locked here (a window function and FOR UPDATE do not mix), and checked again: another
    -- worker may have claimed one since this statement's snapshot.
    SELECT d.id, p.target FROM callback_deliveries d JOIN picked p ON p.id = d.id
    WHERE d.status = 'pending' AND d.next_attempt_at <= now()
    FOR UPDATE OF d SKIP LOCKED
), claimed AS (
    -- Leased for the length of a try: another worker takes it only if this one never answers.
    -- The new next_attempt_at is the lease's token: the try's outcome is recorded only if it is
    -- still there (_RECORD), i.e. no other worker claimed the delivery since.
    UPDATE callback_deliveries d SET next_attempt_at = now() + make_interval(secs => $2), updated_at = now()
    FROM due WHERE d.id = due.id
    RETURNING d.id, d.tenant_id, d.endpoint_id, d.url, d.payload, d.attempts, d.next_attempt_at AS leased_until,
              due.target
)
SELECT c.*, w.callback_url AS endpoint_url, w.auth_type, w.auth_token,
       (w.is_active AND w.deleted_at IS NULL) AS endpoint_live, w.disabled_reason,
       COALESCE(w.signing_secret, s.secret) AS secret,
       CASE WHEN c.endpoint_id IS NULL THEN
            CASE WHEN s.previous_secret_until > now() THEN s.previous_secret END
       ELSE CASE WHEN w.previous_secret_until > now() THEN w.previous_secret END END AS previous_secret
FROM claimed c
LEFT JOIN webhook_configs w ON w.id = c.endpoint_id
LEFT JOIN callback_signing_secrets s ON c.endpoint_id IS NULL AND s.tenant_id = c.tenant_id
"""

# Only while the worker still owns the delivery: pending, as many tries as when it was claimed, and
# the claim's lease unchanged. Else (its lease ran out and another worker claimed it, the endpoint
# was deleted) nothing is written, the try's row neither: the owner records its own.
# $4: where the try went (kept whole: a message's own URL is needed for its next try); $11: the
# same, masked, as the try's row and the answers show it. $9: seconds until the next try, counted
# on the database's clock (the one the claim compares next_attempt_at with), not the tracker's.
_RECORD = """
WITH d AS (
    UPDATE callback_deliveries SET attempts = $2, url = $4, status = $8::text,
        next_attempt_at = COALESCE(now() + make_interval(secs => $9::float8), next_attempt_at),
        last_status_code = $5, last_error = $6,
        delivered_at = CASE WHEN $8::text = 'delivered' THEN now() END, updated_at = now()
    WHERE id = $1 AND status = 'pending' AND attempts = $12::int AND next_attempt_at = $13::timestamptz
    RETURNING id
), a AS (
    INSERT INTO callback_attempts (delivery_id, attempt, attempted_at, url, status_code, error, duration_ms)
    SELECT $1::bigint, $2::int, $3::timestamptz, $11::text, $5::int, $6::text, $7::float8 FROM d WHERE $10::bool
)
SELECT count(*) FROM d
"""

_DISABLE = """
UPDATE webhook_configs SET is_active = false, disabled_reason = $2, updated_at = now()
WHERE id = $1 AND is_active
"""

# The next delivery due, of the targets below their share in this worker ($1: those at it).
_NEXT_DUE = f"""
SELECT EXTRACT(EPOCH FROM min(next_attempt_at) - now()) FROM callback_deliveries
WHERE status = 'pending' AND {_TARGET} <> ALL($1::text[])
"""

_PRUNE_BATCH = 1000
_PRUNE = f"""
DELETE FROM callback_deliveries WHERE id IN (
    SELECT id FROM callback_deliveries
    WHERE status <> 'pending' AND created_at < now() - make_interval(days => $1)
    LIMIT {_PRUNE_BATCH})
"""

_PRUNE_EVERY_S = 600.0
_PRUNE_BATCHES = 20  # at most this many batches a time (20,000 deliveries per 10 minutes)
# A try is cut at HERALD_CALLBACK_TIMEOUT_S; its delivery is leased this much longer, so that a
# lease never ends while its try runs (only when its worker stopped or stalled).
LEASE_MARGIN_S = 30.0
_RETRY_AFTER_MAX_S = 3600.0
# Of a receiver's answer, this much is read at most (then the connection is closed): nothing of it
# is recorded, and an endpoint streaming a huge body must not fill the tracker's memory.
ANSWER_READ_MAX_BYTES = 4096


class _Permanent(Exception):
    """A failure no retry mends (the try is recorded and the delivery fails at once)."""


class CallbackWorker:
    """Delivers ``callback_deliveries``; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        box: SecretBox,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.box = box
        self.client = client or guarded_client(
            settings.outbound_allow, timeout=settings.callback_timeout_s, follow_redirects=False
        )
        self.delays = settings.callback_retry_delays
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._inflight: set[asyncio.Task] = set()
        self._busy: Counter[str] = Counter()  # target (_TARGET) -> its tries in flight here
        # A target's share of the slots (_TARGET_SHARE).
        self.per_target = max(1, settings.callback_concurrency // _TARGET_SHARE)
        self._pruned_at = 0.0
        # How long a claim holds a delivery: longer than a try (cut at the timeout) can last.
        self.lease_s = settings.callback_timeout_s + LEASE_MARGIN_S

    def wake(self, *args: object) -> None:
        """The NOTIFY callback (deliveries were enqueued, or ingest changed a tenant's endpoints:
        ``CONFIG_CHANGED``), and a try's end (a slot is free)."""
        if len(args) >= 4 and args[3] == CONFIG_CHANGED:  # (connection, pid, channel, payload)
            forget_live_tenants()
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        async def listening(_conn: asyncpg.Connection) -> None:
            forget_live_tenants()  # endpoints may have changed while not listening
            self.wake()  # anything enqueued while not listening

        listener = asyncio.create_task(
            follow_notifications(self.settings.database_url.get_secret_value(), NOTIFY_CHANNEL, self.wake,
                                 listening, name="callbacks"),
            name="callback-listener",
        )  # fmt: skip
        delay = 0.5
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                try:
                    wait = await self._round()
                    delay = 0.5
                except DB_UNAVAILABLE as exc:
                    log.warning("callbacks: database unavailable (%s); trying again in %.1f s",
                                type(exc).__name__, delay)  # fmt: skip
                    wait, delay = delay, min(delay * 2, 5.0)
                except asyncpg.UndefinedTableError:  # started before ingest applied the migrations
                    wait = self.settings.callback_max_sleep_s
                except Exception:  # never let the loop die: callbacks would wait forever
                    log.exception("callbacks: round failed; trying again in %.1f s", delay)
                    wait, delay = delay, min(delay * 2, 5.0)
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            listener.cancel()
            if self._inflight:  # leased: another tracker tries them again when the lease ends
                await asyncio.wait(self._inflight, timeout=2)
                for task in self._inflight:
                    task.cancel()
            await self.client.aclose()

    async def _round(self) -> float:
        """Claim as many due deliveries as there are free slots and start their tries; answers
        how long to sleep (until the next is due, or a slot frees up)."""
        # On its timer whatever the load: under a backlog every slot stays taken, rounds return early.
        await self._prune()
        free = self.settings.callback_concurrency - len(self._inflight)
        if free <= 0:
            return self.settings.callback_max_sleep_s  # a try's end wakes the loop
        async with self.pool.acquire() as conn:
            while True:
                busy = [(target, n) for target, n in self._busy.items() if n > 0]
                async with conn.transaction():
                    rows = await conn.fetch(_CLAIM, free, self.lease_s, self.per_target, [b[0] for b in busy],
                                            [b[1] for b in busy])  # fmt: skip
                for row in rows:
                    self._busy[row["target"]] += 1
                    task = asyncio.create_task(self._deliver(row))
                    self._inflight.add(task)
                    task.add_done_callback(functools.partial(self._done, row["target"]))
                free -= len(rows)
                if free <= 0:  # every slot taken: the end of a try wakes the loop
                    return self.settings.callback_max_sleep_s
                # A target that reached its share now may have hidden others' deliveries from this
                # claim (it looks at the _CLAIM_SCAN oldest): claim again without it.
                if not any(self._busy[row["target"]] >= self.per_target for row in rows):
                    break
            # Targets at their share: their due deliveries wait for one of their tries to end
            # (which wakes the loop), not for the clock.
            full = [target for target, n in self._busy.items() if n >= self.per_target]
            until = await conn.fetchval(_NEXT_DUE, full)
        if until is None:
            return self.settings.callback_max_sleep_s
        return min(max(float(until), 0.02), self.settings.callback_max_sleep_s)

    async def _prune(self) -> None:
        """Every ``_PRUNE_EVERY_S``: delete delivered and failed callbacks (and their tries, by
        cascade) older than ``HERALD_CALLBACK_KEEP_DAYS``, in batches."""
        if time.monotonic() - self._pruned_at < _PRUNE_EVERY_S:
            return
        self._pruned_at = time.monotonic()  # a failure waits for the next time too
        async with self.pool.acquire() as conn:
            for _ in range(_PRUNE_BATCHES):
                done = await conn.execute(_PRUNE, self.settings.callback_keep_days)
                if int(done.rsplit(" ", 1)[-1]) < _PRUNE_BATCH:
                    break

    def _done(self, target: str, task: asyncio.Task) -> None:
        self._inflight.discard(task)
        self._busy[target] -= 1
        if self._busy[target] <= 0:
            del self._busy[target]
        if not task.cancelled() and task.exception() is not None:
            log.error("callbacks: a try failed unexpectedly", exc_info=task.exception())
        self.wake()

    def _secrets(self, row: asyncpg.Record) -> list[str]:
        purpose = (
            endpoint_secret_purpose(row["endpoint_id"])
            if row["endpoint_id"] is not None
            else tenant_secret_purpose(row["tenant_id"])
        )
        if not row["secret"]:
            raise _Permanent("the tenant has no callback signing secret")
        try:
            secrets = [self.box.decrypt(row["secret"], purpose)]
            if row["previous_secret"]:
                secrets.append(self.box.decrypt(row["previous_secret"], purpose))
        except DecryptError:
            raise _Permanent("the signing secret cannot be decrypted (was the encryption key changed?)") from None
        return secrets

    def _authorization(self, row: asyncpg.Record) -> str | None:
        if row["endpoint_id"] is None or not row["auth_token"]:
            return None
        try:
            token = self.box.decrypt(row["auth_token"], endpoint_token_purpose(row["endpoint_id"]))
        except DecryptError:
            raise _Permanent(
                "the endpoint's auth token cannot be decrypted (was the encryption key changed?)"
            ) from None
        return auth_header(row["auth_type"], token)

    async def _deliver(self, row: asyncpg.Record) -> None:
        attempt = row["attempts"] + 1
        endpoint = row["endpoint_id"]
        url = row["endpoint_url"] or row["url"]
        if endpoint is not None and not row["endpoint_live"]:
            why = row["disabled_reason"] or "the endpoint was disabled or deleted"
            await self._finish(row, attempt - 1, url, None, why, "failed", None, tried=False)
            CALLBACKS.labels("failed").inc()
            return
        started = time.perf_counter()
        at = datetime.now(UTC)
        status_code: int | None = None
        error: str | None = None
        permanent = False
        wait: float | None = None
        try:
            body, headers = request_of(row["id"], row["payload"], self._secrets(row), int(time.time()),
                                       self._authorization(row))  # fmt: skip
            # The whole try, bounded: httpx's timeouts are per connect and per read (a receiver
            # trickling its answer never trips them), each address of a name gets its own connect
            # timeout, the name's resolution none. The lease (LEASE_MARGIN_S longer) outlasts it.
            response = await asyncio.wait_for(self._post(url, body, headers), self.settings.callback_timeout_s)
            status_code = response.status_code
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
                if 300 <= status_code < 400:
                    error += " (redirects are not followed)"
                elif status_code == 410:
                    permanent = True
                    error += " Gone: the endpoint no longer wants callbacks"
                elif status_code in (429, 502, 503, 504):
                    wait = retry_after(response)
        except _Permanent as exc:
            error, permanent = str(exc), True
        except UnsafeURL as exc:
            error = f"refused: {exc.reason}"
            permanent = "does not resolve" not in exc.reason  # DNS may come back; a private address not
        except (TimeoutError, httpx.TimeoutException):
            error = f"timed out after {self.settings.callback_timeout_s:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500] if str(exc) else type(exc).__name__
        duration = time.perf_counter() - started
        CALLBACK_DURATION.observe(duration)
        if error is None:
            outcome, next_in = "delivered", None
        elif permanent or attempt > len(self.delays):
            outcome, next_in = "failed", None
        else:
            outcome = "pending"
            next_in = self.delays[attempt - 1]
            if wait is not None:
                next_in = max(next_in, min(wait, _RETRY_AFTER_MAX_S))
        CALLBACKS.labels("retrying" if outcome == "pending" else outcome).inc()
        owned = await self._finish(row, attempt, url, status_code, error, outcome, next_in, at=at,
                                   duration=duration)  # fmt: skip
        # Only by the delivery's owner: a stale try's 410 (its outcome dropped) disables nothing.
        if status_code == 410 and endpoint is not None and owned:
            await self.pool.execute(_DISABLE, endpoint, "the endpoint answered 410 Gone")
        if error is not None and owned:
            log_event(log, logging.WARNING if outcome == "pending" else logging.ERROR, "callback not delivered",
                      delivery_id=row["id"], attempt=attempt, url=mask_text(display_url(url)), error=error,
                      outcome="retrying" if outcome == "pending" else outcome)  # fmt: skip

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """One POST; of the answer only its status, headers and first ``ANSWER_READ_MAX_BYTES``
        (raw, not decompressed) are read: the rest is not waited for, the connection is closed."""
        async with self.client.stream("POST", url, content=body, headers=headers) as response:
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read >= ANSWER_READ_MAX_BYTES:
                    break
        return response

    async def _finish(
        self,
        row: asyncpg.Record,
        attempt: int,
        url: str,
        status_code: int | None,
        error: str | None,
        outcome: str,
        next_in: float | None,
        *,
        tried: bool = True,
        at: datetime | None = None,
        duration: float = 0.0,
    ) -> bool:
        """Record the try and the delivery's new state, if this worker still owns it (answers
        whether it did); the database being away is waited for (the lease keeps other workers off
        meanwhile, and when it ends first, the outcome is not recorded)."""
        args = (
            row["id"], attempt, at or datetime.now(UTC), url[:500], status_code, error, duration * 1000, outcome,
            next_in, tried, display_url(url)[:500],
            row["attempts"], row["leased_until"],
        )  # fmt: skip
        delay = 0.5
        for _ in range(8):
            try:
                owned = bool(await self.pool.fetchval(_RECORD, *args))
            except DB_UNAVAILABLE:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if not owned:
                # Its lease ran out (this worker stalled) and another claimed it, or it was settled
                # (its endpoint deleted): the owner's record stands.
                log.debug("callbacks: delivery %s was claimed again or settled meanwhile; this try's outcome "
                         "(%s) is not recorded", row["id"], outcome)  # fmt: skip
            return owned
        log.error("callbacks: the outcome of delivery %s could not be recorded; it will be tried again", row["id"])
        return False
