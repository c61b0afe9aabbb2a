"""Frequency caps (issue 8): at most N messages of a category to one recipient per window, each
with an action (suppress or defer). Create, list, get, update, delete; every change is audited
and published to the routers (:mod:`services.ingest.frequency`)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.frequency import CAP_COLUMNS, cap_of
from services.ingest.http import envelope, json_body_schema, parse_body
from services.ingest.rules import RuleTable
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


CAPS = RuleTable(
    table="frequency_caps",
    columns=CAP_COLUMNS,
    noun="frequency cap",
    kind="frequency_cap",
    id_field="cap_id",
    fields=("category", "channel", "max_count", "window_s", "action", "is_active", "description"),
    nullable=frozenset({"channel", "description"}),
    config=cap_of,
)


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
        await CAPS.created(request, conn, row, body)
    await CAPS.publish(request, row)
    return envelope(CAPS.out(row), status_code=201)


@router.get("", summary="List frequency caps")
async def list_caps(
    request: Request,
    category: str | None = Query(default=None, max_length=64),
    page: int = Query(default=1, ge=1, le=100_000),
    page_size: int = Query(default=20, ge=1, le=100),
):
    return await CAPS.list(request, category, page, page_size)


@router.get("/{cap_id}", summary="One frequency cap")
async def get_cap(cap_id: int, request: Request):
    return envelope(CAPS.out(await CAPS.fetch(services_of(request).pool, tenant_of(request, Scope.CONFIG), cap_id)))


@router.patch("/{cap_id}", summary="Change a frequency cap", openapi_extra=json_body_schema(CapPatch))
async def update_cap(cap_id: int, request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    changes = CAPS.changes(await parse_body(request, CapPatch))
    return await CAPS.update(request, tenant_id, cap_id, changes)


@router.delete("/{cap_id}", summary="Delete a frequency cap")
async def delete_cap(cap_id: int, request: Request):
    return await CAPS.delete(request, cap_id)
