"""Uploaded email attachments (seed 004 §3.1.2, §3.4.4): what may be uploaded, how an upload is
read and stored, how a send request's ``attachment_ids`` become :class:`AttachmentRef`\\ s, and
the sweep that deletes expired ones.

Storage: ``{data_dir}/attachments/{YYYY-MM-DD}/{uuid4hex}.{ext}`` (the day of the upload, UTC),
one row per file in ``email_attachments`` with the path *relative* to the data folder. The email
sender reads the files from the same folder, so both must see it (a shared volume when they run
on different machines).

Types are decided by content, never by the name alone (``filetype`` reads the magic bytes):

- PDF, JPEG, PNG, GIF, GZIP, 7z, RAR: the content decides; the extension, when there is one,
  must agree with it (``.jpg``/``.jpeg`` for JPEG, ``.gz``/``.tgz`` for GZIP, ...).
- ZIP containers: ``.zip``, ``.docx``, ``.xlsx``, ``.pptx`` (and OpenDocument ``.odt``,
  ``.ods``, ``.odp``) are all ZIP files; a file whose content is ZIP (or a document of these
  kinds, when ``filetype`` can tell which) is accepted under one of these names and typed by it.
  A document recognised as one kind (``word/``) but named as another (``.xlsx``) is refused; any
  ZIP may be named ``.zip``.
- Legacy Office (``.doc``, ``.xls``, ``.ppt``): OLE compound files, which ``filetype`` recognises
  only heuristically; any OLE file (signature ``D0 CF 11 E0 A1 B1 1A E1``) is accepted under one
  of these names and typed by it, and refused under any other name or none.
- ``.txt`` and ``.csv``: no magic bytes; accepted when the whole file is UTF-8 without NUL bytes.

Anything else, or content that contradicts the name (an executable named ``.pdf``), is refused
with 1001.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO

import asyncpg
import filetype
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from shared.errors import ErrorCode, HeraldError
from shared.events import AttachmentRef
from shared.ids import new_attachment_id

log = logging.getLogger("herald.ingest.attachments")

ATTACHMENTS_DIR = "attachments"
MAX_FILES_PER_REQUEST = 10
# Enough to see the ZIP entries that tell Office documents apart; filetype reads no further.
_SNIFF_BYTES = 8192
_MAX_FIELD_BYTES = 1024
_MAX_HEADER_BYTES = 8192
# Removes rows only this long after they expired: a message accepted just before the expiry
# still finds its files through the sender's retries (60 + 300 + 600 s by default).
SWEEP_GRACE = timedelta(hours=1)
_SWEEP_BATCH = 500
_DAY_DIR = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# --- what may be uploaded ---------------------------------------------------------------------

# Sniffed MIME type -> (type stored and sent, extensions that agree with it; the first is used
# for a file uploaded without one).
_BY_MAGIC: dict[str, tuple[str, tuple[str, ...]]] = {
    "application/pdf": ("application/pdf", ("pdf",)),
    "image/jpeg": ("image/jpeg", ("jpg", "jpeg", "jpe")),
    "image/png": ("image/png", ("png",)),
    "image/apng": ("image/png", ("png", "apng")),
    "image/gif": ("image/gif", ("gif",)),
    "application/gzip": ("application/gzip", ("gz", "tgz")),
    "application/x-7z-compressed": ("application/x-7z-compressed", ("7z",)),
    "application/x-rar-compressed": ("application/vnd.rar", ("rar",)),
}
_DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
_XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
_PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"
_ODT = "application/vnd.oasis.opendocument.text"
_ODS = "application/vnd.oasis.opendocument.spreadsheet"
_ODP = "application/vnd.oasis.opendocument.presentation"
# ZIP containers, typed by their name.
_ZIP_NAMES = {
    "zip": "application/zip",
    "docx": _DOCX,
    "xlsx": _XLSX,
    "pptx": _PPTX,
    "odt": _ODT,
    "ods": _ODS,
    "odp": _ODP,
}
_ZIP_SNIFFS = {*_ZIP_NAMES.values(), "application/epub+zip"}
# OLE compound files (legacy Office), typed by their name.
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_OLE_NAMES = {"doc": "application/msword", "xls": "application/vnd.ms-excel", "ppt": "application/vnd.ms-powerpoint"}
_TEXT_NAMES = {"txt": "text/plain", "csv": "text/csv"}

ALLOWED_EXTENSIONS = frozenset(
    {e for _, exts in _BY_MAGIC.values() for e in exts} | set(_ZIP_NAMES) | set(_OLE_NAMES) | set(_TEXT_NAMES)
)


def _refuse(message: str, field: str = "file") -> HeraldError:
    return HeraldError(ErrorCode.INVALID_PARAMS, message, field=field)


def extension_of(filename: str) -> str:
    stem, dot, ext = filename.rpartition(".")
    return ext.lower() if dot and stem else ""


def classify(filename: str, head: bytes, utf8_text: bool) -> tuple[str, str]:
    """The MIME type to store and the extension to store under, for a file named ``filename``
    whose first bytes are ``head``; ``utf8_text`` says whether the whole file is UTF-8 text
    without NUL bytes. Raises :class:`HeraldError` (1001, field ``file``) for anything not
    allowed (see the module's docstring)."""
    ext = extension_of(filename)
    if ext in _TEXT_NAMES:
        # Text has no magic; some two-byte magics ("MZ", "BM") would even match ordinary text.
        if utf8_text:
            return _TEXT_NAMES[ext], ext
        raise _refuse(f"{filename}: a .{ext} file must be UTF-8 text")
    kind = filetype.guess(head) if head else None
    sniffed = kind.mime if kind else None
    if sniffed in _BY_MAGIC:
        mime, exts = _BY_MAGIC[sniffed]
        if not ext:
            return mime, exts[0]
        if ext in exts:
            return mime, ext
        raise _refuse(f"{filename}: the content is {mime}, not .{ext}")
    if sniffed in _ZIP_SNIFFS:
        if not ext:
            return "application/zip", "zip"
        if ext not in _ZIP_NAMES:
            raise _refuse(f"{filename}: the content is a ZIP file, not .{ext}")
        if sniffed != "application/zip" and ext != "zip" and _ZIP_NAMES[ext] != sniffed:
            raise _refuse(f"{filename}: the content is .{kind.extension}, not .{ext}")
        return _ZIP_NAMES[ext], ext
    if head.startswith(_OLE_MAGIC):
        if ext in _OLE_NAMES:
            return _OLE_NAMES[ext], ext
        raise _refuse(f"{filename}: an OLE (legacy Office) file must be named .doc, .xls or .ppt")
    if sniffed:
        raise _refuse(f"{filename}: files of type {sniffed} are not allowed")
    raise _refuse(
        f"{filename}: unrecognised content; allowed are PDF, images (JPEG, PNG, GIF), Office documents, "
        "archives (ZIP, GZIP, 7z, RAR) and UTF-8 .txt/.csv"
    )


def clean_filename(raw: str) -> str:
    """The client's file name without any path, or 1001 when it is unusable."""
    if any(c in raw for c in "\r\n\x00"):
        raise _refuse("a filename may not contain CR, LF or NUL")
    if _CONTROL.search(raw):
        raise _refuse("a filename may not contain control characters")
    name = raw.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if name in ("", ".", ".."):
        raise _refuse("every file needs a filename")
    if len(name) > 255:
        raise _refuse("a filename may have at most 255 characters")
    return name


# --- reading an upload ------------------------------------------------------------------------


@dataclass(slots=True)
class StoredFile:
    """One uploaded file, written and checked; ``path`` is relative to the data folder."""

    filename: str
    mime_type: str
    size: int
    sha256: str
    path: str


@dataclass(slots=True)
class Upload:
    """What one request uploaded: its files (already in their final place) and the form fields."""

    files: list[StoredFile] = field(default_factory=list)
    uploaded_by: str | None = None


class _Sink:
    """One file part on its way to disk: a temporary file next to its final place, with its
    size, sha256, first bytes and UTF-8 check kept as the data streams through."""

    def __init__(self, filename: str, directory: Path, max_bytes: int) -> None:
        self.filename = filename
        self.directory = directory
        self.max_bytes = max_bytes
        self.stem = uuid.uuid4().hex
        self.tmp = directory / f".{self.stem}.part"
        self.size = 0
        self.head = bytearray()
        self.sha = hashlib.sha256()
        self.text_check = extension_of(filename) in _TEXT_NAMES
        self.utf8 = codecs.getincrementaldecoder("utf-8")("strict")
        self.is_text = self.text_check
        self.fh: IO[bytes] | None = None

    async def open(self) -> None:
        self.fh = await asyncio.to_thread(open, self.tmp, "xb")

    def _write(self, data: bytes) -> None:
        assert self.fh is not None
        self.fh.write(data)
        self.sha.update(data)
        if self.is_text:
            try:
                self.utf8.decode(data)
                if b"\x00" in data:
                    self.is_text = False
            except UnicodeDecodeError:
                self.is_text = False

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise HeraldError(
                ErrorCode.ATTACHMENT_TOO_LARGE,
                f"{self.filename} is larger than the limit of {self.max_bytes} bytes",
                field="file",
            )
        if len(self.head) < _SNIFF_BYTES:
            self.head += data[: _SNIFF_BYTES - len(self.head)]
        await asyncio.to_thread(self._write, data)

    def _finish(self) -> None:
        assert self.fh is not None
        if self.is_text:
            try:
                self.utf8.decode(b"", final=True)
            except UnicodeDecodeError:
                self.is_text = False
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None

    async def finish(self, day: str) -> StoredFile:
        """Close the file, check its type and move it to its final name."""
        await asyncio.to_thread(self._finish)
        if self.size == 0:
            raise _refuse(f"{self.filename} is empty")
        mime, ext = classify(self.filename, bytes(self.head), self.text_check and self.is_text)
        final = self.directory / f"{self.stem}.{ext}"
        await asyncio.to_thread(os.replace, self.tmp, final)  # atomic: readers see all or nothing
        self.tmp = final
        return StoredFile(self.filename, mime, self.size, self.sha.hexdigest(), f"{ATTACHMENTS_DIR}/{day}/{final.name}")

    def discard(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        self.tmp.unlink(missing_ok=True)


class _FormReader:
    """Feeds a multipart/form-data stream through python-multipart's parser, writing each file
    part to disk as it arrives (memory stays at about one network chunk per request).

    Accepted parts: any number (up to :data:`MAX_FILES_PER_REQUEST`) of ``file`` parts with a
    filename, and an optional ``uploaded_by`` field; anything else is refused (1001)."""

    def __init__(self, boundary: bytes, directory: Path, day: str, max_file_bytes: int) -> None:
        self.directory = directory
        self.day = day
        self.max_file_bytes = max_file_bytes
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
            max_header_count=8,
            max_header_size=_MAX_HEADER_BYTES,
        )
        # The parser's callbacks are synchronous; they queue what the async side then does.
        self._events: list[tuple[str, object]] = []
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._sink: _Sink | None = None
        self._field: tuple[str, bytearray] | None = None
        self.finished = False
        self.upload = Upload()
        self.open_sinks: list[_Sink] = []  # every file written so far, for clean-up on failure

    # -- parser callbacks (synchronous) --
    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_name).strip().lower()] = bytes(self._header_value).strip()
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        self._events.append(("headers", dict(self._headers)))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._events.append(("data", bytes(data[start:end])))

    def _on_part_end(self) -> None:
        self._events.append(("end", None))

    def _on_end(self) -> None:
        self.finished = True

    # -- the async side --
    async def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except FormParserError as exc:
            raise _refuse(f"malformed multipart body: {exc}", field="body") from None
        events, self._events = self._events, []
        for kind, value in events:
            if kind == "headers":
                await self._begin(value)  # type: ignore[arg-type]
            elif kind == "data":
                await self._data(value)  # type: ignore[arg-type]
            else:
                await self._end()

    async def _begin(self, headers: dict[bytes, bytes]) -> None:
        disposition, params = parse_options_header(headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            raise _refuse("every part needs Content-Disposition: form-data with a name", field="body")
        name = _decode(params[b"name"])
        if name == "file":
            if b"filename" not in params:
                raise _refuse("a 'file' part needs a filename")
            if len(self.upload.files) + (self._sink is not None) >= MAX_FILES_PER_REQUEST:
                raise _refuse(f"at most {MAX_FILES_PER_REQUEST} files per request")
            filename = clean_filename(_decode(params[b"filename"]))
            self._sink = _Sink(filename, self.directory, self.max_file_bytes)
            self.open_sinks.append(self._sink)
            await self._sink.open()
        elif name == "uploaded_by" and b"filename" not in params:
            self._field = (name, bytearray())
        else:
            raise _refuse("unknown field; expected 'file' parts and an optional 'uploaded_by'", field=name[:64])

    async def _data(self, data: bytes) -> None:
        if self._sink is not None:
            await self._sink.write(data)
        elif self._field is not None:
            self._field[1].extend(data)
            if len(self._field[1]) > _MAX_FIELD_BYTES:
                raise _refuse(f"longer than {_MAX_FIELD_BYTES} bytes", field=self._field[0])

    async def _end(self) -> None:
        if self._sink is not None:
            self.upload.files.append(await self._sink.finish(self.day))
            self._sink = None
        elif self._field is not None:
            name, raw = self._field
            self._field = None
            value = _decode(bytes(raw)).strip()
            if len(value) > 100 or _CONTROL.search(value):
                raise _refuse("at most 100 characters, no control characters", field=name)
            self.upload.uploaded_by = value or None


def _decode(raw: bytes) -> str:
    """Browsers and httpx send names as raw UTF-8 inside the quoted parameter."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


async def read_upload(
    content_type: str,
    stream: AsyncIterator[bytes],
    *,
    data_dir: Path,
    now: datetime,
    max_file_bytes: int,
    max_body_bytes: int,
) -> Upload:
    """Read a multipart upload from ``stream`` into ``{data_dir}/attachments/{day}/``.

    Each file is checked while it streams (size) and when it ends (type); the first problem
    stops the upload and removes every file it wrote, so an upload stores all its files or
    none. ``max_body_bytes`` bounds the whole body (preamble, headers and all)."""
    mime, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise _refuse("expected a multipart/form-data body with a boundary", field="body")
    day = now.astimezone(UTC).strftime("%Y-%m-%d")
    directory = data_dir / ATTACHMENTS_DIR / day
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    try:
        reader = _FormReader(boundary, directory, day, max_file_bytes)
    except FormParserError as exc:
        raise _refuse(f"malformed multipart body: {exc}", field="body") from None
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > max_body_bytes:
                raise HeraldError(
                    ErrorCode.ATTACHMENT_TOO_LARGE,
                    f"an upload may have at most {max_body_bytes} bytes",
                    field="file",
                )
            if chunk:
                await reader.feed(chunk)
        reader.parser.finalize()
        if not reader.finished:
            raise _refuse("the multipart body ends before its closing boundary", field="body")
        if not reader.upload.files:
            raise _refuse("no file: send one or more parts named 'file'")
        return reader.upload
    except BaseException:
        for sink in reader.open_sinks:
            await asyncio.to_thread(sink.discard)
        raise


async def record_upload(
    pool: asyncpg.Pool, tenant_id: str, upload: Upload, now: datetime, expire_days: int
) -> list[dict[str, object]]:
    """Insert one row per stored file (one transaction) and answer what the API returns."""
    expires_at = now + timedelta(days=expire_days)
    rows = [
        (new_attachment_id(now), tenant_id, f.filename, f.path, f.size, f.mime_type, f.sha256, upload.uploaded_by)
        for f in upload.files
    ]
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            """INSERT INTO email_attachments (attachment_id, tenant_id, filename, file_path, file_size,
                   mime_type, sha256, uploaded_by, created_at, expires_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
            [(*row, now, expires_at) for row in rows],
        )
    stamp = _iso(expires_at)
    return [
        {"attachment_id": r[0], "filename": r[2], "file_size": r[4], "mime_type": r[5], "expires_at": stamp}
        for r in rows
    ]


async def discard_files(data_dir: Path, upload: Upload) -> None:
    await asyncio.to_thread(_remove_files, data_dir, [f.path for f in upload.files])


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- sending: attachment_ids -> AttachmentRef ---------------------------------------------------


async def resolve_attachments(
    pool: asyncpg.Pool, tenant_id: str, attachment_ids: Sequence[str], now: datetime, total_max_bytes: int
) -> list[AttachmentRef]:
    """The tenant's attachments named in a send request, in the order given (repeats once).

    An id that does not exist for the tenant or has expired answers 404 (2006); together
    larger than ``total_max_bytes`` answers 413 (2007); both name ``attachment_ids``."""
    wanted = list(dict.fromkeys(attachment_ids))
    rows = await pool.fetch(
        """SELECT attachment_id, filename, file_path, file_size, mime_type, sha256
           FROM email_attachments
           WHERE tenant_id = $1 AND attachment_id = ANY($2::text[]) AND expires_at > $3
             AND sha256 IS NOT NULL""",
        tenant_id,
        wanted,
        now,
    )
    by_id = {r["attachment_id"]: r for r in rows}
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise HeraldError(
            ErrorCode.ATTACHMENT_NOT_FOUND,
            f"attachment {missing[0]} not found or expired",
            field="attachment_ids",
        )
    total = sum(r["file_size"] for r in rows)
    if total > total_max_bytes:
        raise HeraldError(
            ErrorCode.ATTACHMENT_TOO_LARGE,
            f"attachments total {total} bytes, more than the limit of {total_max_bytes}",
            field="attachment_ids",
        )
    return [
        AttachmentRef(
            attachment_id=r["attachment_id"],
            filename=r["filename"],
            mime_type=r["mime_type"] or "application/octet-stream",
            size=r["file_size"],
            path=r["file_path"],
            sha256=r["sha256"],
        )
        for r in (by_id[i] for i in wanted)
    ]


# --- the sweep ------------------------------------------------------------------------------------


def _inside(data_dir: Path, relative: str) -> Path | None:
    root = data_dir.resolve()
    path = (root / relative).resolve()
    return path if path.is_relative_to(root) and path != root else None


def _remove_files(data_dir: Path, relative_paths: Sequence[str]) -> int:
    removed = 0
    for relative in relative_paths:
        path = _inside(data_dir, relative)
        if path is None:
            log.warning("not removing %s: outside the data folder", relative)
            continue
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:  # left for the orphan pass of a later sweep
            log.warning("could not remove %s: %s", relative, exc)
    return removed


def _old_day_dirs(data_dir: Path, before: date) -> list[tuple[str, list[str]]]:
    """Day folders older than ``before`` and the files in each."""
    base = data_dir / ATTACHMENTS_DIR
    if not base.is_dir():
        return []
    found = []
    for entry in sorted(base.iterdir()):
        if entry.is_dir() and _DAY_DIR.match(entry.name) and entry.name < before.isoformat():
            found.append((entry.name, [f.name for f in entry.iterdir() if f.is_file()]))
    return found


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


async def _reap_orphans(pool: asyncpg.Pool, data_dir: Path, now: datetime) -> int:
    """Files of day folders at least two days old that no row names: a crash between storing
    and recording, a temporary file of an interrupted upload, a file whose removal failed.
    Uploads write only into the current day's folder, so older ones are safe to inspect."""
    removed = 0
    before = (now.astimezone(UTC) - timedelta(days=1)).date()
    for day, names in await asyncio.to_thread(_old_day_dirs, data_dir, before):
        paths = [f"{ATTACHMENTS_DIR}/{day}/{name}" for name in names]
        if paths:
            known = {
                r["file_path"]
                for r in await pool.fetch(
                    "SELECT file_path FROM email_attachments WHERE file_path = ANY($1::text[])", paths
                )
            }
            orphans = [p for p in paths if p not in known]
            removed += await asyncio.to_thread(_remove_files, data_dir, orphans)
        await asyncio.to_thread(_rmdir_if_empty, data_dir / ATTACHMENTS_DIR / day)
    return removed


async def sweep_expired(pool: asyncpg.Pool, data_dir: Path, now: datetime) -> int:
    """Delete the attachments that expired at or before ``now`` (rows, then their files; a
    file already gone is fine) and answer how many rows went. Also removes files no row names
    from day folders at least two days old. Safe to run from several ingest replicas at once."""
    deleted = 0
    while True:
        rows = await pool.fetch(
            """DELETE FROM email_attachments WHERE id IN (
                   SELECT id FROM email_attachments WHERE expires_at <= $1
                   ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)
               RETURNING file_path""",
            now,
            _SWEEP_BATCH,
        )
        if rows:
            await asyncio.to_thread(_remove_files, data_dir, [r["file_path"] for r in rows])
            deleted += len(rows)
        if len(rows) < _SWEEP_BATCH:
            break
    orphans = await _reap_orphans(pool, data_dir, now)
    if deleted or orphans:
        log.info("attachment sweep: %d expired, %d orphan files removed", deleted, orphans)
    return deleted


async def run_sweeper(pool: asyncpg.Pool, data_dir: Path, interval_s: float) -> None:
    """Sweep now and then every ``interval_s`` until cancelled; rows are removed
    :data:`SWEEP_GRACE` after they expire. A failed sweep is logged and tried again next time."""
    while True:
        try:
            await sweep_expired(pool, data_dir, datetime.now(UTC) - SWEEP_GRACE)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("attachment sweep failed; trying again in %.0f s", interval_s)
        await asyncio.sleep(interval_s)
