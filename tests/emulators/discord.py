"""Discord's Execute Webhook (https://discord.com/developers/docs/resources/webhook#execute-webhook):
``POST /api/webhooks/{id}/{token}``; the webhook id must exist (404 Unknown Webhook 10015) and
the token match (401 Invalid Webhook Token 50027); the body must carry content or embeds (400
50006) within the documented limits (content 2000, embed title 256, description 4096, 25
fields of name 256 / value 1024, 10 embeds, 6000 characters in all embeds; username 1-80
without "discord"/"clyde") or Discord answers 400 50035 Invalid Form Body; a ``thread_id`` must
be a thread of the channel (Unknown Channel 10003). With ``?wait=true`` the answer is the
message object, else 204. Every answer carries the X-RateLimit-* headers; 429 answers carry
``retry_after`` in seconds (float) in the body and Retry-After."""

from __future__ import annotations

import time

from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

CHANNEL_ID = "1150000000000000001"


class DiscordWebhookApi(Emulator):
    name = "discord"
    routes = [("POST", "/api/webhooks/{webhook_id}/{token}", "execute")]

    def __init__(self, webhook_id: str = "1234567890123456789", token: str = "tok-abcDEF_123") -> None:
        super().__init__()
        self.webhook_id = webhook_id
        self.token = token
        self.threads = {"1160000000000000002"}
        self.messages: list[dict] = []
        self._next = 1300000000000000000

    @property
    def webhook_url(self) -> str:
        return f"{self.url}/api/webhooks/{self.webhook_id}/{self.token}"

    def _headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": "4",
            "X-RateLimit-Reset": f"{time.time() + 2:.3f}",
            "X-RateLimit-Reset-After": "2.000",
            "X-RateLimit-Bucket": "a06de4a2b1ebc5d4e5f6a7b8c9d0e1f2",
        }

    def _error(self, call: Call, problem: str, status: int, code: int, message: str, **extra) -> web.StreamResponse:
        call.problems.append(problem)
        return web.json_response({"message": message, "code": code, **extra}, status=status, headers=self._headers())

    async def execute(self, request: web.Request, call: Call) -> web.StreamResponse:
        if request.match_info["webhook_id"] != self.webhook_id:
            return self._error(call, "unknown webhook", 404, 10015, "Unknown Webhook")
        if request.match_info["token"] != self.token:
            return self._error(call, "bad token", 401, 50027, "Invalid Webhook Token")
        if call.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return self._error(call, "not JSON", 400, 50006, "Cannot send an empty message")
        try:
            body = call.json()
        except ValueError:
            return self._error(call, "bad JSON", 400, 50109, "The request body contains invalid JSON.")
        errors = _form_errors(body)
        if errors:
            return self._error(call, f"form: {errors}", 400, 50035, "Invalid Form Body", errors=errors)
        if not body.get("content") and not body.get("embeds"):
            return self._error(call, "empty", 400, 50006, "Cannot send an empty message")
        thread_id = call.query.get("thread_id")
        if thread_id is not None and thread_id not in self.threads:
            return self._error(call, "unknown thread", 404, 10003, "Unknown Channel")
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        self._next += 1
        created = {
            "id": str(self._next),
            "type": 0,
            "content": body.get("content", ""),
            "channel_id": thread_id or CHANNEL_ID,
            "author": {"id": self.webhook_id, "username": body.get("username", "Captain Hook"), "bot": True},
            "embeds": body.get("embeds", []),
            "mentions": [],
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime()),
            "webhook_id": self.webhook_id,
        }
        self.messages.append(created)
        if call.query.get("wait") == "true":
            return web.json_response(created, headers=self._headers())
        return web.Response(status=204, headers=self._headers())

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        headers = self._headers()
        if kind in ("rate_limited", "quota"):  # Discord has no quota; "quota" is the global limit
            glob = kind == "quota"
            headers.update({"Retry-After": "3", "X-RateLimit-Remaining": "0",
                            "X-RateLimit-Scope": "global" if glob else "user"})  # fmt: skip
            if glob:
                headers["X-RateLimit-Global"] = "true"
            return web.json_response(
                {"message": "You are being rate limited.", "retry_after": 2.5, "global": glob},
                status=429,
                headers=headers,
            )
        if kind == "auth":
            return web.json_response({"message": "Invalid Webhook Token", "code": 50027}, status=401, headers=headers)
        if kind == "invalid_recipient":
            return web.json_response({"message": "Unknown Channel", "code": 10003}, status=404, headers=headers)
        return web.json_response({"message": "500: Internal Server Error", "code": 0}, status=500)


def _form_errors(body: object) -> dict:
    """Discord's nested ``errors`` object for the limits a body breaks (empty when none)."""
    if not isinstance(body, dict):
        return {"_errors": [{"code": "DICT_TYPE_CONVERT", "message": "Only dictionaries may be used in a DictType"}]}
    errors: dict = {}

    def too_long(path: list, limit: int) -> None:
        node = errors
        for key in path:
            node = node.setdefault(str(key), {})
        node["_errors"] = [{"code": "BASE_TYPE_MAX_LENGTH", "message": f"Must be {limit} or fewer in length."}]

    content = body.get("content")
    if content is not None and (not isinstance(content, str) or len(content) > 2000):
        too_long(["content"], 2000)
    username = body.get("username")
    if username is not None and (not isinstance(username, str) or not 1 <= len(username) <= 80
                                 or "discord" in username.lower() or "clyde" in username.lower()):  # fmt: skip
        too_long(["username"], 80)
    embeds = body.get("embeds") or []
    if not isinstance(embeds, list) or len(embeds) > 10:
        too_long(["embeds"], 10)
        return errors
    total = 0
    for i, embed in enumerate(embeds):
        for key, limit in (("title", 256), ("description", 4096)):
            value = embed.get(key)
            if value is not None:
                total += len(value)
                if len(value) > limit:
                    too_long(["embeds", i, key], limit)
        if "color" in embed and not (isinstance(embed["color"], int) and 0 <= embed["color"] <= 0xFFFFFF):
            too_long(["embeds", i, "color"], 0xFFFFFF)
        if "url" in embed and not str(embed["url"]).startswith(("http://", "https://")):
            errors.setdefault("embeds", {}).setdefault(str(i), {})["url"] = {
                "_errors": [{"code": "URL_TYPE_INVALID_URL", "message": "Not a well formed URL."}]
            }
        fields = embed.get("fields") or []
        if len(fields) > 25:
            too_long(["embeds", i, "fields"], 25)
        for j, field in enumerate(fields):
            name, value = field.get("name"), field.get("value")
            if not name or len(name) > 256:
                too_long(["embeds", i, "fields", j, "name"], 256)
            if not value or len(value) > 1024:
                too_long(["embeds", i, "fields", j, "value"], 1024)
            total += len(name or "") + len(value or "")
    if total > 6000:
        too_long(["embeds"], 6000)
    return errors
