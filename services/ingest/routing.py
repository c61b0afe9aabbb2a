"""Ingest's side of smart routing (issue 10): routing rules, each tenant's quality policy and the
configured providers' public facts, recorded in PostgreSQL and distributed on ``notify.config``
(keys of :mod:`shared.routing`), as frequency rules are (:mod:`services.ingest.frequency`).

A change commits in PostgreSQL (with its audit entry and a new ``revision``), then its record is
published; :class:`services.ingest.distribute.Distributor` publishes everything again when that
fails, at start-up and when the broker came back without its topics. Providers are published
with their own per-row ``revision`` (bumped by every change in ``routes/providers.py``): each
provider has its own key, so a per-row counter orders its records as well as a sequence would.
Never published: a provider's configuration and secrets, and recipient profiles.

Ingest reads the tenant's live rules itself for one thing: a send to a user without a channel is
checked (can it be routed at all?) and counted against the monthly quota of the channel its rule
gives it (:mod:`services.ingest.sends`). :class:`RuleCache` keeps each tenant's rules for
``RULES_TTL_S`` so a stream of such sends costs one query per tenant every few seconds, not one per
send. A change through this ingest's API forgets the tenant's entry at once; another ingest replica
sees the change within ``RULES_TTL_S`` (routers learn it from ``notify.config``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from services.ingest.distribute import Distributor
from services.ingest.frequency import model_of_row
from services.senders.plugins import plugin
from shared.kafka import Topics
from shared.routing import (
    ProviderRoute,
    RoutingPolicy,
    RoutingRule,
    policy_key,
    provider_key,
    rule_key,
)

log = logging.getLogger("herald.ingest.routing")

RULE_COLUMNS = """id, tenant_id, name, position, match, channels, strategy, step_timeout_s, is_active,
    description, revision, created_at, updated_at, deleted_at IS NOT NULL AS deleted"""
POLICY_COLUMNS = "tenant_id, min_success_rate, max_p95_ms, min_samples, revision, updated_at"
PROVIDER_COLUMNS = """id, tenant_id, channel, provider, name, priority, weight, costs, is_active, revision,
    deleted_at IS NOT NULL AS deleted"""

Record = ProviderRoute | RoutingRule | RoutingPolicy


def rule_of(row: asyncpg.Record | dict[str, Any]) -> RoutingRule:
    return model_of_row(RoutingRule, row, "rule_id")


def policy_of(row: asyncpg.Record | dict[str, Any]) -> RoutingPolicy:
    return model_of_row(RoutingPolicy, row)


def _default_cost(channel: str, provider: str) -> Decimal:
    """The plugin's list price, which the sender charges when the tenant configured no cost."""
    try:
        return Decimal(plugin(channel, provider).default_cost)
    except LookupError:  # a plugin no longer in the catalogue: its messages cannot be sent anyway
        return Decimal(0)


def provider_route_of(row: asyncpg.Record | dict[str, Any], *, deleted: bool | None = None) -> ProviderRoute:
    """A ``providers`` row as routers see it: no configuration, no secret. ``deleted`` overrides
    the row's (routes that read ``providers`` without the ``deleted`` column say it)."""
    present = set(row.keys())
    return ProviderRoute(
        provider_id=row["id"],
        tenant_id=row["tenant_id"],
        channel=row["channel"],
        provider=row["provider"],
        name=row["name"],
        priority=row["priority"],
        weight=row["weight"],
        costs=row["costs"] or {},
        default_cost=_default_cost(row["channel"], row["provider"]),
        is_active=row["is_active"],
        deleted=deleted if deleted is not None else bool(row["deleted"]) if "deleted" in present else False,
        revision=row["revision"],
    )


def _record(item: Record) -> tuple[bytes, bytes]:
    if isinstance(item, ProviderRoute):
        key = provider_key(item.tenant_id, item.provider_id)
    elif isinstance(item, RoutingRule):
        key = rule_key(item.tenant_id, item.rule_id)
    else:
        key = policy_key(item.tenant_id)
    return key, item.model_dump_json(by_alias=True).encode()


class RoutingDistributor(Distributor):
    """Publishes providers, routing rules and routing policies to ``notify.config``."""

    what = "providers, routing rules and policies"

    def __init__(self, pool: asyncpg.Pool, producer: AIOKafkaProducer, timeout_s: float) -> None:
        super().__init__(timeout_s)
        self.pool = pool
        self.producer = producer

    async def changed(self, item: Record) -> None:
        """After a committed change: every router soon (or after a republish)."""
        await self.publish_change(self._publish([item]))

    async def _publish(self, items: list[Record]) -> None:
        futures = []
        for item in items:
            key, value = _record(item)
            futures.append(await self.producer.send(Topics.CONFIG, value, key=key))
        await asyncio.gather(*futures)

    async def republish_all(self) -> int:
        """Every provider, rule and policy of every tenant (deleted ones too, so a reader that saw
        one live learns it is gone)."""
        async with self.pool.acquire() as conn:
            providers = await conn.fetch(f"SELECT {PROVIDER_COLUMNS} FROM providers")
            rules = await conn.fetch(f"SELECT {RULE_COLUMNS} FROM routing_rules")
            policies = await conn.fetch(f"SELECT {POLICY_COLUMNS} FROM routing_policies")
        everything: list[Record] = []
        for convert, rows in ((provider_route_of, providers), (rule_of, rules), (policy_of, policies)):
            for row in rows:
                try:
                    everything.append(convert(row))
                except ValidationError as exc:  # a row no router could read: skipped, not fatal
                    first = exc.errors(include_url=False)[0]  # where and why, never the value
                    log.warning("not publishing %s row %s: %s %s", convert.__name__.removesuffix("_of"), row[0],
                                ".".join(map(str, first["loc"])), first["msg"])  # fmt: skip
        await asyncio.wait_for(self._publish(everything), self.timeout_s * 4)
        return len(everything)


async def live_rules(pool: asyncpg.Pool, tenant_id: str) -> list[RoutingRule]:
    """The tenant's active rules, in the order routers try them (for ingest's check and quota
    count of a send that names no channel; read through :class:`RuleCache`)."""
    rows = await pool.fetch(
        f"""SELECT {RULE_COLUMNS} FROM routing_rules WHERE tenant_id = $1 AND is_active AND deleted_at IS NULL
            ORDER BY position, id""",
        tenant_id,
    )
    return [rule_of(r) for r in rows]


RULES_TTL_S = 5.0
RULES_MAX_TENANTS = 10_000


class RuleCache:
    """Each tenant's live routing rules (:func:`live_rules`), kept ``ttl_s`` seconds, for at most
    ``max_tenants`` tenants (the oldest entry goes first). :meth:`forget` drops a tenant's entry
    when its rules change through this process's API; other replicas see the change within
    ``ttl_s``. A read that began before a change never stores what it read after it (so a send
    accepted after the change's answer is checked against the new rules)."""

    def __init__(self, pool: asyncpg.Pool, ttl_s: float = RULES_TTL_S, max_tenants: int = RULES_MAX_TENANTS) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self.max_tenants = max_tenants
        # Insertion order is expiry order (one TTL for all): the first entry is the oldest.
        self._entries: dict[str, tuple[float, list[RoutingRule]]] = {}
        self._generation = 0  # one more at every forget()

    async def get(self, tenant_id: str) -> list[RoutingRule]:
        """The tenant's live rules in the order routers try them; database errors propagate."""
        hit = self._entries.get(tenant_id)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        generation = self._generation
        rules = await live_rules(self.pool, tenant_id)
        if generation == self._generation:
            self._entries.pop(tenant_id, None)
            while len(self._entries) >= self.max_tenants:
                del self._entries[next(iter(self._entries))]
            self._entries[tenant_id] = (time.monotonic() + self.ttl_s, rules)
        return rules

    def forget(self, tenant_id: str) -> None:
        """The tenant's rules changed (committed): read them again at the next send."""
        self._generation += 1
        self._entries.pop(tenant_id, None)
