"""API keys in PostgreSQL: made by the API (``admin`` scope) and by the operator's command
(``python -m services.admin``); both go through :func:`create_key`."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import asyncpg

from services.ingest.auth import hash_secret, new_api_key, new_api_secret

COLUMNS = """id, tenant_id, key_name, api_key, scopes, tier, is_active, expire_at, last_used_at, usage_count,
    description, created_by, created_at, updated_at"""


def key_out(row: asyncpg.Record) -> dict[str, Any]:
    out = dict(row)
    out["scopes"] = list(out["scopes"])
    for name in ("expire_at", "last_used_at", "created_at", "updated_at"):
        if out.get(name) is not None:
            out[name] = out[name].isoformat().replace("+00:00", "Z")
    return out


async def create_key(
    conn: asyncpg.Connection,
    *,
    tenant: str,
    name: str,
    scopes: list[str],
    tier: str,
    rounds: int,
    expire_at: datetime | None = None,
    description: str | None = None,
    created_by: str | None = None,
) -> tuple[dict[str, Any], str]:
    """A new key; answers its row and the secret (which is not kept anywhere)."""
    secret = new_api_secret()
    hashed = await asyncio.to_thread(hash_secret, secret, rounds)
    row = await conn.fetchrow(
        f"""INSERT INTO api_keys (tenant_id, key_name, api_key, api_secret_hash, scopes, tier, expire_at,
                description, created_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {COLUMNS}""",
        tenant, name, new_api_key(), hashed, sorted(set(scopes)), tier, expire_at, description, created_by,
    )  # fmt: skip
    return key_out(row), secret
