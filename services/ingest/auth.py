"""Who is calling: API keys, access tokens, and the caches that make a token check cost
microseconds.

* An API key (``noti_`` + 32 characters) and its secret are made once; the secret is stored as a
  bcrypt hash and shown only to whoever created the key. ``POST /api/v1/auth/token`` exchanges
  the pair for an HS256 access token (1 h); only the token is accepted on other endpoints.
* A token names its key (``sub``), tenant (``tid``) and id (``jti``). Scopes, tier and whether the
  key still works are *not* taken from the token but from the key's current state, so disabling
  a key or narrowing its scopes applies to tokens already issued.
* Caches: a verified token's claims (until it expires), each key's state (``auth_cache_ttl_s``)
  and the set of revoked token ids. Every change to a key or revocation is committed together
  with a PostgreSQL ``NOTIFY herald_auth``; each replica listens and drops what changed, so a
  revoked token or a disabled key stops working at once everywhere. A replica that loses its
  listening connection keeps answering from what it knows and, once listening again, forgets all
  key states and reloads the revoked ids.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import string
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import asyncpg
import bcrypt
import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.crypto import parse_key
from shared.db import DB_UNAVAILABLE, follow_notifications
from shared.settings import Settings

log = logging.getLogger("herald.ingest.auth")

NOTIFY_CHANNEL = "herald_auth"
ISSUER = "herald"
KEY_PREFIX = "noti_"
_KEY_ALPHABET = string.ascii_letters + string.digits
_TOKEN_CACHE_MAX = 100_000


class Scope(StrEnum):
    SEND = "send"
    READ = "read"
    TEMPLATES = "templates"
    CONFIG = "config"
    ADMIN = "admin"


ALL_SCOPES: tuple[str, ...] = tuple(s.value for s in Scope)


class AuthError(Exception):
    """The request is not authenticated; ``reason`` is safe to show (it never holds the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of an authenticated request."""

    tenant: str
    api_key: str
    scopes: frozenset[str]
    tier: str
    jti: str
    expires_at: int  # epoch seconds

    @property
    def actor(self) -> str:
        return self.api_key


@dataclass(frozen=True, slots=True)
class KeyState:
    api_key: str
    tenant: str
    scopes: frozenset[str]
    tier: str
    usable: bool  # enabled, not deleted, and its tenant active
    expire_at: float | None  # epoch seconds

    def refusal(self, now: float) -> str | None:
        if not self.usable:
            return "API key disabled (or its tenant suspended)"
        if self.expire_at is not None and now >= self.expire_at:
            return "API key expired"
        return None


def new_api_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(32))


def new_api_secret() -> str:
    return secrets.token_urlsafe(32)  # 43 characters, 256 bits


def hash_secret(secret: str, rounds: int) -> str:
    return bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds)).decode()


@functools.cache
def _stand_in(rounds: int) -> bytes:
    """A hash to check against when the key does not exist, made with the same work factor, so
    an unknown key costs as long as a wrong secret (no timing oracle on which keys exist)."""
    return bcrypt.hashpw(b"no such key", bcrypt.gensalt(rounds))


def check_secret(secret: str, hashed: str | None, rounds: int = 12) -> bool:
    try:
        matched = bcrypt.checkpw(secret.encode(), hashed.encode() if hashed else _stand_in(rounds))
    except ValueError:  # not a bcrypt hash
        return False
    return matched and hashed is not None


def signing_key(settings: Settings) -> bytes:
    """The HS256 key: ``HERALD_JWT_SECRET``, or one derived from the encryption key."""
    if settings.jwt_secret is not None:
        key = settings.jwt_secret.get_secret_value().encode()
        if len(key) < 32:
            raise ValueError("HERALD_JWT_SECRET must be at least 32 bytes")
        return key
    master = parse_key(settings.encryption_key.get_secret_value() if settings.encryption_key else None)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"herald jwt hs256 v1").derive(master)


class Tokens:
    """Issues and verifies access tokens (HS256 only: ``alg: none`` and every other algorithm
    are refused by PyJWT's algorithm allow-list)."""

    def __init__(self, key: bytes, ttl_s: int) -> None:
        self._key = key
        self.ttl_s = ttl_s

    def issue(self, api_key: str, tenant: str, now: float | None = None) -> tuple[str, dict[str, Any]]:
        issued = int(now if now is not None else time.time())
        claims = {
            "iss": ISSUER,
            "sub": api_key,
            "tid": tenant,
            "jti": uuid.uuid4().hex,
            "iat": issued,
            "exp": issued + self.ttl_s,
        }
        return jwt.encode(claims, self._key, algorithm="HS256"), claims

    def decode(self, token: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "jti", "iss"]},
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError:
            raise AuthError("token invalid") from None


KEY_STATE_SQL = """
SELECT k.api_key, k.tenant_id, k.scopes, k.tier, k.api_secret_hash,
       (k.is_active AND k.deleted_at IS NULL AND t.status = 'active') AS usable,
       extract(epoch FROM k.expire_at) AS expire_at
FROM api_keys k JOIN tenants t ON t.tenant_key = k.tenant_id
WHERE k.api_key = $1"""


def key_state(row: asyncpg.Record | None) -> KeyState | None:
    if row is None:
        return None
    return KeyState(
        api_key=row["api_key"],
        tenant=row["tenant_id"],
        scopes=frozenset(row["scopes"]),
        tier=row["tier"],
        usable=row["usable"],
        expire_at=float(row["expire_at"]) if row["expire_at"] is not None else None,
    )


async def fetch_key_state(conn: asyncpg.Pool | asyncpg.Connection, api_key: str) -> KeyState | None:
    return key_state(await conn.fetchrow(KEY_STATE_SQL, api_key))


async def notify(conn: asyncpg.Connection, *payloads: str) -> None:
    """Tell every replica (at commit) what changed: ``key:<api_key>``, ``jti:<id>``,
    ``tenant:<tenant_key>``."""
    for payload in payloads:
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload)


class Authenticator:
    """Turns a bearer token into a :class:`Principal` with no I/O on the hot path."""

    def __init__(self, pool: asyncpg.Pool, tokens: Tokens, settings: Settings) -> None:
        self.pool = pool
        self.tokens = tokens
        self.dsn = settings.database_url.get_secret_value()
        self.cache_ttl_s = settings.auth_cache_ttl_s
        self.timeout_s = settings.record_timeout_s
        self._claims: OrderedDict[str, tuple[str, str, str, int]] = OrderedDict()
        self._keys: dict[str, tuple[float, KeyState | None]] = {}
        self._revoked: set[str] = set()
        self._usage: dict[str, int] = {}

    # --- the hot path -------------------------------------------------------------------------

    async def authenticate(self, token: str) -> Principal:
        hit = self._claims.get(token)
        if hit is None:
            claims = self.tokens.decode(token)
            hit = (claims["sub"], str(claims.get("tid", "")), claims["jti"], int(claims["exp"]))
            self._claims[token] = hit
            if len(self._claims) > _TOKEN_CACHE_MAX:
                self._claims.popitem(last=False)
        api_key, tenant, jti, exp = hit
        now = time.time()
        if now >= exp:
            self._claims.pop(token, None)
            raise AuthError("token expired")
        if jti in self._revoked:
            raise AuthError("token revoked")
        state = await self.state_of(api_key)
        if state is None or state.tenant != tenant:
            raise AuthError("API key unknown")
        if (refusal := state.refusal(now)) is not None:
            raise AuthError(refusal)
        self._usage[api_key] = self._usage.get(api_key, 0) + 1
        return Principal(tenant, api_key, state.scopes, state.tier, jti, exp)

    async def state_of(self, api_key: str) -> KeyState | None:
        cached = self._keys.get(api_key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            state = await asyncio.wait_for(fetch_key_state(self.pool, api_key), self.timeout_s)
        except (TimeoutError, *DB_UNAVAILABLE):
            if cached is not None:  # PostgreSQL away: the last known state holds
                return cached[1]
            raise
        self._keys[api_key] = (now + self.cache_ttl_s, state)
        return state

    # --- changes ------------------------------------------------------------------------------

    def forget_key(self, api_key: str) -> None:
        self._keys.pop(api_key, None)

    def revoked(self, jti: str) -> None:
        self._revoked.add(jti)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        kind, _, value = payload.partition(":")
        if kind == "key":
            self.forget_key(value)
        elif kind == "jti":
            self.revoked(value)
        elif kind == "tenant":
            for api_key in [k for k, (_, s) in self._keys.items() if s is not None and s.tenant == value]:
                self.forget_key(api_key)

    async def load_revoked(self, conn: asyncpg.Connection | asyncpg.Pool) -> None:
        rows = await conn.fetch("SELECT jti FROM revoked_tokens WHERE expires_at > now()")
        self._revoked = {r["jti"] for r in rows}

    async def listen(self) -> None:
        """Follow ``NOTIFY herald_auth`` for as long as the service runs. While not listening, key
        states are kept (PostgreSQL may be the thing that went away, and they are what answers
        then); they are cleared when listening again."""

        async def listening(conn: asyncpg.Connection) -> None:
            self._keys.clear()
            await self.load_revoked(conn)
            await conn.execute("DELETE FROM revoked_tokens WHERE expires_at < now() - interval '1 minute'")

        await follow_notifications(self.dsn, NOTIFY_CHANNEL, self._on_notify, listening, name="auth change")

    async def flush_usage(self, interval_s: float = 5.0) -> None:
        """Write ``usage_count`` and ``last_used_at`` in batches, not per request."""
        while True:
            await asyncio.sleep(interval_s)
            await self.write_usage()

    async def write_usage(self) -> None:
        if not self._usage:
            return
        usage, self._usage = self._usage, {}
        try:
            await self.pool.execute(
                """UPDATE api_keys k SET usage_count = k.usage_count + u.n, last_used_at = now()
                   FROM unnest($1::text[], $2::bigint[]) AS u(api_key, n) WHERE k.api_key = u.api_key""",
                list(usage),
                list(usage.values()),
            )
        except (TimeoutError, *DB_UNAVAILABLE):
            for key, n in usage.items():  # kept for the next round
                self._usage[key] = self._usage.get(key, 0) + n
