"""Real servers for the suite: Tansu, PostgreSQL, Redis and an SMTP sink, started once per
session on free ports; the four Herald services run as subprocesses (``python -m ...``) against
them, exactly as ``make run`` starts them. Nothing here stands in for a server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from devstack import servers, sinks

ROOT = Path(__file__).resolve().parent.parent


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
        "HERALD_MAX_BODY_BYTES": "65536",
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
class Service:
    name: str
    process: subprocess.Popen
    log_path: Path
    port: int

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Pipeline:
    backing: Backing
    services: dict[str, Service]
    ingest_url: str

    def logs(self) -> str:
        return "\n".join(f"===== {s.name} =====\n{s.logs()[-6000:]}" for s in self.services.values())


def _wait_ready(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {process.returncode}")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s: {last}")


@pytest.fixture(scope="session")
def pipeline(backing: Backing) -> Iterator[Pipeline]:
    """The four services, started as ``make run`` starts them."""
    ports = {name: servers.free_port() for name in ("ingest", "router", "sender", "tracker")}
    env = {
        **os.environ,
        **backing.env,
        "HERALD_INGEST_PORT": str(ports["ingest"]),
        "HERALD_ROUTER_HTTP_PORT": str(ports["router"]),
        "HERALD_SENDER_HTTP_PORT": str(ports["sender"]),
        "HERALD_TRACKER_HTTP_PORT": str(ports["tracker"]),
        "PYTHONUNBUFFERED": "1",
    }
    commands = {
        "ingest": ([sys.executable, "-m", "services.ingest"], ports["ingest"]),
        "router": ([sys.executable, "-m", "services.router"], ports["router"]),
        "sender-email": ([sys.executable, "-m", "services.senders", "email"], ports["sender"]),
        "tracker": ([sys.executable, "-m", "services.tracker"], ports["tracker"]),
    }
    started: dict[str, Service] = {}
    for name, (cmd, port) in commands.items():
        log_path = backing.tmp / f"{name}.log"
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=open(log_path, "wb"),
            stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        started[name] = Service(name, proc, log_path, port)
    pipe = Pipeline(backing, started, f"http://127.0.0.1:{ports['ingest']}")
    try:
        for service in started.values():
            _wait_ready(f"http://127.0.0.1:{service.port}/health/ready", service.process, 120)
    except Exception:
        sys.stderr.write(pipe.logs())
        for service in started.values():
            service.process.kill()
        raise
    try:
        yield pipe
    finally:
        for service in started.values():
            service.process.terminate()
        for service in started.values():
            try:
                service.process.wait(15)
            except subprocess.TimeoutExpired:
                service.process.kill()


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
