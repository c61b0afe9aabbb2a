"""Twilio Programmable Messaging (``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``) as
documented:

- https://www.twilio.com/docs/messaging/api/message-resource (parameters, the Message resource)
- https://www.twilio.com/docs/usage/requests-to-twilio (HTTP Basic authentication)
- https://www.twilio.com/docs/usage/twilios-response (error body) and /docs/api/errors/*

Form body with ``To``, ``From`` or ``MessagingServiceSid``, ``Body`` (at most 1,600
characters); HTTP Basic ``AccountSid:AuthToken`` checked here against the account in the path.
Success is HTTP 201 with the Message resource (``sid`` ``SM`` + 32 hex digits, ``status``
``queued``); errors are ``{"code", "message", "more_info", "status"}``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import itertools
import re
from email.utils import formatdate
from urllib.parse import parse_qsl

from aiohttp import web

from tests.emulators.base import Call, Emulator, FailureKind

_PATH = re.compile(r"/2010-04-01/Accounts/(?P<sid>AC[0-9a-fA-F]{32})/Messages\.json")
_E164 = re.compile(r"\+[1-9]\d{6,14}")


class TwilioEmulator(Emulator):
    name = "twilio"
    routes = [("POST", "/2010-04-01/Accounts/{sid}/Messages.json", "create_message")]

    def __init__(
        self,
        account_sid: str = "AC" + "0" * 31 + "1",
        auth_token: str = "herald-test-auth-token",
        *,
        numbers: set[str] | None = None,
        unsubscribed: set[str] | None = None,
    ) -> None:
        super().__init__()
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.numbers = numbers  # the account's senders (None: any)
        self.unsubscribed = unsubscribed or set()  # recipients that replied STOP
        self._ids = itertools.count(1)

    @staticmethod
    def _error(code: int, message: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
        body = {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status}  # fmt: skip
        return web.json_response(body, status=status, headers=headers)

    def _reject(self, call: Call, code: int, message: str, status: int, **kw) -> web.Response:
        call.problems.append(f"{code}: {message}")
        return self._error(code, message, status, **kw)

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        if kind == "rate_limited":
            return self._error(20429, "Too Many Requests", 429)  # no Retry-After is documented
        if kind == "auth":
            return self._error(20003, "Authenticate", 401, {"WWW-Authenticate": 'Basic realm="Twilio API"'})
        if kind == "invalid_recipient":
            to = dict(parse_qsl(call.body.decode())).get("To", "")
            return self._error(21211, f"Invalid 'To' Phone Number: {to}", 400)
        if kind == "quota":
            return self._error(20005, "Account not active", 401)
        return self._error(20500, "Internal Server Error", 500)

    async def create_message(self, request: web.Request, call: Call) -> web.StreamResponse:
        path = _PATH.fullmatch(call.path)
        if path is None:
            return self._reject(call, 20404, "The requested resource was not found", 404)
        challenge = {"WWW-Authenticate": 'Basic realm="Twilio API"'}
        scheme, _, value = call.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user = password = ""
        if scheme != "Basic" or not (
            hmac.compare_digest(user, self.account_sid) and hmac.compare_digest(password, self.auth_token)
        ):
            return self._reject(call, 20003, "Authenticate", 401, headers=challenge)
        if path["sid"] != self.account_sid:
            return self._reject(call, 20404, "The requested resource was not found", 404)
        if not call.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return self._reject(call, 21609, "unsupported content type", 400)
        form = dict(parse_qsl(call.body.decode(), keep_blank_values=True))
        to = form.get("To", "")
        if not to:
            return self._reject(call, 21604, "A 'To' phone number is required.", 400)
        sender, service = form.get("From"), form.get("MessagingServiceSid")
        if not sender and not service:
            return self._reject(call, 21603, "A 'From' phone number is required.", 400)
        if service and not re.fullmatch(r"MG[0-9a-fA-F]{32}", service):
            return self._reject(call, 21703, "The Messaging Service Sid is invalid", 400)
        body = form.get("Body", "")
        if not body.strip():
            return self._reject(call, 21602, "Message body is required.", 400)
        if len(body) > 1600:
            return self._reject(call, 21617, "The concatenated message body exceeds the 1600 character limit.", 400)
        validity = form.get("ValidityPeriod")
        if validity is not None and not (validity.isdigit() and 1 <= int(validity) <= 36000):
            return self._reject(call, 21623, "Invalid ValidityPeriod", 400)
        if sender and not service and self.numbers is not None and sender not in self.numbers:
            return self._reject(call, 21606, "The 'From' phone number provided is not a valid message-capable "
                                "Twilio phone number for this destination/account.", 400)  # fmt: skip

        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        if not _E164.fullmatch(to):
            return self._error(21211, f"Invalid 'To' Phone Number: {to}", 400)
        if to in self.unsubscribed:
            return self._error(21610, "Attempt to send to unsubscribed recipient", 400)
        sid = f"SM{next(self._ids):032x}"
        now = formatdate(usegmt=True).replace("GMT", "+0000")
        resource = {
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": sender,
            "messaging_service_sid": service,
            "num_media": "0",
            "num_segments": str(1 + (len(body) - 1) // 153 if len(body) > 160 else 1),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if service else "queued",
            "subresource_uris": {"media": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}/Media.json"},
            "to": to,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }
        return web.json_response(resource, status=201)
