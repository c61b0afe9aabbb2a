"""What the rule resources share (frequency caps, digest rules): tenant-scoped rows, deleted
softly, whose every change takes a new ``revision`` from one sequence, is audited in its own
transaction and then published to the routers (:mod:`services.ingest.frequency`). Each route
module keeps what differs: its body models, its checks and its INSERT."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from fastapi import Request
from pydantic import BaseModel

from services.ingest import audit
from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.http import JSONResponse, envelope, iso_z
from shared.errors import ErrorCode, HeraldError


@dataclass(frozen=True, slots=True)
class RuleTable:
    """One rule resource: its table and columns, its name in messages, audit entries and paths."""

    table: str  # frequency_caps
    columns: str  # what RETURNING and SELECT read
    noun: str  # "frequency cap", in messages
    kind: str  # "frequency_cap": the audit log's target type and action prefix
    id_field: str  # "cap_id", the path parameter an error names
    fields: tuple[str, ...]  # the columns an answer shows besides id, revision and times
    nullable: frozenset[str]  # fields a PATCH may set to null
    config: Callable[[asyncpg.Record], Any]  # the row as the record routers read

    def out(self, row: asyncpg.Record) -> dict[str, Any]:
        return {
            "id": row["id"],
            **{name: row[name] for name in self.fields},
            "revision": row["revision"],  # routers expose the highest applied (herald_frequency_rule_revision)
            "created_at": iso_z(row["created_at"]),
            "updated_at": iso_z(row["updated_at"]),
        }

    def not_found(self, rule_id: int) -> HeraldError:
        return HeraldError(ErrorCode.NOT_FOUND, f"{self.noun} {rule_id} not found", field=self.id_field)

    async def created(self, request: Request, conn: asyncpg.Connection, row: asyncpg.Record, body: BaseModel) -> None:
        """Audit a row just inserted (in the caller's transaction)."""
        await audit.record(conn, request, f"{self.kind}.create", self.kind, row["id"], body.model_dump(mode="json"))

    async def publish(self, request: Request, row: asyncpg.Record) -> None:
        await services_of(request).rules.changed(self.config(row))

    async def list(self, request: Request, category: str | None, page: int, page_size: int) -> JSONResponse:
        where, args = ["tenant_id = $1", "deleted_at IS NULL"], [tenant_of(request, Scope.CONFIG)]
        if category is not None:
            args.append(category)
            where.append(f"category = ${len(args)}")
        clause = " AND ".join(where)
        async with services_of(request).pool.acquire() as conn:
            total = await conn.fetchval(f"SELECT count(*) FROM {self.table} WHERE {clause}", *args)
            rows = await conn.fetch(
                f"SELECT {self.columns} FROM {self.table} WHERE {clause} ORDER BY id "
                f"LIMIT {page_size} OFFSET {(page - 1) * page_size}",
                *args,
            )
        return envelope({"total": total, "page": page, "page_size": page_size, "records": [self.out(r) for r in rows]})

    async def fetch(self, conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, rule_id: int) -> asyncpg.Record:
        row = await conn.fetchrow(
            f"SELECT {self.columns} FROM {self.table} WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
            tenant_id,
            rule_id,
        )
        if row is None:
            raise self.not_found(rule_id)
        return row

    def changes(self, body: BaseModel) -> dict[str, Any]:
        """The fields a PATCH body sets; 1001 for none, or for null where null is not allowed."""
        changes = body.model_dump(mode="json", exclude_unset=True)
        if not changes:
            raise HeraldError(ErrorCode.INVALID_PARAMS, "nothing to change", field="body")
        for key, value in changes.items():
            if value is None and key not in self.nullable:
                raise HeraldError(ErrorCode.INVALID_PARAMS, "may not be null", field=key)
        return changes

    async def update(
        self,
        request: Request,
        tenant_id: str,
        rule_id: int,
        changes: dict[str, Any],
        conflict: Callable[[], HeraldError] | None = None,
    ) -> JSONResponse:
        """Apply ``changes`` (from :meth:`changes`), audit and publish; ``conflict`` answers a
        unique violation."""
        assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(changes, start=3))
        async with services_of(request).pool.acquire() as conn, conn.transaction():
            try:
                row = await conn.fetchrow(
                    f"""UPDATE {self.table} SET {assignments}, updated_at = now(),
                            revision = nextval('frequency_revision_seq')
                        WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING {self.columns}""",
                    tenant_id,
                    rule_id,
                    *changes.values(),
                )
            except asyncpg.UniqueViolationError:
                if conflict is None:
                    raise
                raise conflict() from None
            if row is None:
                raise self.not_found(rule_id)
            await audit.record(conn, request, f"{self.kind}.update", self.kind, rule_id, changes)
        await self.publish(request, row)
        return envelope(self.out(row))

    async def delete(self, request: Request, rule_id: int) -> JSONResponse:
        tenant_id = tenant_of(request, Scope.CONFIG)
        async with services_of(request).pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""UPDATE {self.table} SET deleted_at = now(), updated_at = now(),
                        revision = nextval('frequency_revision_seq')
                    WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL RETURNING {self.columns}""",
                tenant_id,
                rule_id,
            )
            if row is None:
                raise self.not_found(rule_id)
            await audit.record(conn, request, f"{self.kind}.delete", self.kind, rule_id)
        await self.publish(request, row)
        return envelope({"id": rule_id, "deleted": True, "revision": row["revision"]})
