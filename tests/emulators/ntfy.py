"""ntfy's publish API, JSON form ("Publish as JSON", docs.ntfy.sh/publish), with the error bodies of
server/errors.go (``{"code", "http", "error", "link"}``).

``POST /`` (or ``PUT /``) with a JSON object: ``topic`` required and ``[-_A-Za-z0-9]{1,64}``
(400 40009 "invalid request: topic invalid"), ``message``/``title``/``click``/``icon`` strings
(``icon`` a URL: 40021), ``priority`` 1-5 (40007), ``tags`` a list of strings, ``markdown`` a
boolean (else 400 40017 "request body must be message JSON"). Credentials, when sent, must be a
known access token (``Authorization: Bearer``) or user (Basic): else 401 40101 "unauthorized";
a topic in ``protected`` without credentials: 403 40301 "forbidden". There is no signature:
``verified`` means the request passed every check. Success: the published message
``{"id", "time", "expires", "event": "message", "topic", "message", ...}``.

Injected failures: rate_limited -> 429 42901 "limit reached: too many requests, please be nice";
quota -> 429 42908 "limit reached: too many messages" (the daily message limit); auth -> 401
40101; invalid_recipient -> 400 40010 "topic name is disallowed"; server_error -> 500 50001.
"""

from __future__ import annotations

import base64
import re
import secrets
import string
import time
from collections.abc import Iterable, Mapping

from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

TOPIC = re.compile(r"^[-_A-Za-z0-9]{1,64}$")
DOCS = "https://ntfy.sh/docs/publish/"


def ntfy_error(code: int, http: int, error: str, link: str = "") -> web.Response:
    body: dict = {"code": code, "http": http, "error": error}
    if link:
        body["link"] = link
    return web.json_response(body, status=http)


class NtfyEmulator(Emulator):
    name = "ntfy"
    routes = [("POST", "/", "publish"), ("PUT", "/", "publish")]

    def __init__(
        self,
        *,
        tokens: Iterable[str] = (),
        users: Mapping[str, str] | None = None,
        protected: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.tokens = set(tokens)
        self.users = dict(users or {})
        self.protected = set(protected)
        self.published: list[dict] = []

    @staticmethod
    def refuse(call: Call, problem: str, response: web.Response) -> web.Response:
        call.problems.append(problem)
        return response

    def _identity(self, call: Call) -> str | None | bool:
        """The authenticated user (token holders are "token"), None when anonymous, False when
        the credentials are wrong."""
        auth = call.headers.get("authorization", "")
        if not auth:
            return None
        if auth.startswith("Bearer "):
            return "token" if auth[7:] in self.tokens else False
        if auth.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return False
            return user if self.users.get(user) == password and user else False
        return False

    async def publish(self, request: web.Request, call: Call) -> web.StreamResponse:
        who = self._identity(call)
        if who is False:
            return self.refuse(
                call, "wrong credentials", ntfy_error(40101, 401, "unauthorized", DOCS + "#authentication")
            )
        try:
            body = call.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return self.refuse(
                call, "not a JSON object", ntfy_error(40017, 400, "invalid request: request body must be message JSON")
            )
        topic = body.get("topic")
        if not isinstance(topic, str) or not TOPIC.match(topic):
            return self.refuse(call, "topic", ntfy_error(40009, 400, "invalid request: topic invalid"))
        if topic in self.protected and who is None:
            return self.refuse(call, "protected topic", ntfy_error(40301, 403, "forbidden", DOCS + "#authentication"))
        for name in ("message", "title", "click", "icon"):
            if name in body and not isinstance(body[name], str):
                return self.refuse(
                    call, name, ntfy_error(40017, 400, "invalid request: request body must be message JSON")
                )
        if "icon" in body and not body["icon"].startswith(("http://", "https://")):
            return self.refuse(call, "icon", ntfy_error(40021, 400, "invalid request: icon URL is invalid"))
        priority = body.get("priority", 3)
        if not isinstance(priority, int) or isinstance(priority, bool) or not 1 <= priority <= 5:
            return self.refuse(call, "priority", ntfy_error(40007, 400, "invalid priority parameter"))
        tags = body.get("tags", [])
        if not isinstance(tags, list) or any(not isinstance(t, str) for t in tags):
            return self.refuse(
                call, "tags", ntfy_error(40017, 400, "invalid request: request body must be message JSON")
            )
        if not isinstance(body.get("markdown", False), bool):
            return self.refuse(
                call, "markdown", ntfy_error(40017, 400, "invalid request: request body must be message JSON")
            )
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        now = int(time.time())
        published = {
            "id": "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(12)),
            "time": now,
            "expires": now + 43200,
            "event": "message",
            "topic": topic,
            "message": body.get("message", "triggered"),
        }
        for name in ("title", "tags", "click", "icon"):
            if body.get(name):
                published[name] = body[name]
        if "priority" in body:
            published["priority"] = priority
        if body.get("markdown"):
            published["content_type"] = "text/markdown"
        self.published.append(published)
        return web.json_response(published)

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        if kind == "rate_limited":
            return ntfy_error(42901, 429, "limit reached: too many requests, please be nice", DOCS + "#limitations")
        if kind == "quota":
            return ntfy_error(42908, 429, "limit reached: too many messages", DOCS + "#limitations")
        if kind == "auth":
            return ntfy_error(40101, 401, "unauthorized", DOCS + "#authentication")
        if kind == "invalid_recipient":
            return ntfy_error(40010, 400, "invalid request: topic name is disallowed")
        return ntfy_error(50001, 500, "internal server error")
