"""What every send endpoint checks the same way (single, scheduled and batch sends)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from shared.errors import ErrorCode, HeraldError


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
