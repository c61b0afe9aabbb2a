"""Real servers for the suite: Tansu, PostgreSQL, Redis and an SMTP sink, started once per
session on free ports; the four Herald services run as subprocesses (``python -m ...``) against
them, exactly as ``make run`` starts them. Nothing here stands in for a server."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devstack import access, servers, sinks
from devstack.pipeline import Service, start_services, stop_services

# A throw-away AES-256 key for the suite (32 bytes, base64), and the tokens' signing key.
TEST_ENCRYPTION_KEY = "aGVyYWxkLXRlc3Qta2V5LTMyLWJ5dGVzLWxvbmctISE="
TEST_JWT_SECRET = "herald-test-jwt-secret-of-at-least-32-bytes"


@dataclass
class Backing:
    """The backing servers of a test session."""

    tmp: Path
    kafka_port: int
    pg: servers.Server
    redis: servers.Server
    tansu: servers.Server
    smtp_port: int
    smtp: sinks.SinkHandler
    smtp_controller: object
    env: dict[str, str] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def dsn(self) -> str:
        return self.pg.extra["dsn"]

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/0"

    def restart_redis(self) -> None:
        self.redis = servers.start_redis(self.redis.port)


@pytest.fixture(scope="session")
def backing() -> Iterator[Backing]:
    tmp = Path(tempfile.mkdtemp(prefix="herald-test-"))
    os.chmod(tmp, 0o755)
    kafka_port = servers.free_port()
    tansu = servers.start_tansu(kafka_port, tmp / "tansu.log")
    pg = servers.start_postgres(tmp / "pg", servers.free_port(), fast=True)
    redis = servers.start_redis(servers.free_port())
    smtp_port = servers.free_port()
    controller, handler = sinks.start_smtp_sink(smtp_port)
    b = Backing(tmp, kafka_port, pg, redis, tansu, smtp_port, handler, controller)
    b.env = {
        "HERALD_KAFKA_BOOTSTRAP_SERVERS": b.bootstrap,
        "HERALD_DATABASE_URL": b.dsn,
        "HERALD_REDIS_URL": b.redis_url,
        "HERALD_SMTP_HOST": "127.0.0.1",
        "HERALD_SMTP_PORT": str(smtp_port),
        "HERALD_SMTP_FROM_ADDRESS": "herald@example.org",
        "HERALD_SMTP_TLS_MODE": "none",
        # The bootstrap mailbox's 500 a day is less than the suite sends; tests of the daily limit
        # set their own counts.
        "HERALD_SMTP_DAILY_LIMIT": "1000000",
        "HERALD_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY,
        "HERALD_DATA_DIR": str(tmp / "data"),
        "HERALD_ATTACHMENT_MAX_BYTES": "2000000",
        "HERALD_ATTACHMENTS_TOTAL_MAX_BYTES": "3000000",
        "HERALD_RETRY_DELAYS_S": "1,2,3",
        # One mailbox slot per reservation: pool changes made by a test apply to the very next
        # email (leases are tested in tests/integration/test_mailbox_pool.py).
        "HERALD_POOL_LEASE_SIZE": "1",
        "HERALD_IDEMPOTENCY_TTL_S": "5",
        "HERALD_SWEEP_STALLED_AFTER_S": "5",
        "HERALD_SWEEP_INTERVAL_S": "1",
        "HERALD_MAX_BODY_BYTES": "65536",
        "HERALD_TEMPLATE_MAX_BYTES": "16384",
        "HERALD_LOG_JSON": "true",
        # bcrypt's cost 12 is for production; the suite makes and checks many keys.
        "HERALD_API_SECRET_BCRYPT_ROUNDS": "4",
        "HERALD_RATE_LIMIT_TIERS": '{"tiny": "5/minute", "standard": "6000/minute", "unlimited": ""}',
        "HERALD_JWT_SECRET": TEST_JWT_SECRET,
        # Providers reach the vendor emulators on the loopback (tests/emulators); every other
        # private or metadata address stays refused.
        "HERALD_OUTBOUND_ALLOW": "127.0.0.1/32",
        # Rate-limit waits over 2 s are deferred through the retry topics (tests see both paths).
        "HERALD_PACING_MAX_WAIT_S": "2",
        # Provider quality over 10 s (1-second buckets, looked at twice a second); breakers open
        # after 3 consecutive failures and are probed after 3 s (tests/e2e/test_smart_routing.py).
        "HERALD_QUALITY_WINDOW_S": "10",
        "HERALD_QUALITY_BUCKET_S": "1",
        "HERALD_QUALITY_TICK_S": "0.5",
        "HERALD_QUALITY_REFRESH_S": "2",
        "HERALD_BREAKER_FAILURES": "3",
        "HERALD_BREAKER_COOLDOWN_S": "3",
        "HERALD_BREAKER_PROBE_EVERY_S": "2",
        # Status callbacks (tests/e2e/test_callbacks.py): 4 tries within about a second.
        "HERALD_CALLBACK_RETRY_DELAYS_S": "0.2,0.3,0.4",
        "HERALD_CALLBACK_TIMEOUT_S": "3",
    }
    try:
        yield b
    finally:
        controller.stop()
        for server in (b.redis, pg, tansu):
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Pipeline:
    backing: Backing
    services: dict[str, Service]
    ingest_url: str
    headers: dict[str, str] = field(default_factory=dict)  # an all-scopes key of the default tenant

    def logs(self) -> str:
        return "\n".join(f"===== {s.name} =====\n{s.logs()[-6000:]}" for s in self.services.values())


@pytest.fixture(scope="session")
def pipeline(backing: Backing) -> Iterator[Pipeline]:
    """The services, started as ``make run`` starts them."""
    services = start_services(backing.env, backing.tmp)
    try:
        # The default tenant's seed quota (10,000 emails a month) is not what this suite tests;
        # tests/e2e/test_access.py tests quotas on a tenant of its own.
        access.admin(backing.env, "set-quota", "default", "email", "unlimited")
        headers = access.admin_headers(backing.env, services["ingest"].url, name="suite")
        yield Pipeline(backing, services, services["ingest"].url, headers)
    finally:
        stop_services(services)
    # Every secret and token the run handed out, searched for in every service's log of the run
    # (a failure here fails the session).
    logs = "".join(path.read_text(errors="replace") for path in backing.tmp.rglob("*.log"))
    leaked = [secret[:6] + "…" for secret in access.ISSUED if secret in logs]
    assert not leaked, f"secrets found in the services' logs: {leaked}"
    sys.stderr.write(f"\nsecret scan: {len(access.ISSUED)} secrets and tokens, {len(logs)} bytes of logs, none found\n")


@pytest.fixture
def dump_logs_on_failure(request: pytest.FixtureRequest, pipeline: Pipeline) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.stderr.write(pipeline.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
