"""Feishu / Lark custom bot webhook, as the custom bot guide documents it
(https://open.feishu.cn/document/client-docs/bot-v3/add-custom-bot).

``POST /open-apis/bot/v2/hook/<token>`` with a JSON body; checks, in the service's order: the
token (19001), the signature when the bot has one (``timestamp`` within an hour and ``sign``
= base64 HMAC-SHA256 of an empty message keyed by ``timestamp\\nsecret``: 19021), the body
(``msg_type`` and its content, 20 KB at most: 9499 Bad Request), the keywords when the bot
has some (19024). The signature is re-implemented here from the guide, independently of the
plugin.
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

SUCCESS = {"StatusCode": 0, "StatusMessage": "success", "code": 0, "data": {}, "msg": "success"}
BAD_REQUEST = {"code": 9499, "msg": "Bad Request", "data": {}}
TOKEN_INVALID = {"code": 19001, "data": {}, "msg": "param invalid: incoming webhook access token invalid"}
SIGN_FAILED = {"code": 19021, "msg": "sign match fail or timestamp is not within one hour from current time"}
KEYWORDS = {"code": 19024, "msg": "Key Words Not Found"}
FREQUENCY = {"code": 11232, "data": {}, "msg": "frequency limited psm[lark.oapi.app_platform_runtime]appID[1500]"}
NOT_ENABLED = {"code": 19007, "msg": "Bot Not Enabled"}

POST_TAGS = {"text", "a", "at", "img", "media", "emotion", "hr", "code_block", "md"}
CARD_TAGS = {"div", "markdown", "hr", "img", "note", "action", "column_set", "button"}
TEMPLATES = {
    "blue", "wathet", "turquoise", "green", "yellow", "orange", "red",
    "carmine", "violet", "purple", "indigo", "grey", "default",
}  # fmt: skip


def _str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _post_problems(post: Any) -> list[str]:
    if not isinstance(post, dict) or not post:
        return ["content.post must be an object"]
    langs = [k for k in post if k in ("zh_cn", "en_us", "ja_jp")]
    if not langs:
        return ["content.post needs zh_cn or en_us"]
    problems = []
    for lang in langs:
        block = post[lang]
        if not isinstance(block, dict) or not isinstance(block.get("content"), list):
            problems.append(f"post.{lang}.content must be a list of paragraphs")
            continue
        if "title" in block and not isinstance(block["title"], str):
            problems.append(f"post.{lang}.title must be a string")
        for paragraph in block["content"]:
            if not isinstance(paragraph, list):
                problems.append("a paragraph must be a list of nodes")
                continue
            for node in paragraph:
                tag = node.get("tag") if isinstance(node, dict) else None
                if tag not in POST_TAGS:
                    problems.append(f"unknown rich text tag {tag!r}")
                elif tag == "text" and not isinstance(node.get("text"), str):
                    problems.append("a text node needs text")
                elif tag == "a" and not (_str(node.get("text")) and _str(node.get("href"))):
                    problems.append("an a node needs text and href")
                elif tag == "at" and not _str(node.get("user_id")):
                    problems.append("an at node needs user_id")
    return problems


def _card_problems(card: Any) -> list[str]:
    if not isinstance(card, dict):
        return ["card must be an object"]
    problems = []
    header = card.get("header")
    if header is not None:
        title = header.get("title") if isinstance(header, dict) else None
        if not (
            isinstance(title, dict) and title.get("tag") in ("plain_text", "lark_md") and _str(title.get("content"))
        ):
            problems.append("header.title needs tag and content")
        if isinstance(header, dict) and "template" in header and header["template"] not in TEMPLATES:
            problems.append(f"unknown header template {header['template']!r}")
    elements = card.get("elements")
    if elements is None and isinstance(card.get("body"), dict):  # card JSON 2.0
        elements = card["body"].get("elements")
    if not isinstance(elements, list) or not elements:
        return [*problems, "the card has no elements"]
    for element in elements:
        tag = element.get("tag") if isinstance(element, dict) else None
        if tag not in CARD_TAGS:
            problems.append(f"unknown card element {tag!r}")
        elif tag == "markdown" and not _str(element.get("content")):
            problems.append("a markdown element needs content")
        elif tag == "div":
            fields = element.get("fields")
            if "text" not in element and not isinstance(fields, list):
                problems.append("a div needs text or fields")
            for field in fields or []:
                text = field.get("text") if isinstance(field, dict) else None
                if not (
                    isinstance(text, dict)
                    and text.get("tag") in ("plain_text", "lark_md")
                    and _str(text.get("content"))
                ):
                    problems.append("a div field needs text.tag and text.content")
        elif tag == "action":
            actions = element.get("actions")
            if not isinstance(actions, list) or not actions:
                problems.append("an action element needs actions")
            for button in actions or []:
                text = button.get("text") if isinstance(button, dict) else None
                if not (isinstance(button, dict) and button.get("tag") == "button" and isinstance(text, dict)):
                    problems.append("an action needs buttons with text")
                elif not (_str(button.get("url")) or button.get("multi_url") or button.get("behaviors")):
                    problems.append("a custom bot's button can only open a URL")
    return problems


def body_problems(body: Any) -> list[str]:
    """Why the webhook would answer 9499 Bad Request to this body (empty: it is valid)."""
    if not isinstance(body, dict):
        return ["the body is not a JSON object"]
    kind = body.get("msg_type")
    content = body.get("content")
    if kind == "text":
        if not (isinstance(content, dict) and _str(content.get("text"))):
            return ["content.text is required"]
        return []
    if kind == "post":
        return _post_problems(content.get("post") if isinstance(content, dict) else None)
    if kind == "interactive":
        return _card_problems(body.get("card"))
    if kind == "image":
        return [] if isinstance(content, dict) and _str(content.get("image_key")) else ["content.image_key is required"]
    if kind == "share_chat":
        return [] if isinstance(content, dict) and _str(content.get("share_chat_id")) else ["share_chat_id required"]
    return [f"unknown msg_type {kind!r}"]


# What the keyword filter does not read.
_NOT_TEXT = frozenset({"href", "url", "user_id", "tag", "sign", "timestamp", "msg_type", "template"})


class FeishuEmulator(Emulator):
    name = "feishu"
    routes = [("*", "/open-apis/bot/v2/hook/{token}", "hook")]

    def __init__(
        self,
        token: str = "0f3c9a4e-6b1d-4c2a-9e57-8d2b41f6a0c3",
        *,
        secret: str | None = None,
        keywords: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.token = token
        self.secret = secret
        self.keywords = tuple(keywords)
        self.clock = clock

    @property
    def webhook_url(self) -> str:
        return f"{self.url}/open-apis/bot/v2/hook/{self.token}"

    def expected_sign(self, timestamp: str) -> str:
        assert self.secret is not None
        mac = hmac.new(f"{timestamp}\n{self.secret}".encode(), digestmod=hashlib.sha256)
        return base64.b64encode(mac.digest()).decode()

    async def hook(self, request: web.Request, call: Call) -> web.StreamResponse:
        if call.method != "POST":
            return self.reject(call, f"method {call.method}", 405, BAD_REQUEST)
        if not hmac.compare_digest(request.match_info["token"], self.token):
            return self.reject(call, "unknown webhook token", 200, TOKEN_INVALID)
        if not call.headers.get("content-type", "").startswith("application/json"):
            return self.reject(call, "content type is not application/json", 400, BAD_REQUEST)
        try:
            body = call.json()
        except orjson.JSONDecodeError:
            return self.reject(call, "the body is not JSON", 400, BAD_REQUEST)
        if self.secret is not None:
            timestamp, sign = (body.get("timestamp"), body.get("sign")) if isinstance(body, dict) else (None, None)
            if not (isinstance(timestamp, str | int) and isinstance(sign, str)):
                return self.reject(call, "timestamp and sign are required", 200, SIGN_FAILED)
            try:
                seconds = int(timestamp)
            except ValueError:
                return self.reject(call, "timestamp is not a number", 200, SIGN_FAILED)
            if abs(self.clock() - seconds) > 3600:
                return self.reject(call, "timestamp is not within one hour", 200, SIGN_FAILED)
            if not hmac.compare_digest(sign, self.expected_sign(str(timestamp))):
                return self.reject(call, "sign mismatch", 200, SIGN_FAILED)
        if len(call.body) > 20 * 1024:
            return self.reject(call, "body over 20 KB", 400, BAD_REQUEST)
        problems = body_problems(body)
        if problems:
            call.problems.extend(problems)
            return web.json_response(BAD_REQUEST, status=400)
        if self.keywords:
            texts = " ".join(texts_of(body, _NOT_TEXT))
            if not any(k in texts for k in self.keywords):
                return self.reject(call, "no keyword", 200, KEYWORDS)
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        return web.json_response(SUCCESS)

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        # The bot has no quota of its own: "quota" is answered as the frequency limit.
        if kind in ("rate_limited", "quota"):
            return web.json_response(FREQUENCY)
        if kind == "auth":
            return web.json_response(SIGN_FAILED)
        if kind == "invalid_recipient":
            return web.json_response(NOT_ENABLED)
        return web.Response(status=500, text="Internal Server Error")
