"""flomo's record API: ``POST /iwh/<id>/<token>/`` with ``{"content": "..."}``.

flomo documents the request and the success answer (HTTP 200, ``code`` 0 and the memo) but no
error codes: every refusal is HTTP 200 with ``code`` -1 and a human message. The messages used
here (invalid URL / not PRO, the daily API limit, too frequent, no such user) are this
emulation's stand-ins for those answers; the plugin classifies them by their wording. The
account's daily limit is enforced (``daily_limit``, 100 by default) so the quota path is real.
"""

from __future__ import annotations

import base64
import re
import time

from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

INVALID_URL = "API 链接无效，请到设置页重新获取（记录 API 仅限 PRO 会员使用）"
DAILY_LIMIT = "今日 API 记录次数已达上限"
TOO_FREQUENT = "操作太频繁，请稍后再试"
NO_USER = "用户不存在"
TOO_LONG = "内容超过 5000 字"


class FlomoApi(Emulator):
    name = "flomo"
    routes = [("POST", "/iwh/{user}/{token}/", "record"), ("POST", "/iwh/{user}/{token}", "record")]

    def __init__(self, user: str = "MTIzNDU", token: str = "0123456789abcdef0123456789abcdef", daily_limit: int = 100):
        super().__init__()
        self.user = user
        self.token = token
        self.daily_limit = daily_limit
        self.memos: list[dict] = []

    @property
    def api_url(self) -> str:
        return f"{self.url}/iwh/{self.user}/{self.token}/"

    async def record(self, request: web.Request, call: Call) -> web.StreamResponse:
        if request.match_info["user"] != self.user or request.match_info["token"] != self.token:
            return self.reject(call, "unknown record URL", 200, {"code": -1, "message": INVALID_URL})
        if call.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return self.reject(call, "not JSON", 200, {"code": -1, "message": "内容不能为空"})
        try:
            body = call.json()
        except ValueError:
            return self.reject(call, "bad JSON", 200, {"code": -1, "message": "内容不能为空"})
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, str) or not content.strip():
            return self.reject(call, "no content", 200, {"code": -1, "message": "内容不能为空"})
        if len(content) > 5000:  # flomo's documented length limit of a memo (5000 characters)
            return self.reject(call, "too long", 200, {"code": -1, "message": TOO_LONG})
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        if len(self.memos) >= self.daily_limit:
            return web.json_response({"code": -1, "message": DAILY_LIMIT})
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        memo = {
            "creator_id": 12345,
            "source": "incoming_webhook",
            "content": "".join(f"<p>{line}</p>" for line in content.split("\n")),
            "tags": re.findall(r"(?<![^\s])#([^\s#]+)", content),
            "updated_at": now,
            "created_at": now,
            "linked_count": 0,
            "slug": base64.b64encode(str(100000 + len(self.memos)).encode()).decode().rstrip("="),
        }
        self.memos.append(memo)
        return web.json_response({"code": 0, "message": "已记录", "memo": memo})

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        if kind == "rate_limited":
            return web.json_response({"code": -1, "message": TOO_FREQUENT})
        if kind == "quota":
            return web.json_response({"code": -1, "message": DAILY_LIMIT})
        if kind == "auth":
            return web.json_response({"code": -1, "message": INVALID_URL})
        if kind == "invalid_recipient":
            return web.json_response({"code": -1, "message": NO_USER})
        return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
