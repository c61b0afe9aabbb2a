"""Starting Herald's services as subprocesses (``python -m ...``), as ``make run`` does;
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
    # Every other channel's sender in one process (each its own consumer group, as if deployed alone).
    "sender-plugins": ["-m", "services.senders", "all-plugins"],
    "tracker": ["-m", "services.tracker"],
}
PORT_VARIABLE = {
    "ingest": "HERALD_INGEST_PORT",
    "router": "HERALD_ROUTER_HTTP_PORT",
    "sender-email": "HERALD_SENDER_HTTP_PORT",
    "sender-plugins": "HERALD_SENDER_HTTP_PORT",
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


def _spawn(name: str, env: dict[str, str], log_path: Path, port: int, *, append: bool = False) -> Service:
    proc = subprocess.Popen(
        [sys.executable, *COMMANDS[name]],
        cwd=ROOT,
        env={**os.environ, **env, PORT_VARIABLE[name]: str(port), "PYTHONUNBUFFERED": "1"},
        stdout=open(log_path, "ab" if append else "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    return Service(name, proc, log_path, port)


def start_services(
    env: dict[str, str], log_dir: Path, names: list[str] | None = None, timeout: float = 120
) -> dict[str, Service]:
    """Start the named services (all by default) and wait until each is ready."""
    started: dict[str, Service] = {}
    for name in names or list(COMMANDS):
        started[name] = _spawn(name, env, log_dir / f"{name}.log", free_port())
    try:
        for service in started.values():
            wait_ready(f"{service.url}/health/ready", service.process, timeout)
    except Exception:
        for service in started.values():
            sys.stderr.write(f"===== {service.name} =====\n{service.logs()[-6000:]}\n")
        stop_services(started)
        raise
    return started


def kill_service(service: Service) -> None:
    """``kill -9``: the process gets no chance to flush, commit or say goodbye (a crash)."""
    if service.process.poll() is None:
        service.process.kill()
    service.process.wait(10)


def terminate_service(service: Service, timeout: float = 30) -> float:
    """SIGTERM, then wait for the exit; answers the seconds it took (``kill -9`` after
    ``timeout``, and then the answer is ``inf``)."""
    started = time.monotonic()
    if service.process.poll() is None:
        service.process.terminate()
    try:
        service.process.wait(timeout)
    except subprocess.TimeoutExpired:
        service.process.kill()
        service.process.wait(10)
        return float("inf")
    return time.monotonic() - started


def restart_service(service: Service, env: dict[str, str], timeout: float = 120, *, wait: bool = True) -> Service:
    """Start a stopped (or killed) service again on the same port, appending to its log."""
    if service.process.poll() is None:
        raise RuntimeError(f"{service.name} is still running")
    with open(service.log_path, "ab") as log:
        log.write(f"\n===== restarted after exit code {service.process.returncode} =====\n".encode())
    fresh = _spawn(service.name, env, service.log_path, service.port, append=True)
    if wait:
        wait_ready(f"{fresh.url}/health/ready", fresh.process, timeout)
    return fresh


def stop_services(services: dict[str, Service], timeout: float = 15) -> None:
    for service in services.values():
        if service.process.poll() is None:
            service.process.terminate()
    for service in services.values():
        try:
            service.process.wait(timeout)
        except subprocess.TimeoutExpired:
            service.process.kill()
