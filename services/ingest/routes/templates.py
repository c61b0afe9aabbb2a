"""Templates (seed 004 §3.1.4, §3.4.9): create, list, get, update (a new version with its
history row), history, rollback (a new version equal to an old one), soft delete, preview."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from services.ingest import audit
from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.http import envelope, json_body_schema, parse_body
from services.ingest.templates import head_of, version_of
from shared.errors import ErrorCode, HeraldError
from shared.templates import Format, Renderer, TemplateProblem, TemplateVersion, Variant, check

router = APIRouter(prefix="/api/v1/templates", tags=["templates"])

_NAME = r"^[^\r\n\x00]+$"
_renderer = Renderer()  # previews; the router has its own


class TemplateIn(BaseModel):
    """A new template: its own channel's default variant (seed 004's fields) plus variants."""

    model_config = ConfigDict(extra="forbid")

    template_name: str = Field(min_length=1, max_length=100, pattern=_NAME)
    template_type: str = Field(default="email", min_length=1, max_length=20, pattern=r"^[a-z][a-z0-9_]*$")
    subject: str | None = Field(default=None, max_length=255)
    content: str = Field(min_length=1)
    text_content: str | None = None
    format: Format | None = None
    variables: list[str] | None = Field(default=None, max_length=200)
    variants: list[Variant] = Field(default_factory=list, max_length=49)
    description: str | None = Field(default=None, max_length=2000)
    is_active: bool = True
    created_by: str | None = Field(default=None, max_length=100, pattern=_NAME)


class TemplateUpdate(BaseModel):
    """A new version: absent fields keep the current version's value."""

    model_config = ConfigDict(extra="forbid")

    subject: str | None = Field(default=None, max_length=255)
    content: str | None = Field(default=None, min_length=1)
    text_content: str | None = None
    format: Format | None = None
    variables: list[str] | None = Field(default=None, max_length=200)
    variants: list[Variant] | None = Field(default=None, max_length=49)
    description: str | None = Field(default=None, max_length=2000)
    is_active: bool | None = None
    change_description: str | None = Field(default=None, max_length=2000)
    updated_by: str | None = Field(default=None, max_length=100, pattern=_NAME)


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    change_description: str | None = Field(default=None, max_length=2000)
    updated_by: str | None = Field(default=None, max_length=100, pattern=_NAME)


class Preview(BaseModel):
    model_config = ConfigDict(extra="forbid")

    template_id: int | None = None
    template_name: str | None = Field(default=None, max_length=100)
    template_version: int | None = Field(default=None, ge=1)
    template_vars: dict[str, Any] = Field(default_factory=dict)
    locale: str | None = Field(default=None, max_length=35)
    channel: str | None = Field(default=None, max_length=20)


def _problem(exc: TemplateProblem) -> HeraldError:
    return HeraldError(exc.code, exc.message, field=exc.field)


def _main_variant(channel: str, subject: str | None, content: str, text: str | None, fmt: str | None) -> Variant:
    return Variant(
        channel=channel,
        locale="default",
        format=fmt or ("html" if channel == "email" else "text"),
        subject=subject,
        content=content,
        text_content=text,
    )


def _checked(
    request: Request, variables: list[str] | None, main: Variant, extra: list[Variant]
) -> tuple[list[str], list[Variant]]:
    variants = [main, *extra]
    try:
        return check(variables, variants, max_bytes=services_of(request).settings.template_max_bytes), variants
    except TemplateProblem as exc:
        # Field names as the client sent them: the main variant is the top-level fields.
        field = exc.field
        if field.startswith("variants.0."):
            field = field.removeprefix("variants.0.")
        elif field.startswith("variants."):
            index, _, rest = field.removeprefix("variants.").partition(".")
            field = f"variants.{int(index) - 1}" + (f".{rest}" if rest else "")
        raise HeraldError(exc.code, exc.message, field=field) from None


def _variants_data(variants: list[Variant]) -> list[dict[str, Any]]:
    # jsonb parameters take Python values (the pool's codec encodes them).
    return [v.model_dump(exclude_none=True) for v in variants]


def _time(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _out(row: asyncpg.Record, *, full: bool = True) -> dict[str, Any]:
    variants = orjson.loads(row["variants"]) if full else None
    out: dict[str, Any] = {
        "id": row["id"],
        "template_name": row["template_name"],
        "template_type": row["template_type"],
        "version": row["version"],
        "is_active": row["is_active"],
        "description": row["description"],
        "created_by": row["created_by"],
        "updated_by": row["updated_by"],
        "created_at": _time(row["created_at"]),
        "updated_at": _time(row["updated_at"]),
    }
    if full:
        out.update(
            subject=row["subject"],
            content=row["content"],
            variables=orjson.loads(row["variables"]) if row["variables"] else [],
            variants=variants[1:],
            text_content=variants[0].get("text_content"),
            format=variants[0].get("format"),
        )
    return out


_SELECT = """SELECT id, tenant_id, template_name, template_type, subject, content, variables::text AS variables,
    variants::text AS variants, version, is_active, description, created_by, updated_by, created_at, updated_at,
    deleted_at IS NOT NULL AS deleted, revision FROM message_templates"""


async def _row(conn: asyncpg.Connection, tenant_id: str, template_id: int, *, lock: bool = False) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"{_SELECT} WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL" + (" FOR UPDATE" if lock else ""),
        template_id,
        tenant_id,
    )
    if row is None:
        raise HeraldError(ErrorCode.TEMPLATE_NOT_FOUND, f"template {template_id} not found", field="template_id")
    return row


async def _new_version(
    conn: asyncpg.Connection,
    row: asyncpg.Record,
    variables: list[str],
    variants: list[Variant],
    *,
    description: str | None,
    is_active: bool,
    change: str | None,
    author: str | None,
) -> asyncpg.Record:
    main = variants[0]
    version = row["version"] + 1
    await conn.execute(
        """UPDATE message_templates SET subject = $2, content = $3, variables = $4::jsonb, variants = $5::jsonb,
               version = $6, is_active = $7, description = $8, updated_by = $9, updated_at = now(),
               revision = nextval('template_revision_seq')
           WHERE id = $1 AND tenant_id = $10""",
        row["id"],
        main.subject,
        main.content,
        variables,
        _variants_data(variants),
        version,
        is_active,
        description,
        author,
        row["tenant_id"],
    )
    await _history(conn, row["id"], row["tenant_id"], version, row["template_name"], row["template_type"],
                   variables, variants, change, author)  # fmt: skip
    return await _row(conn, row["tenant_id"], row["id"])


async def _history(
    conn: asyncpg.Connection,
    template_id: int,
    tenant_id: str,
    version: int,
    name: str,
    kind: str,
    variables: list[str],
    variants: list[Variant],
    change: str | None,
    author: str | None,
) -> None:
    main = variants[0]
    await conn.execute(
        """INSERT INTO message_template_history (template_id, tenant_id, version, template_name, template_type,
               subject, content, variables, variants, change_description, created_by)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10, $11)""",
        template_id,
        tenant_id,
        version,
        name,
        kind,
        main.subject,
        main.content,
        variables,
        _variants_data(variants),
        change,
        author,
    )


async def _distribute(request: Request, row: asyncpg.Record) -> None:
    """Tell this replica's store and every router (the config topic)."""
    head = head_of(row)
    versions = [] if row["deleted"] else [_version_from_current(row)]
    await services_of(request).templates.changed(head, versions)


def _version_from_current(row: asyncpg.Record) -> TemplateVersion:
    return version_of({**dict(row), "template_id": row["id"]})


async def _audit(conn: asyncpg.Connection, request: Request, action: str, row: asyncpg.Record, **extra: Any) -> None:
    details = {"template_name": row["template_name"], "version": row["version"], **extra}
    await audit.record(conn, request, action, "template", row["id"], details)


@router.post("", status_code=201, summary="Create a template", openapi_extra=json_body_schema(TemplateIn))
async def create_template(request: Request):
    tenant_id = tenant_of(request, Scope.TEMPLATES)
    body = await parse_body(request, TemplateIn)
    main = _main_variant(body.template_type, body.subject, body.content, body.text_content, body.format)
    variables, variants = _checked(request, body.variables, main, body.variants)
    pool = services_of(request).pool
    async with pool.acquire() as conn, conn.transaction():
        try:
            template_id = await conn.fetchval(
                """INSERT INTO message_templates (tenant_id, template_name, template_type, subject, content, variables,
                       variants, is_active, description, created_by, updated_by)
                   VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8, $9, $10, $10) RETURNING id""",
                tenant_id,
                body.template_name,
                body.template_type,
                main.subject,
                main.content,
                variables,
                _variants_data(variants),
                body.is_active,
                body.description,
                body.created_by,
            )
        except asyncpg.UniqueViolationError:
            raise HeraldError(
                ErrorCode.DUPLICATE_REQUEST, f"a template named {body.template_name} exists", field="template_name"
            ) from None
        await _history(conn, template_id, tenant_id, 1, body.template_name, body.template_type, variables,
                       variants, "created", body.created_by)  # fmt: skip
        row = await _row(conn, tenant_id, template_id)
        await _audit(conn, request, "template.create", row)
    await _distribute(request, row)
    return envelope(_out(row), status_code=201)


@router.get("", summary="List templates")
async def list_templates(
    request: Request,
    template_type: str | None = Query(default=None, max_length=20),
    template_name: str | None = Query(default=None, max_length=100, description="part of the name"),
    is_active: bool | None = Query(default=None),
    page: int = Query(default=1, ge=1, le=100_000),
    page_size: int = Query(default=20, ge=1, le=100),
):
    where, args = ["tenant_id = $1", "deleted_at IS NULL"], [tenant_of(request, Scope.READ)]
    if template_type is not None:
        args.append(template_type)
        where.append(f"template_type = ${len(args)}")
    if template_name is not None:
        args.append(template_name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_"))
        where.append(f"template_name ILIKE '%' || ${len(args)} || '%'")
    if is_active is not None:
        args.append(is_active)
        where.append(f"is_active = ${len(args)}")
    clause = " AND ".join(where)
    async with services_of(request).pool.acquire() as conn:
        total = await conn.fetchval(f"SELECT count(*) FROM message_templates WHERE {clause}", *args)
        rows = await conn.fetch(
            f"{_SELECT} WHERE {clause} ORDER BY id DESC LIMIT {page_size} OFFSET {(page - 1) * page_size}", *args
        )
    records = [_out(r, full=False) for r in rows]
    return envelope({"total": total, "page": page, "page_size": page_size, "records": records})


@router.get("/{template_id}", summary="One template, current version")
async def get_template(template_id: int, request: Request):
    async with services_of(request).pool.acquire() as conn:
        return envelope(_out(await _row(conn, tenant_of(request, Scope.READ), template_id)))


@router.get("/{template_id}/history", summary="Every version of a template, newest first")
async def template_history(template_id: int, request: Request):
    tenant_id = tenant_of(request, Scope.READ)
    async with services_of(request).pool.acquire() as conn:
        await _row(conn, tenant_id, template_id)
        rows = await conn.fetch(
            """SELECT version, template_name, template_type, subject, content, variables::text AS variables,
                   variants::text AS variants, change_description, created_by, created_at
               FROM message_template_history WHERE template_id = $1 AND tenant_id = $2 ORDER BY version DESC""",
            template_id,
            tenant_id,
        )
    records = [
        {
            "version": r["version"],
            "template_name": r["template_name"],
            "subject": r["subject"],
            "content": r["content"],
            "variables": orjson.loads(r["variables"]) if r["variables"] else [],
            "variants": orjson.loads(r["variants"])[1:],
            "change_description": r["change_description"],
            "created_by": r["created_by"],
            "created_at": _time(r["created_at"]),
        }
        for r in rows
    ]
    return envelope({"template_id": template_id, "total": len(records), "records": records})


@router.put(
    "/{template_id}", summary="Change a template (a new version)", openapi_extra=json_body_schema(TemplateUpdate)
)
async def update_template(template_id: int, request: Request):
    tenant_id = tenant_of(request, Scope.TEMPLATES)
    body = await parse_body(request, TemplateUpdate)
    given = body.model_fields_set
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        row = await _row(conn, tenant_id, template_id, lock=True)
        current = orjson.loads(row["variants"])
        main0 = current[0]
        main = _main_variant(
            row["template_type"],
            body.subject if "subject" in given else main0.get("subject"),
            body.content if body.content is not None else main0["content"],
            body.text_content if "text_content" in given else main0.get("text_content"),
            body.format or main0.get("format"),
        )
        extra = body.variants if body.variants is not None else [Variant.model_validate(v) for v in current[1:]]
        declared = body.variables if "variables" in given else orjson.loads(row["variables"] or "[]")
        variables, variants = _checked(request, declared, main, extra)
        row = await _new_version(
            conn,
            row,
            variables,
            variants,
            description=body.description if "description" in given else row["description"],
            is_active=body.is_active if body.is_active is not None else row["is_active"],
            change=body.change_description,
            author=body.updated_by,
        )
        await _audit(conn, request, "template.update", row)
    await _distribute(request, row)
    return envelope(_out(row))


@router.post("/{template_id}/rollback", summary="A new version equal to an earlier one",
             openapi_extra=json_body_schema(Rollback))  # fmt: skip
async def rollback_template(template_id: int, request: Request):
    tenant_id = tenant_of(request, Scope.TEMPLATES)
    body = await parse_body(request, Rollback)
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        row = await _row(conn, tenant_id, template_id, lock=True)
        old = await conn.fetchrow(
            """SELECT variables::text AS variables, variants::text AS variants FROM message_template_history
               WHERE template_id = $1 AND tenant_id = $2 AND version = $3""",
            template_id,
            tenant_id,
            body.version,
        )
        if old is None:
            raise HeraldError(
                ErrorCode.NOT_FOUND, f"template {template_id} has no version {body.version}", field="version"
            )
        restored = [Variant.model_validate(v) for v in orjson.loads(old["variants"])]
        # Checked again: the rules may have grown stricter since that version was saved.
        variables, variants = _checked(request, orjson.loads(old["variables"] or "[]"), restored[0], restored[1:])
        row = await _new_version(
            conn,
            row,
            variables,
            variants,
            description=row["description"],
            is_active=row["is_active"],
            change=body.change_description or f"rollback to version {body.version}",
            author=body.updated_by,
        )
        await _audit(conn, request, "template.rollback", row, rolled_back_to=body.version)
    await _distribute(request, row)
    return envelope(_out(row))


@router.delete("/{template_id}", summary="Delete a template (soft: its history stays)")
async def delete_template(template_id: int, request: Request):
    tenant_id = tenant_of(request, Scope.TEMPLATES)
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        await _row(conn, tenant_id, template_id, lock=True)
        await conn.execute(
            "UPDATE message_templates SET deleted_at = now(), updated_at = now(), "
            "revision = nextval('template_revision_seq') WHERE id = $1 AND tenant_id = $2",
            template_id,
            tenant_id,
        )
        row = await conn.fetchrow(f"{_SELECT} WHERE id = $1 AND tenant_id = $2", template_id, tenant_id)
        await _audit(conn, request, "template.delete", row)
    await _distribute(request, row)
    return envelope({"id": template_id, "deleted": True})


@router.post("/preview", summary="Render a template with test data", openapi_extra=json_body_schema(Preview))
async def preview_template(request: Request):
    tenant_id = tenant_of(request, Scope.TEMPLATES)
    body = await parse_body(request, Preview)
    if body.template_id is None and body.template_name is None:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "template_id or template_name is required", field="template_id")
    version = await resolve(request, tenant_id, body.template_id, body.template_name, body.template_version)
    channel = body.channel or version.template_type
    try:
        out = _renderer.render(version, channel, body.locale, body.template_vars)
    except TemplateProblem as exc:
        raise _problem(exc) from None
    return envelope(
        {
            "template_id": version.template_id,
            "template_version": version.version,
            "channel": channel,
            "locale": out.locale,
            "format": out.format,
            "subject": out.subject,
            "content": out.content,
            "text_content": out.text_content,
        }
    )


async def resolve(
    request: Request, tenant_id: str, template_id: int | None, name: str | None, version: int | None
) -> TemplateVersion:
    """The version a send or preview uses (2003 when there is none), from the store, or from
    the database when this replica has not seen the template yet."""
    distributor = services_of(request).templates
    try:
        found = distributor.store.for_send(tenant_id, template_id, name, version)
        if found is None:
            found = await distributor.load(tenant_id, template_id, name, version)
    except TemplateProblem as exc:
        raise _problem(exc) from None
    if found is None:
        label = template_id if template_id is not None else name
        field = "template_id" if template_id is not None else "template_name"
        if version is not None:
            raise HeraldError(ErrorCode.TEMPLATE_NOT_FOUND, f"template {label} version {version} not found",
                              field="template_version")  # fmt: skip
        raise HeraldError(ErrorCode.TEMPLATE_NOT_FOUND, f"template {label} not found", field=field)
    return found
