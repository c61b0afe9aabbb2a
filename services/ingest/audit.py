"""The audit log: who changed what, when and from where (admin and config actions).

Entries are written in the same transaction as the change they describe where the change has
one, so there is no change without its entry. ``details`` names what changed, never a secret
(passwords and API secrets appear as ``"<set>"``)."""

from __future__ import annotations

from typing import Any

import asyncpg
from fastapi import Request

from shared.logging import request_id_var

SECRET_FIELDS = frozenset({"smtp_password", "api_secret", "password", "secret", "token"})


def scrub(details: dict[str, Any]) -> dict[str, Any]:
    return {k: ("<set>" if k in SECRET_FIELDS and v else v) for k, v in details.items()}


async def record(
    conn: asyncpg.Connection | asyncpg.Pool,
    request: Request,
    action: str,
    target_type: str,
    target_id: object | None,
    details: dict[str, Any] | None = None,
) -> None:
    principal = request.scope["state"]["principal"]
    client = request.client
    await conn.execute(
        """INSERT INTO audit_log (tenant_id, actor, action, target_type, target_id, details, source_ip, request_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        principal.tenant,
        principal.actor,
        action,
        target_type,
        None if target_id is None else str(target_id),
        scrub(details or {}),
        client.host if client else None,
        request_id_var.get(),
    )
