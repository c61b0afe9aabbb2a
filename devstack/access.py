"""API keys and tokens for the suite, the benchmarks and scripts: keys are made with the
operator's command (``python -m services.admin``), exactly as an operator makes the first one,
and exchanged for a token through the API."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import httpx
import orjson

from devstack.pipeline import ROOT

ALL_SCOPES = "send,read,templates,config,admin"

# Every secret and token handled here, for the suite's scan of the services' logs.
ISSUED: list[str] = []


def admin(env: dict[str, str], *args: str) -> Any:
    """Run one admin command; answers its JSON output."""
    done = subprocess.run(
        [sys.executable, "-m", "services.admin", "--json", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"services.admin {args[0]} failed: {done.stderr.decode(errors='replace')[-2000:]}")
    return orjson.loads(done.stdout)


def new_key(
    env: dict[str, str],
    *,
    tenant: str = "default",
    scopes: str = ALL_SCOPES,
    tier: str = "unlimited",
    name: str = "test",
) -> tuple[str, str]:
    made = admin(env, "create-key", "--tenant", tenant, "--name", name, "--scopes", scopes, "--tier", tier)
    ISSUED.append(made["api_secret"])
    return made["api_key"], made["api_secret"]


def token_for(url: str, api_key: str, api_secret: str) -> str:
    r = httpx.post(f"{url}/api/v1/auth/token", json={"api_key": api_key, "api_secret": api_secret}, timeout=30)
    r.raise_for_status()
    token = r.json()["data"]["access_token"]
    ISSUED.append(token)
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def admin_headers(env: dict[str, str], url: str, **key: Any) -> dict[str, str]:
    """Headers of a fresh all-scopes key of the default tenant (unlimited tier)."""
    return bearer(token_for(url, *new_key(env, **key)))
