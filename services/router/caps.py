"""Frequency caps: which caps a message counts against and what their windows decide. Pure
functions; the counting itself is one Lua script at the edge (:mod:`services.router.frequency`).

A cap's window is a sliding log: one sorted set per (tenant, cap, recipient) whose members are
message ids scored by the time they were counted. The script trims each window, and counts the
message in every window only if none is full (a capped message is not counted). The member being
the message id makes a message routed twice (a router crash before its offset was committed) count
once: it is found in the window and let through. :func:`decide` turns what the script found into
the message's fate:

- no window full → :class:`Allow`;
- a full window whose cap says ``suppress`` → :class:`Suppress` (dropping beats waiting: a
  message over a daily cap is not worth deferring for a per-minute one);
- otherwise → :class:`Defer` until the latest moment at which every full window has room again,
  which is when the entry that fills it leaves (``frees_at``). The message then comes back and is
  checked again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from services.router.routing import Held, Parked, Routed, park, router_event
from shared.errors import ErrorCode
from shared.events import EventV1, MessageSnapshot, RequestV1, State
from shared.frequency import FrequencyCap

# A deferred message is released this long after its window has room, so that a router whose
# clock is a little behind the scheduler's (PostgreSQL's) does not find it still full.
RELEASE_MARGIN = timedelta(milliseconds=50)


def recipient_tag(recipient: str) -> str:
    """A recipient as it appears in Redis keys: hashed (no addresses in key names), case-blind."""
    return hashlib.sha256(recipient.strip().lower().encode()).hexdigest()[:20]


def counter_key(tenant_id: str, cap_id: int, recipient: str) -> str:
    """The sorted set of one cap's window for one recipient. The hash tag (tenant and recipient)
    puts every cap of one recipient in one Redis Cluster slot, as one script needs them."""
    return f"herald:fcap:{{{tenant_id}:{recipient_tag(recipient)}}}:{cap_id}"


@dataclass(frozen=True, slots=True)
class CapCount:
    """One cap's window as the counting script found it, before this message."""

    cap: FrequencyCap
    seen: bool  # this message is already counted in it (routed before)
    count: int  # messages counted in the window
    frees_at_ms: int | None  # when the window next has room (only when it is full)

    @property
    def full(self) -> bool:
        return not self.seen and self.count >= self.cap.max_count


@dataclass(frozen=True, slots=True)
class Allow:
    pass


@dataclass(frozen=True, slots=True)
class Suppress:
    cap: FrequencyCap
    count: int


@dataclass(frozen=True, slots=True)
class Defer:
    cap: FrequencyCap
    count: int
    until: datetime


def decide(counts: list[CapCount]) -> Allow | Suppress | Defer:
    """The fate of a message given its caps' windows (see the module docstring)."""
    full = [c for c in counts if c.full]
    if not full:
        return Allow()
    for c in full:
        if c.cap.action == "suppress":
            return Suppress(c.cap, c.count)
    last = max(full, key=lambda c: c.frees_at_ms or 0)
    until = datetime.fromtimestamp((last.frees_at_ms or 0) / 1000, UTC) + RELEASE_MARGIN
    return Defer(last.cap, last.count, until)


def script_args(member: str, now: datetime, caps: list[FrequencyCap]) -> list[Any]:
    """ARGV of the counting script: the member, now in ms, then each cap's limit and window in ms."""
    args: list[Any] = [member, int(now.timestamp() * 1000)]
    for cap in caps:
        args += [cap.max_count, cap.window_s * 1000]
    return args


def read_counts(caps: list[FrequencyCap], reply: list[Any]) -> tuple[bool, list[CapCount]]:
    """The script's reply: whether it counted the message, and each cap's window."""
    counted = int(reply[0]) == 1
    counts = []
    for i, cap in enumerate(caps):
        seen, count, frees = (int(v) for v in reply[1 + 3 * i : 4 + 3 * i])
        counts.append(CapCount(cap, seen == 1, count, frees if frees >= 0 else None))
    return counted, counts


def rule_text(cap: FrequencyCap) -> str:
    on = f" on {cap.channel}" if cap.channel else ""
    return f"at most {cap.max_count} {cap.category} messages per recipient in {cap.window_s} s{on}"


def _detail(cap: FrequencyCap, count: int) -> dict[str, Any]:
    return {
        "cap_id": cap.cap_id,
        "category": cap.category,
        "channel": cap.channel,
        "max_count": cap.max_count,
        "window_s": cap.window_s,
        "action": cap.action,
        "count": count,
    }


def snapshot_of(routed: Routed) -> MessageSnapshot | None:
    return next((e.message for e in routed.events if e.state is State.ROUTED), None)


def announced(routed: Routed) -> list[EventV1]:
    """The 'accepted' event a direct publish carries (none for what ingest recorded)."""
    return [e for e in routed.events if e.state is State.ACCEPTED]


def suppressed(routed: Routed, verdict: Suppress, now: datetime) -> Held:
    """A message a cap drops: state suppressed, error 1007, the cap named."""
    request = routed.request
    message_id = request.message_id or routed.dispatch.message_id
    event = router_event(
        request,
        message_id,
        State.SUPPRESSED,
        now,
        error_code=int(ErrorCode.RATE_LIMITED),
        error=f"suppressed by frequency cap {verdict.cap.cap_id}: {rule_text(verdict.cap)}",
        detail={"reason": "frequency_cap", **_detail(verdict.cap, verdict.count), "cap": rule_text(verdict.cap)},
        message=snapshot_of(routed),
    )
    return Held(message_id, State.SUPPRESSED, [*announced(routed), event])


def unrendered(raw: bytes | None, routed: Routed) -> RequestV1:
    """The request as it was published (before any template was rendered into it), with the id
    the router gave it: what must be parked, so that it is rendered again when it comes back."""
    data = orjson.loads(raw or b"{}")
    return RequestV1.model_validate(
        {**data, "schema": "notify.request.v1", "message_id": routed.request.message_id or routed.dispatch.message_id}
    )


def deferred(request: RequestV1, verdict: Defer, now: datetime) -> Parked:
    """Park ``request`` (as published) until its cap's window has room; it is checked again then."""
    parked = park(request, verdict.until, "deferred", now)
    scheduled = parked.events[-1]
    # The parking's own keys (reason 'deferred', time, request) stay as the tracker reads them.
    scheduled.detail = {
        **_detail(verdict.cap, verdict.count),
        "cap": rule_text(verdict.cap),
        **(scheduled.detail or {}),
    }
    return parked
