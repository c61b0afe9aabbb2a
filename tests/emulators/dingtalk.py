"""DingTalk custom robot webhook, as its documentation describes it
(https://open.dingtalk.com/document/robots/custom-robot-access,
https://open.dingtalk.com/document/robots/customize-robot-security-settings,
https://open.dingtalk.com/document/robots/message-types-and-data-format).

``POST /robot/send?access_token=...`` (+ ``&timestamp=<ms>&sign=<urlencoded base64>`` when the
robot signs), JSON body, UTF-8. Answers HTTP 200 with ``{"errcode": ..., "errmsg": ...}``.
Checks, in order: the token (300001), the signature: timestamp within an hour and ``sign`` =
base64 HMAC-SHA256 keyed by the secret over ``timestamp\\nsecret`` (310000), the body (size
at most 20000 bytes: 460101; message type: 400105; required fields: 40035), the keywords
(310000). The signature is re-implemented here from the documentation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind
from tests.emulators.base import texts as texts_of

OK = {"errcode": 0, "errmsg": "ok"}
TOKEN = {"errcode": 300001, "errmsg": "description: robot 不存在；solution:请确认 token 是否正确；"}
SIGN = {"errcode": 310000, "errmsg": "sign not match, more: [https://ding-doc.dingtalk.com/doc#/serverapi2/qf2nxq]"}
TIMESTAMP = {"errcode": 310000, "errmsg": "invalid timestamp"}
KEYWORDS = {"errcode": 310000, "errmsg": "keywords not in content"}
TOO_FAST = {"errcode": 130101, "errmsg": "send too fast, exceed 20 times per minute"}
DISBANDED = {"errcode": 400013, "errmsg": "群已被解散"}
BUSY = {"errcode": -1, "errmsg": "系统繁忙"}
UNSUPPORTED = {"errcode": 400105, "errmsg": "不支持的消息类型"}
SIZE = {"errcode": 460101, "errmsg": "description: body 大小不合法;solution:请保持大小在 20000bytes 以内;"}

REQUIRED = {
    "text": ("content",),
    "markdown": ("title", "text"),
    "link": ("title", "text", "messageUrl"),
    "actionCard": ("title", "text"),
    "feedCard": ("links",),
}


def _str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def body_problems(body: Any) -> tuple[list[str], dict[str, Any]]:
    """Why the robot refuses this body and with which answer (no problems: it is valid)."""
    if not isinstance(body, dict):
        return ["the body is not a JSON object"], {"errcode": 40035, "errmsg": "缺少参数 json"}
    kind = body.get("msgtype")
    if kind not in REQUIRED:
        return [f"unknown msgtype {kind!r}"], UNSUPPORTED
    part = body.get(kind)
    missing = [f"{kind}.{f}" for f in REQUIRED[kind] if not isinstance(part, dict) or not part.get(f)]
    if kind == "actionCard" and isinstance(part, dict) and not missing:
        single = _str(part.get("singleTitle")) and _str(part.get("singleURL"))
        buttons = isinstance(part.get("btns"), list) and all(
            isinstance(b, dict) and _str(b.get("title")) and _str(b.get("actionURL")) for b in part["btns"]
        )
        if not (single or buttons):
            missing.append("actionCard.singleTitle/singleURL or actionCard.btns")
    at = body.get("at")
    if at is not None:
        ok = isinstance(at, dict) and all(
            isinstance(at.get(k, []), list) and all(_str(v) for v in at.get(k, [])) for k in ("atMobiles", "atUserIds")
        )
        if not ok or not isinstance(at.get("isAtAll", False), bool):
            missing.append("at")
    if missing:
        return [f"missing or invalid {m}" for m in missing], {"errcode": 40035, "errmsg": f"缺少参数 {missing[0]}"}
    return [], OK


# What the keyword filter does not read.
_NOT_TEXT = frozenset({"messageUrl", "singleURL", "actionURL", "picURL", "msgtype"})


class DingTalkEmulator(Emulator):
    name = "dingtalk"
    routes = [("*", "/robot/send", "send")]

    def __init__(
        self,
        access_token: str = "5b1e0c7d2a9f4e38b6c1d0a7e9f3b2c4d5a6e7f8091a2b3c4d5e6f708192a3b4",
        *,
        secret: str | None = None,
        keywords: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.access_token = access_token
        self.secret = secret
        self.keywords = tuple(keywords)
        self.clock = clock

    @property
    def endpoint(self) -> str:
        return f"{self.url}/robot/send"

    @property
    def webhook_url(self) -> str:
        return f"{self.endpoint}?access_token={self.access_token}"

    def expected_sign(self, timestamp: str) -> str:
        assert self.secret is not None
        mac = hmac.new(self.secret.encode(), digestmod=hashlib.sha256)
        mac.update(f"{timestamp}\n{self.secret}".encode())
        return base64.b64encode(mac.digest()).decode()

    async def send(self, request: web.Request, call: Call) -> web.StreamResponse:
        if call.method != "POST":
            return self.reject(call, f"method {call.method}", 200, {"errcode": 43004, "errmsg": "需要POST请求"})
        if not hmac.compare_digest(call.query.get("access_token", ""), self.access_token):
            return self.reject(call, "unknown access_token", 200, TOKEN)
        if self.secret is not None:
            timestamp, sign = call.query.get("timestamp", ""), call.query.get("sign", "")  # sign: URL-decoded
            if not timestamp.isdigit():
                return self.reject(call, "no timestamp", 200, SIGN)
            if abs(self.clock() * 1000 - int(timestamp)) > 3600 * 1000:
                return self.reject(call, "timestamp is not within one hour", 200, TIMESTAMP)
            if not hmac.compare_digest(sign, self.expected_sign(timestamp)):
                return self.reject(call, "sign mismatch", 200, SIGN)
        if not call.headers.get("content-type", "").startswith("application/json"):
            return self.reject(
                call, "content type is not application/json", 200, {"errcode": 40035, "errmsg": "缺少参数 json"}
            )
        if len(call.body) > 20_000:
            return self.reject(call, "body over 20000 bytes", 200, SIZE)
        try:
            body = call.json()
        except orjson.JSONDecodeError:
            return self.reject(call, "the body is not JSON", 200, {"errcode": 40035, "errmsg": "缺少参数 json"})
        problems, answer = body_problems(body)
        if problems:
            call.problems.extend(problems)
            return web.json_response(answer)
        if self.keywords:
            texts = " ".join(texts_of(body, _NOT_TEXT))
            if not any(k in texts for k in self.keywords):
                return self.reject(call, "no keyword", 200, KEYWORDS)
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        return web.json_response(OK)

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        # A custom robot has no quota of its own: "quota" is answered as the send-rate limit.
        answer = {
            "rate_limited": TOO_FAST,
            "quota": TOO_FAST,
            "auth": SIGN,
            "invalid_recipient": DISBANDED,
            "server_error": BUSY,
        }[kind]
        return web.json_response(answer)
