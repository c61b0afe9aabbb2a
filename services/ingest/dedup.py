"""Idempotency keys and content fingerprints (seed 004 §3.1.3).

- An idempotency key (body ``idempotency_key`` or header ``Idempotency-Key``, per tenant) names
  one message for ``HERALD_IDEMPOTENCY_TTL_S``: the same key with the same body answers the first
  response again (``Idempotent-Replayed: true``); with another body, 409 / 1006. PostgreSQL is the
  source of truth (a unique index on the record's key), so keys hold when Redis is down; Redis
  only caches the first response so a replay costs no database query.
- A request without a key is fingerprinted: SHA-256 over tenant, recipients, subject and the
  content's hash. The same fingerprint within the tenant's window (``tenants.dedup_window_s``,
  default ``HERALD_DEDUP_WINDOW_S``) → 409 / 1006 naming the earlier message. Redis holds the
  window; when Redis is down the check fails open (the message is accepted and marked
  ``dedup_skipped``, a metric counts it) or, with ``HERALD_DEDUP_FAIL_OPEN=false``, the request
  gets 503.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.errors import ErrorCode, HeraldError
from shared.events import RequestV1
from shared.metrics import DEDUP_SKIPPED

log = logging.getLogger("herald.ingest.dedup")


def request_hash(payload: dict) -> str:
    """Hash of a request body in canonical form (sorted keys), without the key itself."""
    body = {k: v for k, v in payload.items() if k not in ("idempotency_key", "async", "async_", "dedup")}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def fingerprint(tenant_id: str, channel: str, recipients: list[str], subject: str | None, content: str) -> str:
    """What makes two messages the same for the dedup window."""
    content_hash = hashlib.sha256(content.encode()).hexdigest()
    material = "\x1f".join([tenant_id, channel, ",".join(sorted(recipients)), subject or "", content_hash])
    return hashlib.sha256(material.encode()).hexdigest()


def fingerprint_of(request: RequestV1) -> str:
    """A request's fingerprint, the same whichever endpoint accepted it (a batch item and a single
    send of the same email are duplicates of each other): every recipient, the subject, and the
    content, or for a template send the template, version, variables and locale; and the card,
    the channel options and the named provider when there are some."""
    email = request.email
    recipients = [*request.to, *(email.cc if email else []), *(email.bcc if email else [])]
    template = request.template
    content = (
        request.content
        if template is None
        else orjson.dumps(template.model_dump(), option=orjson.OPT_SORT_KEYS).decode()
    )
    # Other channels: two cards, two SMS with other template parameters, or the same text through
    # two named providers are different messages. A message to a user (issue 10) is one to that
    # user, at its priority (the default leaves earlier fingerprints as they were).
    user = request.recipient.user_id if request.recipient is not None else None
    priority = request.priority if request.priority != "normal" else None
    extra = {k: v for k, v in (("card", request.card.model_dump(mode="json") if request.card else None),
                               ("options", request.options), ("provider", request.provider),
                               ("user_id", user), ("priority", priority)) if v}  # fmt: skip
    if extra:
        content += "\x1f" + orjson.dumps(extra, option=orjson.OPT_SORT_KEYS).decode()
    channel = request.channel.value if request.channel is not None else "auto"
    return fingerprint(request.tenant_id, channel, recipients, request.subject, content)


# Delete each fingerprint still held by the message that claimed it.
_RELEASE_MANY = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then redis.call('DEL', key) end
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Remembered:
    message_id: str
    request_hash: str
    response: dict


class Guard:
    """The Redis side of idempotency and dedup; every call is bounded and never hangs."""

    def __init__(self, redis: Redis, idempotency_ttl_s: int, fail_open: bool) -> None:
        self.redis = redis
        self.ttl = idempotency_ttl_s
        self.fail_open = fail_open
        self._release_many = redis.register_script(_RELEASE_MANY)

    @staticmethod
    def _key(tenant_id: str, key: str) -> str:
        return f"herald:idem:{tenant_id}:{hashlib.sha256(key.encode()).hexdigest()}"

    async def recall(self, tenant_id: str, key: str) -> Remembered | None:
        """The first response for this key, if Redis has it (None on a miss or when Redis is down)."""
        try:
            raw = await self.redis.get(self._key(tenant_id, key))
        except RedisError:
            return None
        if raw is None:
            return None
        data = orjson.loads(raw)
        return Remembered(data["message_id"], data["request_hash"], data["response"])

    async def remember(self, tenant_id: str, key: str, message_id: str, digest: str, response: dict) -> None:
        value = orjson.dumps({"message_id": message_id, "request_hash": digest, "response": response})
        try:
            await self.redis.set(self._key(tenant_id, key), value, ex=self.ttl)
        except RedisError:
            log.warning("redis unavailable; idempotency key kept in PostgreSQL only")

    async def claim(self, fp: str, message_id: str, window_s: int) -> tuple[str | None, bool]:
        """Claim a fingerprint for ``message_id`` for ``window_s`` (the tenant's window; 0: no
        check): answers (earlier message id or None, skipped). ``skipped`` is True when Redis
        could not be asked and the check failed open."""
        if window_s <= 0:
            return None, False
        key = f"herald:fp:{fp}"
        try:
            if await self.redis.set(key, message_id, nx=True, ex=window_s):
                return None, False
            earlier = await self.redis.get(key)
            return (earlier.decode() if earlier else None), False
        except RedisError as exc:
            if not self.fail_open:
                raise HeraldError(
                    ErrorCode.SERVICE_UNAVAILABLE, "duplicate check unavailable (Redis); try again", http_status=503
                ) from exc
            DEDUP_SKIPPED.inc()
            log.warning("redis unavailable; duplicate check skipped (fail open)")
            return None, True

    async def claim_many(self, claims: list[tuple[str, str]], window_s: int) -> tuple[list[str | None], bool]:
        """:meth:`claim` for many ``(fingerprint, message_id)`` pairs in two round trips (a batch
        send's items): answers the earlier message id of each (None: claimed) and ``skipped``."""
        if window_s <= 0 or not claims:
            return [None] * len(claims), False
        try:
            pipe = self.redis.pipeline(transaction=False)
            for fp, message_id in claims:
                pipe.set(f"herald:fp:{fp}", message_id, nx=True, ex=window_s)
            taken = await pipe.execute()
            lost = [i for i, ok in enumerate(taken) if not ok]
            earlier: list[str | None] = [None] * len(claims)
            if lost:
                values = await self.redis.mget([f"herald:fp:{claims[i][0]}" for i in lost])
                for i, value in zip(lost, values, strict=True):
                    # Expired between the two calls: still someone else's a moment ago.
                    earlier[i] = value.decode() if value else "an earlier message"
            return earlier, False
        except RedisError as exc:
            if not self.fail_open:
                raise HeraldError(
                    ErrorCode.SERVICE_UNAVAILABLE, "duplicate check unavailable (Redis); try again", http_status=503
                ) from exc
            DEDUP_SKIPPED.inc(len(claims))
            log.warning("redis unavailable; duplicate check of %d messages skipped (fail open)", len(claims))
            return [None] * len(claims), True

    async def release_many(self, claims: list[tuple[str, str]]) -> None:
        """:meth:`release` for many ``(fingerprint, message_id)`` pairs, in one round trip."""
        if not claims:
            return
        try:
            await self._release_many(keys=[f"herald:fp:{fp}" for fp, _ in claims], args=[m for _, m in claims])
        except RedisError:
            pass

    async def release(self, fp: str, message_id: str) -> None:
        """Give a fingerprint back when its message was not accepted after all."""
        try:
            key = f"herald:fp:{fp}"
            if (await self.redis.get(key) or b"").decode() == message_id:
                await self.redis.delete(key)
        except RedisError:
            pass
