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

from devstack import servers, sinks
from devstack.pipeline import Service, start_services, stop_services

# A throw-away AES-256 key for the suite (32 bytes, base64).
TEST_ENCRYPTION_KEY = "aGVyYWxkLXRlc3Qta2V5LTMyLWJ5dGVzLWxvbmctISE="


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

    def logs(self) -> str:
        return "\n".join(f"===== {s.name} =====\n{s.logs()[-6000:]}" for s in self.services.values())


@pytest.fixture(scope="session")
def pipeline(backing: Backing) -> Iterator[Pipeline]:
    """The four services, started as ``make run`` starts them."""
    services = start_services(backing.env, backing.tmp)
    try:
        yield Pipeline(backing, services, services["ingest"].url)
    finally:
        stop_services(services)


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
