"""Frequency caps (issue 8): at most N messages of a category to one recipient per window, each
with an action (suppress or defer). Create, list, get, update, delete; every change is audited
and published to the routers (:mod:`services.ingest.frequency`)."""

from __future__ import annotations

from typing import Any

import asyncpg
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from services.ingest import audit
from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.frequency import CAP_COLUMNS, cap_of
from services.ingest.http import envelope, json_body_schema, parse_body
from shared.errors import ErrorCode, HeraldError
from shared.events import Category, Channel
from shared.frequency import MAX_CAP_WINDOW_S, Action

router = APIRouter(prefix="/api/v1/frequency-caps", tags=["frequency caps"])

_TEXT = r"^[^\r\n\x00]*$"


class CapIn(BaseModel):
    """A new cap: at most ``max_count`` messages of ``category`` per recipient in any ``window_s``."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    category: Category = Field(examples=["marketing"])
    channel: Channel | None = Field(default=None, description="only this channel's messages; default all")
    max_count: int = Field(ge=1, le=1_000_000, examples=[5])
    window_s: int = Field(ge=1, le=MAX_CAP_WINDOW_S, description="sliding window, seconds", examples=[86400])
    action: Action = Field(description="suppress: drop the message; defer: send it when the window has room")
    is_active: bool = True
    description: str | None = Field(default=None, max_length=500, pattern=_TEXT)


class CapPatch(BaseModel):
    """Fields to change; absent fields stay (``channel: null`` makes the cap count every channel)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    category: Category | None = None
    channel: Channel | None = None
    max_count: int | None = Field(default=None, ge=1, le=1_000_000)
    window_s: int | None = Field(default=None, ge=1, le=MAX_CAP_WINDOW_S)
    action: Action | None = None
    is_active: bool | None = None
    description: str | None = Field(default=None, max_length=500, pattern=_TEXT)


_NULLABLE = frozenset({"channel", "description"})


def _time(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _out(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "category": row["category"],
        "channel": row["channel"],
        "max_count": row["max_count"],
        "window_s": row["window_s"],
        "action": row["action"],
        "is_active": row["is_active"],
        "description": row["description"],
        "revision": row["revision"],  # routers expose the highest applied (herald_frequency_rule_revision)
        "created_at": _time(row["created_at"]),
        "updated_at": _time(row["updated_at"]),
    }


def _not_found(cap_id: int) -> HeraldError:
    return HeraldError(ErrorCode.NOT_FOUND, f"frequency cap {cap_id} not found", field="cap_id")


async def _published(request: Request, row: asyncpg.Record) -> None:
    await services_of(request).rules.changed(cap_of(row))


@router.post("", status_code=201, summary="Create a frequency cap", openapi_extra=json_body_schema(CapIn))
async def create_cap(request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    body = await parse_body(request, CapIn)
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""INSERT INTO frequency_caps (tenant_id, category, channel, max_count, window_s, action, is_active,
                    description)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {CAP_COLUMNS}""",
            tenant_id,
            body.category,
            body.channel.value if body.channel else None,
            body.max_count,
            body.window_s,
            body.action,
            body.is_active,
            body.description,
        )
        await audit.record(
            conn, request, "frequency_cap.create", "frequency_cap", row["id"], body.model_dump(mode="json")
        )
    await _published(request, row)
    return envelope(_out(row), status_code=201)


@router.get("", summary="List frequency caps")
async def list_caps(
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
        total = await conn.fetchval(f"SELECT count(*) FROM frequency_caps WHERE {clause}", *args)
        rows = await conn.fetch(
            f"SELECT {CAP_COLUMNS} FROM frequency_caps WHERE {clause} ORDER BY id "
            f"LIMIT {page_size} OFFSET {(page - 1) * page_size}",
            *args,
        )
    return envelope({"total": total, "page": page, "page_size": page_size, "records": [_out(r) for r in rows]})


@router.get("/{cap_id}", summary="One frequency cap")
async def get_cap(cap_id: int, request: Request):
    row = await services_of(request).pool.fetchrow(
        f"SELECT {CAP_COLUMNS} FROM frequency_caps WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
        tenant_of(request, Scope.CONFIG),
        cap_id,
    )
    if row is None:
        raise _not_found(cap_id)
    return envelope(_out(row))


@router.patch("/{cap_id}", summary="Change a frequency cap", openapi_extra=json_body_schema(CapPatch))
async def update_cap(cap_id: int, request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    body = await parse_body(request, CapPatch)
    changes = body.model_dump(mode="json", exclude_unset=True)
    if not changes:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "nothing to change", field="body")
    for key, value in changes.items():
        if value is None and key not in _NULLABLE:
            raise HeraldError(ErrorCode.INVALID_PARAMS, "may not be null", field=key)
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(changes, start=3))
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""UPDATE frequency_caps SET {assignments}, updated_at = now(),
                    revision = nextval('frequency_revision_seq')
                WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING {CAP_COLUMNS}""",
            tenant_id,
            cap_id,
            *changes.values(),
        )
        if row is None:
            raise _not_found(cap_id)
        await audit.record(conn, request, "frequency_cap.update", "frequency_cap", cap_id, changes)
    await _published(request, row)
    return envelope(_out(row))


@router.delete("/{cap_id}", summary="Delete a frequency cap")
async def delete_cap(cap_id: int, request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""UPDATE frequency_caps SET deleted_at = now(), updated_at = now(),
                    revision = nextval('frequency_revision_seq')
                WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING {CAP_COLUMNS}""",
            tenant_id,
            cap_id,
        )
        if row is None:
            raise _not_found(cap_id)
        await audit.record(conn, request, "frequency_cap.delete", "frequency_cap", cap_id)
    await _published(request, row)
    return envelope({"id": cap_id, "deleted": True, "revision": row["revision"]})
