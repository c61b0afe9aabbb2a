"""The SMTP mailbox pool's accounts (seed 004 email_accounts): create, list, get, update,
enable/disable, delete. Passwords are stored encrypted (AES-256-GCM) and never returned."""

from __future__ import annotations

from typing import Any, Literal

import asyncpg
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, EmailStr, Field

from services.ingest import audit
from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.http import envelope, json_body_schema, parse_body
from services.senders.email.pool import PASSWORD_PURPOSE
from shared.errors import ErrorCode, HeraldError

router = APIRouter(prefix="/api/v1/email-accounts", tags=["email accounts"])

# No CR, LF or NUL anywhere near a header or an SMTP command.
_LINE = r"^[^\r\n\x00]*$"
_HOST = r"^[A-Za-z0-9.\-\[\]:]+$"


class AccountIn(BaseModel):
    """A new mailbox of the pool."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    email: EmailStr
    smtp_host: str = Field(min_length=1, max_length=255, pattern=_HOST)
    smtp_port: int = Field(ge=1, le=65535)
    smtp_username: str = Field(default="", max_length=255, pattern=_LINE)
    smtp_password: str = Field(default="", max_length=1024, pattern=_LINE)
    tls_mode: Literal["none", "starttls", "tls"] = "starttls"
    display_name: str | None = Field(default=None, max_length=100, pattern=_LINE)
    daily_limit: int = Field(default=500, ge=0, le=10_000_000)
    priority: int = Field(default=0, ge=-1000, le=1000)
    is_active: bool = True


class AccountPatch(BaseModel):
    """Fields to change; absent fields stay as they are."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    email: EmailStr | None = None
    smtp_host: str | None = Field(default=None, min_length=1, max_length=255, pattern=_HOST)
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_username: str | None = Field(default=None, max_length=255, pattern=_LINE)
    smtp_password: str | None = Field(default=None, max_length=1024, pattern=_LINE)
    tls_mode: Literal["none", "starttls", "tls"] | None = None
    display_name: str | None = Field(default=None, max_length=100, pattern=_LINE)
    daily_limit: int | None = Field(default=None, ge=0, le=10_000_000)
    priority: int | None = Field(default=None, ge=-1000, le=1000)


_COLUMNS = """id, email, smtp_host, smtp_port, smtp_username, (smtp_password <> '') AS has_password,
    tls_mode, display_name, daily_limit,
    CASE WHEN last_reset_date < (now() AT TIME ZONE $TZ)::date THEN 0 ELSE daily_sent_count END AS daily_sent_count,
    last_reset_date, is_active, priority, failure_count, last_failure_at, last_error, disabled_reason,
    created_at, updated_at"""


def _columns(tz_param: str) -> str:
    return _COLUMNS.replace("$TZ", tz_param)


def _out(row: asyncpg.Record) -> dict[str, Any]:
    out = dict(row)
    for key in ("last_failure_at", "created_at", "updated_at"):
        if out.get(key) is not None:
            out[key] = out[key].isoformat().replace("+00:00", "Z")
    if out.get("last_reset_date") is not None:
        out["last_reset_date"] = out["last_reset_date"].isoformat()
    return out


def _box(request: Request):
    return request.app.state.secret_box


async def _fetch(request: Request, account_id: int) -> dict[str, Any]:
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    row = await services.pool.fetchrow(
        f"SELECT {_columns('$3')} FROM email_accounts WHERE tenant_id = $1 AND id = $2",
        tenant_id,
        account_id,
        services.settings.pool_timezone,
    )
    if row is None:
        raise HeraldError(ErrorCode.NOT_FOUND, f"email account {account_id} not found", field="account_id")
    return _out(row)


@router.post("", status_code=201, summary="Add a mailbox to the pool", openapi_extra=json_body_schema(AccountIn))
async def create_account(request: Request):
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    body = await parse_body(request, AccountIn)
    secret = _box(request).encrypt(body.smtp_password, PASSWORD_PURPOSE) if body.smtp_password else ""
    try:
        account_id = await services.pool.fetchval(
            """INSERT INTO email_accounts (tenant_id, email, smtp_host, smtp_port, smtp_username, smtp_password,
                   tls_mode, display_name, daily_limit, priority, is_active, last_reset_date)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, (now() AT TIME ZONE $12)::date)
               RETURNING id""",
            tenant_id, str(body.email), body.smtp_host, body.smtp_port, body.smtp_username, secret,
            body.tls_mode, body.display_name, body.daily_limit, body.priority, body.is_active,
            services.settings.pool_timezone,
        )  # fmt: skip
    except asyncpg.UniqueViolationError:
        raise HeraldError(
            ErrorCode.DUPLICATE_REQUEST, f"a mailbox {body.email} already exists", field="email"
        ) from None
    details = body.model_dump(exclude={"smtp_password"}, mode="json")
    await audit.record(services.pool, request, "email_account.create", "email_account", account_id,
                       {**details, "smtp_password": bool(body.smtp_password)})  # fmt: skip
    return envelope(await _fetch(request, account_id), status_code=201)


@router.get("", summary="List the pool's mailboxes")
async def list_accounts(
    request: Request,
    is_active: bool | None = Query(default=None),
    page: int = Query(default=1, ge=1, le=100_000),
    page_size: int = Query(default=20, ge=1, le=100),
):
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    where, args = "tenant_id = $1", [tenant_id]
    if is_active is not None:
        args.append(is_active)
        where += " AND is_active = $2"
    tz = f"${len(args) + 1}"
    async with services.pool.acquire() as conn:
        total = await conn.fetchval(f"SELECT count(*) FROM email_accounts WHERE {where}", *args)
        rows = await conn.fetch(
            f"""SELECT {_columns(tz)} FROM email_accounts WHERE {where}
                ORDER BY priority DESC, id LIMIT {page_size} OFFSET {(page - 1) * page_size}""",
            *args,
            services.settings.pool_timezone,
        )
    return envelope({"total": total, "page": page, "page_size": page_size, "records": [_out(r) for r in rows]})


@router.get("/{account_id}", summary="One mailbox")
async def get_account(account_id: int, request: Request):
    return envelope(await _fetch(request, account_id))


@router.patch("/{account_id}", summary="Change a mailbox", openapi_extra=json_body_schema(AccountPatch))
async def update_account(account_id: int, request: Request):
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    body = await parse_body(request, AccountPatch)
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "nothing to change", field="body")
    for key in ("smtp_host", "smtp_port", "email", "tls_mode", "daily_limit", "priority"):
        if key in changes and changes[key] is None:
            raise HeraldError(ErrorCode.INVALID_PARAMS, "may not be null", field=key)
    if "email" in changes:
        changes["email"] = str(changes["email"])
    if changes.get("smtp_password") is not None:
        changes["smtp_password"] = _box(request).encrypt(changes["smtp_password"], PASSWORD_PURPOSE)
    elif "smtp_password" in changes:
        changes["smtp_password"] = ""
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(changes, start=3))
    try:
        updated = await services.pool.fetchval(
            f"UPDATE email_accounts SET {assignments}, updated_at = now() "
            "WHERE tenant_id = $1 AND id = $2 RETURNING id",
            tenant_id,
            account_id,
            *changes.values(),
        )
    except asyncpg.UniqueViolationError:
        raise HeraldError(ErrorCode.DUPLICATE_REQUEST, "another mailbox has this address", field="email") from None
    if updated is None:
        raise HeraldError(ErrorCode.NOT_FOUND, f"email account {account_id} not found", field="account_id")
    await audit.record(services.pool, request, "email_account.update", "email_account", account_id,
                       {k: v for k, v in changes.items()})  # fmt: skip
    return envelope(await _fetch(request, account_id))


async def _set_active(request: Request, account_id: int, active: bool) -> dict[str, Any]:
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    # Re-enabling clears the failure streak: the operator says the account is fixed.
    updated = await services.pool.fetchval(
        """UPDATE email_accounts SET is_active = $3,
               failure_count = CASE WHEN $3 THEN 0 ELSE failure_count END,
               disabled_reason = CASE WHEN $3 THEN NULL ELSE 'disabled by an operator' END,
               updated_at = now()
           WHERE tenant_id = $1 AND id = $2 RETURNING id""",
        tenant_id,
        account_id,
        active,
    )
    if updated is None:
        raise HeraldError(ErrorCode.NOT_FOUND, f"email account {account_id} not found", field="account_id")
    action = "email_account.enable" if active else "email_account.disable"
    await audit.record(services.pool, request, action, "email_account", account_id)
    return await _fetch(request, account_id)


@router.post("/{account_id}/enable", summary="Put a mailbox back in use (resets its failure count)")
async def enable_account(account_id: int, request: Request):
    return envelope(await _set_active(request, account_id, True))


@router.post("/{account_id}/disable", summary="Take a mailbox out of use")
async def disable_account(account_id: int, request: Request):
    return envelope(await _set_active(request, account_id, False))


@router.delete("/{account_id}", summary="Remove a mailbox from the pool")
async def delete_account(account_id: int, request: Request):
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    deleted = await services.pool.fetchval(
        "DELETE FROM email_accounts WHERE tenant_id = $1 AND id = $2 RETURNING id", tenant_id, account_id
    )
    if deleted is None:
        raise HeraldError(ErrorCode.NOT_FOUND, f"email account {account_id} not found", field="account_id")
    await audit.record(services.pool, request, "email_account.delete", "email_account", account_id)
    return envelope({"id": account_id, "deleted": True})
