"""Ingest's side of frequency caps and digest rules: PostgreSQL is the record, ``notify.config``
the distribution (as for templates, :mod:`services.ingest.templates`).

A change commits in PostgreSQL (with its audit entry and a new ``revision``), then the rule is
published. If the broker does not take it, the change stands and the distributor publishes every
rule again a few seconds later (and at start-up, and when the broker came back without its
topics), so routers converge on the database.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from shared.frequency import DigestRule, FrequencyCap, cap_key, digest_key
from shared.kafka import Topics

log = logging.getLogger("herald.ingest.frequency")

_RESYNC_DIRTY_EVERY_S = 5.0

CAP_COLUMNS = """id, tenant_id, category, channel, max_count, window_s, action, is_active, description,
    revision, created_at, updated_at, deleted_at IS NOT NULL AS deleted"""
DIGEST_COLUMNS = """id, tenant_id, category, channel, window_s, template_id, is_active, description,
    revision, created_at, updated_at, deleted_at IS NOT NULL AS deleted"""


def cap_of(row: asyncpg.Record | dict[str, Any]) -> FrequencyCap:
    return FrequencyCap(
        cap_id=row["id"],
        tenant_id=row["tenant_id"],
        category=row["category"],
        channel=row["channel"],
        max_count=row["max_count"],
        window_s=row["window_s"],
        action=row["action"],
        is_active=row["is_active"],
        deleted=row["deleted"],
        revision=row["revision"],
    )


def digest_of(row: asyncpg.Record | dict[str, Any]) -> DigestRule:
    return DigestRule(
        rule_id=row["id"],
        tenant_id=row["tenant_id"],
        category=row["category"],
        channel=row["channel"],
        window_s=row["window_s"],
        template_id=row["template_id"],
        is_active=row["is_active"],
        deleted=row["deleted"],
        revision=row["revision"],
    )


def _record(rule: FrequencyCap | DigestRule) -> tuple[bytes, bytes]:
    key = (
        cap_key(rule.tenant_id, rule.cap_id)
        if isinstance(rule, FrequencyCap)
        else digest_key(rule.tenant_id, rule.rule_id)
    )
    return key, rule.model_dump_json(by_alias=True).encode()


class RuleDistributor:
    """Publishes frequency caps and digest rules to ``notify.config``."""

    def __init__(self, pool: asyncpg.Pool, producer: AIOKafkaProducer, timeout_s: float) -> None:
        self.pool = pool
        self.producer = producer
        self.timeout_s = timeout_s
        self.dirty = asyncio.Event()

    async def changed(self, rule: FrequencyCap | DigestRule) -> None:
        """After a committed change: every router soon (or after a republish)."""
        try:
            await asyncio.wait_for(self._publish([rule]), self.timeout_s)
        except (TimeoutError, KafkaError, OSError) as exc:
            log.warning("rule change not published (%s); publishing again shortly", exc.__class__.__name__)
            self.dirty.set()

    async def _publish(self, rules: list[FrequencyCap | DigestRule]) -> None:
        futures = []
        for rule in rules:
            key, value = _record(rule)
            futures.append(await self.producer.send(Topics.CONFIG, value, key=key))
        await asyncio.gather(*futures)

    async def republish_all(self) -> int:
        """Every rule (deleted ones too, so a reader that saw one live learns it is gone)."""
        async with self.pool.acquire() as conn:
            caps = [cap_of(r) for r in await conn.fetch(f"SELECT {CAP_COLUMNS} FROM frequency_caps")]
            rules = [digest_of(r) for r in await conn.fetch(f"SELECT {DIGEST_COLUMNS} FROM digest_rules")]
        everything: list[FrequencyCap | DigestRule] = [*caps, *rules]
        await asyncio.wait_for(self._publish(everything), self.timeout_s * 4)
        return len(everything)

    async def run(self) -> None:
        """Publish everything at start-up, and again whenever a publish failed."""
        self.dirty.set()
        while True:
            await self.dirty.wait()
            self.dirty.clear()  # before reading: a change that fails meanwhile sets it again
            try:
                count = await self.republish_all()
                log.info("frequency caps and digest rules published to the config topic: %d", count)
            except Exception as exc:  # broker or database away: try again shortly
                self.dirty.set()
                log.warning("rule republish failed (%s)", exc.__class__.__name__)
            await asyncio.sleep(_RESYNC_DIRTY_EVERY_S)
