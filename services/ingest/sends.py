"""What every send endpoint checks the same way (single, scheduled and batch sends)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fastapi import Request

from shared.errors import ErrorCode, HeraldError
from shared.schedule import ScheduleError, due_at
from shared.settings import Settings

# A language tag as sends name their template variant's locale (zh-CN, en).
LOCALE = r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$"


def missing_variable(required: Sequence[str], given: dict[str, Any]) -> tuple[str, str] | None:
    """The first declared template variable not given, and the message naming it (2004)."""
    missing = [name for name in required if name not in given]
    if not missing:
        return None
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return missing[0], f"missing template variable: {missing[0]}{more}"


def content_mode_error(body: Any) -> HeraldError | None:
    """Seed 004: ``content`` and a template are exclusive; direct mode needs both ``subject``
    and ``content``. ``body`` has the send fields (template_id, template_name, subject, content,
    text_content, template_vars, template_version, locale). A function rather than a model
    validator so that the error names the field."""
    templated = body.template_id is not None or body.template_name is not None
    if body.template_id is not None and body.template_name is not None:
        return HeraldError(
            ErrorCode.INVALID_PARAMS, "give template_id or template_name, not both", field="template_name"
        )
    for name in ("content", "subject", "text_content"):
        if templated and getattr(body, name) is not None:
            return HeraldError(
                ErrorCode.INVALID_PARAMS, f"{name} and template_id are mutually exclusive: the template provides it",
                field=name,
            )  # fmt: skip
    if not templated:
        for name in ("content", "subject"):
            if getattr(body, name) is None:
                return HeraldError(ErrorCode.INVALID_PARAMS, "field required without template_id", field=name)
        for name in ("template_vars", "template_version", "locale"):
            if getattr(body, name) is not None:
                return HeraldError(ErrorCode.INVALID_PARAMS, "only with template_id or template_name", field=name)
    return None


def idempotency_key(given: str | None, request: Request) -> str | None:
    """The key from the body (``given``) or the ``Idempotency-Key`` header; both must agree."""
    header = request.headers.get("idempotency-key")
    if header is not None and (not header.strip() or len(header) > 255):
        raise HeraldError(ErrorCode.INVALID_PARAMS, "1 to 255 characters", field="Idempotency-Key")
    if header and given and header != given:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "differs from the Idempotency-Key header", field="idempotency_key")
    return given or header


def due_time(
    settings: Settings,
    scheduled_time: str | None,
    delay: str | int | None,
    timezone: str | None,
    now: datetime,
    *,
    required: bool = False,
) -> datetime | None:
    """When a send is due (None: now), or 1001 naming the scheduling field at fault."""
    try:
        return due_at(
            scheduled_time=scheduled_time,
            delay=delay,
            timezone=timezone,
            default_timezone=settings.default_timezone,
            horizon_s=settings.schedule_horizon_s,
            now=now,
            required=required,
        )
    except ScheduleError as exc:
        raise HeraldError(ErrorCode.INVALID_PARAMS, exc.message, field=exc.field) from None
