"""PushDeer (api2.pushdeer.com or a self-hosted server): ``POST {server}/message/push``,
form-encoded ``pushkey``, ``text``, ``desp``, ``type`` (``text``/``markdown``/``image``).

``to`` is the push key (``PDU...``): the key is both the address and the only credential, so the
provider configuration holds nothing secret. With a title, ``text`` is the title and ``desp`` the
content; without, ``text`` is the content.

Answers follow the server's ``{"code": 0, "content": ...}`` / ``{"code": <error>, "error": ...}``
(api/app/Http/Helpers.php): success is ``{"code": 0, "content": {"result": [...]}}`` with one
entry per device pushed to; an empty (or ``false``) result means the key reached no device (an
unknown key, or a key whose owner registered no device). Error codes: 80501 (ARGS: a missing or
invalid parameter, "没有可用的设备，请先注册" no device registered, "此账号已被停用" the key owner's
account disabled), 80403 (AUTH), 80502 (REMOTE: the push relay failed), 80999 (other). The
server's Laravel throttle answers HTTP 429 "Too Many Attempts." with ``Retry-After``.

Options (``message.options``; unknown ones are ignored): none.
"""

from __future__ import annotations

from decimal import Decimal

import httpx
from pydantic import Field

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.plugins.base import (
    HttpCall,
    Message,
    Plugin,
    ProviderConfig,
    RateLimit,
    body_of,
    card_body,
    http_failure,
    retry_after,
    vendor_text,
)
from shared.errors import ErrorCode

ARGS, AUTH, REMOTE = 80501, 80403, 80502


class PushDeerConfig(ProviderConfig):
    server: str = Field(default="https://api2.pushdeer.com", pattern=r"^https?://", max_length=2000)


class PushDeer(Plugin[PushDeerConfig]):
    """PushDeer push to one push key."""

    channel = "pushdeer"
    name = "pushdeer"
    title = "PushDeer"
    Config = PushDeerConfig
    docs = (
        "https://github.com/easychen/pushdeer#推送消息",
        "https://github.com/easychen/pushdeer/blob/main/doc/api/PushDeerOS.md",
        "https://github.com/easychen/pushdeer/blob/main/api/app/Http/Controllers/PushDeerMessageController.php",
        "https://github.com/easychen/pushdeer/blob/main/api/app/Http/Helpers.php",
        "https://github.com/easychen/pushdeer/blob/main/api/app/Providers/RouteServiceProvider.php",
    )
    formats = frozenset({"text", "markdown"})
    rate_limits = (
        # Laravel's "api" limiter, Limit::perMinute(60) per client IP (X-RateLimit-Limit: 60).
        RateLimit(
            60, 60.0, source="https://github.com/easychen/pushdeer/blob/main/api/app/Providers/RouteServiceProvider.php"
        ),
    )
    default_cost = Decimal("0")
    address = "a PushDeer push key (PDU...)"

    def build(self, message: Message) -> HttpCall:
        form = {"pushkey": message.to}
        if message.card is not None:
            form["text"] = message.card.title
            if desp := card_body(message.card, markdown=True):
                form["desp"] = desp
            form["type"] = "markdown"
        else:
            if message.title and message.content:
                form["text"], form["desp"] = message.title, message.content
            else:
                form["text"] = message.content or message.title or ""
            form["type"] = "markdown" if message.format == "markdown" else "text"
        return HttpCall("POST", f"{self.config.server.rstrip('/')}/message/push", form=form)

    def parse(self, message: Message, response: httpx.Response) -> SendResult:
        body = body_of(response)
        status = response.status_code
        if status != 200 or "code" not in body:
            detail = str(body.get("message") or body.get("error") or "")
            raise http_failure("pushdeer", response, vendor_text(detail, 200))
        code = body.get("code")
        error = str(body.get("error") or "")
        what = f"pushdeer: code {code}" + (f": {vendor_text(error, 200)}" if error else "")
        if code == 0:
            content = body.get("content") if isinstance(body.get("content"), dict) else {}
            result = content.get("result")
            if isinstance(result, list) and result:
                return SendResult(detail={"devices": len(result)})
            raise Permanent("pushdeer: the push key reached no device", code=ErrorCode.RECIPIENT_INVALID)
        if code == AUTH:
            raise Permanent(what, code=ErrorCode.PROVIDER_AUTH_FAILED, sender_fault=True)
        if code == REMOTE:
            raise Retryable(
                what, code=ErrorCode.CHANNEL_SEND_FAILED, retry_after=retry_after(response), sender_fault=True
            )
        if code == ARGS and not any(field in error for field in ("text", "desp", "type")):
            raise Permanent(what, code=ErrorCode.RECIPIENT_INVALID)  # the key: unknown, no device, owner disabled
        raise Permanent(what, code=ErrorCode.CHANNEL_SEND_FAILED)
