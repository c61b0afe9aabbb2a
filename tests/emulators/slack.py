"""Slack incoming webhook, as Slack documents it
(https://docs.slack.dev/messaging/sending-messages-using-incoming-webhooks, errors:
https://api.slack.com/changelog/2016-05-17-changes-to-errors-for-incoming-webhooks, blocks:
https://docs.slack.dev/reference/block-kit/blocks).

``POST /services/<team>/<bot>/<secret>`` with a JSON body. Incoming webhooks are not signed:
the secret path is the credential (unknown team or bot: 404 ``no_service``; wrong secret: 403
``invalid_token``). Answers plain text: 200 ``ok``; 400 ``invalid_payload`` (not JSON / wrong
content type), ``no_text`` (neither text, blocks nor attachments), ``invalid_blocks`` (a block
breaking Block Kit's rules and limits).
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

BLOCK_TYPES = {"header", "section", "actions", "context", "divider", "image", "rich_text", "markdown", "input"}


def _text_obj(value: Any, types: tuple[str, ...], limit: int) -> bool:
    return (
        isinstance(value, dict)
        and value.get("type") in types
        and isinstance(value.get("text"), str)
        and 1 <= len(value["text"]) <= limit
    )


def block_problems(blocks: Any) -> list[str]:
    """Why Slack would answer ``invalid_blocks`` (empty: the blocks are valid)."""
    if not isinstance(blocks, list) or len(blocks) > 50:
        return ["blocks must be a list of at most 50 blocks"]
    problems = []
    for i, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in BLOCK_TYPES:
            problems.append(f"blocks[{i}]: unknown type {kind!r}")
        elif kind == "header" and not _text_obj(block.get("text"), ("plain_text",), 150):
            problems.append(f"blocks[{i}]: a header needs plain_text of at most 150 characters")
        elif kind == "section":
            text, fields = block.get("text"), block.get("fields")
            if text is None and fields is None:
                problems.append(f"blocks[{i}]: a section needs text or fields")
            if text is not None and not _text_obj(text, ("plain_text", "mrkdwn"), 3000):
                problems.append(f"blocks[{i}]: section text of at most 3000 characters")
            if fields is not None and not (
                isinstance(fields, list)
                and 1 <= len(fields) <= 10
                and all(_text_obj(f, ("plain_text", "mrkdwn"), 2000) for f in fields)
            ):
                problems.append(f"blocks[{i}]: 1 to 10 fields of at most 2000 characters")
        elif kind == "actions":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= 25:
                problems.append(f"blocks[{i}]: actions need 1 to 25 elements")
            for element in elements or []:
                if not isinstance(element, dict) or element.get("type") != "button":
                    continue
                if not _text_obj(element.get("text"), ("plain_text",), 75):
                    problems.append(f"blocks[{i}]: a button needs plain_text of at most 75 characters")
                url = element.get("url")
                if url is not None and not (isinstance(url, str) and 1 <= len(url) <= 3000):
                    problems.append(f"blocks[{i}]: a button url of at most 3000 characters")
    return problems


class SlackEmulator(Emulator):
    name = "slack"
    routes = [("*", "/services/{team}/{bot}/{secret}", "hook")]

    def __init__(
        self, team: str = "T0A1B2C3D", bot: str = "B0E4F5G6H", secret: str = "Xk9mQ2vL7pR4tW8zY3nB6cJ1"
    ) -> None:
        super().__init__()
        self.team, self.bot, self.secret = team, bot, secret
        self.retry_after_s = 1

    @property
    def webhook_url(self) -> str:
        return f"{self.url}/services/{self.team}/{self.bot}/{self.secret}"

    @staticmethod
    def answer(status: int, text: str) -> web.Response:
        return web.Response(status=status, text=text, content_type="text/html")

    def refuse(self, call: Call, problem: str, status: int, error: str) -> web.Response:
        call.problems.append(problem)
        return self.answer(status, error)

    async def hook(self, request: web.Request, call: Call) -> web.StreamResponse:
        if call.method != "POST":
            return self.refuse(call, f"method {call.method}", 405, "invalid_payload")
        match = request.match_info
        if match["team"] != self.team or match["bot"] != self.bot:
            return self.refuse(call, "unknown webhook", 404, "no_service")
        if not hmac.compare_digest(match["secret"], self.secret):
            return self.refuse(call, "wrong webhook secret", 403, "invalid_token")
        if not call.headers.get("content-type", "").startswith("application/json"):
            return self.refuse(call, "content type is not application/json", 400, "invalid_payload")
        try:
            body = call.json()
        except orjson.JSONDecodeError:
            return self.refuse(call, "the body is not JSON", 400, "invalid_payload")
        if not isinstance(body, dict):
            return self.refuse(call, "the body is not an object", 400, "invalid_payload")
        if not any(body.get(k) for k in ("text", "blocks", "attachments")):
            return self.refuse(call, "no text, blocks or attachments", 400, "no_text")
        problems = block_problems(body["blocks"]) if "blocks" in body else []
        for i, attachment in enumerate(body.get("attachments") or []):
            if not isinstance(attachment, dict):
                problems.append(f"attachments[{i}] is not an object")
                continue
            if "blocks" in attachment:
                problems += [f"attachments[{i}].{p}" for p in block_problems(attachment["blocks"])]
            color = attachment.get("color")
            if color is not None and not (isinstance(color, str) and color.startswith("#") and len(color) == 7):
                problems.append(f"attachments[{i}].color must be #RRGGBB")
        if problems:
            call.problems.extend(problems)
            return self.answer(400, "invalid_blocks")
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        return self.answer(200, "ok")

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        # Incoming webhooks have no quota: "quota" is answered as the rate limit.
        if kind in ("rate_limited", "quota"):
            response = self.answer(429, "rate_limited")
            response.headers["Retry-After"] = str(self.retry_after_s)
            return response
        if kind == "auth":
            return self.answer(403, "invalid_token")
        if kind == "invalid_recipient":
            return self.answer(404, "channel_not_found")
        return self.answer(500, "rollup_error")
