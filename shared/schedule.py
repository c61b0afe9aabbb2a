"""When a send is due: parsing ``scheduled_time`` and ``delay`` (issue 8, seed 004 §4.2.1).

Pure functions, shared by every send endpoint and by the router (direct Kafka publishers):

- ``scheduled_time``: ISO 8601 with a zone (``2026-12-24T09:00:00+08:00``, ``…Z``), or seed 004's
  ``2025-10-25 10:00:00`` without one, read in the request's ``timezone`` (IANA name) or the
  service's default;
- ``delay``: ``"30m"``, ``"2h"``, ``"3d"``, combinations such as ``"1h30m"`` (units s, m, h, d, w),
  an ISO 8601 duration (``PT30M``, ``P1DT2H``) or a number of seconds.

A time in the past (beyond a small allowance for clock skew), further ahead than the horizon, or
unparsable is a :class:`ScheduleError` naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# Clients' clocks drift: "now" sent from a slightly slow machine is not "in the past".
SKEW_ALLOWANCE = timedelta(seconds=5)
# Far beyond any horizon, and small enough for datetime arithmetic (no OverflowError).
MAX_DELAY_S = 10 * 366 * 86400

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_COMPACT = re.compile(r"^(?:(\d{1,9})([smhdw]))+$")
_COMPACT_PART = re.compile(r"(\d{1,9})([smhdw])")
_ISO_DURATION = re.compile(
    r"^P(?:(?P<w>\d{1,9})W)?(?:(?P<d>\d{1,9})D)?(?:T(?:(?P<h>\d{1,9})H)?(?:(?P<m>\d{1,9})M)?(?:(?P<s>\d{1,9})S)?)?$"
)


@dataclass(slots=True)
class ScheduleError(Exception):
    """A scheduling field that cannot be used; ``field`` names it."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def parse_delay(value: str | int | float) -> timedelta:
    """``"30m"`` → 30 minutes; see the module docstring for the accepted forms."""
    if isinstance(value, bool):
        raise ScheduleError("delay", "expected a duration such as 30m, 2h, 3d or PT30M")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        if re.fullmatch(r"\d{1,9}", text):
            seconds = float(text)
        elif _COMPACT.fullmatch(text):
            seconds = float(sum(int(n) * _UNITS[u] for n, u in _COMPACT_PART.findall(text)))
        elif (iso := _ISO_DURATION.fullmatch(value.strip().upper())) and value.strip().upper() not in ("P", "PT"):
            parts = {k: int(v) for k, v in iso.groupdict().items() if v}
            seconds = float(sum(n * _UNITS[u.lower()] for u, n in parts.items()))
        else:
            raise ScheduleError("delay", "expected a duration such as 30m, 2h, 3d, 1h30m or PT30M")
    if seconds <= 0:
        raise ScheduleError("delay", "must be more than zero")
    if seconds > MAX_DELAY_S:
        raise ScheduleError("delay", "too long")
    return timedelta(seconds=seconds)


def zone(name: str | None, default: str) -> ZoneInfo:
    """The IANA zone ``name`` (the request's ``timezone`` field), or ``default``."""
    try:
        return ZoneInfo(name or default)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "Asia" is a folder of zones
        raise ScheduleError(
            "timezone", f"unknown time zone {name!r}; expected an IANA name such as Asia/Shanghai"
        ) from None


def parse_time(value: str, tz: ZoneInfo) -> datetime:
    """An ISO 8601 time; one without a zone is read in ``tz``."""
    text = value.strip()
    if not 10 <= len(text) <= 40:
        raise ScheduleError("scheduled_time", "expected ISO 8601, e.g. 2026-12-24T09:00:00+08:00")
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ScheduleError(
            "scheduled_time", "expected ISO 8601 (2026-12-24T09:00:00+08:00) or 2026-12-24 09:00:00"
        ) from None
    if len(text) == 10:  # a bare date would silently mean midnight
        raise ScheduleError("scheduled_time", "a time of day is required, e.g. 2026-12-24 09:00:00")
    return moment if moment.tzinfo else moment.replace(tzinfo=tz)


def due_at(
    *,
    scheduled_time: str | None,
    delay: str | int | float | None,
    timezone: str | None,
    default_timezone: str,
    horizon_s: float,
    now: datetime,
    required: bool = False,
) -> datetime | None:
    """When a send with these fields is due (UTC), or None for "now". At most one of
    ``scheduled_time`` and ``delay``; ``required`` when the endpoint is the scheduled one."""
    if scheduled_time is not None and delay is not None:
        raise ScheduleError("delay", "give scheduled_time or delay, not both")
    tz = zone(timezone, default_timezone)  # a bad zone is an error even where it is not needed
    if scheduled_time is None and delay is None:
        if required:
            raise ScheduleError("scheduled_time", "field required")
        return None
    if scheduled_time is not None:
        try:
            moment = parse_time(scheduled_time, tz).astimezone(UTC)
        except OverflowError:  # e.g. 9999-12-31T23:59:59-01:00
            raise ScheduleError("scheduled_time", "out of range") from None
        field = "scheduled_time"
        if moment < now - SKEW_ALLOWANCE:
            raise ScheduleError(field, f"{moment.isoformat()} is in the past")
    else:
        moment = now + parse_delay(delay)  # type: ignore[arg-type]
        field = "delay"
    if moment > now + timedelta(seconds=horizon_s):
        raise ScheduleError(field, f"more than {_span(horizon_s)} ahead (the scheduling horizon)")
    return moment


def _span(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    return f"{days} days" if days and not rest else f"{int(seconds)} s"
