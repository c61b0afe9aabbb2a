"""The caller's tenant (seed 004 §5.2): its settings, monthly quotas and this month's usage.
Another tenant's key answers 404. Quotas are the operator's to set
(``python -m services.admin set-quota``), not the tenant's."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from services.ingest import audit
from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.http import envelope, json_body_schema, parse_body
from services.ingest.limits import month_bounds
from shared.errors import ErrorCode, HeraldError

router = APIRouter(prefix="/api/v1/tenants", tags=["tenants"])


class TenantPatch(BaseModel):
    """Settings to change; absent fields stay, ``null`` returns a setting to the service default."""

    model_config = ConfigDict(extra="forbid")

    dedup_window_s: int | None = Field(default=None, ge=0, le=86400)


_COLUMNS = """tenant_key, tenant_name, status, quotas, email_quota, sms_quota, dedup_window_s, created_at, updated_at"""


async def _fetch(request: Request, tenant_key: str, scope: Scope) -> dict[str, Any]:
    if tenant_key != tenant_of(request, scope):
        raise HeraldError(ErrorCode.NOT_FOUND, f"tenant {tenant_key} not found", field="tenant_key")
    services = services_of(request)
    row = await services.pool.fetchrow(f"SELECT {_COLUMNS} FROM tenants WHERE tenant_key = $1", tenant_key)
    if row is None:
        raise HeraldError(ErrorCode.NOT_FOUND, f"tenant {tenant_key} not found", field="tenant_key")
    out = dict(row)
    out["effective_dedup_window_s"] = (
        services.settings.dedup_window_s if out["dedup_window_s"] is None else out["dedup_window_s"]
    )
    start, end = month_bounds(datetime.now(UTC))
    usage = {channel: await services.quotas.used(tenant_key, channel) for channel in out["quotas"]}
    out["usage"] = {"month": f"{start:%Y-%m}", "resets_at": end.isoformat().replace("+00:00", "Z"), "used": usage}
    for key in ("created_at", "updated_at"):
        out[key] = out[key].isoformat().replace("+00:00", "Z")
    return out


@router.get("/{tenant_key}", summary="A tenant, its settings, quotas and this month's usage")
async def get_tenant(tenant_key: str, request: Request):
    return envelope(await _fetch(request, tenant_key, Scope.READ))


@router.patch("/{tenant_key}", summary="Change a tenant's settings", openapi_extra=json_body_schema(TenantPatch))
async def update_tenant(tenant_key: str, request: Request):
    await _fetch(request, tenant_key, Scope.CONFIG)  # 404 for anyone else's, 403 without the scope
    body = await parse_body(request, TenantPatch)
    services = services_of(request)
    if "dedup_window_s" in body.model_fields_set:
        async with services.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE tenants SET dedup_window_s = $2, updated_at = now() WHERE tenant_key = $1",
                tenant_key,
                body.dedup_window_s,
            )
            await audit.record(conn, request, "tenant.update", "tenant", tenant_key, body.model_dump())
        services.tenants.forget(tenant_key)
    return envelope(await _fetch(request, tenant_key, Scope.CONFIG))
