"""Telegram Bot API ``sendMessage`` as documented (https://core.telegram.org/bots/api):
``POST /bot<token>/sendMessage`` with a JSON body; answers ``{"ok": true, "result": Message}``
or ``{"ok": false, "error_code", "description", "parameters"?}``.

It checks the token (401 Unauthorized), the chat (400 chat not found; 403 when the user blocked
the bot), the text (empty, longer than 4096 characters after entity parsing) and parses
``parse_mode: HTML`` as the docs' "HTML style" describes -- only the supported tags, properly
nested, every ``<``/``>``/``&`` outside a tag escaped -- answering Telegram's "can't parse
entities" errors; the inline keyboard's URL buttons are checked too."""

from __future__ import annotations

import html
import re
import time

from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span", "tg-spoiler", "a", "code", "pre",
         "blockquote", "tg-emoji"}  # fmt: skip
_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)((?:\s+[a-zA-Z-]+\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s>]+))*)\s*(/?)>")
_ATTR = re.compile(r"([a-zA-Z-]+)\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s>]+))")
_ENTITY = re.compile(r"&(lt|gt|amp|quot|#\d{1,7}|#x[0-9a-fA-F]{1,6});")


class EntityError(ValueError):
    pass


def parse_html(text: str) -> str:
    """The visible text of Telegram-style HTML, or EntityError saying why Telegram would refuse
    it (the messages follow the Bot API's "can't parse entities" answers)."""
    visible: list[str] = []
    stack: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        offset = len(text[:i].encode())
        if c == "<":
            m = _TAG.match(text, i)
            if not m:
                raise EntityError(f"Unclosed start tag at byte offset {offset}")
            closing, name, attrs, _ = m.group(1), m.group(2).lower(), m.group(3), m.group(4)
            if name not in _TAGS:
                raise EntityError(f'Unsupported start tag "{name}" at byte offset {offset}')
            if closing:
                if not stack or stack[-1] != name:
                    raise EntityError(f"Unexpected end tag at byte offset {offset}")
                stack.pop()
            else:
                attributes = {
                    a.group(1).lower(): a.group(2) or a.group(3) or a.group(4) or "" for a in _ATTR.finditer(attrs)
                }
                if name == "a" and not re.match(
                    r"^(https?://|tg://|mailto:)", html.unescape(attributes.get("href", ""))
                ):
                    raise EntityError(f"Wrong HTTP URL at byte offset {offset}")
                if name == "span" and attributes.get("class") != "tg-spoiler":
                    raise EntityError(f'Tag "span" must have class "tg-spoiler" at byte offset {offset}')
                if name in ("code", "pre") and stack and stack[-1] in ("code",):
                    raise EntityError(f"Entities can't be nested in code at byte offset {offset}")
                stack.append(name)
            i = m.end()
            continue
        if c == ">":
            raise EntityError(f"Character '>' is reserved at byte offset {offset}")  # must be &gt;
        if c == "&":
            m = _ENTITY.match(text, i)
            if not m:
                raise EntityError(f"Can't find end of the entity starting at byte offset {offset}")
            visible.append(html.unescape(m.group(0)))
            i = m.end()
            continue
        visible.append(c)
        i += 1
    if stack:
        raise EntityError(f'Can\'t find end tag corresponding to start tag "{stack[-1]}"')
    return "".join(visible)


class TelegramBotApi(Emulator):
    name = "telegram"
    routes = [("POST", "/bot{token}/sendMessage", "send_message")]

    def __init__(self, token: str, chats: dict[str, str] | None = None) -> None:
        super().__init__()
        self.token = token
        # chat id or @username -> type ("private", "group", "supergroup", "channel")
        self.chats = chats if chats is not None else {"123456789": "private", "-1001234567890": "supergroup"}
        self.blocked: set[str] = set()  # private chats whose user blocked the bot
        self.sent: list[dict] = []  # the Message objects answered
        self._next_id = 1

    async def send_message(self, request: web.Request, call: Call) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return self.reject(call, "bad token", 401, _error(401, "Unauthorized"))
        if call.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return self.reject(call, "not JSON", 400, _error(400, "Bad Request: message text is empty"))
        try:
            body = call.json()
        except ValueError:
            return self.reject(call, "bad JSON", 400, _error(400, "Bad Request: message text is empty"))
        chat_id = body.get("chat_id")
        if chat_id in (None, ""):
            return self.reject(call, "no chat_id", 400, _error(400, "Bad Request: chat_id is empty"))
        if not isinstance(chat_id, int | str) or isinstance(chat_id, bool):
            return self.reject(call, "chat_id type", 400, _error(400, "Bad Request: chat not found"))
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            return self.reject(call, "empty text", 400, _error(400, "Bad Request: message text is empty"))
        parse_mode = body.get("parse_mode")
        if parse_mode is not None and parse_mode != "HTML":
            return self.reject(
                call, f"parse_mode {parse_mode} not emulated", 400, _error(400, "Bad Request: unsupported parse_mode")
            )
        visible = text
        if parse_mode == "HTML":
            try:
                visible = parse_html(text)
            except EntityError as exc:
                return self.reject(call, str(exc), 400, _error(400, f"Bad Request: can't parse entities: {exc}"))
        if not visible.strip():
            return self.reject(call, "empty text", 400, _error(400, "Bad Request: message text is empty"))
        if len(visible) > 4096:
            return self.reject(call, "too long", 400, _error(400, "Bad Request: message is too long"))
        markup = body.get("reply_markup")
        if markup is not None and not _valid_keyboard(markup):
            return self.reject(
                call, "reply_markup", 400, _error(400, "Bad Request: can't parse inline keyboard button")
            )
        for flag in ("disable_notification", "protect_content"):
            if flag in body and not isinstance(body[flag], bool):
                return self.reject(call, flag, 400, _error(400, f"Bad Request: bad {flag}"))
        chat_type = self.chats.get(str(chat_id))
        if chat_type is None:
            return self.reject(call, "unknown chat", 400, _error(400, "Bad Request: chat not found"))
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        if str(chat_id) in self.blocked:
            return web.json_response(_error(403, "Forbidden: bot was blocked by the user"), status=403)
        result = {
            "message_id": self._next_id,
            "from": {"id": int(self.token.split(":")[0]), "is_bot": True, "first_name": "Herald"},
            "chat": {"id": chat_id, "type": chat_type},
            "date": int(time.time()),
            "text": visible,
        }
        if markup is not None:
            result["reply_markup"] = markup
        self._next_id += 1
        self.sent.append(result)
        return web.json_response({"ok": True, "result": result})

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        if kind in ("rate_limited", "quota"):  # the Bot API has no quota: flood control only
            return web.json_response(
                {**_error(429, "Too Many Requests: retry after 7"), "parameters": {"retry_after": 7}}, status=429
            )
        if kind == "auth":
            return web.json_response(_error(401, "Unauthorized"), status=401)
        if kind == "invalid_recipient":
            return web.json_response(_error(403, "Forbidden: bot was blocked by the user"), status=403)
        return web.json_response(_error(500, "Internal Server Error"), status=500)


def _error(code: int, description: str) -> dict:
    return {"ok": False, "error_code": code, "description": description}


def _valid_keyboard(markup: object) -> bool:
    if not isinstance(markup, dict) or not isinstance(markup.get("inline_keyboard"), list):
        return False
    for row in markup["inline_keyboard"]:
        if not isinstance(row, list) or not row:
            return False
        for button in row:
            if not isinstance(button, dict) or not isinstance(button.get("text"), str) or not button["text"]:
                return False
            url = button.get("url")
            if not isinstance(url, str) or not re.match(r"^(https?|tg)://", url):
                return False
    return True
