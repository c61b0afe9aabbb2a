"""The audit log of the caller's tenant (``admin`` scope), newest first."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.http import envelope

router = APIRouter(prefix="/api/v1/audit-logs", tags=["audit"])


@router.get("", summary="Who changed what, when and from where")
async def list_entries(
    request: Request,
    action: str | None = Query(default=None, max_length=64, description="e.g. api_key.create"),
    target_type: str | None = Query(default=None, max_length=32),
    actor: str | None = Query(default=None, max_length=100),
    page: int = Query(default=1, ge=1),
    page_size: int = Query(default=50, ge=1, le=500),
):
    tenant = tenant_of(request, Scope.ADMIN)
    where, args = ["tenant_id = $1"], [tenant]
    for column, value in (("action", action), ("target_type", target_type), ("actor", actor)):
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    clause = " AND ".join(where)
    pool = services_of(request).pool
    total = await pool.fetchval(f"SELECT count(*) FROM audit_log WHERE {clause}", *args)
    rows = await pool.fetch(
        f"""SELECT id, actor, action, target_type, target_id, details, source_ip, request_id, created_at
            FROM audit_log WHERE {clause} ORDER BY created_at DESC, id DESC
            LIMIT {page_size} OFFSET {(page - 1) * page_size}""",
        *args,
    )
    items = [{**dict(r), "created_at": r["created_at"].isoformat().replace("+00:00", "Z")} for r in rows]
    return envelope({"total": total, "page": page, "page_size": page_size, "items": items})
