"""Smart routing's configuration (issue 10): the tenant's routing rules (which channels a message
sent to a user goes to, in which order) and its provider quality policy. Scope ``config``, like
every other configuration that decides where messages go (providers, frequency caps, digest
rules). Every change is audited in its transaction, takes a new ``revision`` and is then published
to the routers (:mod:`services.ingest.routing`); deletes are soft and published as ``deleted``."""

from __future__ import annotations

from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Query, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from services.ingest import audit
from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.http import JSONResponse, envelope, iso_z, json_body_schema, parse_body, patch_changes
from services.ingest.routing import POLICY_COLUMNS, RULE_COLUMNS, policy_of, rule_of
from shared.errors import ErrorCode, HeraldError
from shared.events import Channel
from shared.routing import RoutingPolicy, RoutingRule, RuleMatch, distinct_channels

router = APIRouter(prefix="/api/v1/routing", tags=["routing"])

_TEXT = r"^[^\r\n\x00]*$"
_NAME = r"^[^\r\n\x00]+$"


def _shared(model: type[BaseModel], name: str, *more: Any) -> Any:
    """The type of ``model``'s field ``name`` with its own limits (and ``more``), without its
    default: the API checks a value with the very limits routers read it with, defined once in
    :mod:`shared.routing`."""
    info = model.model_fields[name]
    limits = (*info.metadata, *more)
    return Annotated[(info.annotation, *limits)] if limits else info.annotation


def _default(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].default


_Channels = _shared(RoutingRule, "channels", AfterValidator(distinct_channels))
_RuleName = _shared(RoutingRule, "name", StringConstraints(pattern=_NAME))
_Position = _shared(RoutingRule, "position")
_StepTimeout = _shared(RoutingRule, "step_timeout_s")
_Strategy = _shared(RoutingRule, "strategy")
_SuccessRate = _shared(RoutingPolicy, "min_success_rate")
_P95 = _shared(RoutingPolicy, "max_p95_ms")
_Samples = _shared(RoutingPolicy, "min_samples")


class RuleIn(BaseModel):
    """A new routing rule: messages that ``match`` go to ``channels``, in order (``first_success``:
    the next channel when one fails or has not succeeded within ``step_timeout_s``) or all at once."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: _RuleName = Field(examples=["urgent-ops"])
    position: _Position = Field(default=_default(RoutingRule, "position"), description="lower is tried first")
    match: RuleMatch = Field(default_factory=RuleMatch, description="empty matches every message")
    channels: _Channels = Field(examples=[["wecom", "sms", "email"]])
    strategy: _Strategy = _default(RoutingRule, "strategy")
    step_timeout_s: _StepTimeout = _default(RoutingRule, "step_timeout_s")
    is_active: bool = True
    description: str | None = Field(default=None, max_length=500, pattern=_TEXT)


class RulePatch(BaseModel):
    """Fields to change; absent fields stay (``description: null`` clears it)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: _RuleName | None = None
    position: _Position | None = None
    match: RuleMatch | None = None
    channels: _Channels | None = None
    strategy: _Strategy | None = None
    step_timeout_s: _StepTimeout | None = None
    is_active: bool | None = None
    description: str | None = Field(default=None, max_length=500, pattern=_TEXT)


class PolicyIn(BaseModel):
    """The tenant's quality threshold; a field left out takes its default."""

    model_config = ConfigDict(extra="forbid")

    min_success_rate: _SuccessRate = _default(RoutingPolicy, "min_success_rate")
    max_p95_ms: _P95 = Field(default=_default(RoutingPolicy, "max_p95_ms"), description="null: latency not judged")
    min_samples: _Samples = _default(RoutingPolicy, "min_samples")


def _out(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "position": row["position"],
        "match": RuleMatch.model_validate(row["match"] or {}).model_dump(mode="json", exclude_defaults=True),
        "channels": list(row["channels"]),
        "strategy": row["strategy"],
        "step_timeout_s": row["step_timeout_s"],
        "is_active": row["is_active"],
        "description": row["description"],
        "revision": row["revision"],
        "created_at": iso_z(row["created_at"]),
        "updated_at": iso_z(row["updated_at"]),
    }


def _not_found(rule_id: int) -> HeraldError:
    return HeraldError(ErrorCode.NOT_FOUND, f"routing rule {rule_id} not found", field="rule_id")


def _name_taken(name: str) -> HeraldError:
    return HeraldError(ErrorCode.DUPLICATE_REQUEST, f"a routing rule named {name!r} already exists", field="name")


def _column_values(values: dict[str, Any]) -> dict[str, Any]:
    """Body values (JSON mode) as the columns take them."""
    out = dict(values)
    if "match" in out:
        out["match"] = out["match"] or {}
    if "channels" in out:
        out["channels"] = list(out["channels"])
    return out


async def _publish(request: Request, row: asyncpg.Record) -> None:
    """After a committed change to a rule: this ingest's sends see it at once (other replicas
    within their cache's few seconds, :class:`services.ingest.routing.RuleCache`), routers when
    they read it from ``notify.config``."""
    services = services_of(request)
    services.routing_rules.forget(row["tenant_id"])
    await services.routing.changed(rule_of(row))


# --- rules ---------------------------------------------------------------------------------------


@router.post("/rules", status_code=201, summary="Create a routing rule", openapi_extra=json_body_schema(RuleIn))
async def create_rule(request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    body = await parse_body(request, RuleIn)
    values = _column_values(body.model_dump(mode="json"))
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        try:
            row = await conn.fetchrow(
                f"""INSERT INTO routing_rules (tenant_id, name, position, match, channels, strategy, step_timeout_s,
                        is_active, description)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {RULE_COLUMNS}""",
                tenant_id, values["name"], values["position"], values["match"], values["channels"], values["strategy"],
                values["step_timeout_s"], values["is_active"], values["description"],
            )  # fmt: skip
        except asyncpg.UniqueViolationError:
            raise _name_taken(body.name) from None
        await audit.record(conn, request, "routing_rule.create", "routing_rule", row["id"], values)
    await _publish(request, row)
    return envelope(_out(row), status_code=201)


@router.get("/rules", summary="List routing rules, in the order routers try them")
async def list_rules(
    request: Request,
    is_active: bool | None = Query(default=None),
    channel: Channel | None = Query(default=None, description="rules that use this channel"),
    page: int = Query(default=1, ge=1, le=100_000),
    page_size: int = Query(default=20, ge=1, le=100),
):
    tenant_id = tenant_of(request, Scope.CONFIG)
    where = """tenant_id = $1 AND deleted_at IS NULL AND ($2::bool IS NULL OR is_active = $2)
               AND ($3::text IS NULL OR $3 = ANY(channels))"""
    args = [tenant_id, is_active, channel.value if channel else None]
    async with services_of(request).pool.acquire() as conn:
        total = await conn.fetchval(f"SELECT count(*) FROM routing_rules WHERE {where}", *args)
        rows = await conn.fetch(
            f"""SELECT {RULE_COLUMNS} FROM routing_rules WHERE {where}
                ORDER BY position, id LIMIT $4 OFFSET $5""",
            *args,
            page_size,
            (page - 1) * page_size,
        )
    return envelope({"total": total, "page": page, "page_size": page_size, "records": [_out(r) for r in rows]})


@router.get("/rules/{rule_id}", summary="One routing rule")
async def get_rule(rule_id: int, request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    row = await services_of(request).pool.fetchrow(
        f"SELECT {RULE_COLUMNS} FROM routing_rules WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
        tenant_id,
        rule_id,
    )
    if row is None:
        raise _not_found(rule_id)
    return envelope(_out(row))


@router.patch("/rules/{rule_id}", summary="Change a routing rule", openapi_extra=json_body_schema(RulePatch))
async def update_rule(rule_id: int, request: Request) -> JSONResponse:
    tenant_id = tenant_of(request, Scope.CONFIG)
    body = await parse_body(request, RulePatch)
    changes = patch_changes(body, nullable=("description",))
    changes = _column_values(changes)
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(changes, start=3))
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        try:
            row = await conn.fetchrow(
                f"""UPDATE routing_rules SET {assignments}, updated_at = now(),
                        revision = nextval('routing_revision_seq')
                    WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING {RULE_COLUMNS}""",
                tenant_id,
                rule_id,
                *changes.values(),
            )
        except asyncpg.UniqueViolationError:
            raise _name_taken(changes["name"]) from None
        if row is None:
            raise _not_found(rule_id)
        await audit.record(conn, request, "routing_rule.update", "routing_rule", rule_id, changes)
    await _publish(request, row)
    return envelope(_out(row))


@router.delete("/rules/{rule_id}", summary="Delete a routing rule")
async def delete_rule(rule_id: int, request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""UPDATE routing_rules SET deleted_at = now(), updated_at = now(),
                    revision = nextval('routing_revision_seq')
                WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING {RULE_COLUMNS}""",
            tenant_id,
            rule_id,
        )
        if row is None:
            raise _not_found(rule_id)
        await audit.record(conn, request, "routing_rule.delete", "routing_rule", rule_id)
    await _publish(request, row)
    return envelope({"id": rule_id, "deleted": True, "revision": row["revision"]})


# --- policy --------------------------------------------------------------------------------------


def _policy_out(policy: RoutingPolicy, updated_at: Any = None) -> dict[str, Any]:
    return {
        "min_success_rate": policy.min_success_rate,
        "max_p95_ms": policy.max_p95_ms,
        "min_samples": policy.min_samples,
        "revision": policy.revision,  # 0: nothing stored, the defaults apply
        "updated_at": iso_z(updated_at),
    }


@router.get("/policy", summary="The tenant's provider quality policy (the defaults when none is stored)")
async def get_policy(request: Request):
    tenant_id = tenant_of(request, Scope.CONFIG)
    row = await services_of(request).pool.fetchrow(
        f"SELECT {POLICY_COLUMNS} FROM routing_policies WHERE tenant_id = $1", tenant_id
    )
    if row is None:
        return envelope(_policy_out(RoutingPolicy(tenant_id=tenant_id)))
    return envelope(_policy_out(policy_of(row), row["updated_at"]))


@router.put("/policy", summary="Set the tenant's provider quality policy", openapi_extra=json_body_schema(PolicyIn))
async def put_policy(request: Request):
    """Providers whose success rate (or p95 latency) misses the threshold, once they have
    ``min_samples`` tries to judge, get traffic only when no other provider of the channel can."""
    tenant_id = tenant_of(request, Scope.CONFIG)
    body = await parse_body(request, PolicyIn)
    async with services_of(request).pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""INSERT INTO routing_policies (tenant_id, min_success_rate, max_p95_ms, min_samples)
                VALUES ($1, $2, $3, $4)
                ON CONFLICT (tenant_id) DO UPDATE SET min_success_rate = EXCLUDED.min_success_rate,
                    max_p95_ms = EXCLUDED.max_p95_ms, min_samples = EXCLUDED.min_samples,
                    revision = nextval('routing_revision_seq'), updated_at = now()
                RETURNING {POLICY_COLUMNS}""",
            tenant_id,
            body.min_success_rate,
            body.max_p95_ms,
            body.min_samples,
        )
        await audit.record(conn, request, "routing_policy.update", "routing_policy", tenant_id, body.model_dump())
    policy = policy_of(row)
    await services_of(request).routing.changed(policy)
    return envelope(_policy_out(policy, row["updated_at"]))
