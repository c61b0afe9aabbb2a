"""Ingest's side of templates: PostgreSQL is the record, ``notify.config`` the distribution.

Every change is written in one transaction (the template row and its version's history row),
then published: the version record and the head (:mod:`shared.template_store`). If the broker
does not take it, the change stands and the distributor publishes everything again a few
seconds later (and at start-up, and when the broker came back without its topics), so routers
always converge on the database.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from services.ingest.distribute import Distributor
from shared.kafka import Topics
from shared.template_store import TemplateStore
from shared.templates import TemplateHead, TemplateVersion, Variant, head_key, version_key

_VERSIONS = """
SELECT h.template_id, h.tenant_id, h.version, h.template_name, h.template_type, h.variables, h.variants
FROM message_template_history h
WHERE h.tenant_id = $1 AND h.template_id = $2 AND ($3::int IS NULL OR h.version = $3)
"""
_HEAD = """
SELECT id, tenant_id, template_name, version, is_active, deleted_at IS NOT NULL AS deleted, revision
FROM message_templates WHERE tenant_id = $1 AND (id = $2 OR ($2::bigint IS NULL AND template_name = $3))
ORDER BY deleted_at IS NULL DESC, id DESC LIMIT 1
"""


def version_of(row: asyncpg.Record | dict[str, Any]) -> TemplateVersion:
    variables = row["variables"]
    variants = row["variants"]
    return TemplateVersion(
        template_id=row["template_id"],
        tenant_id=row["tenant_id"],
        template_name=row["template_name"],
        template_type=row["template_type"],
        version=row["version"],
        variables=orjson.loads(variables) if isinstance(variables, str) else (variables or []),
        variants=[
            Variant.model_validate(v) for v in (orjson.loads(variants) if isinstance(variants, str) else variants)
        ],
    )


def head_of(row: asyncpg.Record | dict[str, Any]) -> TemplateHead:
    return TemplateHead(
        template_id=row["id"],
        tenant_id=row["tenant_id"],
        template_name=row["template_name"],
        version=row["version"],
        is_active=row["is_active"],
        deleted=row["deleted"],
        revision=row["revision"],
    )


class TemplateDistributor(Distributor):
    """Publishes template changes to ``notify.config`` and keeps ingest's own store current."""

    what = "templates"

    def __init__(self, pool: asyncpg.Pool, producer: AIOKafkaProducer, store: TemplateStore, timeout_s: float) -> None:
        super().__init__(timeout_s)
        self.pool = pool
        self.producer = producer
        self.store = store

    async def changed(self, head: TemplateHead, versions: list[TemplateVersion]) -> None:
        """After a committed change: this replica sees it at once, every router soon."""
        for v in versions:
            self.store.put_version(v)
        self.store.put_head(head)
        await self.publish_change(self._publish(head, versions))

    async def _publish(self, head: TemplateHead, versions: list[TemplateVersion]) -> None:
        futures = [
            await self.producer.send(
                Topics.CONFIG,
                v.model_dump_json(by_alias=True).encode(),
                key=version_key(v.tenant_id, v.template_id, v.version),
            )
            for v in versions
        ]
        futures.append(
            await self.producer.send(
                Topics.CONFIG,
                head.model_dump_json(by_alias=True).encode(),
                key=head_key(head.tenant_id, head.template_id),
            )
        )
        await asyncio.gather(*futures)

    async def republish_all(self) -> int:
        """Every template's versions and head, from the database (answers how many templates)."""
        async with self.pool.acquire() as conn:
            heads = await conn.fetch(
                "SELECT id, tenant_id, template_name, version, is_active, deleted_at IS NOT NULL AS deleted, "
                "revision FROM message_templates"
            )
            rows = await conn.fetch(
                "SELECT template_id, tenant_id, version, template_name, template_type, variables, variants "
                "FROM message_template_history ORDER BY template_id, version"
            )
        by_template: dict[int, list[TemplateVersion]] = {}
        for row in rows:
            by_template.setdefault(row["template_id"], []).append(version_of(row))
        for row in heads:
            head = head_of(row)
            await asyncio.wait_for(self._publish(head, by_template.get(head.template_id, [])), self.timeout_s * 4)
            for v in by_template.get(head.template_id, []):
                self.store.put_version(v)
            self.store.put_head(head)
        return len(heads)

    async def load(
        self, tenant_id: str, template_id: int | None, name: str | None, version: int | None
    ) -> TemplateVersion | None:
        """What the store does not know (a template another replica just made), from the database."""
        async with self.pool.acquire() as conn:
            head_row = await conn.fetchrow(_HEAD, tenant_id, template_id, name)
            if head_row is None:
                return None
            head = head_of(head_row)
            rows = await conn.fetch(_VERSIONS, tenant_id, head.template_id, version or head.version)
        for row in rows:
            self.store.put_version(version_of(row))
        self.store.put_head(head)
        return self.store.for_send(tenant_id, head.template_id, None, version)
