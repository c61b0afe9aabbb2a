"""WeCom group robot webhook, as "群机器人配置说明" documents it
(https://developer.work.weixin.qq.com/document/path/91770; error codes:
https://developer.work.weixin.qq.com/document/path/90313).

``POST /cgi-bin/webhook/send?key=<key>`` with a JSON body; answers HTTP 200 with
``{"errcode": ..., "errmsg": ...}``. The key is the robot's only credential (no signature):
an unknown key is 93000 "invalid webhook url". The body is checked as documented: message
type (40008), text/markdown content present (44004) and within 2048/4096 bytes (45002),
mention lists, a text_notice template card's required parts (40058).
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

HINT = ", hint: [1760000000123456789012345], from ip: 127.0.0.1, more info at https://open.work.weixin.qq.com/devtool/query?e={}"


def answer(errcode: int, errmsg: str) -> dict[str, Any]:
    return {"errcode": errcode, "errmsg": errmsg + (HINT.format(errcode) if errcode else "")}


OK = {"errcode": 0, "errmsg": "ok"}
INVALID_WEBHOOK = answer(93000, "invalid webhook url")
FREQ = answer(45009, "api freq out of limit")
NOT_IN_GROUP = answer(93008, "robot not in chat")
BUSY = answer(-1, "system busy")

TYPES = {"text", "markdown", "markdown_v2", "image", "news", "file", "voice", "template_card"}


def _str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(_str(v) for v in value)


def _card_problems(card: Any) -> list[str]:
    if not isinstance(card, dict) or card.get("card_type") not in ("text_notice", "news_notice"):
        return ["template_card.card_type must be text_notice or news_notice"]
    problems = []
    main = card.get("main_title")
    if card["card_type"] == "text_notice":
        has_title = isinstance(main, dict) and _str(main.get("title"))
        if not (has_title or _str(card.get("sub_title_text"))):
            problems.append("main_title.title or sub_title_text is required")
    action = card.get("card_action")
    if not isinstance(action, dict) or action.get("type") not in (1, 2):
        problems.append("card_action with type 1 or 2 is required")
    elif action["type"] == 1 and not _str(action.get("url")):
        problems.append("card_action.url is required for type 1")
    fields = card.get("horizontal_content_list", [])
    if not isinstance(fields, list) or len(fields) > 6:
        problems.append("horizontal_content_list: at most 6 items")
    elif not all(isinstance(f, dict) and _str(f.get("keyname")) for f in fields):
        problems.append("horizontal_content_list items need keyname")
    jumps = card.get("jump_list", [])
    if not isinstance(jumps, list) or len(jumps) > 3:
        problems.append("jump_list: at most 3 items")
    elif not all(
        isinstance(j, dict) and _str(j.get("title")) and (j.get("type") != 1 or _str(j.get("url"))) for j in jumps
    ):
        problems.append("jump_list items need title (and url for type 1)")
    return problems


def body_problems(body: Any) -> tuple[list[str], dict[str, Any]]:
    """Why the robot refuses this body and with which answer (no problems: it is valid)."""
    if not isinstance(body, dict):
        return ["the body is not a JSON object"], answer(47001, "data format error")
    kind = body.get("msgtype")
    if kind not in TYPES:
        return [f"unknown msgtype {kind!r}"], answer(40008, "invalid message type")
    part = body.get(kind)
    if not isinstance(part, dict):
        return [f"{kind} is required"], answer(40058, f"{kind} is required")
    if kind in ("text", "markdown", "markdown_v2"):
        content = part.get("content")
        if not _str(content):
            return [f"{kind}.content is empty"], answer(44004, "empty content")
        limit = 2048 if kind == "text" else 4096
        if len(content.encode()) > limit:
            return [f"{kind}.content over {limit} bytes"], answer(45002, "content size out of limit")
        lists = ("mentioned_list", "mentioned_mobile_list") if kind == "text" else ()
        bad = [k for k in lists if k in part and not _str_list(part[k])]
        if bad:
            return [f"text.{k} must be a list of strings" for k in bad], answer(40058, "invalid Request Parameter")
        return [], OK
    if kind == "template_card":
        problems = _card_problems(part)
        return problems, answer(40058, "invalid Request Parameter") if problems else OK
    if kind == "news":
        articles = part.get("articles")
        ok = isinstance(articles, list) and 1 <= len(articles) <= 8
        if not ok or not all(isinstance(a, dict) and _str(a.get("title")) and _str(a.get("url")) for a in articles):
            return ["news.articles: 1 to 8 items with title and url"], answer(40058, "invalid Request Parameter")
    return [], OK


class WeComEmulator(Emulator):
    name = "wecom"
    routes = [("*", "/cgi-bin/webhook/send", "send")]

    def __init__(self, key: str = "693a91f6-7b2c-4bc4-97a0-0ec2a1fa5d3e") -> None:
        super().__init__()
        self.key = key

    @property
    def endpoint(self) -> str:
        return f"{self.url}/cgi-bin/webhook/send"

    @property
    def webhook_url(self) -> str:
        return f"{self.endpoint}?key={self.key}"

    async def send(self, request: web.Request, call: Call) -> web.StreamResponse:
        if call.method != "POST":
            return self.reject(call, f"method {call.method}", 200, answer(43004, "POST method required"))
        if not hmac.compare_digest(call.query.get("key", ""), self.key):
            return self.reject(call, "unknown key", 200, INVALID_WEBHOOK)
        try:
            body = call.json()
        except orjson.JSONDecodeError:
            return self.reject(call, "the body is not JSON", 200, answer(47001, "data format error"))
        problems, reply = body_problems(body)
        if problems:
            call.problems.extend(problems)
            return web.json_response(reply)
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        return web.json_response(OK)

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        # A group robot has no quota: "quota" is answered as the frequency limit.
        reply = {
            "rate_limited": FREQ,
            "quota": FREQ,
            "auth": INVALID_WEBHOOK,
            "invalid_recipient": NOT_IN_GROUP,
            "server_error": BUSY,
        }[kind]
        return web.json_response(reply)
