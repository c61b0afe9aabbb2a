"""Frequency caps and digest rules (issue 8): the records ``notify.config`` carries, and the
in-memory store every router keeps of them.

Ingest writes a rule to PostgreSQL and publishes it to the compacted ``notify.config`` (key
``frequency-cap:<tenant>:<id>`` or ``digest-rule:<tenant>:<id>``); routers read the topic
whole at start-up and follow it, like templates (:mod:`shared.template_store`), so a message
never costs a rule query. Each record carries a ``revision`` taken from one sequence on every
change: a store keeps the highest, so a record published late cannot undo a newer change. A
deleted rule is published as such (``deleted: true``), not dropped.

- A **frequency cap** allows at most ``max_count`` messages of ``category`` to one recipient in
  any ``window_s`` seconds (a sliding window), optionally on one ``channel`` only; a message over
  it is suppressed or deferred (``action``).
- A **digest rule** collects the messages of ``category`` on ``channel`` to one recipient for
  ``window_s`` seconds from the first one, then delivers them as one message listing them,
  rendered with ``template_id`` (variables ``items``, ``count``, ``category``) or a built-in
  listing.
"""

from __future__ import annotations

from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from shared.events import Category
from shared.metrics import FREQUENCY_RULE_REVISION

CAP_SCHEMA = "notify.config.frequency-cap.v1"
DIGEST_SCHEMA = "notify.config.digest-rule.v1"
# Longest window of a cap (31 days) and of a digest (7 days).
MAX_CAP_WINDOW_S = 31 * 86400
MAX_DIGEST_WINDOW_S = 7 * 86400
# What a digest template may use.
DIGEST_VARIABLES = frozenset({"items", "count", "category"})

Action = Literal["suppress", "defer"]


class FrequencyCap(BaseModel):
    """At most ``max_count`` messages of ``category`` per recipient in any ``window_s`` seconds."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["notify.config.frequency-cap.v1"] = Field(default=CAP_SCHEMA, alias="schema")
    cap_id: int = Field(ge=1)
    tenant_id: str
    category: Category
    channel: str | None = None  # None: every channel
    max_count: int = Field(ge=1)
    window_s: int = Field(ge=1, le=MAX_CAP_WINDOW_S)
    action: Action
    is_active: bool = True
    deleted: bool = False
    revision: int = 0

    def applies_to(self, channel: str) -> bool:
        return self.is_active and not self.deleted and (self.channel is None or self.channel == channel)


class DigestRule(BaseModel):
    """Messages of ``category`` on ``channel`` to one recipient within ``window_s`` → one delivery."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["notify.config.digest-rule.v1"] = Field(default=DIGEST_SCHEMA, alias="schema")
    rule_id: int = Field(ge=1)
    tenant_id: str
    category: Category
    channel: str
    window_s: int = Field(ge=1, le=MAX_DIGEST_WINDOW_S)
    template_id: int | None = Field(default=None, ge=1)
    is_active: bool = True
    deleted: bool = False
    revision: int = 0


def cap_key(tenant_id: str, cap_id: int) -> bytes:
    return f"frequency-cap:{tenant_id}:{cap_id}".encode()


def digest_key(tenant_id: str, rule_id: int) -> bytes:
    return f"digest-rule:{tenant_id}:{rule_id}".encode()


class RuleStore:
    """Every frequency cap and digest rule known, the live ones indexed by (tenant, category)."""

    def __init__(self) -> None:
        self.caps: dict[tuple[str, int], FrequencyCap] = {}
        self.digests: dict[tuple[str, int], DigestRule] = {}
        self._live_caps: dict[tuple[str, str], dict[int, FrequencyCap]] = {}
        self._live_digests: dict[tuple[str, str], dict[int, DigestRule]] = {}
        self.revision = 0  # the highest applied: how far this store has caught up with changes

    def apply(self, value: bytes | None) -> None:
        """One record of the config topic (other kinds and tombstones are ignored)."""
        if not value:
            return
        data = orjson.loads(value)
        kind = data.get("schema") if isinstance(data, dict) else None
        if kind == CAP_SCHEMA:
            self.put_cap(FrequencyCap.model_validate(data))
        elif kind == DIGEST_SCHEMA:
            self.put_digest(DigestRule.model_validate(data))

    def put_cap(self, cap: FrequencyCap) -> None:
        key = (cap.tenant_id, cap.cap_id)
        old = self.caps.get(key)
        if old is not None and cap.revision < old.revision:
            return  # published late: a newer change is already known
        self.caps[key] = cap
        if old is not None:
            self._live_caps.get((old.tenant_id, old.category), {}).pop(old.cap_id, None)
        if cap.is_active and not cap.deleted:
            self._live_caps.setdefault((cap.tenant_id, cap.category), {})[cap.cap_id] = cap
        self._seen(cap.revision)

    def put_digest(self, rule: DigestRule) -> None:
        key = (rule.tenant_id, rule.rule_id)
        old = self.digests.get(key)
        if old is not None and rule.revision < old.revision:
            return
        self.digests[key] = rule
        if old is not None:
            self._live_digests.get((old.tenant_id, old.category), {}).pop(old.rule_id, None)
        if rule.is_active and not rule.deleted:
            self._live_digests.setdefault((rule.tenant_id, rule.category), {})[rule.rule_id] = rule
        self._seen(rule.revision)

    def _seen(self, revision: int) -> None:
        self.revision = max(self.revision, revision)
        FREQUENCY_RULE_REVISION.set(self.revision)

    def caps_for(self, tenant_id: str, category: str, channel: str) -> list[FrequencyCap]:
        """The live caps a message of this tenant, category and channel counts against."""
        live = self._live_caps.get((tenant_id, category))
        if not live:
            return []
        return sorted((c for c in live.values() if c.applies_to(channel)), key=lambda c: c.cap_id)

    def digest_for(self, tenant_id: str, category: str, channel: str) -> DigestRule | None:
        """The live digest rule of this tenant, category and channel (at most one; the oldest)."""
        live = self._live_digests.get((tenant_id, category))
        return (
            min((r for r in live.values() if r.channel == channel), key=lambda r: r.rule_id, default=None)
            if live
            else None
        )
