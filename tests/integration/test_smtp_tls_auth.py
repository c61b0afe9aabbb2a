"""The SMTP provider against real aiosmtpd servers that demand STARTTLS + AUTH, or implicit TLS,
with a throw-away certificate the sender is told to trust (HERALD_SMTP_CA_FILE)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devstack.servers import free_port
from services.senders.base import Retryable
from services.senders.email.pool import PASSWORD_PURPOSE
from services.senders.email.smtp import SmtpProvider
from shared.crypto import SecretBox
from shared.db import apply_migrations
from shared.events import DispatchV1
from shared.settings import Settings
from tests.conftest import TEST_ENCRYPTION_KEY, Backing

USER, PASSWORD = "mailer", "pa55-w0rd"


def _certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "herald-test-smtp")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "smtp.crt", directory / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[bool, object, bytes]] = []

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: ANN001
        encrypted = server.transport.get_extra_info("ssl_object") is not None
        self.messages.append((encrypted, session.authenticated, envelope.original_content))
        return "250 OK"


def _authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:  # noqa: ANN001
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == USER.encode()
        and auth_data.password == (PASSWORD.encode())
    )
    # handled=False: the server answers 535 itself (handled=True would leave the client waiting).
    return AuthResult(success=ok, handled=False)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    cert, key = _certificate(tmp_path_factory.mktemp("tls"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    starttls_handler, implicit_handler = Recorder(), Recorder()
    starttls = Controller(
        starttls_handler, hostname="127.0.0.1", port=free_port(), tls_context=context, require_starttls=True,
        authenticator=_authenticator, auth_require_tls=True,
    )  # fmt: skip
    implicit = Controller(
        implicit_handler, hostname="127.0.0.1", port=free_port(), ssl_context=context,
        authenticator=_authenticator, auth_require_tls=False,
    )  # fmt: skip
    starttls.start()
    implicit.start()
    yield {"cert": cert, "starttls": (starttls.port, starttls_handler), "tls": (implicit.port, implicit_handler)}
    starttls.stop()
    implicit.stop()


@pytest.fixture
async def provider(backing: Backing, servers: dict, tmp_path: Path) -> AsyncIterator[tuple[SmtpProvider, list]]:
    await asyncio.to_thread(apply_migrations, backing.dsn)
    health: list[dict] = []

    async def hook(change: dict) -> None:
        health.append(change)

    settings = Settings(
        database_url=backing.dsn, encryption_key=TEST_ENCRYPTION_KEY, smtp_ca_file=str(servers["cert"]),
        data_dir=str(tmp_path), smtp_host="", db_pool_min=1, db_pool_max=2, smtp_timeout_s=5,
    )  # fmt: skip
    p = await SmtpProvider.open(settings, hook)
    yield p, health
    await p.close()


async def add_account(pool: asyncpg.Pool, tenant: str, port: int, mode: str, password: str) -> int:
    box = SecretBox.from_setting(TEST_ENCRYPTION_KEY)
    return await pool.fetchval(
        """INSERT INTO email_accounts (tenant_id, email, smtp_host, smtp_port, smtp_username, smtp_password, tls_mode)
           VALUES ($1, $2, '127.0.0.1', $3, $4, $5, $6) RETURNING id""",
        tenant, f"{mode}-{uuid.uuid4().hex[:6]}@example.org", port, USER, box.encrypt(password, PASSWORD_PURPOSE),
        mode,
    )  # fmt: skip


def dispatch(tenant: str) -> DispatchV1:
    mid = f"msg_20261123_{uuid.uuid4().hex[:16]}"
    return DispatchV1(
        dispatch_id=f"{mid}:1", message_id=mid, tenant_id=tenant, channel="email", to=["r@example.com"],
        subject="tls", content="<p>over TLS</p>",
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_sends_over_tls_with_authentication(provider, servers: dict, mode: str) -> None:
    p, _ = provider
    port, handler = servers[mode]
    tenant = f"tls-{uuid.uuid4().hex[:8]}"
    await add_account(p.db_pool, tenant, port, mode, PASSWORD)
    d = dispatch(tenant)
    before = len(handler.messages)
    result = await p.send(d)
    assert result.provider_message_id == f"<{d.message_id}@example.org>"
    encrypted, authenticated, data = handler.messages[before]
    assert encrypted is True and authenticated is True
    assert f"X-Herald-Message-ID: {d.message_id}".encode() in data
    # The session is reused for the next message.
    await p.send(dispatch(tenant))
    assert len(handler.messages) == before + 2


async def test_wrong_password_counts_against_the_account_and_disables_it(provider, servers: dict) -> None:
    p, health = provider
    port, handler = servers["starttls"]
    tenant = f"auth-{uuid.uuid4().hex[:8]}"
    account_id = await add_account(p.db_pool, tenant, port, "starttls", "wrong")
    before = len(handler.messages)
    for expected in (1, 2, 3):
        with pytest.raises(Retryable) as failure:
            await p.send(dispatch(tenant))
        assert failure.value.code == 2009 and "authentication failed" in failure.value.message
        assert await p.db_pool.fetchval("SELECT failure_count FROM email_accounts WHERE id=$1", account_id) == expected
    assert len(handler.messages) == before
    row = await p.db_pool.fetchrow("SELECT is_active, daily_sent_count FROM email_accounts WHERE id=$1", account_id)
    assert row["is_active"] is False and row["daily_sent_count"] == 0  # failed sends are not counted
    assert health[-1]["state"] == "disabled" and health[-1]["identity"] == f"email_account:{account_id}"
    with pytest.raises(Retryable) as exhausted:
        await p.send(dispatch(tenant))
    assert exhausted.value.code == 2002


async def test_untrusted_certificate_is_refused(backing: Backing, servers: dict, tmp_path: Path) -> None:
    """Without the CA file the sender does not trust the server: TLS verification is on."""
    await asyncio.to_thread(apply_migrations, backing.dsn)

    async def hook(change: dict) -> None:
        pass

    settings = Settings(database_url=backing.dsn, encryption_key=TEST_ENCRYPTION_KEY, data_dir=str(tmp_path),
                        smtp_host="", db_pool_min=1, db_pool_max=2, smtp_timeout_s=5)  # fmt: skip
    p = await SmtpProvider.open(settings, hook)
    try:
        tenant = f"untrusted-{uuid.uuid4().hex[:8]}"
        await add_account(p.db_pool, tenant, servers["starttls"][0], "starttls", PASSWORD)
        with pytest.raises(Retryable) as failure:
            await p.send(dispatch(tenant))
        assert "CERTIFICATE_VERIFY_FAILED" in failure.value.message or "certificate" in failure.value.message.lower()
    finally:
        await p.close()
