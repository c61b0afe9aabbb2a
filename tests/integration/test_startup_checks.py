"""A bad configuration stops a service at start-up with a clear message, before any traffic."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from devstack.pipeline import ROOT


@pytest.mark.parametrize("command", [["services.ingest"], ["services.senders", "email"]])
@pytest.mark.parametrize(
    ("key", "says"),
    [(None, "HERALD_ENCRYPTION_KEY is not set"), ("c2hvcnQ=", "must decode to 32 bytes")],
)
def test_missing_or_malformed_encryption_key_stops_start_up(command: list[str], key: str | None, says: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    if key is not None:
        env["HERALD_ENCRYPTION_KEY"] = key
    # Nothing listens on these: a service that got past the key check would hang, not exit.
    env.update({"HERALD_DATABASE_URL": "postgresql://x@127.0.0.1:1/x", "HERALD_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    done = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert says in done.stderr
    assert "Traceback" not in done.stderr
