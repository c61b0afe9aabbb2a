"""Apple Push Notification service, token-based provider API, as documented ("Sending notification
requests to APNs", "Establishing a token-based connection to APNs", "Handling notification
responses from APNs").

Like Apple's, it speaks HTTP/2 over TLS only: a hypercorn server (ASGI) with a certificate from a
private CA (trustme; ``ca_file`` is its PEM, for the client) and ALPN ``h2``. A request that
arrives as HTTP/1.1 is refused (505) and recorded with a problem; every call records its
``http_version``.

Checks of ``POST /3/device/<token>``: method (405 MethodNotAllowed), path (404 BadPath), a hex
device token (400 BadDeviceToken), the provider token (403 MissingProviderToken /
InvalidProviderToken: ES256 signature verified with the team key's public key via PyJWT, header
``kid`` = the key id, ``iss`` = the team id, ``iat`` not in the future; 403 ExpiredProviderToken
when ``iat`` is more than an hour old; 429 TooManyProviderTokenUpdates when a new token appears
less than 20 minutes after the previous new one), the headers (``apns-topic`` = the bundle id:
400 MissingTopic / TopicDisallowed; ``apns-push-type``: 400 InvalidPushType; ``apns-priority``
10/5/1: 400 BadPriority; ``apns-expiration`` an integer: 400 BadExpirationDate; ``apns-id`` a
lower-case canonical UUID: 400 BadMessageId; ``apns-collapse-id`` at most 64 bytes: 400
BadCollapseId) and the payload (400 PayloadEmpty; at most 4096 bytes: 413 PayloadTooLarge; a JSON
object with an ``aps`` dictionary, an alert push with ``aps.alert`` -- Apple documents no reason
string for a malformed payload, the emulator answers 400 ``BadPayload``). Tokens in
``unregistered`` answer 410 Unregistered with a timestamp. Success: 200, empty body, ``apns-id``.

Injected failures: rate_limited and quota -> 429 TooManyRequests (APNs has no quota); auth -> 403
InvalidProviderToken; invalid_recipient -> 410 Unregistered; server_error -> 503
ServiceUnavailable.

Not the aiohttp server of :class:`Emulator`: ``start``/``stop``/``url`` are its own; ``calls``,
``fail``, ``recover``, ``slow``, ``injected_answer`` and ``verified`` behave the same.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import ssl
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import jwt
import trustme
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.utils import wrap_app

from tests.emulators.base import Call, Emulator, FailureKind

PUSH_TYPES = {"alert", "background", "location", "voip", "complication", "fileprovider", "mdm", "liveactivity"}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
DEVICE_TOKEN = re.compile(r"^[0-9a-fA-F]{64,200}$")
MAX_PAYLOAD = 4096
TOKEN_MAX_AGE_S = 3600
TOKEN_UPDATE_MIN_S = 1200


@dataclass(slots=True)
class ApnsCall(Call):
    http_version: str = ""


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def reason(status: int, why: str, **extra: Any) -> Answer:
    return Answer(status, json.dumps({"reason": why, **extra}).encode(), {"content-type": "application/json"})


class ApnsEmulator(Emulator):
    name = "apns"

    def __init__(
        self,
        *,
        team_id: str,
        key_id: str,
        public_key_pem: str,
        bundle_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.team_id = team_id
        self.key_id = key_id
        self.public_key_pem = public_key_pem
        self.bundle_id = bundle_id
        self.clock = clock
        self.unregistered: set[str] = set()
        self.delivered: list[dict[str, Any]] = []  # accepted payloads
        self.tokens_seen: dict[str, float] = {}  # provider token -> when first used
        self._last_update: float | None = None
        self.ca = trustme.CA()
        self._dir = tempfile.mkdtemp(prefix="apns-emulator-")
        self.ca_file = os.path.join(self._dir, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self._certfile = os.path.join(self._dir, "cert.pem")
        self._keyfile = os.path.join(self._dir, "key.pem")
        for i, pem in enumerate(cert.cert_chain_pems):
            pem.write_to_path(self._certfile, append=i > 0)
        cert.private_key_pem.write_to_path(self._keyfile)
        self._shutdown: asyncio.Event | None = None
        self._server: asyncio.Task | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, port: int = 0) -> ApnsEmulator:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = Config()
        config.certfile, config.keyfile = self._certfile, self._keyfile
        config.alpn_protocols = ["h2", "http/1.1"]  # HTTP/1.1 is negotiated, then refused by the app
        config.graceful_timeout = 0.5
        config.accesslog = None
        config.errorlog = None
        self._shutdown = asyncio.Event()
        app = wrap_app(self._asgi, config.wsgi_max_body_size, "asgi")
        self._server = asyncio.create_task(
            worker_serve(app, config, sockets=Sockets([sock], [], []), shutdown_trigger=self._shutdown.wait)
        )
        # The socket already listens: a TLS handshake completes once the server is attached.
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        handshake = asyncio.ensure_future(asyncio.open_connection("127.0.0.1", self.port, ssl=context))
        done, _ = await asyncio.wait({handshake, self._server}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        if self._server in done:
            handshake.cancel()
            self._server.result()  # the server failed to start: raise why
        if handshake not in done:
            handshake.cancel()
            raise RuntimeError("the APNs emulator did not start")
        _, writer = handshake.result()
        writer.close()
        return self

    async def stop(self) -> None:
        if self._server is not None and self._shutdown is not None:
            self._shutdown.set()
            try:
                await asyncio.wait_for(self._server, 5)
            except TimeoutError:
                pass  # wait_for cancelled the server task
            except asyncio.InvalidStateError:
                # hypercorn 0.18 cannot stop cleanly while a client (a sender process's pooled
                # HTTP/2 connection) still holds a connection: its worker_serve asks the gather
                # of the connection tasks it just cancelled for their exception too early.
                pass
            self._server = None

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # --- ASGI ---------------------------------------------------------------------------------

    async def _asgi(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1").lower()
            headers[key] = f"{headers[key]}, {value.decode('latin-1')}" if key in headers else value.decode("latin-1")
        call = ApnsCall(
            method=scope["method"],
            path=scope["path"],
            query=dict(parse_qsl(scope.get("query_string", b"").decode())),
            headers=headers,
            body=body,
            http_version=scope["http_version"],
        )
        self.calls.append(call)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        answer = self.handle(call)
        call.status = answer.status
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": [(k.encode(), v.encode()) for k, v in answer.headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": answer.body})

    # --- the endpoint -------------------------------------------------------------------------

    @staticmethod
    def refuse(call: Call, problem: str, answer: Answer) -> Answer:
        call.problems.append(problem)
        return answer

    def handle(self, call: ApnsCall) -> Answer:
        if call.http_version != "2":
            return self.refuse(call, f"HTTP/{call.http_version}: APNs requires HTTP/2", Answer(505))
        answer = self._check(call)
        if answer is not None:
            return answer
        call.verified = True
        injected = self.injected_answer(call)
        if injected is not None:
            return injected
        self.delivered.append(call.json())
        return Answer(200, b"", {"apns-id": call.headers.get("apns-id") or str(uuid.uuid4())})

    def _check(self, call: ApnsCall) -> Answer | None:
        if call.method != "POST":
            return self.refuse(call, "method", reason(405, "MethodNotAllowed"))
        match = re.fullmatch(r"/3/device/([^/]+)", call.path)
        if match is None:
            return self.refuse(call, "path", reason(404, "BadPath"))
        device = match.group(1)
        if not DEVICE_TOKEN.match(device):
            return self.refuse(call, "device token", reason(400, "BadDeviceToken"))
        answer = self._check_token(call)
        if answer is not None:
            return answer
        h = call.headers
        if "apns-topic" not in h:
            return self.refuse(call, "apns-topic missing", reason(400, "MissingTopic"))
        if h["apns-topic"] != self.bundle_id:
            return self.refuse(call, "apns-topic is not the team's app", reason(400, "TopicDisallowed"))
        if h.get("apns-push-type") not in PUSH_TYPES:
            return self.refuse(call, "apns-push-type", reason(400, "InvalidPushType"))
        if h.get("apns-priority", "10") not in ("10", "5", "1"):
            return self.refuse(call, "apns-priority", reason(400, "BadPriority"))
        if not h.get("apns-expiration", "0").isdigit():
            return self.refuse(call, "apns-expiration", reason(400, "BadExpirationDate"))
        if "apns-id" in h and not UUID.match(h["apns-id"]):
            return self.refuse(call, "apns-id", reason(400, "BadMessageId"))
        if len(h.get("apns-collapse-id", "").encode()) > 64:
            return self.refuse(call, "apns-collapse-id", reason(400, "BadCollapseId"))
        if not call.body:
            return self.refuse(call, "empty payload", reason(400, "PayloadEmpty"))
        if len(call.body) > MAX_PAYLOAD:
            return self.refuse(call, "payload over 4096 bytes", reason(413, "PayloadTooLarge"))
        try:
            payload = call.json()
        except ValueError:
            payload = None
        aps = payload.get("aps") if isinstance(payload, dict) else None
        if not isinstance(aps, dict) or (h["apns-push-type"] == "alert" and not aps.get("alert")):
            return self.refuse(call, "payload without aps (alert)", reason(400, "BadPayload"))
        if device in self.unregistered:
            return self.refuse(call, "unregistered", reason(410, "Unregistered", timestamp=int(self.clock() * 1000)))
        return None

    def _check_token(self, call: ApnsCall) -> Answer | None:
        auth = call.headers.get("authorization", "")
        if not auth:
            return self.refuse(call, "no provider token", reason(403, "MissingProviderToken"))
        if not auth.startswith("bearer "):
            return self.refuse(call, "authorization is not 'bearer <jwt>'", reason(403, "InvalidProviderToken"))
        token = auth[len("bearer ") :]
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token,
                self.public_key_pem,
                algorithms=["ES256"],
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False, "require": ["iss", "iat"]},
            )
        except jwt.PyJWTError as exc:
            return self.refuse(call, f"provider token: {exc}", reason(403, "InvalidProviderToken"))
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return self.refuse(call, "kid/iss are not the team key's", reason(403, "InvalidProviderToken"))
        now, iat = self.clock(), claims["iat"]
        if not isinstance(iat, int) or iat > now + 60:
            return self.refuse(call, "iat in the future", reason(403, "InvalidProviderToken"))
        if now - iat > TOKEN_MAX_AGE_S:
            return self.refuse(call, "provider token older than an hour", reason(403, "ExpiredProviderToken"))
        if token not in self.tokens_seen:
            if self._last_update is not None and now - self._last_update < TOKEN_UPDATE_MIN_S:
                return self.refuse(call, "new token within 20 minutes", reason(429, "TooManyProviderTokenUpdates"))
            self.tokens_seen[token] = self._last_update = now
        return None

    def failure(self, kind: FailureKind, call: Call) -> Answer:  # type: ignore[override]
        apns_id = {"apns-id": call.headers.get("apns-id", "")}
        if kind in ("rate_limited", "quota"):
            answer = reason(429, "TooManyRequests")
        elif kind == "auth":
            answer = reason(403, "InvalidProviderToken")
        elif kind == "invalid_recipient":
            answer = reason(410, "Unregistered", timestamp=int(self.clock() * 1000))
        else:
            answer = reason(503, "ServiceUnavailable")
        answer.headers.update(apns_id)
        return answer
