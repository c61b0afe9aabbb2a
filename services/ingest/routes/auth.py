"""Access tokens (seed 004 §3.1.8, §3.4.2): exchange an API key and secret for a token, refresh
a token in its last minutes, revoke one."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from services.ingest.auth import KEY_STATE_SQL, check_secret, key_state, notify
from services.ingest.deps import caller, services_of
from services.ingest.http import envelope, json_body_schema, parse_body
from shared.db import DB_UNAVAILABLE
from shared.errors import ErrorCode, HeraldError
from shared.metrics import AUTH_FAILURES

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    api_key: str = Field(min_length=1, max_length=64)
    api_secret: str = Field(min_length=1, max_length=128)


def _token_data(token: str, ttl_s: int) -> dict:
    return {"access_token": token, "token_type": "bearer", "expires_in": ttl_s}


@router.post(
    "/token", summary="Exchange an API key and secret for an access token", openapi_extra=json_body_schema(TokenRequest)
)
async def issue_token(request: Request):
    body = await parse_body(request, TokenRequest)
    services = services_of(request)
    try:
        row = await services.pool.fetchrow(KEY_STATE_SQL, body.api_key)
    except (TimeoutError, *DB_UNAVAILABLE):
        raise HeraldError(ErrorCode.SERVICE_UNAVAILABLE, "key store unavailable, retry shortly") from None
    # bcrypt takes a quarter of a second by design: off the event loop.
    stored = row["api_secret_hash"] if row else None
    valid = await asyncio.to_thread(check_secret, body.api_secret, stored, services.settings.api_secret_bcrypt_rounds)
    if not valid:
        AUTH_FAILURES.labels("bad key or secret").inc()
        raise HeraldError(ErrorCode.UNAUTHENTICATED, "authentication failed: unknown API key or wrong secret")
    state = key_state(row)
    assert state is not None
    if (refusal := state.refusal(time.time())) is not None:
        AUTH_FAILURES.labels(refusal).inc()
        raise HeraldError(ErrorCode.UNAUTHENTICATED, f"authentication failed: {refusal}")
    token, _ = services.tokens.issue(state.api_key, state.tenant)
    return envelope(_token_data(token, services.tokens.ttl_s))


async def _revoke(request: Request) -> None:
    principal = caller(request, None)
    services = services_of(request)
    async with services.pool.acquire() as conn, conn.transaction():
        inserted = await conn.fetchval(
            """INSERT INTO revoked_tokens (jti, api_key, expires_at) VALUES ($1, $2, $3)
               ON CONFLICT (jti) DO NOTHING RETURNING true""",
            principal.jti,
            principal.api_key,
            datetime.fromtimestamp(principal.expires_at, UTC),
        )
        if not inserted:  # revoked a moment ago by a concurrent request
            raise HeraldError(ErrorCode.UNAUTHENTICATED, "authentication failed: token revoked")
        await notify(conn, f"jti:{principal.jti}")
    services.auth.revoked(principal.jti)  # here at once; other replicas on NOTIFY


@router.post("/refresh", summary="A new token for one about to expire; the old one is revoked")
async def refresh_token(request: Request):
    principal = caller(request, None)
    services = services_of(request)
    window = services.settings.jwt_refresh_window_s
    left = principal.expires_at - int(time.time())
    if left > window:
        raise HeraldError(
            ErrorCode.INVALID_PARAMS,
            f"a token can be refreshed in its last {window} s; this one has {left} s left",
            field="authorization",
        )
    await _revoke(request)
    token, _ = services.tokens.issue(principal.api_key, principal.tenant)
    return envelope(_token_data(token, services.tokens.ttl_s))


@router.post("/revoke", summary="Revoke the token of this request (sign out)")
async def revoke_token(request: Request):
    await _revoke(request)
    return envelope({"revoked": True})
