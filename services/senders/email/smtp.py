"""SMTP provider: one account from settings (the mailbox pool arrives with its own issue),
with a small pool of reused connections."""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

import aiosmtplib

from services.senders.base import Permanent, Retryable, SendResult
from services.senders.email.mime import build_message, envelope_recipients
from shared.errors import ErrorCode
from shared.events import DispatchV1
from shared.settings import Settings

# A reused connection is dropped after this long idle; servers close idle sessions anyway.
_MAX_IDLE_S = 30.0


def classify(exc: BaseException) -> Retryable | Permanent:
    """Turn an aiosmtplib/OS error into the decision it implies (RFC 5321 reply classes)."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        text = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)[:500]
        if codes and all(400 <= c < 500 for c in codes):
            return Retryable(f"recipients refused temporarily: {text}", code=ErrorCode.EMAIL_SEND_FAILED)
        return Permanent(f"recipients refused: {text}", code=ErrorCode.EMAIL_SEND_FAILED)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        # The account is at fault, not the message: retry (with another account, once pooled).
        return Retryable(f"SMTP authentication failed: {exc.code}", code=ErrorCode.SMTP_CONNECT_FAILED)
    if isinstance(exc, aiosmtplib.SMTPConnectError | aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPTimeoutError):
        return Retryable(f"SMTP connection failed: {exc}", code=ErrorCode.SMTP_CONNECT_FAILED)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        message = f"SMTP {exc.code}: {exc.message}"[:500]
        if 400 <= exc.code < 500:
            return Retryable(message, code=ErrorCode.EMAIL_SEND_FAILED)
        return Permanent(message, code=ErrorCode.EMAIL_SEND_FAILED)
    if isinstance(exc, OSError | TimeoutError | aiosmtplib.SMTPException):
        return Retryable(f"SMTP error: {exc.__class__.__name__}: {exc}"[:500], code=ErrorCode.SMTP_CONNECT_FAILED)
    return Permanent(f"unexpected error: {exc.__class__.__name__}: {exc}"[:500], code=ErrorCode.EMAIL_SEND_FAILED)


class SmtpProvider:
    """Sends through one SMTP account, keeping up to ``size`` connections open."""

    name: ClassVar[str] = "smtp"
    channel: ClassVar[str] = "email"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str,
        password: str,
        use_tls: bool,
        start_tls: bool | None,
        timeout: float,
        from_address: str,
        from_name: str,
        size: int,
    ) -> None:
        self.host, self.port = host, port
        self.username, self._password = username, password
        self.use_tls, self.start_tls, self.timeout = use_tls, start_tls, timeout
        self.from_address, self.from_name = from_address, from_name
        self.domain = from_address.rpartition("@")[2] or "localhost"
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._slots = asyncio.Semaphore(size)

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpProvider:
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value(),
            use_tls=settings.smtp_use_tls,
            start_tls=settings.smtp_start_tls,
            timeout=settings.smtp_timeout_s,
            from_address=settings.smtp_from_address,
            from_name=settings.smtp_from_name,
            size=min(settings.sender_concurrency, 16),
        )

    @property
    def account(self) -> str:
        return self.from_address

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            use_tls=self.use_tls,
            start_tls=self.start_tls,
            timeout=self.timeout,
        )
        await client.connect()
        if self.username:
            await client.login(self.username, self._password)
        return client

    async def _checkout(self) -> aiosmtplib.SMTP:
        now = time.monotonic()
        while self._idle:
            client, since = self._idle.pop()
            if client.is_connected and now - since < _MAX_IDLE_S:
                return client
            await _close(client)
        return await self._connect()

    async def send(self, dispatch: DispatchV1) -> SendResult:
        message = build_message(dispatch, self.from_address, self.from_name, self.domain)
        recipients = envelope_recipients(dispatch)
        async with self._slots:
            client: aiosmtplib.SMTP | None = None
            try:
                client = await self._checkout()
                try:
                    refused, response = await client.sendmail(self.from_address, recipients, message.data)
                except aiosmtplib.SMTPServerDisconnected:
                    # A reused connection the server had closed: one fresh try.
                    await _close(client)
                    client = await self._connect()
                    refused, response = await client.sendmail(self.from_address, recipients, message.data)
            except Exception as exc:
                if client is not None:
                    await _close(client)
                raise classify(exc) from exc
            self._idle.append((client, time.monotonic()))
        detail: dict = {"account": self.account, "response": str(response)[:200]}
        if refused:
            detail["refused"] = {k: f"{v.code} {v.message}"[:200] for k, v in refused.items()}
        return SendResult(provider_message_id=message.message_id, detail=detail)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client, _ in idle:
            await _close(client)


async def _close(client: aiosmtplib.SMTP) -> None:
    try:
        if client.is_connected:
            await asyncio.wait_for(client.quit(), 2)
    except Exception:
        client.close()
