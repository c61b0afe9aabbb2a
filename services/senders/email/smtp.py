"""SMTP provider: sends each email through the mailbox pool (:mod:`pool`), keeping connections
open per account, and classifies every SMTP outcome (RFC 5321 reply classes)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from pathlib import Path
from typing import ClassVar

import aiosmtplib

from services.senders.base import DeliveryError, HealthHook, Permanent, Retryable, SendResult
from services.senders.email.mime import build_message, envelope_recipients, load_attachments
from services.senders.email.pool import Account, MailboxPool, ensure_bootstrap_account
from shared.crypto import SecretBox
from shared.db import create_pool, migrate
from shared.errors import ErrorCode
from shared.events import DispatchV1
from shared.metrics import EMAIL_POOL_AVAILABLE, EMAIL_POOL_DAILY_SENT
from shared.settings import Settings

log = logging.getLogger("herald.sender.smtp")

# A reused connection is dropped after this long idle; servers close idle sessions anyway.
_MAX_IDLE_S = 30.0
# Accounts tried within one attempt when accounts fail (auth, connection) before giving up.
_ACCOUNTS_PER_ATTEMPT = 3


def classify(exc: BaseException) -> Retryable | Permanent:
    """Turn an aiosmtplib/OS error into the decision it implies.

    4xx and network errors are transient; 5xx is permanent for that recipient or content;
    failures of the account itself (authentication, connection, MAIL FROM refused, no STARTTLS)
    are marked ``sender_fault`` so the pool counts them and the next account is tried. A
    recipient's 550 is not the account's fault.
    """
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        text = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)[:500]
        if codes and all(400 <= c < 500 for c in codes):
            return Retryable(f"recipients refused temporarily: {text}", code=ErrorCode.EMAIL_SEND_FAILED)
        return Permanent(f"recipients refused: {text}", code=ErrorCode.EMAIL_SEND_FAILED)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return Retryable(
            f"SMTP authentication failed: {exc.code} {exc.message}"[:500],
            code=ErrorCode.SMTP_CONNECT_FAILED,
            sender_fault=True,
        )
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return Retryable(
            f"sender refused: {exc.code} {exc.message}"[:500], code=ErrorCode.EMAIL_SEND_FAILED, sender_fault=True
        )
    if isinstance(
        exc,
        aiosmtplib.SMTPConnectError
        | aiosmtplib.SMTPServerDisconnected
        | aiosmtplib.SMTPTimeoutError
        | aiosmtplib.SMTPHeloError
        | aiosmtplib.SMTPNotSupported,
    ):
        return Retryable(f"SMTP connection failed: {exc}"[:500], code=ErrorCode.SMTP_CONNECT_FAILED, sender_fault=True)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        message = f"SMTP {exc.code}: {exc.message}"[:500]
        if 400 <= exc.code < 500:
            return Retryable(message, code=ErrorCode.EMAIL_SEND_FAILED)
        return Permanent(message, code=ErrorCode.EMAIL_SEND_FAILED)
    if isinstance(exc, OSError | TimeoutError | ssl.SSLError | aiosmtplib.SMTPException):
        return Retryable(
            f"SMTP error: {exc.__class__.__name__}: {exc}"[:500], code=ErrorCode.SMTP_CONNECT_FAILED, sender_fault=True
        )
    return Permanent(f"unexpected error: {exc.__class__.__name__}: {exc}"[:500], code=ErrorCode.EMAIL_SEND_FAILED)


class _Connections:
    """Open SMTP sessions of one account, reused between messages."""

    def __init__(self, account: Account, tls_context: ssl.SSLContext, timeout: float, size: int) -> None:
        self.account = account
        self.tls_context = tls_context
        self.timeout = timeout
        self.idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self.slots = asyncio.Semaphore(size)

    async def connect(self) -> aiosmtplib.SMTP:
        a = self.account
        client = aiosmtplib.SMTP(
            hostname=a.host,
            port=a.port,
            use_tls=a.tls_mode == "tls",
            start_tls=True if a.tls_mode == "starttls" else False,
            tls_context=self.tls_context,
            timeout=self.timeout,
        )
        await client.connect()
        if a.username:
            await client.login(a.username, a.password)
        return client

    async def checkout(self) -> aiosmtplib.SMTP:
        now = time.monotonic()
        while self.idle:
            client, since = self.idle.pop()
            if client.is_connected and now - since < _MAX_IDLE_S:
                return client
            await _close(client)
        return await self.connect()

    def checkin(self, client: aiosmtplib.SMTP) -> None:
        self.idle.append((client, time.monotonic()))

    async def close(self) -> None:
        idle, self.idle = self.idle, []
        for client, _ in idle:
            await _close(client)


class SmtpProvider:
    """Email through the tenant's mailbox pool."""

    name: ClassVar[str] = "smtp"
    channel: ClassVar[str] = "email"

    def __init__(self, settings: Settings, mailboxes: MailboxPool, health: HealthHook, db_pool) -> None:
        self.settings = settings
        self.mailboxes = mailboxes
        self.health = health
        self.db_pool = db_pool
        self.data_dir = Path(settings.data_dir)
        self.tls_context = ssl.create_default_context(cafile=settings.smtp_ca_file)
        self.per_account = min(settings.sender_concurrency, 16)
        self._connections: dict[int, _Connections] = {}
        self._gauges_task: asyncio.Task | None = None

    @classmethod
    def check(cls, settings: Settings) -> None:
        cls._secret_box(settings)

    @staticmethod
    def _secret_box(settings: Settings) -> SecretBox:
        key = settings.encryption_key.get_secret_value() if settings.encryption_key else None
        return SecretBox.from_setting(key)  # raises with a clear message when unusable

    @classmethod
    async def open(cls, settings: Settings, health: HealthHook) -> SmtpProvider:
        box = cls._secret_box(settings)
        if settings.run_migrations:  # the pool's tables may not exist yet on a first start
            await migrate(settings)
        db_pool = await create_pool(settings)
        await ensure_bootstrap_account(db_pool, box, settings)
        mailboxes = MailboxPool(
            db_pool,
            box,
            settings.pool_timezone,
            settings.pool_failure_threshold,
            lease_size=settings.pool_lease_size,
        )
        provider = cls(settings, mailboxes, health, db_pool)
        provider._gauges_task = asyncio.create_task(provider._refresh_gauges())
        return provider

    async def ready(self) -> None:
        async with self.db_pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")

    def _connections_for(self, account: Account) -> _Connections:
        current = self._connections.get(account.id)
        if current is None or current.account.key != account.key:
            if current is not None:  # settings changed: drop the old sessions
                asyncio.get_running_loop().create_task(current.close())
            current = _Connections(account, self.tls_context, self.settings.smtp_timeout_s, self.per_account)
            self._connections[account.id] = current
        return current

    async def send(self, dispatch: DispatchV1) -> SendResult:
        attachments = await load_attachments(dispatch, self.data_dir)
        recipients = envelope_recipients(dispatch)
        tried: set[int] = set()
        last: DeliveryError | None = None
        while len(tried) < _ACCOUNTS_PER_ATTEMPT:
            account = await self.mailboxes.reserve(dispatch.tenant_id, tried)
            if account is None:
                break
            tried.add(account.id)
            EMAIL_POOL_DAILY_SENT.labels(account.email).set(account.daily_sent_count)
            message = build_message(
                dispatch, account.email, account.display_name or "", _domain(account.email), attachments=attachments
            )
            try:
                response, refused = await self._transmit(account, recipients, message.data)
            except DeliveryError as exc:
                await self.mailboxes.release(account)
                if not exc.sender_fault:
                    raise
                await self.mailboxes.drop_lease(account)
                last = exc
                disabled = await self.mailboxes.failed(account, exc.message)
                if disabled is not None:
                    await self.health(
                        {
                            "provider": self.name,
                            "channel": self.channel,
                            "identity": f"email_account:{disabled.account_id}",
                            "account": disabled.email,
                            "tenant_id": disabled.tenant_id,
                            "state": "disabled",
                            "failures": disabled.failures,
                            "reason": disabled.reason,
                        }
                    )
                continue
            await self.mailboxes.succeeded(account)
            detail: dict = {"account": account.email, "account_id": account.id, "response": response[:200]}
            if refused:
                detail["refused"] = refused
            return SendResult(provider_message_id=message.message_id, detail=detail)
        if last is not None:
            raise Retryable(
                f"every mailbox tried failed; last: {last.message}"[:500], code=last.code, sender_fault=True
            )
        raise Retryable(
            "no mailbox available: every active account is at its daily limit or disabled",
            code=ErrorCode.EMAIL_POOL_EXHAUSTED,
        )

    async def _transmit(self, account: Account, recipients: list[str], data: bytes) -> tuple[str, dict[str, str]]:
        connections = self._connections_for(account)
        async with connections.slots:
            client: aiosmtplib.SMTP | None = None
            try:
                client = await connections.checkout()
                try:
                    refused, response = await client.sendmail(account.email, recipients, data)
                except aiosmtplib.SMTPServerDisconnected:
                    # A reused session the server had closed: one fresh try.
                    await _close(client)
                    client = await connections.connect()
                    refused, response = await client.sendmail(account.email, recipients, data)
            except Exception as exc:
                if client is not None:
                    await _close(client)
                raise classify(exc) from exc
            connections.checkin(client)
        return str(response), {k: f"{v.code} {v.message}"[:200] for k, v in refused.items()}

    async def _refresh_gauges(self) -> None:
        while True:
            try:
                rows = await self.mailboxes.gauges()
                available: dict[str, int] = {}
                for r in rows:
                    EMAIL_POOL_DAILY_SENT.labels(r["email"]).set(r["sent"])
                    ok = r["is_active"] and r["sent"] < r["daily_limit"]
                    available[r["tenant_id"]] = available.get(r["tenant_id"], 0) + int(ok)
                for tenant, count in available.items():
                    EMAIL_POOL_AVAILABLE.labels(tenant).set(count)
            except Exception:  # metrics must never stop the sender
                log.warning("could not refresh mailbox pool gauges", exc_info=True)
            await asyncio.sleep(5)

    async def close(self) -> None:
        if self._gauges_task:
            self._gauges_task.cancel()
        for connections in self._connections.values():
            await connections.close()
        await self.mailboxes.close()
        await self.db_pool.close()


def _domain(address: str) -> str:
    return address.rpartition("@")[2] or "localhost"


async def _close(client: aiosmtplib.SMTP) -> None:
    try:
        if client.is_connected:
            await asyncio.wait_for(client.quit(), 2)
    except Exception:
        client.close()
