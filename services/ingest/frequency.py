"""Ingest's side of frequency caps and digest rules: PostgreSQL is the record, ``notify.config``
the distribution (as for templates, :mod:`services.ingest.templates`).

A change commits in PostgreSQL (with its audit entry and a new ``revision``), then the rule is
published; :class:`services.ingest.distribute.Distributor` publishes every rule again when that
fails, at start-up and when the broker came back without its topics.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import asyncpg
from aiokafka import AIOKafkaProducer
from pydantic import BaseModel

from services.ingest.distribute import Distributor
from shared.frequency import DigestRule, FrequencyCap, cap_key, digest_key
from shared.kafka import Topics

R = TypeVar("R", bound=BaseModel)

CAP_COLUMNS = """id, tenant_id, category, channel, max_count, window_s, action, is_active, description,
    revision, created_at, updated_at, deleted_at IS NOT NULL AS deleted"""
DIGEST_COLUMNS = """id, tenant_id, category, channel, window_s, template_id, is_active, description,
    revision, created_at, updated_at, deleted_at IS NOT NULL AS deleted"""


def model_of_row(model: type[R], row: asyncpg.Record | dict[str, Any], id_field: str | None = None) -> R:
    """A config record from its row (``*_COLUMNS``): the columns the model has, and the row's id
    as ``id_field`` (frequency caps, digest rules, routing rules and policies)."""
    present = set(row.keys())
    ids = {id_field: row["id"]} if id_field else {}
    return model(**{name: row[name] for name in model.model_fields if name in present}, **ids)


def cap_of(row: asyncpg.Record | dict[str, Any]) -> FrequencyCap:
    return model_of_row(FrequencyCap, row, "cap_id")


def digest_of(row: asyncpg.Record | dict[str, Any]) -> DigestRule:
    return model_of_row(DigestRule, row, "rule_id")


def _record(rule: FrequencyCap | DigestRule) -> tuple[bytes, bytes]:
    key = (
        cap_key(rule.tenant_id, rule.cap_id)
        if isinstance(rule, FrequencyCap)
        else digest_key(rule.tenant_id, rule.rule_id)
    )
    return key, rule.model_dump_json(by_alias=True).encode()


class RuleDistributor(Distributor):
    """Publishes frequency caps and digest rules to ``notify.config``."""

    what = "frequency caps and digest rules"

    def __init__(self, pool: asyncpg.Pool, producer: AIOKafkaProducer, timeout_s: float) -> None:
        super().__init__(timeout_s)
        self.pool = pool
        self.producer = producer

    async def changed(self, rule: FrequencyCap | DigestRule) -> None:
        """After a committed change: every router soon (or after a republish)."""
        await self.publish_change(self._publish([rule]))

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
