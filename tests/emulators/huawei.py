"""Huawei Cloud Message & SMS ``batchSendSms`` v1 with X-WSSE authentication, as documented:

- https://support.huaweicloud.com/api-msgsms/sms_05_0001.html (发送短信: headers, body, answer)
- https://support.huaweicloud.com/api-msgsms/sms_05_0050.html (error codes)

``POST /sms/batchSendSms/v1``, ``Content-Type: application/x-www-form-urlencoded``,
``Authorization: WSSE realm="SDP",profile="UsernameToken",type="Appkey"`` and
``X-WSSE: UsernameToken Username="app_key",PasswordDigest="...",Nonce="...",Created="..."``
with ``PasswordDigest = Base64(SHA256(Nonce + Created + app_secret))``; ``Created`` may be at
most 24 hours from now. Huawei's own samples differ in what they Base64-encode (the Java
sample the raw digest, the Python/PHP samples its hex string) and both work against the real
service, so both are accepted here. Answers ``{"code", "description", "result": [{"originTo",
"createTime", "from", "smsMsgId", "status"}]}``; per-number failures are ``E000510`` with the
reason in ``status``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
import time
from datetime import UTC, datetime
from urllib.parse import parse_qsl

from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

CREATED_WINDOW_S = 24 * 3600
_AUTH_PARTS = re.compile(r'(\w+)="([^"]*)"')
_NUMBER = re.compile(r"\+[1-9]\d{6,19}")
_NONCE = re.compile(r"[0-9A-Za-z]{1,128}")


class HuaweiSmsEmulator(Emulator):
    name = "huawei"
    routes = [("POST", "/sms/batchSendSms/v1", "batch_send_sms")]

    def __init__(
        self,
        app_key: str = "c8RWg3ggEcydHeraldTestKey",
        app_secret: str = "herald-test-app-secret",
        *,
        sender: str = "8824110605000",
        templates: set[str] | None = None,
    ) -> None:
        super().__init__()
        self.app_key = app_key
        self.app_secret = app_secret
        self.sender = sender
        self.templates = templates
        self._ids = itertools.count(1)

    # --- answers ----------------------------------------------------------------------------

    @staticmethod
    def _answer(code: str, description: str, status: int, result: list | None = None) -> web.Response:
        body: dict = {"code": code, "description": description}
        if result is not None:
            body["result"] = result
        return web.json_response(body, status=status)

    def _reject(self, call: Call, code: str, description: str, status: int) -> web.Response:
        call.problems.append(f"{code}: {description}")
        return self._answer(code, description, status)

    def _result(self, form: dict[str, str], status: str) -> list[dict]:
        return [
            {
                "originTo": number,
                "createTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "from": form.get("from", ""),
                "smsMsgId": f"4b4b34e7-1a9e-42ac-b309-d10997148905_{85496075 + next(self._ids)}",
                "status": status,
                "countryId": "CN" if number.startswith("+86") else "",
                "total": 1 if status == "000000" else 0,
            }
            for number in form.get("to", "").split(",")
        ]

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        form = dict(parse_qsl(call.body.decode()))
        failed = "The SMS fails to be sent. For details, see status."
        if kind == "rate_limited":
            return self._answer("E000510", failed, 200, self._result(form, "E200015"))
        if kind == "invalid_recipient":
            return self._answer("E000510", failed, 200, self._result(form, "E200023"))
        if kind == "auth":
            return self._answer("E000101", "Authentication failed.", 401)
        if kind == "quota":
            return self._answer("E000623", "SP send quantity exceeds the limit.", 403)
        return self._answer("E000000", "System error.", 500)

    # --- the endpoint -----------------------------------------------------------------------

    def _digest_ok(self, nonce: str, created: str, digest: str) -> bool:
        raw = hashlib.sha256(f"{nonce}{created}{self.app_secret}".encode()).digest()
        accepted = (base64.b64encode(raw).decode(), base64.b64encode(raw.hex().encode()).decode())
        return any(hmac.compare_digest(digest, a) for a in accepted)

    async def batch_send_sms(self, request: web.Request, call: Call) -> web.StreamResponse:
        h = call.headers
        if not h.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return self._reject(call, "E000040", "ContentType should be application/x-www-form-urlencoded.", 400)
        authz = h.get("authorization")
        if not authz:
            return self._reject(call, "E000001", "Authorization not contained in the HTTP header.", 401)
        if not authz.startswith("WSSE "):
            return self._reject(call, "E000008", "WSSE not contained in Authorization.", 401)
        parts = dict(_AUTH_PARTS.findall(authz))
        for key, code in (("realm", "E000002"), ("profile", "E000003"), ("type", "E000007")):
            if key not in parts:
                return self._reject(call, code, f"{key} not contained in Authorization.", 401)
        if parts["realm"] != "SDP":
            return self._reject(call, "E000004", "The value of realm in Authorization must be SDP.", 401)
        if parts["profile"] != "UsernameToken":
            return self._reject(call, "E000005", "The value of profile in Authorization must be UsernameToken.", 401)
        if parts["type"] != "Appkey":
            return self._reject(call, "E000006", "The value of type in Authorization must be app_key.", 401)
        wsse = h.get("x-wsse")
        if not wsse:
            return self._reject(call, "E000020", "X-WSSE not contained in the HTTP header.", 401)
        if not wsse.startswith("UsernameToken "):
            return self._reject(call, "E000101", "Authentication failed.", 401)
        token = dict(_AUTH_PARTS.findall(wsse))
        for key, code in (("Username", "E000021"), ("Nonce", "E000022"), ("Created", "E000023"),
                          ("PasswordDigest", "E000024")):  # fmt: skip
            if not token.get(key):
                return self._reject(call, code, f"{key} not contained in X-WSSE.", 401)
        if token["Username"] != self.app_key:
            return self._reject(call, "E000102", "Invalid app_key.", 401)
        if not _NONCE.fullmatch(token["Nonce"]):
            return self._reject(call, "E000101", "Authentication failed.", 401)
        try:
            stamp = datetime.strptime(token["Created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
        except ValueError:
            return self._reject(call, "E000101", "Authentication failed.", 401)
        if abs(time.time() - stamp) > CREATED_WINDOW_S:
            return self._reject(call, "E000110", "Time out limit.", 401)
        if not self._digest_ok(token["Nonce"], token["Created"], token["PasswordDigest"]):
            return self._reject(call, "E000101", "Authentication failed.", 401)

        try:
            form = dict(parse_qsl(call.body.decode(), keep_blank_values=True, strict_parsing=True))
        except (UnicodeDecodeError, ValueError):
            return self._reject(call, "E000000", "System error.", 400)
        for key in ("from", "to", "templateId"):
            if not form.get(key):
                return self._reject(call, "E000503", f"Incorrect parameter format: {key} is missing.", 400)
        numbers = form["to"].split(",")
        if len(numbers) > 500 or not all(_NUMBER.fullmatch(n) for n in numbers):
            return self._reject(call, "E000503", "Incorrect parameter format: to.", 400)
        if not 1 <= len(form["templateId"]) <= 32:
            return self._reject(call, "E000503", "Incorrect parameter format: templateId.", 400)
        if "templateParas" in form:
            try:
                paras = json.loads(form["templateParas"])
            except ValueError:
                paras = None
            if not isinstance(paras, list) or not all(isinstance(p, str) and p for p in paras):
                return self._reject(call, "E000000", "System error.", 400)

        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        if form["from"] != self.sender:
            return self._answer("E000510", "The SMS fails to be sent. For details, see status.", 200,
                                self._result(form, "E200018"))  # fmt: skip
        if self.templates is not None and form["templateId"] not in self.templates:
            return self._answer("E000510", "The SMS fails to be sent. For details, see status.", 200,
                                self._result(form, "E200030"))  # fmt: skip
        return self._answer("000000", "Success", 200, self._result(form, "000000"))
