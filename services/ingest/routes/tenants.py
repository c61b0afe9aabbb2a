"""The caller's tenant and its settings (seed 004 §5.2). Another tenant's key answers 404.
Issue 7 puts these behind the ``admin`` scope."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from services.ingest.deps import services_of, tenant_of
from services.ingest.http import envelope, json_body_schema, parse_body
from shared.errors import ErrorCode, HeraldError

router = APIRouter(prefix="/api/v1/tenants", tags=["tenants"])


class TenantPatch(BaseModel):
    """Settings to change; absent fields stay, ``null`` returns a setting to the service default."""

    model_config = ConfigDict(extra="forbid")

    dedup_window_s: int | None = Field(default=None, ge=0, le=86400)


_COLUMNS = """tenant_key, tenant_name, status, email_quota, sms_quota, current_email_usage,
    current_sms_usage, dedup_window_s, created_at, updated_at"""


async def _fetch(request: Request, tenant_key: str) -> dict[str, Any]:
    if tenant_key != tenant_of(request):
        raise HeraldError(ErrorCode.NOT_FOUND, f"tenant {tenant_key} not found", field="tenant_key")
    services = services_of(request)
    row = await services.pool.fetchrow(f"SELECT {_COLUMNS} FROM tenants WHERE tenant_key = $1", tenant_key)
    if row is None:
        raise HeraldError(ErrorCode.NOT_FOUND, f"tenant {tenant_key} not found", field="tenant_key")
    out = dict(row)
    out["effective_dedup_window_s"] = (
        services.settings.dedup_window_s if out["dedup_window_s"] is None else out["dedup_window_s"]
    )
    for key in ("created_at", "updated_at"):
        out[key] = out[key].isoformat().replace("+00:00", "Z")
    return out


@router.get("/{tenant_key}", summary="A tenant and its settings")
async def get_tenant(tenant_key: str, request: Request):
    return envelope(await _fetch(request, tenant_key))


@router.patch("/{tenant_key}", summary="Change a tenant's settings", openapi_extra=json_body_schema(TenantPatch))
async def update_tenant(tenant_key: str, request: Request):
    body = await parse_body(request, TenantPatch)
    await _fetch(request, tenant_key)  # 404 for anyone else's
    services = services_of(request)
    if "dedup_window_s" in body.model_fields_set:
        await services.pool.execute(
            "UPDATE tenants SET dedup_window_s = $2, updated_at = now() WHERE tenant_key = $1",
            tenant_key,
            body.dedup_window_s,
        )
        services.tenants.forget(tenant_key)
    return envelope(await _fetch(request, tenant_key))
