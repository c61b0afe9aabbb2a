"""Smart routing (issue 10): what ``notify.config`` carries about routing and the router's pure
decisions on it.

Ingest writes routing configuration to PostgreSQL and publishes it to the compacted config topic
(as templates and frequency rules, :mod:`shared.frequency`); routers read it whole at start-up and
follow it, so no message costs a query:

- ``provider:<tenant>:<id>``: a configured provider's public facts (name, plugin, priority,
  weight, costs, active): never its configuration or secrets;
- ``routing-rule:<tenant>:<id>``: a rule (match → ordered channels, strategy);
- ``routing-policy:<tenant>``: the tenant's quality threshold.

Each record carries a ``revision``; a store keeps the highest per key, so a record published late
cannot undo a newer change.

The provider choice (:func:`rank`) orders a channel's providers for one message:

1. providers whose breaker is closed and whose quality clears the tenant's threshold (or that have
   too few samples to judge), cheapest first; among equal costs a weighted draw orders them;
2. then providers below the threshold (best success rate first);
3. then providers whose breaker is open (last resort: a message is never refused for want of a
   healthy provider while any is configured).

An open breaker whose cooldown has passed is *half-open*: a router lets one message probe it (first
in the list, the others behind it so the message still goes at once if the probe fails) per
``probe_every_s``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.events import (
    AttributeValue,
    Category,
    Channel,
    ClockTime,
    Priority,
    ProviderHealthV1,
    QuietHours,
    RecipientProfile,
)

PROVIDER_SCHEMA = "notify.config.provider.v1"
RULE_SCHEMA = "notify.config.routing-rule.v1"
POLICY_SCHEMA = "notify.config.routing-policy.v1"

Strategy = Literal["first_success", "all"]


class ProviderRoute(BaseModel):
    """A configured provider as routers see it: what choosing needs, no configuration, no secret."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["notify.config.provider.v1"] = Field(default=PROVIDER_SCHEMA, alias="schema")
    provider_id: int
    tenant_id: str
    channel: Channel
    provider: str
    name: str
    priority: int = 100
    weight: int = 100
    costs: dict[str, Any] = Field(default_factory=dict)  # {"default": 0.05, "by_country": {"86": 0.045}}
    default_cost: Decimal = Decimal(0)  # the plugin's, when the tenant set none
    is_active: bool = True
    deleted: bool = False
    revision: int = 0

    def cost(self, to: str | None) -> Decimal:
        """One message to ``to``, priced as the sender prices it (:func:`price`)."""
        return price(self.costs.get("by_country"), self.costs.get("default"), self.default_cost, to)

    @property
    def live(self) -> bool:
        return self.is_active and not self.deleted


def price(by_country: Mapping[str, Any] | None, default: Any, fallback: Decimal, to: str | None) -> Decimal:
    """One message to ``to``: the price of its country (calling code, longest first: "1242" before
    "1"), else the configured default, else ``fallback`` (the plugin's list price). The sender
    prices deliveries with it and the router ranks providers with it: one function, one price."""
    if by_country and to and to.startswith("+"):
        digits = to[1:]
        for n in (4, 3, 2, 1):
            if digits[:n] in by_country:
                return Decimal(str(by_country[digits[:n]]))
    if default is not None:
        return Decimal(str(default))
    return fallback


class TimeWindow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: ClockTime
    end: ClockTime


class RuleMatch(BaseModel):
    """What a message must be for a rule to apply; an empty list or map matches anything."""

    model_config = ConfigDict(extra="forbid")

    priorities: list[Priority] = Field(default_factory=list, max_length=4)
    categories: list[Category] = Field(default_factory=list, max_length=50)
    # Each attribute of the recipient's profile equals the value (or one of the values).
    attributes: dict[str, AttributeValue | list[AttributeValue]] = Field(default_factory=dict, max_length=20)
    # The recipient's local time is within the window (start after end spans midnight).
    local_time: TimeWindow | None = None


def distinct_channels(value: list[Channel]) -> list[Channel]:
    """A rule's channels, each once (the API's models validate with it too)."""
    if len(set(value)) != len(value):
        raise ValueError("a channel is listed twice")
    return value


class RoutingRule(BaseModel):
    """Messages that match go to ``channels`` in order (``first_success``) or to all at once."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["notify.config.routing-rule.v1"] = Field(default=RULE_SCHEMA, alias="schema")
    rule_id: int = Field(ge=1)
    tenant_id: str
    name: str = Field(min_length=1, max_length=100)
    position: int = Field(default=100, ge=0, le=100_000)  # lower is tried first
    match: RuleMatch = Field(default_factory=RuleMatch)
    channels: list[Channel] = Field(min_length=1, max_length=8)
    strategy: Strategy = "first_success"
    step_timeout_s: int = Field(default=300, ge=5, le=86_400)
    is_active: bool = True
    deleted: bool = False
    revision: int = 0

    @field_validator("channels")
    @classmethod
    def _distinct(cls, value: list[Channel]) -> list[Channel]:
        return distinct_channels(value)

    @property
    def live(self) -> bool:
        return self.is_active and not self.deleted


class RoutingPolicy(BaseModel):
    """A tenant's quality threshold: providers below it get traffic only when no other can."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["notify.config.routing-policy.v1"] = Field(default=POLICY_SCHEMA, alias="schema")
    tenant_id: str
    min_success_rate: float = Field(default=0.9, ge=0, le=1)
    max_p95_ms: float | None = Field(default=None, gt=0, le=3_600_000)
    # Fewer tries than this in the window: not enough to judge, the provider counts as good.
    min_samples: int = Field(default=10, ge=1, le=10_000)
    revision: int = 0


def provider_key(tenant_id: str, provider_id: int) -> bytes:
    return f"provider:{tenant_id}:{provider_id}".encode()


def rule_key(tenant_id: str, rule_id: int) -> bytes:
    return f"routing-rule:{tenant_id}:{rule_id}".encode()


def policy_key(tenant_id: str) -> bytes:
    return f"routing-policy:{tenant_id}".encode()


def health_identity(provider_id: int) -> str:
    """The key of a configured provider's record on ``notify.provider-health``."""
    return f"provider:{provider_id}"


class RoutingStore:
    """Providers, rules and policies from ``notify.config`` (a :class:`ConfigStore`)."""

    def __init__(self) -> None:
        self.providers: dict[int, ProviderRoute] = {}
        self.rules: dict[tuple[str, int], RoutingRule] = {}
        self.policies: dict[str, RoutingPolicy] = {}
        # What a message asks for, kept sorted as changes arrive (every message asks; few change),
        # each change re-sorting only its own tenant's group.
        self._groups: dict[tuple[str, Channel], dict[int, ProviderRoute]] = {}
        self._live: dict[tuple[str, Channel], list[ProviderRoute]] = {}
        self._rule_groups: dict[str, dict[int, RoutingRule]] = {}
        self._live_rules: dict[str, list[RoutingRule]] = {}

    def apply(self, value: bytes | None) -> None:
        if not value:
            return
        data = orjson.loads(value)
        kind = data.get("schema") if isinstance(data, dict) else None
        if kind == PROVIDER_SCHEMA:
            self.put_provider(ProviderRoute.model_validate(data))
        elif kind == RULE_SCHEMA:
            self.put_rule(RoutingRule.model_validate(data))
        elif kind == POLICY_SCHEMA:
            self.put_policy(RoutingPolicy.model_validate(data))

    def put_provider(self, route: ProviderRoute) -> None:
        old = self.providers.get(route.provider_id)
        if old is not None and route.revision < old.revision:
            return  # published late: a newer change is already known
        self.providers[route.provider_id] = route
        if old is not None:
            self._groups.get((old.tenant_id, old.channel), {}).pop(old.provider_id, None)
        self._groups.setdefault((route.tenant_id, route.channel), {})[route.provider_id] = route
        for key in {(route.tenant_id, route.channel), *([(old.tenant_id, old.channel)] if old else [])}:
            found = [p for p in self._groups.get(key, {}).values() if p.live]
            self._live[key] = sorted(found, key=lambda p: (p.priority, p.provider_id))

    def put_rule(self, rule: RoutingRule) -> None:
        key = (rule.tenant_id, rule.rule_id)
        old = self.rules.get(key)
        if old is not None and rule.revision < old.revision:
            return
        self.rules[key] = rule
        group = self._rule_groups.setdefault(rule.tenant_id, {})
        group[rule.rule_id] = rule
        self._live_rules[rule.tenant_id] = sorted((r for r in group.values() if r.live),
                                                  key=lambda r: (r.position, r.rule_id))  # fmt: skip

    def put_policy(self, policy: RoutingPolicy) -> None:
        old = self.policies.get(policy.tenant_id)
        if old is None or policy.revision >= old.revision:
            self.policies[policy.tenant_id] = policy

    def policy(self, tenant_id: str) -> RoutingPolicy:
        return self.policies.get(tenant_id) or RoutingPolicy(tenant_id=tenant_id)

    def providers_of(self, tenant_id: str, channel: Channel) -> list[ProviderRoute]:
        """The tenant's live providers of ``channel``, by priority then id."""
        return self._live.get((tenant_id, channel), [])

    def named(self, tenant_id: str, channel: Channel, name: str) -> ProviderRoute | None:
        return next((p for p in self.providers_of(tenant_id, channel) if p.name == name), None)

    def rules_of(self, tenant_id: str) -> list[RoutingRule]:
        """The tenant's live rules, in the order they are tried (position, then id)."""
        return self._live_rules.get(tenant_id, [])


class HealthStore:
    """The latest ``notify.provider-health`` record of each configured provider (a compacted
    topic read whole and followed: every router holds all of it)."""

    def __init__(self, stale_after_s: float | None = None) -> None:
        self.by_provider: dict[int, ProviderHealthV1] = {}
        # The tracker publishes every provider it measures at least every quality_refresh_s; a
        # record older than this (no tracker leads, Redis away) is not trusted: an open breaker
        # or a demotion must not outlive the measurements that made it.
        self.stale_after_s = stale_after_s

    def apply(self, value: bytes | None) -> None:
        if not value:
            return
        record = ProviderHealthV1.model_validate_json(value)
        if record.provider_id is None:
            return  # a mailbox's health (the email pool's own)
        # One key, one partition, read in order: the last record read is the latest (its
        # occurred_at is the publishing tracker's clock, which may lag another tracker's).
        self.by_provider[record.provider_id] = record

    def get(self, provider_id: int, now: datetime | None = None) -> ProviderHealthV1 | None:
        record = self.by_provider.get(provider_id)
        if record is None or now is None or self.stale_after_s is None:
            return record
        return record if (now - record.occurred_at).total_seconds() <= self.stale_after_s else None


# --- recipients, rules, quiet hours ------------------------------------------------------------


def _clock(value: str) -> time:
    return time(*(int(part) for part in value.split(":")))


def _within(now: time, start: time, end: time) -> bool:
    if start == end:
        return False  # an empty window (the models refuse it; a record from elsewhere might not)
    if start < end:
        return start <= now < end
    return now >= start or now < end  # spans midnight


def _same(have: Any, wanted: Any) -> bool:
    """Attribute equality without Python's ``True == 1 == 1.0``: a bool matches only a bool."""
    if isinstance(have, bool) or isinstance(wanted, bool):
        return type(have) is type(wanted) and have == wanted
    return have is not None and have == wanted


def local_now(profile: RecipientProfile | None, now: datetime) -> datetime:
    zone = ZoneInfo(profile.timezone) if profile is not None else ZoneInfo("UTC")
    return now.astimezone(zone)


def quiet_until(profile: RecipientProfile, now: datetime) -> datetime | None:
    """When the recipient's quiet hours end, if ``now`` is within them (else None)."""
    hours: QuietHours | None = profile.quiet_hours
    if hours is None:
        return None
    here = local_now(profile, now)
    start, end = _clock(hours.start), _clock(hours.end)
    if not _within(here.time().replace(microsecond=0), start, end):
        return None
    ends = here.replace(hour=end.hour, minute=end.minute, second=end.second, microsecond=0)
    if ends <= here:
        ends += timedelta(days=1)
    # A wall-clock time on the recipient's calendar, made absolute again (DST-safe).
    return ends.astimezone(now.tzinfo)


def matches(rule: RoutingRule, *, priority: str, category: str | None, profile: RecipientProfile | None,
            now: datetime) -> bool:  # fmt: skip
    m = rule.match
    if m.priorities and priority not in m.priorities:
        return False
    if m.categories and category not in m.categories:
        return False
    if m.attributes:
        attributes = profile.attributes if profile is not None else {}
        for name, wanted in m.attributes.items():
            have = attributes.get(name)
            options = wanted if isinstance(wanted, list) else [wanted]
            if not any(_same(have, option) for option in options):
                return False
    if m.local_time is not None:
        here = local_now(profile, now).time().replace(microsecond=0)
        if not _within(here, _clock(m.local_time.start), _clock(m.local_time.end)):
            return False
    return True


def first_rule(rules: list[RoutingRule], **facts: Any) -> RoutingRule | None:
    return next((r for r in rules if matches(r, **facts)), None)


@dataclass(slots=True)
class Steps:
    """The channels a message to a recipient goes to, in order, with their addresses; the rule
    that chose them (None: the send named its channel) and the channels left out, and why."""

    rule: RoutingRule | None
    strategy: str
    timeout_s: int | None
    channels: list[tuple[Channel, list[str]]]
    left_out: list[dict[str, str]] = field(default_factory=list)
    first: int = 1  # the number of the first step in ``channels`` (a resumed message's is later)

    def resume_at(self, step: int) -> int:
        """Drop the steps before ``step`` (a message the sweeper publishes again after a later
        channel had taken over: the channels before it failed already); answers how many."""
        skip = min(step - 1, len(self.channels) - 1)
        if self.strategy != "first_success" or skip <= 0:
            return 0
        self.left_out += [{"channel": c.value, "why": f"failed before; resumed at step {step}"}
                          for c, _ in self.channels[:skip]]  # fmt: skip
        self.channels = self.channels[skip:]
        self.first += skip
        return skip


@dataclass(slots=True)
class NoChannel:
    """Why a message to a recipient has no channel: ``no_route`` (no channel named and no rule
    matches), ``opted_out`` (every channel it could take is opted out of), ``no_address``."""

    reason: Literal["no_route", "opted_out", "no_address"]
    wanted: list[Channel]
    left_out: list[dict[str, str]]


def channels_for(rules: list[RoutingRule], profile: RecipientProfile, *, channel: Channel | None, to: list[str],
                 priority: str, category: str | None, now: datetime) -> Steps | NoChannel:  # fmt: skip
    """The first matching rule's channels (or the one the send named) that the recipient has an
    address on and did not opt out of. Used by the router to route, and by ingest to count a
    channel-less send against the monthly quota of the channel it will take."""
    rule = None
    if channel is not None:
        wanted, strategy, timeout = [channel], "first_success", None
    else:
        rule = first_rule(rules, priority=priority, category=category, profile=profile, now=now)
        if rule is None:
            return NoChannel("no_route", [], [])
        wanted, strategy, timeout = list(rule.channels), rule.strategy, rule.step_timeout_s
    chosen: list[tuple[Channel, list[str]]] = []
    left_out: list[dict[str, str]] = []
    for wanted_channel in wanted:
        if wanted_channel in profile.opt_outs.channels:
            left_out.append({"channel": wanted_channel.value, "why": "opted out"})
        elif wanted_channel is channel and to:
            chosen.append((wanted_channel, list(to)))
        elif wanted_channel in profile.addresses:
            chosen.append((wanted_channel, [profile.addresses[wanted_channel]]))
        else:
            left_out.append({"channel": wanted_channel.value, "why": "no address in the profile"})
    if not chosen:
        opted = any(x["why"] == "opted out" for x in left_out)
        return NoChannel("opted_out" if opted else "no_address", wanted, left_out)
    return Steps(rule, strategy, timeout, chosen, left_out)


# --- providers within a channel --------------------------------------------------------------


@dataclass(slots=True)
class Scored:
    route: ProviderRoute
    cost: Decimal
    tier: int  # 0 good, 1 below the threshold, 2 breaker open
    breaker: str  # closed, open, half_open
    samples: int | None
    success_rate: float | None
    p95_ms: float | None
    why: str
    probe: bool = False

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.route.provider_id,
            "name": self.route.name,
            "provider": self.route.provider,
            "cost": str(self.cost),
            "breaker": self.breaker,
            "tier": ("eligible", "below_threshold", "breaker_open")[self.tier],
            "why": self.why,
        }
        if self.samples is not None:
            out["samples"] = self.samples
        if self.success_rate is not None:
            out["success_rate"] = round(self.success_rate, 4)
        if self.p95_ms is not None:
            out["p95_ms"] = self.p95_ms
        if self.probe:
            out["probe"] = True
        return out


@dataclass(slots=True)
class Probes:
    """When this router last let a message probe each half-open provider."""

    every_s: float = 5.0
    last: dict[int, datetime] = field(default_factory=dict)

    def take(self, provider_id: int, now: datetime) -> bool:
        last = self.last.get(provider_id)
        if last is not None and (now - last).total_seconds() < self.every_s:
            return False
        self.last[provider_id] = now
        return True


def score(route: ProviderRoute, health: ProviderHealthV1 | None, policy: RoutingPolicy, to: str | None,
          now: datetime) -> Scored:  # fmt: skip
    cost = route.cost(to)
    if health is None:
        return Scored(route, cost, 0, "closed", None, None, None, "no quality data yet")
    samples, rate, p95 = health.samples, health.success_rate, health.p95_ms
    if health.breaker == "open":
        cooled = health.opened_at is None or now >= health.opened_at + timedelta(seconds=health.cooldown_s or 0)
        state = "half_open" if cooled else "open"
        return Scored(route, cost, 2, state, samples, rate, p95, f"breaker {state}: {health.reason or 'failing'}")
    if samples is None or rate is None:
        return Scored(route, cost, 0, "closed", samples, rate, p95, "no tries in the window")
    if samples < policy.min_samples:
        # Too few tries to measure, but maybe enough to know: if even all the tries still
        # needed succeeded, would the rate clear the threshold? (3 failures in the first 9 of 10
        # tries cannot reach 90 %.) Without this, a provider just judged bad would be "unknown"
        # again as soon as its tries left the window and it got no new ones.
        best = (rate * samples + (policy.min_samples - samples)) / policy.min_samples
        if best < policy.min_success_rate:
            failed = samples - round(rate * samples)
            why = f"{failed} of {samples} tries failed: below {policy.min_success_rate:.0%} whatever comes next"
            return Scored(route, cost, 1, "closed", samples, rate, p95, why)
        return Scored(route, cost, 0, "closed", samples, rate, p95, f"fewer than {policy.min_samples} samples")
    if rate is not None and rate < policy.min_success_rate:
        why = f"success rate {rate:.2%} below {policy.min_success_rate:.0%}"
        return Scored(route, cost, 1, "closed", samples, rate, p95, why)
    if policy.max_p95_ms is not None and p95 is not None and p95 > policy.max_p95_ms:
        why = f"p95 {p95:.0f} ms above {policy.max_p95_ms:.0f} ms"
        return Scored(route, cost, 1, "closed", samples, rate, p95, why)
    return Scored(route, cost, 0, "closed", samples, rate, p95, "meets the threshold")


def _weighted_order(group: list[Scored], rng: random.Random) -> list[Scored]:
    """Equal-cost providers in a weighted random order (weight 0: only after the others)."""
    left = list(group)
    out: list[Scored] = []
    while left:
        weights = [max(s.route.weight, 0) for s in left]
        if sum(weights) <= 0:
            out.extend(left)
            break
        pick = rng.choices(range(len(left)), weights=weights)[0]
        out.append(left.pop(pick))
    return out


def rank(
    scored: list[Scored], *, probes: Probes | None, now: datetime, rng: random.Random | None = None
) -> list[Scored]:
    """The order to try providers in (see the module doc)."""
    rng = rng or random.Random()
    good = sorted((s for s in scored if s.tier == 0), key=lambda s: s.cost)
    ordered: list[Scored] = []
    i = 0
    while i < len(good):  # cheapest first; a weighted draw among equal costs
        j = i
        while j < len(good) and good[j].cost == good[i].cost:
            j += 1
        ordered.extend(_weighted_order(good[i:j], rng))
        i = j
    below = sorted((s for s in scored if s.tier == 1), key=lambda s: (-(s.success_rate or 0), s.cost))
    broken = sorted((s for s in scored if s.tier == 2), key=lambda s: s.cost)
    probing = [s for s in broken if s.breaker == "half_open" and probes is not None
               and probes.take(s.route.provider_id, now)]  # fmt: skip
    for s in probing:
        s.probe = True
    rest = [s for s in broken if not s.probe]
    return [*probing, *ordered, *below, *rest]
