"""Gotify's ``POST /message`` ("Push messages", "Message Extras", the API docs) with the server's
authentication rules (auth/authentication.go, RequireApplicationToken):

The token is read from the ``token`` query parameter, the ``X-Gotify-Key`` header or
``Authorization: Bearer``, in that order; it must be an application token (a client token or an
unknown one: 401 "you need to provide a valid access token or user credentials to access this
api"; user basic auth without a token: 403 "you are not allowed to access this api"). The body
(JSON) needs a non-empty ``message`` string (400 "Field 'message' is required"); ``title`` a
string, ``priority`` an integer, ``extras`` an object with ``namespace::action`` keys. There is no
signature: ``verified`` means the request passed every check. Errors are ``{"error",
"errorCode", "errorDescription"}``; success is the created message ``{"id", "appid", "message",
"title", "priority", "extras", "date"}``.

Injected failures: auth and invalid_recipient -> 401 (a deleted application's token is unknown:
Gotify has no other notion of a bad recipient); rate_limited and quota -> 429 with Retry-After as
a reverse proxy in front of Gotify answers (Gotify itself neither throttles nor has quotas);
server_error -> 500.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

UNAUTHORIZED = "you need to provide a valid access token or user credentials to access this api"


def gotify_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "errorCode": status, "errorDescription": description}, status=status)


class GotifyEmulator(Emulator):
    name = "gotify"
    routes = [("POST", "/message", "message")]

    def __init__(self, *, app_tokens: Mapping[str, int], client_tokens: Iterable[str] = ()) -> None:
        super().__init__()
        self.app_tokens = dict(app_tokens)  # application token -> application id
        self.client_tokens = set(client_tokens)
        self.messages: list[dict] = []
        self._ids = itertools.count(1)

    @staticmethod
    def refuse(call: Call, problem: str, response: web.Response) -> web.Response:
        call.problems.append(problem)
        return response

    def _token(self, call: Call) -> str:
        auth = call.headers.get("authorization", "")
        bearer = auth[7:] if auth.lower().startswith("bearer ") else ""
        return call.query.get("token") or call.headers.get("x-gotify-key") or bearer

    async def message(self, request: web.Request, call: Call) -> web.StreamResponse:
        token = self._token(call)
        if token not in self.app_tokens:
            if not token and call.headers.get("authorization", "").startswith("Basic "):
                return self.refuse(
                    call, "user auth", gotify_error(403, "Forbidden", "you are not allowed to access this api")
                )
            return self.refuse(call, "not an application token", gotify_error(401, "Unauthorized", UNAUTHORIZED))
        if not call.headers.get("content-type", "").startswith("application/json"):
            return self.refuse(call, "not JSON", gotify_error(400, "Bad Request", "extras need application/json"))
        try:
            body = call.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return self.refuse(call, "not a JSON object", gotify_error(400, "Bad Request", "invalid JSON"))
        if not isinstance(body.get("message"), str) or not body["message"]:
            return self.refuse(call, "no message", gotify_error(400, "Bad Request", "Field 'message' is required"))
        if "title" in body and not isinstance(body["title"], str):
            return self.refuse(call, "title", gotify_error(400, "Bad Request", "Field 'title' must be a string"))
        priority = body.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            return self.refuse(call, "priority", gotify_error(400, "Bad Request", "Field 'priority' must be a number"))
        extras = body.get("extras", {})
        if not isinstance(extras, dict) or any("::" not in key for key in extras):
            return self.refuse(call, "extras", gotify_error(400, "Bad Request", "extras keys are namespace::action"))
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        created = {
            "id": next(self._ids),
            "appid": self.app_tokens[token],
            "message": body["message"],
            "title": body.get("title") or "app",
            "priority": priority,
            "date": datetime.now(UTC).isoformat(),
        }
        if extras:
            created["extras"] = extras
        self.messages.append(created)
        return web.json_response(created)

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        if kind in ("auth", "invalid_recipient"):
            return gotify_error(401, "Unauthorized", UNAUTHORIZED)
        if kind in ("rate_limited", "quota"):
            return web.Response(status=429, text="Too Many Requests", headers={"Retry-After": "10"})
        return gotify_error(500, "Internal Server Error", "database is locked")
