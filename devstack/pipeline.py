"""Starting Herald's four services as subprocesses (``python -m ...``), as ``make run`` does;
used by the test suite and the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from devstack.servers import free_port

ROOT = Path(__file__).resolve().parent.parent

COMMANDS: dict[str, list[str]] = {
    "ingest": ["-m", "services.ingest"],
    "router": ["-m", "services.router"],
    "sender-email": ["-m", "services.senders", "email"],
    "tracker": ["-m", "services.tracker"],
}
PORT_VARIABLE = {
    "ingest": "HERALD_INGEST_PORT",
    "router": "HERALD_ROUTER_HTTP_PORT",
    "sender-email": "HERALD_SENDER_HTTP_PORT",
    "tracker": "HERALD_TRACKER_HTTP_PORT",
}


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log_path: Path
    port: int

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_ready(url: str, process: subprocess.Popen, timeout: float) -> None:
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


def start_services(
    env: dict[str, str], log_dir: Path, names: list[str] | None = None, timeout: float = 120
) -> dict[str, Service]:
    """Start the named services (all four by default) and wait until each is ready."""
    started: dict[str, Service] = {}
    for name in names or list(COMMANDS):
        port = free_port()
        log_path = log_dir / f"{name}.log"
        proc = subprocess.Popen(
            [sys.executable, *COMMANDS[name]],
            cwd=ROOT,
            env={**os.environ, **env, PORT_VARIABLE[name]: str(port), "PYTHONUNBUFFERED": "1"},
            stdout=open(log_path, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        started[name] = Service(name, proc, log_path, port)
    try:
        for service in started.values():
            wait_ready(f"{service.url}/health/ready", service.process, timeout)
    except Exception:
        for service in started.values():
            sys.stderr.write(f"===== {service.name} =====\n{service.logs()[-6000:]}\n")
        stop_services(started)
        raise
    return started


def stop_services(services: dict[str, Service], timeout: float = 15) -> None:
    for service in services.values():
        if service.process.poll() is None:
            service.process.terminate()
    for service in services.values():
        try:
            service.process.wait(timeout)
        except subprocess.TimeoutExpired:
            service.process.kill()
