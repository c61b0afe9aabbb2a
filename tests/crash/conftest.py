"""Crash and outage tests: each module gets its own backing servers and its own four services,
because these tests kill them (``kill -9``, SIGTERM) and stop the servers underneath them. The
session-wide ``pipeline`` of the other suites is never touched."""

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
from devstack.pipeline import (
    Service,
    kill_service,
    restart_service,
    start_services,
    stop_services,
    terminate_service,
)
from tests.conftest import TEST_ENCRYPTION_KEY, TEST_JWT_SECRET


@dataclass
class Stack:
    """Backing servers and services owned by one test module."""

    tmp: Path
    tansu: servers.Server
    pg: servers.Server
    redis: servers.Server
    smtp_port: int
    smtp: sinks.SinkHandler
    smtp_controller: object
    env: dict[str, str] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # an all-scopes key of the default tenant

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.tansu.port}"

    @property
    def dsn(self) -> str:
        return self.pg.extra["dsn"]

    @property
    def ingest_url(self) -> str:
        return self.services["ingest"].url

    def kill(self, name: str) -> None:
        kill_service(self.services[name])

    def terminate(self, name: str, timeout: float = 30) -> float:
        return terminate_service(self.services[name], timeout)

    def restart(self, name: str, timeout: float = 120) -> None:
        self.services[name] = restart_service(self.services[name], self.env, timeout)

    def stop_postgres(self) -> None:
        self.pg.stop()

    def start_postgres(self) -> None:
        self.pg = servers.start_postgres(self.tmp / "pg", self.pg.port, fast=True)

    def logs(self) -> str:
        return "\n".join(f"===== {s.name} =====\n{s.logs()[-8000:]}" for s in self.services.values())


def crash_env(tmp: Path, bootstrap: str, dsn: str, redis_port: int, smtp_port: int) -> dict[str, str]:
    """The variables the services read (the shape of ``backing.env`` in tests/conftest.py)."""
    return {
        "HERALD_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "HERALD_DATABASE_URL": dsn,
        "HERALD_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "HERALD_SMTP_HOST": "127.0.0.1",
        "HERALD_SMTP_PORT": str(smtp_port),
        "HERALD_SMTP_FROM_ADDRESS": "herald@example.org",
        "HERALD_SMTP_TLS_MODE": "none",
        # The bootstrap mailbox defaults to 500 a day; these tests send thousands.
        "HERALD_SMTP_DAILY_LIMIT": "1000000",
        "HERALD_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY,
        "HERALD_DATA_DIR": str(tmp / "data"),
        "HERALD_RETRY_DELAYS_S": "1,2,3",
        "HERALD_POOL_LEASE_SIZE": "1",
        # The sweeper publishes again what a restarted broker lost; quickly, for the test.
        "HERALD_SWEEP_STALLED_AFTER_S": "5",
        "HERALD_SWEEP_INTERVAL_S": "1",
        # ... and every service creates again the topics a restarted broker lost.
        "HERALD_KAFKA_TOPIC_CHECK_INTERVAL_S": "1",
        "HERALD_KAFKA_METADATA_MAX_AGE_S": "5",
        "HERALD_LOG_JSON": "true",
        # A member killed with -9 leaves the group only when its session times out; 6 s
        # rather than 10 keeps each restart here a few seconds shorter.
        "HERALD_KAFKA_SESSION_TIMEOUT_S": "6",
        "HERALD_API_SECRET_BCRYPT_ROUNDS": "4",
        "HERALD_JWT_SECRET": TEST_JWT_SECRET,
    }


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    tmp = Path(tempfile.mkdtemp(prefix="herald-crash-"))
    os.chmod(tmp, 0o755)
    tansu = servers.start_tansu(servers.free_port(), tmp / "tansu.log")
    pg = servers.start_postgres(tmp / "pg", servers.free_port(), fast=True)
    redis = servers.start_redis(servers.free_port())
    smtp_port = servers.free_port()
    controller, handler = sinks.start_smtp_sink(smtp_port)
    s = Stack(tmp, tansu, pg, redis, smtp_port, handler, controller)
    s.env = crash_env(tmp, s.bootstrap, s.dsn, redis.port, smtp_port)
    try:
        s.services = start_services(s.env, tmp)
        access.admin(s.env, "set-quota", "default", "email", "unlimited")
        s.headers = access.admin_headers(s.env, s.ingest_url, name="crash")
        yield s
    finally:
        stop_services(s.services)
        controller.stop()
        for server in (s.redis, s.pg, s.tansu):
            server.stop()
        if os.environ.get("HERALD_CRASH_KEEP"):  # debugging: keep the logs and data
            sys.stderr.write(f"crash stack kept in {tmp}\n")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, stack: Stack) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.stderr.write(stack.logs())
