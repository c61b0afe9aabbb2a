"""Recipient profiles (issue 10): ``PUT /api/v1/recipients/{user_id}`` creates or replaces a
user's profile (an address per channel, checked and stored normalised as a send's ``to`` would be;
locale; IANA time zone; opt-outs; quiet hours; attributes routing rules match on); ``PATCH``
changes some of it, ``DELETE`` removes it for good. A send to ``{"user_id": ...}`` then reaches the
user through their profile (:mod:`services.ingest.recipients`).

Scope: ``config`` for reading as well as writing. A profile is contact data, and the list is the
tenant's whole address book: ``send`` keys live in every producing service and only need to name
a user, ``read`` keys feed dashboards and history tools; neither should be able to page through
everyone's phone numbers. ``config`` is already the scope of what decides where messages go
(providers, routing rules), held by the few keys that administer delivery.

Audit entries name which channels and attributes were set or removed, never the addresses or
attribute values themselves (the audit log is read by ``admin`` keys and kept long).
"""

from __future__ import annotations

from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from services.ingest import audit
from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.http import envelope, iso_z, json_body_schema, parse_body
from services.ingest.recipients import COLUMNS, profile_of
from services.ingest.sends import LOCALE
from shared.channels import AddressError, check_address
from shared.errors import ErrorCode, HeraldError
from shared.events import Address, AttributeValue, Channel, OptOuts, QuietHours, RecipientProfile, UserId

router = APIRouter(prefix="/api/v1/recipients", tags=["recipients"])

_USER_ID: TypeAdapter[str] = TypeAdapter(UserId)
_AttributeName = Annotated[str, Field(min_length=1, max_length=64)]


class RecipientIn(BaseModel):
    """A whole profile (``PUT``): fields left out take their defaults."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    addresses: dict[Channel, Address] = Field(
        default_factory=dict,
        description="channel -> address in the channel's form (GET /api/v1/providers/catalogue)",
        examples=[{"email": "alice@example.com", "sms": "+8613800138000"}],
    )
    locale: str | None = Field(default=None, max_length=35, pattern=LOCALE, examples=["zh-CN"])
    timezone: str = Field(default="UTC", max_length=64, description="IANA time zone", examples=["Asia/Shanghai"])
    opt_outs: OptOuts = Field(default_factory=OptOuts, description="categories and channels the user declined")
    quiet_hours: QuietHours | None = Field(default=None, description='{"start": "22:00", "end": "07:00"}, local')
    attributes: dict[_AttributeName, AttributeValue] = Field(
        default_factory=dict, max_length=50, description="what routing rules match on", examples=[{"team": "ops"}]
    )


class RecipientPatch(BaseModel):
    """Fields to change. ``addresses`` and ``attributes`` are merged (a ``null`` value removes
    that channel's address or that attribute); the other fields given replace theirs
    (``locale: null`` and ``quiet_hours: null`` clear them)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    addresses: dict[Channel, Address | None] | None = None
    locale: str | None = Field(default=None, max_length=35, pattern=LOCALE)
    timezone: str | None = Field(default=None, max_length=64)
    opt_outs: OptOuts | None = None
    quiet_hours: QuietHours | None = None
    attributes: dict[_AttributeName, AttributeValue | None] | None = Field(default=None, max_length=50)


def _user_id(value: str) -> str:
    try:
        return _USER_ID.validate_python(value)
    except ValidationError:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "1 to 128 letters, digits and _ . : @ + -, starting with a letter "
                          "or digit", field="user_id") from None  # fmt: skip


def _not_found(user_id: str) -> HeraldError:
    # 1004: seed 004's "resource not found", as for every other configured resource (providers,
    # frequency caps, routing rules); another tenant's users are not found either.
    return HeraldError(ErrorCode.NOT_FOUND, f"recipient {user_id} not found", field="user_id")


def _normalised(addresses: dict[Channel, str]) -> dict[str, str]:
    """Each address in its channel's form (E.164, ...), or 1001 naming ``addresses.<channel>``."""
    out = {}
    for channel, address in addresses.items():
        try:
            out[channel.value] = check_address(channel, address)
        except AddressError as exc:
            raise HeraldError(ErrorCode.INVALID_PARAMS, str(exc), field=f"addresses.{channel.value}") from None
    return out


def _profile(user_id: str, values: dict[str, Any]) -> RecipientProfile:
    """The profile as a send would carry it; what the profile model refuses (an unknown time
    zone, ...) is 1001 naming the field."""
    values = {**values, "addresses": _normalised({Channel(k): v for k, v in values.get("addresses", {}).items()})}
    try:
        return RecipientProfile(user_id=user_id, **values)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"]), "input": None} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def _out(row: asyncpg.Record) -> dict[str, Any]:
    return {
        **profile_of(row).model_dump(mode="json"),
        "created_at": iso_z(row["created_at"]),
        "updated_at": iso_z(row["updated_at"]),
    }


def _audited(values: dict[str, Any]) -> dict[str, Any]:
    """What an audit entry says of a change: channels and attribute names, not their values."""
    out = dict(values)
    for name in ("addresses", "attributes"):
        if name in out and out[name] is not None:
            out[name] = {k: "<removed>" if v is None else "<set>" for k, v in out[name].items()}
    return out


_UPSERT = f"""
INSERT INTO recipients AS r (tenant_id, user_id, addresses, locale, timezone, opt_outs, quiet_hours, attributes)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (tenant_id, user_id) DO UPDATE SET addresses = EXCLUDED.addresses, locale = EXCLUDED.locale,
    timezone = EXCLUDED.timezone, opt_outs = EXCLUDED.opt_outs, quiet_hours = EXCLUDED.quiet_hours,
    attributes = EXCLUDED.attributes, updated_at = now()
RETURNING {", ".join("r." + c.strip() for c in COLUMNS.split(","))}, (xmax = 0) AS created
"""


def _columns(profile: RecipientProfile) -> tuple[Any, ...]:
    data = profile.model_dump(mode="json")
    return (data["addresses"], data["locale"], data["timezone"], data["opt_outs"], data["quiet_hours"],
            data["attributes"])  # fmt: skip


@router.put(
    "/{user_id}", summary="Create or replace a recipient's profile", openapi_extra=json_body_schema(RecipientIn)
)
async def put_recipient(user_id: str, request: Request):
    """201 when the profile is new, 200 when it replaced one."""
    tenant_id = tenant_of(request, Scope.CONFIG)
    user_id = _user_id(user_id)
    body = await parse_body(request, RecipientIn)
    profile = _profile(user_id, body.model_dump(mode="json"))
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_UPSERT, tenant_id, user_id, *_columns(profile))
        action = "recipient.create" if row["created"] else "recipient.replace"
        await audit.record(conn, request, action, "recipient", user_id,
                           _audited(profile.model_dump(mode="json", exclude={"user_id"})))  # fmt: skip
    return envelope(_out(row), status_code=201 if row["created"] else 200)


@router.get("", summary="List recipients, by user id")
async def list_recipients(
    request: Request,
    prefix: str | None = Query(default=None, min_length=1, max_length=128, description="user ids starting with"),
    channel: Channel | None = Query(default=None, description="only users with an address on this channel"),
    page: int = Query(default=1, ge=1, le=100_000),
    page_size: int = Query(default=20, ge=1, le=100),
):
    tenant_id = tenant_of(request, Scope.CONFIG)
    where = """tenant_id = $1 AND ($2::text IS NULL OR left(user_id, length($2)) = $2)
               AND ($3::text IS NULL OR addresses ? $3)"""
    args = [tenant_id, prefix, channel.value if channel else None]
    async with services_of(request).pool.acquire() as conn:
        total = await conn.fetchval(f"SELECT count(*) FROM recipients WHERE {where}", *args)
        rows = await conn.fetch(
            f"SELECT {COLUMNS} FROM recipients WHERE {where} ORDER BY user_id LIMIT $4 OFFSET $5",
            *args,
            page_size,
            (page - 1) * page_size,
        )
    return envelope({"total": total, "page": page, "page_size": page_size, "records": [_out(r) for r in rows]})


@router.get("/{user_id}", summary="One recipient's profile")
async def get_recipient(user_id: str, request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    user_id = _user_id(user_id)
    row = await services_of(request).pool.fetchrow(
        f"SELECT {COLUMNS} FROM recipients WHERE tenant_id = $1 AND user_id = $2", tenant_id, user_id
    )
    if row is None:
        raise _not_found(user_id)
    return envelope(_out(row))


@router.patch("/{user_id}", summary="Change part of a recipient's profile",
              openapi_extra=json_body_schema(RecipientPatch))  # fmt: skip
async def patch_recipient(user_id: str, request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    user_id = _user_id(user_id)
    body = await parse_body(request, RecipientPatch)
    given = body.model_dump(mode="json", exclude_unset=True)
    if not given:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "nothing to change", field="body")
    for name in ("timezone", "opt_outs", "addresses", "attributes"):
        if name in given and given[name] is None:
            raise HeraldError(ErrorCode.INVALID_PARAMS, "may not be null", field=name)
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {COLUMNS} FROM recipients WHERE tenant_id = $1 AND user_id = $2 FOR UPDATE", tenant_id, user_id
        )
        if row is None:
            raise _not_found(user_id)
        merged = profile_of(row).model_dump(mode="json", exclude={"user_id"})
        for name, value in given.items():
            if name in ("addresses", "attributes"):
                kept = {k: v for k, v in merged[name].items() if k not in value}
                merged[name] = {**kept, **{k: v for k, v in value.items() if v is not None}}
            else:
                merged[name] = value
        profile = _profile(user_id, merged)
        row = await conn.fetchrow(
            f"""UPDATE recipients SET addresses = $3, locale = $4, timezone = $5, opt_outs = $6, quiet_hours = $7,
                    attributes = $8, updated_at = now()
                WHERE tenant_id = $1 AND user_id = $2 RETURNING {COLUMNS}""",
            tenant_id,
            user_id,
            *_columns(profile),
        )
        await audit.record(conn, request, "recipient.update", "recipient", user_id, _audited(given))
    return envelope(_out(row))


@router.delete("/{user_id}", summary="Remove a recipient's profile (messages already accepted keep their copy)")
async def delete_recipient(user_id: str, request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    user_id = _user_id(user_id)
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        deleted = await conn.fetchval(
            "DELETE FROM recipients WHERE tenant_id = $1 AND user_id = $2 RETURNING user_id", tenant_id, user_id
        )
        if deleted is None:
            raise _not_found(user_id)
        await audit.record(conn, request, "recipient.delete", "recipient", user_id)
    return envelope({"user_id": user_id, "deleted": True})
