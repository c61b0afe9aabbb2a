"""Digest rules (issue 8): the messages of a category on a channel to one recipient within a
window are delivered as one message listing them, rendered with a template (variables ``items``,
``count``, ``category``) or a built-in listing. One live rule per tenant, category and channel.
Create, list, get, update, delete; every change is audited and published to the routers."""

from __future__ import annotations

from typing import Any

import asyncpg
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from services.ingest import audit
from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.frequency import DIGEST_COLUMNS, digest_of
from services.ingest.http import envelope, json_body_schema, parse_body
from services.ingest.routes.templates import resolve as resolve_template
from shared.errors import ErrorCode, HeraldError
from shared.events import Category, Channel
from shared.frequency import DIGEST_VARIABLES, MAX_DIGEST_WINDOW_S

router = APIRouter(prefix="/api/v1/digest-rules", tags=["digest rules"])

_TEXT = r"^[^\r\n\x00]*$"


class DigestIn(BaseModel):
    """A new digest rule."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    category: Category = Field(examples=["marketing"])
    channel: Channel = Channel.EMAIL
    window_s: int = Field(ge=1, le=MAX_DIGEST_WINDOW_S, description="from a bucket's first message", examples=[3600])
    template_id: int | None = Field(
        default=None, ge=1, description="rendered with items, count and category; default: a built-in listing"
    )
    is_active: bool = True
    description: str | None = Field(default=None, max_length=500, pattern=_TEXT)


class DigestPatch(BaseModel):
    """Fields to change; absent fields stay (``template_id: null``: the built-in listing)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    category: Category | None = None
    channel: Channel | None = None
    window_s: int | None = Field(default=None, ge=1, le=MAX_DIGEST_WINDOW_S)
    template_id: int | None = Field(default=None, ge=1)
    is_active: bool | None = None
    description: str | None = Field(default=None, max_length=500, pattern=_TEXT)


_NULLABLE = frozenset({"template_id", "description"})


def _time(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _out(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "category": row["category"],
        "channel": row["channel"],
        "window_s": row["window_s"],
        "template_id": row["template_id"],
        "is_active": row["is_active"],
        "description": row["description"],
        "revision": row["revision"],  # routers expose the highest applied (herald_frequency_rule_revision)
        "created_at": _time(row["created_at"]),
        "updated_at": _time(row["updated_at"]),
    }


def _not_found(rule_id: int) -> HeraldError:
    return HeraldError(ErrorCode.NOT_FOUND, f"digest rule {rule_id} not found", field="rule_id")


def _taken(category: str, channel: str) -> HeraldError:
    return HeraldError(
        ErrorCode.DUPLICATE_REQUEST, f"a digest rule for {category} on {channel} exists", field="category"
    )


async def _check_template(request: Request, tenant_id: str, template_id: int, channel: str) -> None:
    """The template exists, has a variant for ``channel`` and uses only what a digest gives it."""
    version = await resolve_template(request, tenant_id, template_id, None, None)
    if not any(v.channel == channel for v in version.variants):
        raise HeraldError(ErrorCode.TEMPLATE_NOT_FOUND, f"template {template_id} has no {channel} variant",
                          field="template_id")  # fmt: skip
    extra = sorted(set(version.variables) - DIGEST_VARIABLES)
    if extra:
        raise HeraldError(
            ErrorCode.TEMPLATE_RENDER_FAILED,
            f"a digest template may use only {', '.join(sorted(DIGEST_VARIABLES))}; "
            f"template {template_id} declares {', '.join(extra)}",
            field="template_id",
        )


async def _published(request: Request, row: asyncpg.Record) -> None:
    await services_of(request).rules.changed(digest_of(row))


@router.post("", status_code=201, summary="Create a digest rule", openapi_extra=json_body_schema(DigestIn))
async def create_rule(request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    body = await parse_body(request, DigestIn)
    if body.template_id is not None:
        await _check_template(request, tenant_id, body.template_id, body.channel.value)
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        try:
            row = await conn.fetchrow(
                f"""INSERT INTO digest_rules (tenant_id, category, channel, window_s, template_id, is_active,
                        description)
                    VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {DIGEST_COLUMNS}""",
                tenant_id,
                body.category,
                body.channel.value,
                body.window_s,
                body.template_id,
                body.is_active,
                body.description,
            )
        except asyncpg.UniqueViolationError:
            raise _taken(body.category, body.channel.value) from None
        await audit.record(conn, request, "digest_rule.create", "digest_rule", row["id"], body.model_dump(mode="json"))
    await _published(request, row)
    return envelope(_out(row), status_code=201)


@router.get("", summary="List digest rules")
async def list_rules(
    request: Request,
    category: str | None = Query(default=None, max_length=64),
    page: int = Query(default=1, ge=1, le=100_000),
    page_size: int = Query(default=20, ge=1, le=100),
):
    where, args = ["tenant_id = $1", "deleted_at IS NULL"], [tenant_of(request, Scope.CONFIG)]
    if category is not None:
        args.append(category)
        where.append(f"category = ${len(args)}")
    clause = " AND ".join(where)
    async with services_of(request).pool.acquire() as conn:
        total = await conn.fetchval(f"SELECT count(*) FROM digest_rules WHERE {clause}", *args)
        rows = await conn.fetch(
            f"SELECT {DIGEST_COLUMNS} FROM digest_rules WHERE {clause} ORDER BY id "
            f"LIMIT {page_size} OFFSET {(page - 1) * page_size}",
            *args,
        )
    return envelope({"total": total, "page": page, "page_size": page_size, "records": [_out(r) for r in rows]})


async def _fetch(conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, rule_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"SELECT {DIGEST_COLUMNS} FROM digest_rules WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
        tenant_id,
        rule_id,
    )
    if row is None:
        raise _not_found(rule_id)
    return row


@router.get("/{rule_id}", summary="One digest rule")
async def get_rule(rule_id: int, request: Request):
    return envelope(_out(await _fetch(services_of(request).pool, tenant_of(request, Scope.CONFIG), rule_id)))


@router.patch("/{rule_id}", summary="Change a digest rule", openapi_extra=json_body_schema(DigestPatch))
async def update_rule(rule_id: int, request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    body = await parse_body(request, DigestPatch)
    changes = body.model_dump(mode="json", exclude_unset=True)
    if not changes:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "nothing to change", field="body")
    for key, value in changes.items():
        if value is None and key not in _NULLABLE:
            raise HeraldError(ErrorCode.INVALID_PARAMS, "may not be null", field=key)
    pool = services_of(request).pool
    current = await _fetch(pool, tenant_id, rule_id)
    template_id = changes.get("template_id", current["template_id"])
    if template_id is not None and ("template_id" in changes or "channel" in changes):
        await _check_template(request, tenant_id, template_id, changes.get("channel", current["channel"]))
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(changes, start=3))
    async with pool.acquire() as conn, conn.transaction():
        try:
            row = await conn.fetchrow(
                f"""UPDATE digest_rules SET {assignments}, updated_at = now(),
                        revision = nextval('frequency_revision_seq')
                    WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING {DIGEST_COLUMNS}""",
                tenant_id,
                rule_id,
                *changes.values(),
            )
        except asyncpg.UniqueViolationError:
            raise _taken(
                changes.get("category", current["category"]), changes.get("channel", current["channel"])
            ) from None
        if row is None:
            raise _not_found(rule_id)
        await audit.record(conn, request, "digest_rule.update", "digest_rule", rule_id, changes)
    await _published(request, row)
    return envelope(_out(row))


@router.delete("/{rule_id}", summary="Delete a digest rule (digests already open are still delivered)")
async def delete_rule(rule_id: int, request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""UPDATE digest_rules SET deleted_at = now(), updated_at = now(),
                    revision = nextval('frequency_revision_seq')
                WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING {DIGEST_COLUMNS}""",
            tenant_id,
            rule_id,
        )
        if row is None:
            raise _not_found(rule_id)
        await audit.record(conn, request, "digest_rule.delete", "digest_rule", rule_id)
    await _published(request, row)
    return envelope({"id": rule_id, "deleted": True, "revision": row["revision"]})
