"""bark-server's push API (V2), as documented in docs/API_V2.md and implemented in route_push.go /
route_auth.go / router.go of Finb/bark-server:

``POST /push`` with a JSON body (``Content-Type: application/json``): ``device_key`` required (400
"device key is empty"), a registered key (400 "failed to get device token: ..."), string
``title``/``subtitle``/``body``/``markdown``/``group``/``sound``/``url``/``level``/``icon``, an
integer ``badge``. When the server has basic auth enabled (``username``/``password`` given to the
emulator), missing or wrong credentials answer 418 "I'm a teapot" (plain text), as bark-server
does. Answers: ``{"code", "message", "timestamp"}`` with ``code`` = the HTTP status; success
``{"code": 200, "message": "success", ...}``. There is no signature: ``verified`` means the
request passed every check (credentials included).

Injected failures: invalid_recipient -> 400 "failed to get device token"; auth -> 418; rate_limited
and quota -> 500 "push failed: APNS push failed: TooManyRequests" (bark-server itself neither
throttles nor has quotas: it passes on Apple's refusal); server_error -> 500 "push failed: APNS
push failed: ServiceUnavailable".
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable

from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

STRING_FIELDS = ("title", "subtitle", "body", "markdown", "group", "sound", "url", "level", "icon", "isArchive")


def answer(code: int, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message, "timestamp": int(time.time())}, status=code)


class BarkEmulator(Emulator):
    name = "bark"
    routes = [("POST", "/push", "push")]

    def __init__(self, *, device_keys: Iterable[str], username: str | None = None, password: str | None = None) -> None:
        super().__init__()
        self.device_keys = set(device_keys)
        self.username = username
        self.password = password
        self.pushed: list[dict] = []

    @staticmethod
    def refuse(call: Call, problem: str, response: web.Response) -> web.Response:
        call.problems.append(problem)
        return response

    def _authorized(self, call: Call) -> bool:
        if not (self.username and self.password):
            return True
        auth = call.headers.get("authorization", "")
        if not auth.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        except ValueError:
            return False
        return (user, password) == (self.username, self.password)

    async def push(self, request: web.Request, call: Call) -> web.StreamResponse:
        if not self._authorized(call):
            return self.refuse(call, "basic auth", web.Response(status=418, text="I'm a teapot"))
        if not call.headers.get("content-type", "").startswith("application/json"):
            return self.refuse(call, "not JSON", answer(400, "request bind failed: unsupported content type"))
        try:
            body = call.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return self.refuse(call, "not a JSON object", answer(400, "request bind failed: invalid JSON"))
        key = body.get("device_key")
        if not key:
            return self.refuse(call, "no device_key", answer(400, "device key is empty"))
        if key not in self.device_keys:
            text = f"failed to get device token: failed to get [{key}] device token from database"
            return self.refuse(call, "unknown device key", answer(400, text))
        for name in STRING_FIELDS:
            if name in body and not isinstance(body[name], str):
                return self.refuse(call, f"{name} is not a string", answer(400, f"request bind failed: {name}"))
        if "badge" in body and not isinstance(body["badge"], int):
            return self.refuse(call, "badge is not an integer", answer(400, "request bind failed: badge"))
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        self.pushed.append(body)
        return answer(200, "success")

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        if kind == "invalid_recipient":
            key = call.json().get("device_key")
            return answer(400, f"failed to get device token: failed to get [{key}] device token from database")
        if kind == "auth":
            return web.Response(status=418, text="I'm a teapot")
        if kind in ("rate_limited", "quota"):
            return answer(500, "push failed: APNS push failed: TooManyRequests")
        return answer(500, "push failed: APNS push failed: ServiceUnavailable")
