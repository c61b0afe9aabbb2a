"""Digest rules (issue 8): the messages of a category on a channel to one recipient within a
window are delivered as one message listing them, rendered with a template (variables ``items``,
``count``, ``category``) or a built-in listing. One live rule per tenant, category and channel.
Create, list, get, update, delete; every change is audited and published to the routers."""

from __future__ import annotations

import asyncpg
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.frequency import DIGEST_COLUMNS, digest_of
from services.ingest.http import envelope, json_body_schema, parse_body
from services.ingest.routes.templates import resolve as resolve_template
from services.ingest.rules import RuleTable
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


DIGESTS = RuleTable(
    table="digest_rules",
    columns=DIGEST_COLUMNS,
    noun="digest rule",
    kind="digest_rule",
    id_field="rule_id",
    fields=("category", "channel", "window_s", "template_id", "is_active", "description"),
    nullable=frozenset({"template_id", "description"}),
    config=digest_of,
)


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
        await DIGESTS.created(request, conn, row, body)
    await DIGESTS.publish(request, row)
    return envelope(DIGESTS.out(row), status_code=201)


@router.get("", summary="List digest rules")
async def list_rules(
    request: Request,
    category: str | None = Query(default=None, max_length=64),
    page: int = Query(default=1, ge=1, le=100_000),
    page_size: int = Query(default=20, ge=1, le=100),
):
    return await DIGESTS.list(request, category, page, page_size)


@router.get("/{rule_id}", summary="One digest rule")
async def get_rule(rule_id: int, request: Request):
    return envelope(
        DIGESTS.out(await DIGESTS.fetch(services_of(request).pool, tenant_of(request, Scope.CONFIG), rule_id))
    )


@router.patch("/{rule_id}", summary="Change a digest rule", openapi_extra=json_body_schema(DigestPatch))
async def update_rule(rule_id: int, request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    changes = DIGESTS.changes(await parse_body(request, DigestPatch))
    current = await DIGESTS.fetch(services_of(request).pool, tenant_id, rule_id)
    template_id = changes.get("template_id", current["template_id"])
    if template_id is not None and ("template_id" in changes or "channel" in changes):
        await _check_template(request, tenant_id, template_id, changes.get("channel", current["channel"]))

    def conflict() -> HeraldError:
        return _taken(changes.get("category", current["category"]), changes.get("channel", current["channel"]))

    return await DIGESTS.update(request, tenant_id, rule_id, changes, conflict)


@router.delete("/{rule_id}", summary="Delete a digest rule (digests already open are still delivered)")
async def delete_rule(rule_id: int, request: Request):
    return await DIGESTS.delete(request, rule_id)
