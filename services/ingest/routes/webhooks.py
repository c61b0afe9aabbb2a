"""Status callbacks (issue 11; seed 004 §5.1.7, §5.2 ``webhook_configs``; docs/callbacks.md).

A tenant registers callback endpoints (``/api/v1/webhooks``): a URL, the states it wants
(``events``), and how it authenticates Herald (``auth_type`` none/bearer/basic and its
``auth_token``). Each endpoint has its own Standard Webhooks signing secret, answered once at
creation and by ``rotate-secret``, never otherwise. A send may name its own ``callback_url``: it is
signed with the tenant's signing secret (``POST /api/v1/webhooks/signing-secret``, answered once
too), without which such a send is refused. The tracker delivers (services/tracker/callbacks.py);
``GET /api/v1/webhooks/deliveries`` shows every delivery and its tries.

Every URL is checked against SSRF here (1001 naming ``callback_url``) and again at each try.
The delivery log shows URLs with their query's values masked (``?token=***``).
Tokens and secrets are stored AES-256-GCM encrypted, bound to their row, and never appear in an
answer (but the once), a log line or the audit log. Changes need ``config``; reads ``read``."""

from __future__ import annotations

from functools import lru_cache
from time import monotonic
from typing import Any, Literal

import asyncpg
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from services.ingest import audit
from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.http import envelope, iso_z, json_body_schema, parse_body, patch_changes
from services.tracker.callbacks import (
    CONFIG_CHANGED,
    NOTIFY_CHANNEL,
    STATUS_STATES,
    display_url,
    endpoint_secret_purpose,
    endpoint_token_purpose,
    forget_live_tenants,
    new_signing_secret,
    tenant_secret_purpose,
)
from shared.errors import ErrorCode, HeraldError
from shared.events import CallbackURL
from shared.settings import Settings
from shared.ssrf import AllowList, UnsafeURL, check_url

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"])

_TEXT = r"^[^\r\n\x00]*$"
EVENT_NAMES: tuple[str, ...] = (*(s.value for s in STATUS_STATES), "*")
EventName = Literal[EVENT_NAMES]  # type: ignore[valid-type]
AuthType = Literal["none", "bearer", "basic"]
_COLUMNS = """id, tenant_id, callback_url, events, auth_type, auth_token IS NOT NULL AS auth_token_set,
    description, is_active, disabled_reason, previous_secret_until, created_at, updated_at"""


# --- checks shared with the send endpoints ---------------------------------------------------------


@lru_cache(maxsize=8)
def _allow(setting: str) -> AllowList:
    return AllowList.parse(setting)


async def check_callback_url(settings: Settings, url: str, field: str = "callback_url") -> None:
    """1001 naming ``field`` for a URL that would reach a private, local or metadata address."""
    try:
        await check_url(url, _allow(settings.outbound_allow))
    except UnsafeURL as exc:
        raise HeraldError(ErrorCode.INVALID_PARAMS, f"callback URL refused: {exc.reason}", field=field) from None


# A yes is remembered a few seconds (a stream of sends with callback URLs costs one query per
# tenant every few seconds); a no never, so a secret just created is found at once.
_SECRET_TTL_S = 10.0
_HAS_SECRET: dict[str, float] = {}


async def check_message_callback(services: Any, tenant_id: str, url: str) -> None:
    """A send's ``callback_url``: a public address (SSRF), and a tenant signing secret to sign
    its callbacks with; else 1001 naming ``callback_url``."""
    await check_callback_url(services.settings, url)
    if _HAS_SECRET.get(tenant_id, 0.0) > monotonic():
        return
    found = await services.pool.fetchval("SELECT 1 FROM callback_signing_secrets WHERE tenant_id = $1", tenant_id)
    if not found:
        raise HeraldError(
            ErrorCode.INVALID_PARAMS,
            "the tenant has no callback signing secret to sign this callback_url's callbacks with "
            "(create one with POST /api/v1/webhooks/signing-secret)",
            field="callback_url",
        )
    if len(_HAS_SECRET) > 10_000:
        _HAS_SECRET.clear()
    _HAS_SECRET[tenant_id] = monotonic() + _SECRET_TTL_S


# --- bodies ----------------------------------------------------------------------------------------


def _events(value: list[str] | None) -> Any:
    if value is None:
        return None
    return ["*"] if "*" in value else list(dict.fromkeys(value))


def _token(value: SecretStr | None) -> SecretStr | None:
    if value is not None:
        token = value.get_secret_value()
        if not token or len(token) > 1000 or any(c in token for c in "\r\n\x00"):
            raise ValueError("1 to 1000 characters, no line breaks")
    return value


class WebhookIn(BaseModel):
    """A callback endpoint: where, which states (``["*"]``: every status change), and how
    Herald authenticates to it besides the signature."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    callback_url: CallbackURL = Field(examples=["https://hooks.example.com/herald"])
    events: list[EventName] = Field(
        default_factory=lambda: ["*"], min_length=1, max_length=len(EVENT_NAMES),
        description=f"states to receive: {', '.join(EVENT_NAMES[:-1])}, or * for all",
        examples=[["sent", "delivered", "failed", "dead"]],
    )  # fmt: skip
    auth_type: AuthType = "none"
    auth_token: SecretStr | None = Field(
        default=None, description="bearer: the token; basic: user:password (stored encrypted, never shown)"
    )
    description: str | None = Field(default=None, max_length=500, pattern=_TEXT)
    is_active: bool = True

    @field_validator("events")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        return _events(value)

    @field_validator("auth_token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        return _token(value)


class WebhookPatch(BaseModel):
    """``PUT``: the fields given replace theirs, the others stay (``auth_token`` too: give it
    again only to change it; ``auth_type: none`` removes it)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    callback_url: CallbackURL | None = None
    events: list[EventName] | None = Field(default=None, min_length=1, max_length=len(EVENT_NAMES))
    auth_type: AuthType | None = None
    auth_token: SecretStr | None = None
    description: str | None = Field(default=None, max_length=500, pattern=_TEXT)
    is_active: bool | None = None

    @field_validator("events")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        return _events(value)

    @field_validator("auth_token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        return _token(value)


def _check_auth(auth_type: str, token: SecretStr | None, *, required: bool) -> None:
    if auth_type == "none":
        if token is not None:
            raise HeraldError(ErrorCode.INVALID_PARAMS, "only with auth_type bearer or basic", field="auth_token")
        return
    if token is None:
        if required:
            raise HeraldError(ErrorCode.INVALID_PARAMS, f"field required with auth_type {auth_type}",
                              field="auth_token")  # fmt: skip
        return
    if auth_type == "basic" and ":" not in token.get_secret_value():
        raise HeraldError(ErrorCode.INVALID_PARAMS, "basic: user:password", field="auth_token")


# --- answers ---------------------------------------------------------------------------------------


def _out(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "callback_url": row["callback_url"],
        "events": row["events"],
        "auth_type": row["auth_type"],
        "auth_token_set": row["auth_token_set"],  # the token itself never leaves
        "description": row["description"],
        "is_active": row["is_active"],
        "disabled_reason": row["disabled_reason"],
        "previous_secret_valid_until": iso_z(row["previous_secret_until"]),
        "created_at": iso_z(row["created_at"]),
        "updated_at": iso_z(row["updated_at"]),
    }


def _not_found(webhook_id: int) -> HeraldError:
    return HeraldError(ErrorCode.NOT_FOUND, f"webhook {webhook_id} not found", field="webhook_id")


async def _changed(conn: Any, tenant_id: str) -> None:
    """Which tenants have callbacks is remembered a few seconds by the trackers (and this process)
    to spare the fold a query per batch: a change makes them forget it, at the commit."""
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, CONFIG_CHANGED)
    forget_live_tenants([tenant_id])


def _audited(values: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in values.items() if k != "auth_token"}
    if "auth_token" in values:
        out["auth_token"] = "<set>" if values["auth_token"] else None
    return out


# --- the tenant's signing secret (per-message callback_url) ----------------------------------------
# Static paths before /{webhook_id}.


@router.post("/signing-secret", summary="Create or rotate the tenant's signing secret for per-message callback_url")
async def signing_secret(request: Request):
    """Answers the new ``whsec_`` secret, once. A rotation keeps the previous secret signing
    beside the new one (two signatures in ``webhook-signature``) for
    ``HERALD_CALLBACK_SECRET_GRACE_S``, so receivers can switch without losing a callback."""
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    box = request.app.state.secret_box
    secret = new_signing_secret()
    sealed = box.encrypt(secret, tenant_secret_purpose(tenant_id))
    grace = services.settings.callback_secret_grace_s
    async with services.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """INSERT INTO callback_signing_secrets AS s (tenant_id, secret) VALUES ($1, $2)
               ON CONFLICT (tenant_id) DO UPDATE SET secret = EXCLUDED.secret, previous_secret = s.secret,
                   previous_secret_until = now() + make_interval(secs => $3), rotated_at = now()
               RETURNING created_at, rotated_at, previous_secret_until""",
            tenant_id, sealed, float(grace),
        )  # fmt: skip
        rotated = row["rotated_at"] is not None
        if not rotated:
            await _changed(conn, tenant_id)
        await audit.record(conn, request, "callback_signing_secret." + ("rotate" if rotated else "create"),
                           "callback_signing_secret", tenant_id)  # fmt: skip
    _HAS_SECRET[tenant_id] = monotonic() + _SECRET_TTL_S
    data = {
        "signing_secret": secret,  # shown this once
        "created_at": iso_z(row["created_at"]),
        "rotated_at": iso_z(row["rotated_at"]),
        "previous_secret_valid_until": iso_z(row["previous_secret_until"]) if rotated else None,
    }
    return envelope(data, status_code=200 if rotated else 201)


# --- the delivery log ------------------------------------------------------------------------------


@router.get("/deliveries", summary="Status callbacks delivered, pending and failed, with every try")
async def deliveries(
    request: Request,
    message_id: str | None = Query(default=None, max_length=64),
    webhook_id: int | None = Query(default=None, ge=1, description="an endpoint's id"),
    status: Literal["pending", "delivered", "failed"] | None = Query(default=None),
    page: int = Query(default=1, ge=1, le=100_000),
    page_size: int = Query(default=20, ge=1, le=100),
):
    """Newest first; with ``message_id`` in the order they were made. ``webhook_id`` null: the
    message's own ``callback_url``. ``attempts``: each try (time, URL, HTTP status or error,
    duration)."""
    services, tenant_id = services_of(request), tenant_of(request, Scope.READ)
    where, args = ["tenant_id = $1"], [tenant_id]
    for column, value in (("message_id", message_id), ("endpoint_id", webhook_id), ("status", status)):
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    clause = " AND ".join(where)
    order = "id" if message_id is not None else "id DESC"
    async with services.pool.acquire() as conn:
        total = await conn.fetchval(f"SELECT count(*) FROM callback_deliveries WHERE {clause}", *args)
        rows = await conn.fetch(
            f"""SELECT id, endpoint_id, message_id, event_id, event_type, url, payload, status, attempts,
                       next_attempt_at, last_status_code, last_error, created_at, updated_at, delivered_at
                FROM callback_deliveries WHERE {clause} ORDER BY {order}
                LIMIT {page_size} OFFSET {(page - 1) * page_size}""",
            *args,
        )
        tries = await conn.fetch(
            """SELECT delivery_id, attempt, attempted_at, url, status_code, error, duration_ms
               FROM callback_attempts WHERE delivery_id = ANY($1::bigint[]) ORDER BY delivery_id, attempt, id""",
            [r["id"] for r in rows],
        )
    by_delivery: dict[int, list[dict[str, Any]]] = {}
    for t in tries:
        by_delivery.setdefault(t["delivery_id"], []).append({
            "attempt": t["attempt"], "attempted_at": iso_z(t["attempted_at"]), "url": display_url(t["url"]),
            "status_code": t["status_code"], "error": t["error"], "duration_ms": round(t["duration_ms"], 1),
        })  # fmt: skip
    records = [
        {
            "id": r["id"],
            "webhook_id": r["endpoint_id"],
            "webhook_msg_id": f"cbd_{r['id']}",  # the webhook-id header of every try
            "message_id": r["message_id"],
            "event_id": r["event_id"],
            "event_type": r["event_type"],
            "url": display_url(r["url"]),  # its query's values masked: the full URL is for the tries only
            "status": r["status"],
            "attempt_count": r["attempts"],
            "next_attempt_at": iso_z(r["next_attempt_at"]) if r["status"] == "pending" else None,
            "last_status_code": r["last_status_code"],
            "last_error": r["last_error"],
            "payload": r["payload"],
            "created_at": iso_z(r["created_at"]),
            "updated_at": iso_z(r["updated_at"]),
            "delivered_at": iso_z(r["delivered_at"]),
            "attempts": by_delivery.get(r["id"], []),
        }
        for r in rows
    ]
    return envelope({"total": total, "page": page, "page_size": page_size, "records": records})


# --- endpoints -------------------------------------------------------------------------------------


@router.post("", status_code=201, summary="Register a callback endpoint", openapi_extra=json_body_schema(WebhookIn))
async def create_webhook(request: Request):
    """Answers the endpoint with its ``signing_secret`` (``whsec_…``), shown this once."""
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    body = await parse_body(request, WebhookIn)
    _check_auth(body.auth_type, body.auth_token, required=True)
    await check_callback_url(services.settings, body.callback_url)
    box = request.app.state.secret_box
    secret = new_signing_secret()
    token = body.auth_token.get_secret_value() if body.auth_token is not None else None
    async with services.pool.acquire() as conn, conn.transaction():
        webhook_id = await conn.fetchval("SELECT nextval('webhook_configs_id_seq')")
        row = await conn.fetchrow(
            f"""INSERT INTO webhook_configs (id, tenant_id, callback_url, events, auth_type, auth_token,
                    signing_secret, description, is_active)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {_COLUMNS}""",
            webhook_id, tenant_id, body.callback_url, body.events, body.auth_type,
            box.encrypt(token, endpoint_token_purpose(webhook_id)) if token else None,
            box.encrypt(secret, endpoint_secret_purpose(webhook_id)), body.description, body.is_active,
        )  # fmt: skip
        await _changed(conn, tenant_id)
        await audit.record(conn, request, "webhook.create", "webhook", webhook_id,
                           _audited(body.model_dump(mode="json")))  # fmt: skip
    return envelope({**_out(row), "signing_secret": secret}, status_code=201)


@router.get("", summary="The tenant's callback endpoints")
async def list_webhooks(
    request: Request,
    is_active: bool | None = Query(default=None),
    page: int = Query(default=1, ge=1, le=100_000),
    page_size: int = Query(default=20, ge=1, le=100),
):
    services, tenant_id = services_of(request), tenant_of(request, Scope.READ)
    where = "tenant_id = $1 AND deleted_at IS NULL AND ($2::bool IS NULL OR is_active = $2)"
    async with services.pool.acquire() as conn:
        total = await conn.fetchval(f"SELECT count(*) FROM webhook_configs WHERE {where}", tenant_id, is_active)
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM webhook_configs WHERE {where} ORDER BY id LIMIT $3 OFFSET $4",
            tenant_id, is_active, page_size, (page - 1) * page_size,
        )  # fmt: skip
    return envelope({"total": total, "page": page, "page_size": page_size, "records": [_out(r) for r in rows]})


async def _fetch(conn: Any, tenant_id: str, webhook_id: int, *, lock: bool = False) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""SELECT {_COLUMNS}, auth_token FROM webhook_configs
            WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL {"FOR UPDATE" if lock else ""}""",
        tenant_id,
        webhook_id,
    )
    if row is None:
        raise _not_found(webhook_id)
    return row


@router.get("/{webhook_id}", summary="One callback endpoint")
async def get_webhook(webhook_id: int, request: Request):
    services, tenant_id = services_of(request), tenant_of(request, Scope.READ)
    return envelope(_out(await _fetch(services.pool, tenant_id, webhook_id)))


@router.put("/{webhook_id}", summary="Change a callback endpoint", openapi_extra=json_body_schema(WebhookPatch))
async def update_webhook(webhook_id: int, request: Request):
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    body = await parse_body(request, WebhookPatch)
    changes = patch_changes(body, nullable=("description",))
    if body.callback_url is not None:
        await check_callback_url(services.settings, body.callback_url)
    box = request.app.state.secret_box
    async with services.pool.acquire() as conn, conn.transaction():
        current = await _fetch(conn, tenant_id, webhook_id, lock=True)
        auth_type = body.auth_type or current["auth_type"]
        columns: dict[str, Any] = {k: v for k, v in changes.items() if k != "auth_token"}
        # A new type needs its token again (a bearer token is no user:password).
        retyped = auth_type != current["auth_type"]
        _check_auth(auth_type, body.auth_token, required=current["auth_token"] is None or retyped)
        if auth_type == "none":
            columns["auth_token"] = None
        elif body.auth_token is not None:
            columns["auth_token"] = box.encrypt(body.auth_token.get_secret_value(), endpoint_token_purpose(webhook_id))
        if body.is_active:
            columns["disabled_reason"] = None
        assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(columns, start=3))
        row = await conn.fetchrow(
            f"""UPDATE webhook_configs SET {assignments}, updated_at = now()
                WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING {_COLUMNS}""",
            tenant_id, webhook_id, *columns.values(),
        )  # fmt: skip
        if "events" in changes or "is_active" in changes:
            await _changed(conn, tenant_id)
        await audit.record(conn, request, "webhook.update", "webhook", webhook_id, _audited(changes))
    return envelope(_out(row))


@router.delete("/{webhook_id}", summary="Delete a callback endpoint")
async def delete_webhook(webhook_id: int, request: Request):
    """Its pending callbacks fail ('endpoint deleted'); the delivery log keeps them."""
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    async with services.pool.acquire() as conn, conn.transaction():
        done = await conn.fetchval(
            """UPDATE webhook_configs SET deleted_at = now(), is_active = false, updated_at = now()
               WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING id""",
            tenant_id,
            webhook_id,
        )
        if done is None:
            raise _not_found(webhook_id)
        await conn.execute(
            """UPDATE callback_deliveries SET status = 'failed', last_error = 'the endpoint was deleted',
                   updated_at = now()
               WHERE endpoint_id = $1 AND status = 'pending'""",
            webhook_id,
        )
        await audit.record(conn, request, "webhook.delete", "webhook", webhook_id)
    return envelope({"id": webhook_id, "deleted": True})


@router.post("/{webhook_id}/rotate-secret", summary="A new signing secret for a callback endpoint")
async def rotate_secret(webhook_id: int, request: Request):
    """Answers the new ``whsec_`` secret, once; the previous one keeps signing beside it for
    ``HERALD_CALLBACK_SECRET_GRACE_S`` (``previous_secret_valid_until``)."""
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    box = request.app.state.secret_box
    secret = new_signing_secret()
    async with services.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""UPDATE webhook_configs SET previous_secret = signing_secret, signing_secret = $3,
                    previous_secret_until = now() + make_interval(secs => $4), updated_at = now()
                WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING {_COLUMNS}""",
            tenant_id, webhook_id, box.encrypt(secret, endpoint_secret_purpose(webhook_id)),
            float(services.settings.callback_secret_grace_s),
        )  # fmt: skip
        if row is None:
            raise _not_found(webhook_id)
        await audit.record(conn, request, "webhook.rotate_secret", "webhook", webhook_id)
    return envelope({**_out(row), "signing_secret": secret})
