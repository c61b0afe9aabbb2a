"""API keys of the caller's tenant (seed 004 §3.1.8, §5.1.5): create (the secret is shown once),
list, get (with usage: ``usage_count``, ``last_used_at``), update scopes, tier, expiry and name,
enable, disable, delete. All need the ``admin`` scope; every change is audited and reaches every
replica's token checks at once."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from services.ingest import audit
from services.ingest.auth import ALL_SCOPES, Scope, notify
from services.ingest.deps import services_of, tenant_of
from services.ingest.http import envelope, json_body_schema, parse_body
from services.ingest.keys import COLUMNS, create_key, key_out
from shared.errors import ErrorCode, HeraldError

router = APIRouter(prefix="/api/v1/api-keys", tags=["api keys"])

_LINE = r"^[^\r\n\x00]*$"


def _scopes(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    unknown = sorted(set(value) - set(ALL_SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; scopes are {', '.join(ALL_SCOPES)}")
    if not value:
        raise ValueError("at least one scope")
    return sorted(set(value))


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    key_name: str = Field(min_length=1, max_length=100, pattern=_LINE)
    scopes: list[str] = Field(min_length=1, max_length=5, description=f"any of {', '.join(ALL_SCOPES)}")
    tier: str | None = Field(default=None, max_length=32, description="rate-limit tier; default the service's")
    expire_at: AwareDatetime | None = None
    description: str | None = Field(default=None, max_length=1000)

    @field_validator("scopes")
    @classmethod
    def _known_scopes(cls, value: list[str]) -> list[str]:
        return _scopes(value)


class KeyPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    key_name: str | None = Field(default=None, min_length=1, max_length=100, pattern=_LINE)
    scopes: list[str] | None = Field(default=None, min_length=1, max_length=5)
    tier: str | None = Field(default=None, max_length=32)
    expire_at: AwareDatetime | None = None
    description: str | None = Field(default=None, max_length=1000)
    is_active: bool | None = None

    @field_validator("scopes")
    @classmethod
    def _known_scopes(cls, value: list[str] | None) -> list[str] | None:
        return _scopes(value)


def _check_tier(request: Request, tier: str | None) -> None:
    tiers = services_of(request).settings.rate_limit_tiers
    if tier is not None and tier not in tiers:
        raise HeraldError(ErrorCode.INVALID_PARAMS, f"unknown tier; tiers are {', '.join(tiers)}", field="tier")


def _check_expiry(expire_at: datetime | None) -> None:
    if expire_at is not None and expire_at <= datetime.now(UTC):
        raise HeraldError(ErrorCode.INVALID_PARAMS, "must be in the future", field="expire_at")


async def _fetch(request: Request, key_id: int, conn: Any = None) -> dict[str, Any]:
    tenant = tenant_of(request, Scope.ADMIN)
    row = await (conn or services_of(request).pool).fetchrow(
        f"SELECT {COLUMNS} FROM api_keys WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL", tenant, key_id
    )
    if row is None:
        raise HeraldError(ErrorCode.NOT_FOUND, f"API key {key_id} not found", field="key_id")
    return key_out(row)


@router.post(
    "",
    status_code=201,
    summary="Create an API key (its secret is shown this once)",
    openapi_extra=json_body_schema(KeyIn),
)
async def create(request: Request):
    tenant = tenant_of(request, Scope.ADMIN)
    body = await parse_body(request, KeyIn)
    _check_tier(request, body.tier)
    _check_expiry(body.expire_at)
    services = services_of(request)
    async with services.pool.acquire() as conn, conn.transaction():
        key, secret = await create_key(
            conn,
            tenant=tenant,
            name=body.key_name,
            scopes=body.scopes,
            tier=body.tier or services.settings.default_key_tier,
            rounds=services.settings.api_secret_bcrypt_rounds,
            expire_at=body.expire_at,
            description=body.description,
            created_by=request.scope["state"]["principal"].actor,
        )
        await audit.record(
            conn, request, "api_key.create", "api_key", key["id"],
            {"api_key": key["api_key"], "key_name": key["key_name"], "scopes": key["scopes"], "tier": key["tier"]},
        )  # fmt: skip
    return envelope({**key, "api_secret": secret}, status_code=201)


@router.get("", summary="The tenant's API keys")
async def list_keys(
    request: Request,
    is_active: bool | None = Query(default=None),
    page: int = Query(default=1, ge=1),
    page_size: int = Query(default=20, ge=1, le=100),
):
    tenant = tenant_of(request, Scope.ADMIN)
    where, args = "tenant_id = $1 AND deleted_at IS NULL", [tenant]
    if is_active is not None:
        args.append(is_active)
        where += f" AND is_active = ${len(args)}"
    pool = services_of(request).pool
    total = await pool.fetchval(f"SELECT count(*) FROM api_keys WHERE {where}", *args)
    rows = await pool.fetch(
        f"SELECT {COLUMNS} FROM api_keys WHERE {where} ORDER BY id LIMIT {page_size} OFFSET {(page - 1) * page_size}",
        *args,
    )
    return envelope({"total": total, "page": page, "page_size": page_size, "items": [key_out(r) for r in rows]})


@router.get("/{key_id}", summary="An API key and its usage")
async def get_key(key_id: int, request: Request):
    return envelope(await _fetch(request, key_id))


async def _change(request: Request, key_id: int, changes: dict[str, Any], action: str) -> dict[str, Any]:
    services = services_of(request)
    async with services.pool.acquire() as conn, conn.transaction():
        key = await _fetch(request, key_id, conn)
        if changes:
            sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(changes, start=2))
            await conn.execute(
                f"UPDATE api_keys SET {sets}, updated_at = now() WHERE id = $1", key_id, *changes.values()
            )
            await notify(conn, f"key:{key['api_key']}")
        details = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in changes.items()}
        await audit.record(conn, request, action, "api_key", key_id, {"api_key": key["api_key"], **details})
        out = await _fetch(request, key_id, conn) if action != "api_key.delete" else key
    services.auth.forget_key(key["api_key"])  # here at once; other replicas on NOTIFY
    return out


@router.patch(
    "/{key_id}", summary="Change a key's name, scopes, tier, expiry or state", openapi_extra=json_body_schema(KeyPatch)
)
async def update_key(key_id: int, request: Request):
    tenant_of(request, Scope.ADMIN)
    body = await parse_body(request, KeyPatch)
    _check_tier(request, body.tier)
    _check_expiry(body.expire_at)
    changes = {k: getattr(body, k) for k in body.model_fields_set}
    for name in ("key_name", "scopes", "tier", "is_active"):
        if name in changes and changes[name] is None:
            raise HeraldError(ErrorCode.INVALID_PARAMS, "may not be null", field=name)
    return envelope(await _change(request, key_id, changes, "api_key.update"))


@router.post("/{key_id}/enable", summary="Enable a key")
async def enable_key(key_id: int, request: Request):
    tenant_of(request, Scope.ADMIN)
    return envelope(await _change(request, key_id, {"is_active": True}, "api_key.enable"))


@router.post("/{key_id}/disable", summary="Disable a key: its tokens stop working at once")
async def disable_key(key_id: int, request: Request):
    tenant_of(request, Scope.ADMIN)
    return envelope(await _change(request, key_id, {"is_active": False}, "api_key.disable"))


@router.delete("/{key_id}", summary="Delete a key: its tokens stop working at once")
async def delete_key(key_id: int, request: Request):
    tenant_of(request, Scope.ADMIN)
    await _change(request, key_id, {"deleted_at": datetime.now(UTC), "is_active": False}, "api_key.delete")
    return envelope({"id": key_id, "deleted": True})
