"""PushDeer's ``/message/push`` (README "推送消息", doc/api/PushDeerOS.md, and the Laravel API:
PushDeerMessageController::push, Helpers.php, RouteServiceProvider.php).

Parameters from the query, a form or JSON: ``pushkey`` and ``text`` required strings (else, as
Laravel validation through the app's handler, HTTP 200 ``{"code": 80501, "error": "The text
field is required."}``), ``desp``/``type`` optional strings, ``type`` one of text/markdown/image.
Keys (comma-separated) are looked up: an unknown key reaches no device (``{"code": 0, "content":
{"result": false}}``, the controller's answer when no key matched), a key whose owner's account
is disabled answers 80501 "此账号已被停用", a key with devices answers one gorush-style result per
device (``"{\\"counts\\":1,\\"logs\\":[],\\"success\\":\\"ok\\"}"``). There is no signature: the key is
the credential; ``verified`` means the request passed every check.

Injected failures: invalid_recipient -> 80501 "没有可用的设备，请先注册" (no device registered);
auth -> 80403 (the AUTH error code); rate_limited and quota -> HTTP 429 "Too Many Attempts." with
``Retry-After: 60`` (Laravel's per-minute throttle; PushDeer has no quota); server_error -> HTTP
500 ``{"message": "Server Error"}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl

from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

DEVICE_RESULT = json.dumps({"counts": 1, "logs": [], "success": "ok"}, separators=(",", ":"))


def error(code: int, text: str) -> web.Response:
    return web.json_response({"code": code, "error": text})  # HTTP 200, as send_error() answers


class PushDeerEmulator(Emulator):
    name = "pushdeer"
    routes = [("POST", "/message/push", "push"), ("GET", "/message/push", "push")]

    def __init__(self, *, keys: Mapping[str, int], disabled: Iterable[str] = ()) -> None:
        super().__init__()
        self.keys = dict(keys)  # push key -> number of registered devices
        self.disabled = set(disabled)  # keys whose owner's account is disabled
        self.pushed: list[dict[str, str]] = []

    @staticmethod
    def refuse(call: Call, problem: str, response: web.Response) -> web.Response:
        call.problems.append(problem)
        return response

    def _params(self, call: Call) -> dict:
        params: dict = dict(call.query)
        content_type = call.headers.get("content-type", "")
        if content_type.startswith("application/x-www-form-urlencoded"):
            params.update(parse_qsl(call.body.decode()))
        elif content_type.startswith("application/json") and call.body:
            try:
                body = call.json()
            except ValueError:
                body = None
            if isinstance(body, dict):
                params.update(body)
        return params

    async def push(self, request: web.Request, call: Call) -> web.StreamResponse:
        params = self._params(call)
        for name in ("pushkey", "text"):
            if not isinstance(params.get(name), str) or not params[name]:
                return self.refuse(call, f"no {name}", error(80501, f"The {name} field is required."))
        for name in ("desp", "type"):
            if name in params and params[name] is not None and not isinstance(params[name], str):
                return self.refuse(call, name, error(80501, f"The {name} must be a string."))
        if params.get("type") not in (None, "text", "markdown", "image"):
            return self.refuse(call, "type", error(80501, "type is text, markdown or image"))
        keys = list(dict.fromkeys(params["pushkey"].split(",")))
        if any(key in self.disabled for key in keys):
            return self.refuse(call, "owner disabled", error(80501, "此账号已被停用"))
        known = [key for key in keys if key in self.keys]
        if not known:
            call.problems.append("unknown push key")
            return web.json_response({"code": 0, "content": {"result": False}})
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        self.pushed.append({k: v for k, v in params.items() if k in ("pushkey", "text", "desp", "type")})
        return web.json_response({"code": 0, "content": {"result": [DEVICE_RESULT] * sum(self.keys[k] for k in known)}})

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        if kind == "invalid_recipient":
            return error(80501, "没有可用的设备，请先注册")
        if kind == "auth":
            return error(80403, "auth failed")
        if kind in ("rate_limited", "quota"):
            headers = {"Retry-After": "60", "X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "0"}
            return web.json_response({"message": "Too Many Attempts."}, status=429, headers=headers)
        return web.json_response({"message": "Server Error"}, status=500)
