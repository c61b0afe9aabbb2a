"""SMTP provider: sends each email through the mailbox pool (:mod:`pool`), keeping connections
open per account, and classifies every SMTP outcome (RFC 5321 reply classes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import aiosmtplib
from aiosmtplib import SMTPStatus

from services.senders.base import DeliveryError, Handoff, HealthHook, Permanent, Retryable, SendResult, Unavailable
from services.senders.email.mime import build_message, envelope_recipients, load_attachments
from services.senders.email.pool import Account, MailboxPool, ensure_bootstrap_account
from shared.crypto import SecretBox
from shared.db import DB_UNAVAILABLE, create_pool, migrate
from shared.errors import ErrorCode
from shared.events import DispatchV1
from shared.metrics import EMAIL_POOL_AVAILABLE, EMAIL_POOL_DAILY_SENT
from shared.settings import Settings

log = logging.getLogger("herald.sender.smtp")

# A reused connection is dropped after this long idle; servers close idle sessions anyway.
_MAX_IDLE_S = 30.0
# Accounts tried within one attempt when accounts fail (auth, connection) before giving up.
_ACCOUNTS_PER_ATTEMPT = 3
_LINE_END = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")


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

    async def send(self, dispatch: DispatchV1, handoff: Handoff | None = None) -> SendResult:
        attachments = await load_attachments(dispatch, self.data_dir)
        recipients = envelope_recipients(dispatch)
        tried: set[int] = set()
        last: DeliveryError | None = None
        while len(tried) < _ACCOUNTS_PER_ATTEMPT:
            try:
                account = await self.mailboxes.reserve(dispatch.tenant_id, tried)
            except DB_UNAVAILABLE as exc:
                # Nothing sent yet: the runner waits for the database and tries again, the
                # dispatch keeps its attempts (it used to be dead-lettered as a sender error).
                raise Unavailable(f"mailbox pool database unavailable: {exc.__class__.__name__}: {exc}") from exc
            if account is None:
                break
            tried.add(account.id)
            EMAIL_POOL_DAILY_SENT.labels(account.email).set(account.daily_sent_count)
            message = build_message(
                dispatch, account.email, account.display_name or "", _domain(account.email), attachments=attachments
            )
            try:
                response, refused = await self._transmit(account, recipients, message.data, handoff)
            except DeliveryError as exc:
                await _bookkeeping(self.mailboxes.release(account), "slot given back")
                if not exc.sender_fault:
                    raise
                await _bookkeeping(self.mailboxes.drop_lease(account), "lease dropped")
                last = exc
                disabled = await _bookkeeping(self.mailboxes.failed(account, exc.message), "failure counted")
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
            # The server has the message: a database hiccup now must not turn it into a failure.
            await _bookkeeping(self.mailboxes.succeeded(account), "success counted")
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

    async def _transmit(
        self, account: Account, recipients: list[str], data: bytes, handoff: Handoff | None
    ) -> tuple[str, dict[str, str]]:
        connections = self._connections_for(account)
        handed = False

        def mark(complete: bool) -> None:
            nonlocal handed
            handed = True
            if handoff is not None and complete:
                handoff()

        async with connections.slots:
            client: aiosmtplib.SMTP | None = None
            try:
                client = await connections.checkout()
                try:
                    refused, response = await _sendmail(client, account.email, recipients, data, mark)
                except aiosmtplib.SMTPServerDisconnected:
                    if handed:  # the message went out: the server may have it, no second try here
                        raise
                    # A reused session the server had closed: one fresh try.
                    await _close(client)
                    client = await connections.connect()
                    refused, response = await _sendmail(client, account.email, recipients, data, mark)
            except Exception as exc:
                if client is not None:
                    await _close(client)
                raise classify(exc) from exc
            connections.checkin(client)
        return response, {k: f"{v.code} {v.message}"[:200] for k, v in refused.items()}

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
        # Unused leased slots go back if the database is there; if not, they stay counted
        # (the safe direction) and the pool is closed anyway.
        await _bookkeeping(self.mailboxes.close(), "leases given back")
        try:
            await asyncio.wait_for(self.db_pool.close(), 2)
        except (TimeoutError, *DB_UNAVAILABLE):
            self.db_pool.terminate()


async def _sendmail(
    client: aiosmtplib.SMTP, sender: str, recipients: list[str], data: bytes, written: Callable[[bool], None]
) -> tuple[dict[str, aiosmtplib.SMTPRecipientRefused], str]:
    """aiosmtplib's ``sendmail`` (MAIL, RCPT, DATA), with the DATA step written here so that
    ``written`` runs in the same event-loop step as the message's final dot is written (with
    whether all of it went to the kernel at once): the server keeps nothing before that dot,
    and may have the message after it."""
    options = [f"size={len(data)}"] if client.supports_extension("size") else []
    try:
        await client.mail(sender, options=options)
        refused: dict[str, aiosmtplib.SMTPRecipientRefused] = {}
        for recipient in recipients:
            try:
                await client.rcpt(recipient)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused[recipient] = exc
        if len(refused) == len(recipients):
            raise aiosmtplib.SMTPRecipientsRefused(list(refused.values()))
        start = await client.execute_command(b"DATA")
        if start.code != SMTPStatus.start_input:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        protocol = client.protocol
        if protocol is None or protocol.transport is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        # What SMTP.data() writes after the 354: CRLF line ends, leading dots doubled, the
        # final dot. No await between this write, the hand-off and arming the reply.
        body = _LINE_END.sub(b"\r\n", data)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        protocol.write(_LEADING_DOT.sub(b"..", body) + b".\r\n")
        written(protocol.transport.get_write_buffer_size() == 0)
        response = await protocol.read_response(timeout=client.timeout)
        if response.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        with contextlib.suppress(aiosmtplib.SMTPException, ConnectionError):
            await client.rset()  # leave the reused session clean
        raise
    return refused, response.message


async def _bookkeeping(coro, what: str):
    """Pool bookkeeping around a send (counters, failure streaks): logged and skipped while
    the database is unavailable, never allowed to change the outcome of the send itself."""
    try:
        return await coro
    except DB_UNAVAILABLE as exc:
        log.warning("mailbox pool: %s not recorded, database unavailable (%s)", what, exc.__class__.__name__)
        return None


def _domain(address: str) -> str:
    return address.rpartition("@")[2] or "localhost"


async def _close(client: aiosmtplib.SMTP) -> None:
    try:
        if client.is_connected:
            await asyncio.wait_for(client.quit(), 2)
    except Exception:
        client.close()
