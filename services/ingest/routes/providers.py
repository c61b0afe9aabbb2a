"""Providers of the channels other than email (issue 9): a tenant configures several per
channel (``POST /api/v1/providers``), each an instance of a plugin from the catalogue
(``GET /api/v1/providers/catalogue``) with its configuration validated by the plugin's model.
Secret fields are stored encrypted (AES-256-GCM, bound to the row) and never returned: an
answer says which are set. Every change is audited; senders follow them through NOTIFY, routers
through ``notify.config`` (the public facts only: :mod:`services.ingest.routing`). Email's
providers are the mailbox pool (``/api/v1/email-accounts``)."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, Literal

import asyncpg
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.ingest import audit
from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.http import envelope, iso_z, json_body_schema, parse_body
from services.ingest.routing import provider_route_of
from services.senders.plugins import CATALOGUE, plugin
from services.senders.plugins.base import Costs
from services.senders.plugins.config import seal, secret_fields, split, unseal
from shared.channels import CHANNELS, PROVIDER_NAME
from shared.crypto import DecryptError
from shared.errors import ErrorCode, HeraldError
from shared.events import Channel

router = APIRouter(prefix="/api/v1/providers", tags=["providers"])

_TEXT = r"^[^\r\n\x00]*$"
# Configuration fields that say where a provider's requests (and so its secrets) go.
_ENDPOINT = re.compile(r"(?i)endpoint|url|server|api_base|host|uri")
_COLUMNS = """id, tenant_id, channel, provider, name, config, secrets, priority, weight, costs, rate_limit,
    is_active, description, revision, created_at, updated_at"""


class RateLimitIn(BaseModel):
    """The tenant's own limit, on top of the vendor's documented ones (waited for, not dropped)."""

    model_config = ConfigDict(extra="forbid")
    count: int = Field(ge=1, le=1_000_000)
    per_s: float = Field(gt=0, le=86_400)
    scope: Literal["provider", "recipient"] = "provider"


class ProviderIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    channel: Channel = Field(examples=["sms"])
    provider: str = Field(min_length=1, max_length=40, description="the plugin (catalogue)", examples=["aliyun"])
    name: str = Field(pattern=f"^(?:{PROVIDER_NAME})$", description="unique per channel; bots: the send's `to`",
                      examples=["aliyun-main"])  # fmt: skip
    config: dict[str, Any] = Field(default_factory=dict, description="the plugin's configuration (catalogue schema)")
    priority: int = Field(default=100, ge=0, le=10_000, description="lower first when a send names none")
    weight: int = Field(default=100, ge=0, le=10_000)
    costs: Costs | None = Field(default=None, description='{"default": 0.05, "by_country": {"86": 0.045}}')
    rate_limit: RateLimitIn | None = None
    is_active: bool = True
    description: str | None = Field(default=None, max_length=500, pattern=_TEXT)


class ProviderPatch(BaseModel):
    """Fields to change; ``config`` fields given replace theirs (a secret given is replaced,
    one left out is kept), ``rate_limit: null`` removes the tenant's own limit."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str | None = Field(default=None, pattern=f"^(?:{PROVIDER_NAME})$")
    config: dict[str, Any] | None = None
    priority: int | None = Field(default=None, ge=0, le=10_000)
    weight: int | None = Field(default=None, ge=0, le=10_000)
    costs: Costs | None = None
    rate_limit: RateLimitIn | None = None
    is_active: bool | None = None
    description: str | None = Field(default=None, max_length=500, pattern=_TEXT)


def _plugin_of(channel: Channel, name: str) -> Any:
    if channel is Channel.EMAIL:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "email's providers are the mailbox pool: /api/v1/email-accounts",
                          field="channel")  # fmt: skip
    try:
        return plugin(channel.value, name)
    except LookupError:
        known = ", ".join(sorted(CATALOGUE.get(channel.value, {})))
        raise HeraldError(ErrorCode.INVALID_PARAMS, f"no provider {name!r} for {channel.value} (one of: {known})",
                          field="provider") from None  # fmt: skip


def _validated(cls: Any, config: dict[str, Any]) -> Any:
    """The plugin's configuration model, or 1001 naming ``config.<field>``."""
    try:
        return cls.Config.model_validate(config)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", "config", *e["loc"]), "input": None} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def _out(row: asyncpg.Record) -> dict[str, Any]:
    cls = plugin(row["channel"], row["provider"])
    return {
        "id": row["id"],
        "channel": row["channel"],
        "provider": row["provider"],
        "name": row["name"],
        "config": {k: v for k, v in row["config"].items() if k != "_secrets"},
        # Which secrets are set; their values never leave.
        "secrets": {name: name in _set_secrets(row) for name in sorted(secret_fields(cls.Config))},
        "priority": row["priority"],
        "weight": row["weight"],
        "costs": row["costs"] or None,
        "rate_limit": row["rate_limit"],
        "is_active": row["is_active"],
        "description": row["description"],
        "revision": row["revision"],
        "created_at": iso_z(row["created_at"]),
        "updated_at": iso_z(row["updated_at"]),
    }


def _set_secrets(row: asyncpg.Record) -> set[str]:
    # The names of the secrets stored are kept beside them in the public config's "_secrets".
    return set(row["config"].get("_secrets", [])) if row["secrets"] else set()


def _store(config: Any) -> tuple[dict[str, Any], dict[str, str]]:
    public, hidden = split(config)
    return {**public, "_secrets": sorted(hidden)}, hidden


@router.get("/catalogue", summary="Every channel and provider plugin, with its configuration schema")
async def catalogue(request: Request):
    tenant_of(request, Scope.READ)
    channels = []
    for channel, names in CATALOGUE.items():
        spec = CHANNELS[Channel(channel)]
        providers = []
        for name in names:
            cls = plugin(channel, name)
            providers.append({
                "provider": name,
                "title": cls.title,
                "docs": list(cls.docs),
                "formats": sorted(cls.formats),
                "rate_limits": [{"count": r.count, "per_s": r.per_s, "scope": r.scope, "source": r.source}
                                for r in cls.rate_limits],
                "default_cost": str(cls.default_cost),
                "address": cls.address or spec.address,
                "secrets": sorted(secret_fields(cls.Config)),
                "config_schema": cls.Config.model_json_schema(),
            })  # fmt: skip
        channels.append({
            "channel": channel,
            "address": spec.address,
            "to_names_provider": spec.endpoint,
            "formats": sorted(spec.formats),
            "providers": providers,
        })  # fmt: skip
    return envelope({"channels": channels})


@router.post("", status_code=201, summary="Configure a provider", openapi_extra=json_body_schema(ProviderIn))
async def create_provider(request: Request):
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    body = await parse_body(request, ProviderIn)
    cls = _plugin_of(body.channel, body.provider)
    public, hidden = _store(_validated(cls, body.config))
    box = request.app.state.secret_box
    async with services.pool.acquire() as conn, conn.transaction():
        provider_id = await conn.fetchval("SELECT nextval('providers_id_seq')")
        try:
            row = await conn.fetchrow(
                f"""INSERT INTO providers (id, tenant_id, channel, provider, name, config, secrets, priority, weight,
                        costs, rate_limit, is_active, description)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING {_COLUMNS}""",
                provider_id, tenant_id, body.channel.value, body.provider, body.name, public,
                seal(box, provider_id, hidden), body.priority, body.weight,
                body.costs.model_dump(mode="json", exclude_none=True) if body.costs else {},
                body.rate_limit.model_dump() if body.rate_limit else None, body.is_active, body.description,
            )  # fmt: skip
        except asyncpg.UniqueViolationError:
            raise HeraldError(ErrorCode.DUPLICATE_REQUEST,
                              f"a {body.channel.value} provider named {body.name!r} already exists",
                              field="name") from None  # fmt: skip
        await audit.record(conn, request, "provider.create", "provider", provider_id,
                           {**body.model_dump(mode="json", exclude={"config"}), "config": public})  # fmt: skip
    await services.routing.changed(provider_route_of(row))
    return envelope(_out(row), status_code=201)


@router.get("", summary="The tenant's configured providers")
async def list_providers(
    request: Request,
    channel: Channel | None = Query(default=None),
    is_active: bool | None = Query(default=None),
):
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    rows = await services.pool.fetch(
        f"""SELECT {_COLUMNS} FROM providers WHERE tenant_id = $1 AND deleted_at IS NULL
              AND ($2::text IS NULL OR channel = $2) AND ($3::bool IS NULL OR is_active = $3)
            ORDER BY channel, priority, id""",
        tenant_id,
        channel.value if channel else None,
        is_active,
    )
    return envelope({"total": len(rows), "records": [_out(r) for r in rows]})


async def _fetch(conn: Any, tenant_id: str, provider_id: int, *, lock: bool = False) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""SELECT {_COLUMNS} FROM providers WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL
            {"FOR UPDATE" if lock else ""}""",
        tenant_id,
        provider_id,
    )
    if row is None:
        raise HeraldError(ErrorCode.NOT_FOUND, f"provider {provider_id} not found", field="provider_id")
    return row


@router.get("/{provider_id}", summary="One configured provider (secrets: only whether they are set)")
async def get_provider(provider_id: int, request: Request):
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    return envelope(_out(await _fetch(services.pool, tenant_id, provider_id)))


@router.patch("/{provider_id}", summary="Change a provider", openapi_extra=json_body_schema(ProviderPatch))
async def update_provider(provider_id: int, request: Request):
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    body = await parse_body(request, ProviderPatch)
    given = body.model_dump(exclude_unset=True)
    for name in ("name", "config", "priority", "weight", "is_active"):
        if name in given and given[name] is None:
            raise HeraldError(ErrorCode.INVALID_PARAMS, "may not be null", field=name)
    box = request.app.state.secret_box
    async with services.pool.acquire() as conn, conn.transaction():
        row = await _fetch(conn, tenant_id, provider_id, lock=True)
        changes: dict[str, Any] = {k: v for k, v in given.items() if k not in ("config", "costs", "rate_limit")}
        if "costs" in given:
            changes["costs"] = body.costs.model_dump(mode="json", exclude_none=True) if body.costs else {}
        if "rate_limit" in given:
            changes["rate_limit"] = body.rate_limit.model_dump() if body.rate_limit else None
        public_changes: dict[str, Any] = {}
        if body.config is not None:
            cls = plugin(row["channel"], row["provider"])
            secrets = secret_fields(cls.Config)
            current = {k: v for k, v in row["config"].items() if k != "_secrets"}
            stored = _stored_secrets(box, row, secrets, body.config)
            # Where the secrets go may only change with the secrets: a new endpoint, server or
            # URL with the stored secrets kept would send them to whoever the caller names.
            was = {**current, **stored}
            moved = [k for k, v in body.config.items() if _ENDPOINT.search(k) and was.get(k) != v]
            missing = [n for n in sorted(stored) if n not in body.config] if moved else []
            if missing:
                raise HeraldError(ErrorCode.INVALID_PARAMS, f"changing {moved[0]} needs the secrets again "
                                  f"({', '.join(missing)})", field=f"config.{missing[0]}")  # fmt: skip
            merged = {**current, **stored, **body.config}
            public, hidden = _store(_validated(cls, merged))
            changes["config"] = public
            if moved or secrets & body.config.keys():  # else the stored ciphertext stays
                changes["secrets"] = seal(box, provider_id, hidden)
            public_changes = {k: v for k, v in body.config.items() if k not in secrets}
            public_changes.update({k: "(changed)" for k in body.config if k in secrets})
        if not changes:
            return envelope(_out(row))
        sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(changes, start=3))
        try:
            row = await conn.fetchrow(
                f"""UPDATE providers SET {sets}, revision = revision + 1, updated_at = now()
                    WHERE tenant_id = $1 AND id = $2 RETURNING {_COLUMNS}""",
                tenant_id,
                provider_id,
                *changes.values(),
            )
        except asyncpg.UniqueViolationError:
            raise HeraldError(ErrorCode.DUPLICATE_REQUEST, f"a provider named {body.name!r} already exists",
                              field="name") from None  # fmt: skip
        details = {k: v for k, v in given.items() if k != "config"}
        if body.config is not None:
            details["config"] = public_changes
        await audit.record(conn, request, "provider.update", "provider", provider_id, _jsonable(details))
    await services.routing.changed(provider_route_of(row))
    return envelope(_out(row))


@router.delete("/{provider_id}", summary="Remove a provider (messages already routed to it fail with 2011)")
async def delete_provider(provider_id: int, request: Request):
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    async with services.pool.acquire() as conn, conn.transaction():
        await _fetch(conn, tenant_id, provider_id, lock=True)
        row = await conn.fetchrow(
            f"""UPDATE providers SET deleted_at = now(), is_active = false, revision = revision + 1,
                   updated_at = now(), secrets = '' WHERE tenant_id = $1 AND id = $2 RETURNING {_COLUMNS}""",
            tenant_id,
            provider_id,
        )
        await audit.record(conn, request, "provider.delete", "provider", provider_id)
    await services.routing.changed(provider_route_of(row, deleted=True))
    return envelope({"id": provider_id, "deleted": True})


def _stored_secrets(box: Any, row: asyncpg.Record, secrets: frozenset[str], given: dict[str, Any]) -> dict[str, str]:
    """The row's secrets, decrypted; none needed when the change gives them all (so a row whose
    ciphertext no longer decrypts, after a key change, can be repaired by giving them again)."""
    if secrets <= given.keys():
        return {}
    try:
        return unseal(box, row["id"], row["secrets"])
    except DecryptError:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "the stored secrets cannot be decrypted (was the encryption "
                          f"key changed?): give them all again ({', '.join(sorted(secrets))})",
                          field="config") from None  # fmt: skip


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value
