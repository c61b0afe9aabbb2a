"""Uploading email attachments (seed 004 §3.4.4)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from fastapi import APIRouter, Request

from services.ingest.attachments import (
    MAX_FILES_PER_REQUEST,
    discard_files,
    read_upload,
    record_upload,
)
from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.http import envelope
from shared.errors import ErrorCode, HeraldError

router = APIRouter(prefix="/api/v1/attachments", tags=["attachments"])

UPLOAD_PATH = "/api/v1/attachments/upload"

# Room for the multipart framing and the form fields around the files themselves.
_FRAMING_BYTES = 1024 * 1024

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "maxItems": MAX_FILES_PER_REQUEST,
                            "description": "one or more files, each a part named `file`",
                        },
                        "uploaded_by": {"type": "string", "maxLength": 100},
                    },
                }
            }
        },
    }
}


def max_upload_bytes(max_file_bytes: int) -> int:
    """The largest body the upload route reads: every file at its limit plus the framing."""
    return MAX_FILES_PER_REQUEST * max_file_bytes + _FRAMING_BYTES


@router.post("/upload", summary="Upload attachments", openapi_extra=_UPLOAD_BODY)
async def upload(request: Request):
    """Store one or more files for later emails (``attachment_ids`` of a send request).

    Each file may have up to ``HERALD_ATTACHMENT_MAX_BYTES`` (413, code 2007, beyond); its type
    is decided by its content: PDF, JPEG, PNG, GIF, Office documents, ZIP/GZIP/7z/RAR archives,
    UTF-8 .txt/.csv (400, code 1001, otherwise, or when the content contradicts the name).
    Files expire after ``HERALD_ATTACHMENT_EXPIRE_DAYS``. Answers the stored files, in order."""
    services, tenant_id = services_of(request), tenant_of(request, Scope.SEND)
    settings = services.settings
    limit = max_upload_bytes(settings.attachment_max_bytes)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HeraldError(ErrorCode.ATTACHMENT_TOO_LARGE, f"an upload may have at most {limit} bytes", field="file")
    now = datetime.now(UTC)
    data_dir = Path(settings.data_dir)
    try:
        stored = await read_upload(
            request.headers.get("content-type", ""),
            request.stream(),
            data_dir=data_dir,
            now=now,
            max_file_bytes=settings.attachment_max_bytes,
            max_body_bytes=limit,
        )
    except OSError as exc:
        raise HeraldError(
            ErrorCode.ATTACHMENT_UPLOAD_FAILED, f"could not store the upload: {exc.__class__.__name__}"
        ) from exc
    try:
        data = await record_upload(services.pool, tenant_id, stored, now, settings.attachment_expire_days)
    except BaseException:
        await discard_files(data_dir, stored)
        raise
    return envelope(data)
