"""Firebase Cloud Messaging HTTP v1 and Google's OAuth 2.0 token endpoint, as documented:

- ``POST /token`` (the service account's ``token_uri``): form-encoded ``grant_type`` =
  ``urn:ietf:params:oauth:grant-type:jwt-bearer`` and ``assertion``, an RS256 JWT whose signature
  is checked with the service account's public key (given to the emulator; it generates
  nothing), header ``kid`` = the key id, claims ``iss`` = the client email, ``aud`` = this token
  URL, ``scope`` containing the FCM scope, ``exp - iat <= 3600`` and now within [iat, exp]
  (60 s skew). Errors as RFC 6749 5.2 / Google: 400 ``invalid_grant`` "Invalid JWT Signature." ...
  Success: ``{"access_token", "expires_in": 3599, "token_type": "Bearer"}`` (an opaque token).
- ``POST /v1/projects/{project_id}/messages:send``: ``Authorization: Bearer`` an access token
  this emulator issued and that has not expired (else 401 UNAUTHENTICATED), the project of the
  path = the service account's (else 403 PERMISSION_DENIED), a JSON ``message`` with exactly one
  target, a registration token of the documented form (else 400 INVALID_ARGUMENT with FcmError
  INVALID_ARGUMENT), ``data`` values strings (else 400 with google.rpc.BadRequest), a token
  marked unregistered answers 404 UNREGISTERED. Success: ``{"name": "projects/p/messages/ID"}``.

Injected failures (google.rpc error bodies with a ``google.firebase.fcm.v1.FcmError`` detail):
rate_limited and quota -> 429 RESOURCE_EXHAUSTED / QUOTA_EXCEEDED with ``Retry-After`` (FCM's only
quota is per project and minute); auth -> 403 PERMISSION_DENIED / SENDER_ID_MISMATCH;
invalid_recipient -> 404 NOT_FOUND / UNREGISTERED; server_error -> 503 UNAVAILABLE.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import jwt
from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_LIFETIME_S = 3599
REGISTRATION_TOKEN = re.compile(r"^[A-Za-z0-9_:\-.]{16,4096}$")
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"


def rpc_error(http: int, status: str, message: str, fcm_code: str | None = None, **headers: str) -> web.Response:
    details: list[dict[str, Any]] = [{"@type": FCM_ERROR, "errorCode": fcm_code}] if fcm_code else []
    body = {"error": {"code": http, "message": message, "status": status, "details": details}}
    return web.json_response(body, status=http, headers=headers or None)


class FcmEmulator(Emulator):
    name = "fcm"
    routes = [
        ("POST", "/token", "token"),
        ("POST", "/v1/projects/{project}/messages:send", "send"),
    ]

    def __init__(
        self,
        *,
        public_key_pem: str,
        project_id: str,
        client_email: str,
        key_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.public_key_pem = public_key_pem
        self.project_id = project_id
        self.client_email = client_email
        self.key_id = key_id
        self.clock = clock
        self.access_tokens: dict[str, float] = {}  # issued token -> expiry (epoch s)
        self.unregistered: set[str] = set()  # registration tokens answered 404 UNREGISTERED
        self.sent: list[str] = []  # names of the accepted messages
        self._ids = itertools.count(1)

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    def revoke_tokens(self) -> None:
        """Every access token issued so far is no longer valid (as after a key rotation)."""
        self.access_tokens.clear()

    # --- the OAuth 2.0 token endpoint --------------------------------------------------------

    @staticmethod
    def oauth_error(call: Call, error: str, description: str, status: int = 400) -> web.Response:
        call.problems.append(f"{error}: {description}")
        return web.json_response({"error": error, "error_description": description}, status=status)

    async def token(self, request: web.Request, call: Call) -> web.StreamResponse:
        if not call.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return self.oauth_error(call, "invalid_request", "Content-Type must be application/x-www-form-urlencoded")
        form = dict(parse_qsl(call.body.decode()))
        if form.get("grant_type") != GRANT:
            return self.oauth_error(call, "unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type')}")
        assertion = form.get("assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            return self.oauth_error(call, "invalid_grant", "Invalid JWT: malformed")
        if header.get("alg") != "RS256" or header.get("kid") != self.key_id:
            return self.oauth_error(call, "invalid_grant", "Invalid JWT Signature.")
        try:
            claims = jwt.decode(
                assertion,
                self.public_key_pem,
                algorithms=["RS256"],
                audience=self.token_url,
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False, "require": ["iat", "exp"]},
            )
        except jwt.InvalidAudienceError:
            return self.oauth_error(call, "invalid_grant", "Invalid JWT: audience is not the token URL")
        except jwt.PyJWTError:
            return self.oauth_error(call, "invalid_grant", "Invalid JWT Signature.")
        if claims.get("iss") != self.client_email:
            return self.oauth_error(call, "invalid_grant", "Invalid JWT: iss is not the service account")
        if SCOPE not in str(claims.get("scope", "")).split():
            return self.oauth_error(call, "invalid_scope", "The FCM scope was not requested")
        iat, exp, now = claims["iat"], claims["exp"], self.clock()
        if not (isinstance(iat, int) and isinstance(exp, int)) or exp - iat > 3600 or exp <= iat:
            return self.oauth_error(
                call, "invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes)"
            )
        if not iat - 60 <= now <= exp:
            return self.oauth_error(call, "invalid_grant", "Invalid JWT: Check your iat and exp values")
        call.verified = True
        token = f"ya29.{secrets.token_urlsafe(32)}"
        self.access_tokens[token] = now + TOKEN_LIFETIME_S
        return web.json_response({"access_token": token, "expires_in": TOKEN_LIFETIME_S, "token_type": "Bearer"})

    # --- messages:send -----------------------------------------------------------------------

    @staticmethod
    def refuse(call: Call, problem: str, response: web.Response) -> web.Response:
        call.problems.append(problem)
        return response

    async def send(self, request: web.Request, call: Call) -> web.StreamResponse:
        auth = call.headers.get("authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if not token or self.access_tokens.get(token, 0) <= self.clock():
            return self.refuse(
                call,
                "no valid access token",
                rpc_error(
                    401,
                    "UNAUTHENTICATED",
                    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
                    "or other valid authentication credential.",
                ),
            )
        project = request.match_info["project"]
        if project != self.project_id:
            return self.refuse(
                call,
                f"project {project!r} is not the service account's",
                rpc_error(403, "PERMISSION_DENIED", f"Permission 'cloudmessaging.messages.create' denied on {project}"),
            )
        try:
            payload = call.json()
        except ValueError:
            payload = None
        message = payload.get("message") if isinstance(payload, dict) else None
        if not isinstance(message, dict):
            return self.refuse(call, "no message object", rpc_error(400, "INVALID_ARGUMENT", "Invalid JSON payload"))
        targets = [k for k in ("token", "topic", "condition") if k in message]
        if len(targets) != 1:
            return self.refuse(
                call,
                "not exactly one target",
                rpc_error(400, "INVALID_ARGUMENT", "exactly one target", "INVALID_ARGUMENT"),
            )
        data = message.get("data", {})
        for i, (key, value) in enumerate(data.items() if isinstance(data, dict) else []):
            if not isinstance(value, str):
                text = f"Invalid value at 'message.data[{i}].value' (TYPE_STRING), {value}"
                body = {
                    "error": {
                        "code": 400,
                        "message": text,
                        "status": "INVALID_ARGUMENT",
                        "details": [
                            {
                                "@type": "type.googleapis.com/google.rpc.BadRequest",
                                "fieldViolations": [{"field": f"message.data[{i}].value", "description": text}],
                            }
                        ],
                    }
                }
                return self.refuse(call, f"data {key!r} is not a string", web.json_response(body, status=400))
        notification = message.get("notification", {})
        if not isinstance(notification, dict) or any(
            not isinstance(notification.get(k, ""), str) for k in ("title", "body")
        ):
            return self.refuse(call, "bad notification", rpc_error(400, "INVALID_ARGUMENT", "Invalid notification"))
        target = message.get("token")
        if target is not None and not (isinstance(target, str) and REGISTRATION_TOKEN.match(target)):
            return self.refuse(
                call,
                "malformed registration token",
                rpc_error(
                    400,
                    "INVALID_ARGUMENT",
                    "The registration token is not a valid FCM registration token",
                    "INVALID_ARGUMENT",
                ),
            )
        if target in self.unregistered:
            return self.refuse(
                call,
                "unregistered token",
                rpc_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED"),
            )
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        name = f"projects/{project}/messages/0:{int(self.clock() * 1e6)}%{next(self._ids):016x}"
        self.sent.append(name)
        return web.json_response({"name": name})

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        if kind in ("rate_limited", "quota"):
            return rpc_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED", **{"Retry-After": "30"})
        if kind == "auth":
            return rpc_error(403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH")
        if kind == "invalid_recipient":
            return rpc_error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
        return rpc_error(503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE")
