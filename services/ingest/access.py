"""The gate every request passes: authentication and rate limits, before any route runs.

* Health and metrics are open (probes and scrapers carry no token), and so is
  ``POST /api/v1/auth/token`` (that is where a token comes from) and, when ``public_docs`` is
  set, the API docs.
* Everything else needs ``Authorization: Bearer <access token>``: 401 / 1002 otherwise, with
  ``WWW-Authenticate``. An API key and secret sent as the bearer are refused (exchange them).
* A request with a valid token is limited per API key by the key's tier; every other request
  (open paths other than health and metrics, missing or bad tokens) per client IP, so guessing
  tokens or secrets is throttled too.
* Scopes are checked by the routes (``deps.caller``), which know what they need.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.ingest.auth import KEY_PREFIX, AuthError
from services.ingest.http import error_response
from shared.db import DB_UNAVAILABLE
from shared.errors import ErrorCode
from shared.metrics import AUTH_FAILURES

log = logging.getLogger("herald.ingest.access")

TOKEN_PATH = "/api/v1/auth/token"
OPEN_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/metrics"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class AccessMiddleware:
    def __init__(self, app: ASGIApp, public_docs: bool = False) -> None:
        self.app = app
        self.limited_open = frozenset({TOKEN_PATH, *(DOCS_PATHS if public_docs else ())})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        services = scope["app"].state.services
        principal, failure = None, None
        if path not in self.limited_open:
            token = _bearer(scope)
            if token is None:
                failure = "missing bearer token"
            elif token.startswith(KEY_PREFIX):
                failure = f"send an access token, not an API key: exchange the key at {TOKEN_PATH}"
            else:
                try:
                    principal = await services.auth.authenticate(token)
                except AuthError as exc:
                    failure = exc.reason
                except (TimeoutError, *DB_UNAVAILABLE):
                    await _answer(send, ErrorCode.SERVICE_UNAVAILABLE, "key store unavailable, retry shortly")
                    return
        limiter = services.limiter
        try:
            if principal is not None:
                item = limiter.tier_item(principal.tier)
                decision = None if item is None else await limiter.take(item, "key", principal.api_key)
            else:
                decision = await limiter.take(limiter.ip_item, "ip", _client_ip(scope))
        except Exception:  # noqa: BLE001 - limiter configured to fail closed and Redis is away
            await _answer(send, ErrorCode.SERVICE_UNAVAILABLE, "rate limiter unavailable, retry shortly")
            return
        extra = decision.headers() if decision is not None else []
        if decision is not None and not decision.allowed:
            who = "this API key" if principal is not None else "this client address"
            await _answer(
                send,
                ErrorCode.RATE_LIMITED,
                f"too many requests from {who}: at most {decision.limit} per {decision.window_s} s; "
                f"retry in {max(1, decision.reset_s)} s",
                extra,
            )
            return
        if failure is not None:
            AUTH_FAILURES.labels(failure.split(":")[0][:40]).inc()
            extra.append((b"www-authenticate", b'Bearer error="invalid_token"'))
            await _answer(send, ErrorCode.UNAUTHENTICATED, f"authentication failed: {failure}", extra)
            return
        scope.setdefault("state", {})["principal"] = principal
        if not extra:
            await self.app(scope, receive, send)
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_limits)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if kind.lower() == "bearer" and token else None
    return None


def _client_ip(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


async def _answer(send: Send, code: ErrorCode, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    response = error_response(code, message)
    response.raw_headers.extend(headers or [])
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
