"""A Standard Webhooks receiver (https://www.standardwebhooks.com/): verifies every request with
the ``standardwebhooks`` library's own ``Webhook(secret).verify(body, headers)`` -- the
reference consumer, independent of how Herald signs -- which also rejects timestamps more than
five minutes old or ahead. Answers as a well-behaved consumer: 2xx when accepted, 401 on a bad
signature, and (``respond``) any status a test wants to see the sender's answer to (3xx, 410,
503 with Retry-After ...)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.emulators.base import Call, Emulator, FailureKind


class WebhookReceiver(Emulator):
    name = "webhook"

    def __init__(
        self,
        secret: str,
        *,
        path: str = "/hooks/herald",
        require_headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.secret = secret
        self.path = path
        self.require_headers = {k.lower(): v for k, v in (require_headers or {}).items()}
        self.received: list[Any] = []  # the verified payloads, parsed
        self.forced: tuple[int, dict[str, str], str] | None = None
        self.routes = [("POST", path, "receive"), ("PUT", path, "receive"), ("GET", "/moved", "moved")]

    def respond(self, status: int, headers: dict[str, str] | None = None, body: str = "") -> None:
        """Answer every verified request with ``status`` (until :meth:`recover`)."""
        self.forced = (status, headers or {}, body)

    def recover(self) -> None:
        super().recover()
        self.forced = None

    @property
    def endpoint(self) -> str:
        return self.url + self.path

    async def receive(self, request: web.Request, call: Call) -> web.StreamResponse:
        if call.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return self.reject(call, "content-type is not application/json", 415)
        for name, value in self.require_headers.items():
            if call.headers.get(name) != value:
                return self.reject(call, f"header {name} missing or wrong", 403)
        try:
            payload = Webhook(self.secret).verify(call.body, call.headers)
        except WebhookVerificationError as exc:
            return self.reject(call, f"signature: {exc}", 401, {"error": "invalid signature"})
        except ValueError as exc:  # not JSON
            return self.reject(call, f"body: {exc}", 400)
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        if self.forced is not None:
            status, headers, body = self.forced
            return web.Response(status=status, headers=headers, text=body)
        self.received.append(payload)
        return web.json_response({"received": call.headers["webhook-id"]}, status=200)

    async def moved(self, request: web.Request, call: Call) -> web.StreamResponse:
        return web.Response(text="moved here")

    def failure(self, kind: FailureKind, call: Call) -> web.StreamResponse:
        # A receiver has no quota of its own: "quota" is answered as throttling (429).
        if kind in ("rate_limited", "quota"):
            return web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": "7"})
        if kind == "auth":
            return web.json_response({"error": "invalid signature"}, status=401)
        if kind == "invalid_recipient":
            return web.json_response({"error": "no such hook"}, status=404)
        return web.json_response({"error": "internal error"}, status=500)
