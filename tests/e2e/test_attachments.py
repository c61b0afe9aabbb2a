"""Email attachments end to end, on real servers: upload (content sniffing, limits, storage),
send with ``attachment_ids`` (resolution, limits), delivery to the SMTP sink byte for byte, and
the sweep of expired attachments. The suite runs the services with a 2 MB per-file and a 3 MB
per-message limit (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import time
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from services.ingest.attachments import sweep_expired
from tests.conftest import Pipeline
from tests.e2e.helpers import SEND, by_message_id, request_end_offsets, wait_for_mail, wait_for_state

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("dump_logs_on_failure")]

UPLOAD = "/api/v1/attachments/upload"
MAX_FILE = 2_000_000  # HERALD_ATTACHMENT_MAX_BYTES in tests/conftest.py
MAX_TOTAL = 3_000_000  # HERALD_ATTACHMENTS_TOTAL_MAX_BYTES
DOCX_MIME = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


@pytest.fixture(scope="session")
def data_dir(pipeline: Pipeline) -> Path:
    return pipeline.backing.tmp / "data"


# --- samples: minimal valid headers, random bodies ---------------------------------------------


def pdf(size: int = 5000) -> bytes:
    head, tail = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", b"\n%%EOF\n"
    return head + os.urandom(size - len(head) - len(tail)) + tail


def png(size: int = 3000) -> bytes:
    head = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00"
    return head + os.urandom(size - len(head))


def docx() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        z.writestr("_rels/.rels", '<?xml version="1.0"?><Relationships/>')
        z.writestr("word/document.xml", '<?xml version="1.0"?><w:document/>' + uuid.uuid4().hex)
    return out.getvalue()


CSV = "名前,金额\r\nalice,1\r\nbob,2\n".encode()
ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\x3e\x00" + os.urandom(2000)
PE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + bytes(100) + os.urandom(1000)


async def upload(client: httpx.AsyncClient, *files: tuple[str, bytes], **fields: str) -> httpx.Response:
    return await client.post(UPLOAD, files=[("file", (name, data)) for name, data in files], data=fields or None)


async def upload_ok(client: httpx.AsyncClient, *files: tuple[str, bytes]) -> list[dict]:
    r = await upload(client, *files)
    assert r.status_code == 200, r.text
    return r.json()["data"]


async def attachment_rows(db: asyncpg.Pool) -> int:
    return await db.fetchval("SELECT count(*) FROM email_attachments")


def stored_files(data_dir: Path) -> set[Path]:
    base = data_dir / "attachments"
    return {p for p in base.rglob("*") if p.is_file()} if base.exists() else set()


# --- upload ---------------------------------------------------------------------------------------


async def test_upload_stores_sniffed_files_and_answers_their_ids(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool, data_dir: Path
) -> None:
    samples = [("报告 2026.pdf", pdf()), ("chart.PNG", png()), ("data.csv", CSV), ("notes.docx", docx())]
    before = datetime.now(UTC)
    r = await upload(client, *samples, uploaded_by="billing-service")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["code"] == 0 and body["request_id"] == r.headers["x-request-id"]
    data = body["data"]
    assert [d["filename"] for d in data] == [name for name, _ in samples]
    assert [d["mime_type"] for d in data] == ["application/pdf", "image/png", "text/csv", DOCX_MIME]
    assert [d["file_size"] for d in data] == [len(content) for _, content in samples]
    day = time.strftime("%Y%m%d", time.gmtime())
    for item, (_, content) in zip(data, samples, strict=True):
        assert re.fullmatch(rf"att_{day}_[0-9a-z]{{16}}", item["attachment_id"])
        expires = datetime.fromisoformat(item["expires_at"].replace("Z", "+00:00"))
        assert item["expires_at"].endswith("Z")
        assert before + timedelta(days=7) - timedelta(seconds=5) <= expires <= datetime.now(UTC) + timedelta(days=7)
        row = await db.fetchrow("SELECT * FROM email_attachments WHERE attachment_id = $1", item["attachment_id"])
        assert row["tenant_id"] == "default" and row["uploaded_by"] == "billing-service"
        assert row["sha256"] == hashlib.sha256(content).hexdigest()
        assert re.fullmatch(r"attachments/\d{4}-\d{2}-\d{2}/[0-9a-f]{32}\.[a-z0-9]+", row["file_path"])
        assert (data_dir / row["file_path"]).read_bytes() == content  # stored relative to the data folder
    assert not [p for p in stored_files(data_dir) if p.name.endswith(".part")]


async def test_upload_keeps_only_the_file_name(client: httpx.AsyncClient, db: asyncpg.Pool) -> None:
    [item] = await upload_ok(client, ("../../etc/季度/report.pdf", pdf()))
    assert item["filename"] == "report.pdf"
    [item] = await upload_ok(
        client, ("C:\\Users\\me\\scan.jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + os.urandom(500))
    )
    assert item["filename"] == "scan.jpeg" and item["mime_type"] == "image/jpeg"
    [item] = await upload_ok(client, ("noext", b"GIF89a" + os.urandom(300)))
    assert item["filename"] == "noext" and item["mime_type"] == "image/gif"


def raw_multipart(filename: bytes, content: bytes, boundary: str = "herald-test-boundary") -> tuple[bytes, str]:
    body = (
        f"--{boundary}\r\n".encode()
        + b'Content-Disposition: form-data; name="file"; filename="'
        + filename
        + b'"\r\nContent-Type: application/octet-stream\r\n\r\n'
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


BAD_UPLOADS = [
    pytest.param([("invoice.pdf", ELF)], "file", id="elf-named-pdf"),
    pytest.param([("invoice.pdf", PE)], "file", id="exe-named-pdf"),
    pytest.param([("setup.exe", PE)], "file", id="exe"),
    pytest.param([("photo.pdf", png())], "file", id="png-named-pdf"),
    pytest.param([("sheet.xlsx", docx())], "file", id="docx-named-xlsx"),
    pytest.param([("notes.txt", b"\xff\xfe not utf-8")], "file", id="txt-not-utf8"),
    pytest.param([("notes.txt", b"text\x00with NUL")], "file", id="txt-with-nul"),
    pytest.param([("unknown.bin", os.urandom(500))], "file", id="unrecognised"),
    pytest.param([("empty.pdf", b"")], "file", id="empty"),
    pytest.param([("ok.pdf", pdf()), ("bad.pdf", ELF)], "file", id="one-bad-of-two"),
]


@pytest.mark.parametrize(("files", "field"), BAD_UPLOADS)
async def test_disallowed_uploads_are_refused_and_nothing_is_kept(
    client: httpx.AsyncClient, db: asyncpg.Pool, data_dir: Path, files: list, field: str
) -> None:
    rows, on_disk = await attachment_rows(db), stored_files(data_dir)
    r = await upload(client, *files)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == 1001 and body["data"] is None
    assert [e["field"] for e in body["errors"]] == [field]
    assert await attachment_rows(db) == rows
    assert stored_files(data_dir) == on_disk  # all or nothing, no temporary file left


async def test_malformed_uploads(client: httpx.AsyncClient, db: asyncpg.Pool, data_dir: Path) -> None:
    rows, on_disk = await attachment_rows(db), stored_files(data_dir)
    for filename in (b"a\x00b.pdf", b"a\x01b.pdf", b"", b"x" * 300 + b".pdf"):
        content, ctype = raw_multipart(filename, pdf())
        r = await client.post(UPLOAD, content=content, headers={"Content-Type": ctype})
        assert r.status_code == 400 and r.json()["code"] == 1001, (filename, r.text)
        assert r.json()["errors"][0]["field"] == "file"
    # CR/LF cannot appear inside a header line; the part's headers end there and the body is malformed.
    content, ctype = raw_multipart(b"a\r\nb.pdf", pdf())
    r = await client.post(UPLOAD, content=content, headers={"Content-Type": ctype})
    assert r.status_code == 400 and r.json()["code"] == 1001
    # Not multipart, no file, an unknown field, a truncated body.
    r = await client.post(UPLOAD, json={"file": "x"})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "body"
    r = await client.post(UPLOAD, data={"uploaded_by": "me"}, files={"other": ("x.pdf", pdf())})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "other"
    r = await client.post(UPLOAD, files={"uploaded_by": (None, "only a field")})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "file"
    content, ctype = raw_multipart(b"cut.pdf", pdf())
    r = await client.post(UPLOAD, content=content[:-30], headers={"Content-Type": ctype})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "body"
    r = await upload(client, *[(f"f{i}.pdf", pdf(1000)) for i in range(11)])
    assert r.status_code == 400 and "at most 10" in r.json()["message"]
    assert await attachment_rows(db) == rows
    assert stored_files(data_dir) == on_disk


async def test_oversized_files_get_413_while_streaming(
    client: httpx.AsyncClient, db: asyncpg.Pool, data_dir: Path
) -> None:
    rows, on_disk = await attachment_rows(db), stored_files(data_dir)
    # Under the limit passes, although far above HERALD_MAX_BODY_BYTES (64 KiB in the suite).
    [item] = await upload_ok(client, ("big.pdf", pdf(MAX_FILE)))
    assert item["file_size"] == MAX_FILE
    rows += 1
    on_disk = stored_files(data_dir)

    r = await upload(client, ("huge.pdf", pdf(MAX_FILE + 1)))
    assert r.status_code == 413, r.text
    assert r.json()["code"] == 2007 and r.json()["errors"][0]["field"] == "file"

    # Chunked, no Content-Length: the limit holds while the data streams.
    boundary = "chunked-boundary"

    async def chunks():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="stream.pdf"\r\n\r\n'
        ).encode() + b"%PDF-1.7\n"
        for _ in range(40):
            yield os.urandom(64 * 1024)  # 2.6 MB in all
        yield f"\r\n--{boundary}--\r\n".encode()

    r = await client.post(
        UPLOAD, content=chunks(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert r.status_code == 413 and r.json()["code"] == 2007

    # A body declared larger than ten files at the limit is refused before it is read.
    host, port = client.base_url.host, client.base_url.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"POST {UPLOAD} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 25000000\r\n"
        f"Authorization: {client.headers['authorization']}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 413"), status_line
    assert await attachment_rows(db) == rows
    assert stored_files(data_dir) == on_disk


# --- sending --------------------------------------------------------------------------------------


async def test_email_with_two_attachments_arrives_byte_for_byte(pipeline: Pipeline, client: httpx.AsyncClient) -> None:
    report, doc = pdf(200_000), docx()
    items = await upload_ok(client, ("报告 2026.pdf", report), ("notes.docx", doc))
    r = await client.post(
        SEND,
        json={
            "to": "attach@example.com",
            "subject": "with attachments",
            "content": "<p>see <b>attached</b></p>",
            "attachment_ids": [i["attachment_id"] for i in items],
        },
    )
    assert r.status_code == 202, r.text
    message_id = r.json()["data"]["message_id"]
    mail = await wait_for_mail(pipeline, by_message_id(message_id))
    mail.data.decode("ascii")  # still 7-bit clean
    msg = mail.parsed()
    assert msg.defects == [] and msg.get_content_type() == "multipart/mixed"
    assert msg.get_body(("html",)).get_content().strip() == "<p>see <b>attached</b></p>"
    got = [(p.get_filename(), p.get_content_type(), p.get_payload(decode=True)) for p in msg.iter_attachments()]
    assert got == [("报告 2026.pdf", "application/pdf", report), ("notes.docx", DOCX_MIME, doc)]
    await wait_for_state(client, message_id, "sent")


async def _send_counts(pipeline: Pipeline, db: asyncpg.Pool) -> tuple[int, dict[int, int]]:
    rows = await db.fetchval("SELECT count(*) FROM message_records")
    return rows, await request_end_offsets(pipeline.backing.bootstrap, "notify.requests")


async def test_unknown_expired_and_too_large_attachment_ids_are_refused_and_nothing_is_sent(
    pipeline: Pipeline, client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    small, expired, big1, big2 = await upload_ok(
        client, ("a.pdf", pdf()), ("old.pdf", pdf()), ("b1.pdf", pdf(1_600_000)), ("b2.png", png(1_600_000))
    )
    await db.execute(
        "UPDATE email_attachments SET expires_at = now() - interval '1 minute' WHERE attachment_id = $1",
        expired["attachment_id"],
    )
    cases = [
        ([small["attachment_id"], "att_20200101_doesnotexist0000"], 404, 2006),
        ([expired["attachment_id"]], 404, 2006),
        ([big1["attachment_id"], big2["attachment_id"]], 413, 2007),  # 3.2 MB > 3 MB in all
    ]
    before = await _send_counts(pipeline, db)
    for ids, status, code in cases:
        r = await client.post(
            SEND, json={"to": "nope@example.com", "subject": "s", "content": "c", "attachment_ids": ids}
        )
        assert r.status_code == status, r.text
        body = r.json()
        assert body["code"] == code and body["data"] is None
        assert [e["field"] for e in body["errors"]] == ["attachment_ids"]
    assert await _send_counts(pipeline, db) == before

    # Another tenant's attachment is as good as unknown.
    await db.execute(
        "UPDATE email_attachments SET tenant_id = 'other' WHERE attachment_id = $1", small["attachment_id"]
    )
    r = await client.post(
        SEND,
        json={"to": "nope@example.com", "subject": "s", "content": "c", "attachment_ids": [small["attachment_id"]]},
    )
    assert r.status_code == 404 and r.json()["code"] == 2006
    # One of the big ones alone is within the limit.
    r = await client.post(
        SEND, json={"to": "ok@example.com", "subject": "s", "content": "c", "attachment_ids": [big2["attachment_id"]]}
    )
    assert r.status_code == 202, r.text


# --- the sweep ------------------------------------------------------------------------------------


async def test_sweep_deletes_expired_rows_and_their_files(
    client: httpx.AsyncClient, db: asyncpg.Pool, data_dir: Path
) -> None:
    keep, gone, no_file = await upload_ok(client, ("keep.pdf", pdf()), ("gone.pdf", pdf()), ("nofile.pdf", pdf()))
    paths = {
        r["attachment_id"]: data_dir / r["file_path"]
        for r in await db.fetch(
            "SELECT attachment_id, file_path FROM email_attachments WHERE attachment_id = ANY($1::text[])",
            [keep["attachment_id"], gone["attachment_id"], no_file["attachment_id"]],
        )
    }
    await db.execute(
        "UPDATE email_attachments SET expires_at = now() - interval '1 day' WHERE attachment_id = ANY($1::text[])",
        [gone["attachment_id"], no_file["attachment_id"]],
    )
    paths[no_file["attachment_id"]].unlink()  # a missing file is fine
    # An old day folder: a file no row names goes, a file a live row names stays.
    old_day = (datetime.now(UTC) - timedelta(days=3)).strftime("%Y-%m-%d")
    old_dir = data_dir / "attachments" / old_day
    old_dir.mkdir(parents=True, exist_ok=True)
    orphan, leftover, named = old_dir / "0rphan.pdf", old_dir / ".abc.part", old_dir / "named.pdf"
    for p in (orphan, leftover, named):
        p.write_bytes(b"%PDF-1.4 old")
    await db.execute(
        """INSERT INTO email_attachments (attachment_id, tenant_id, filename, file_path, file_size, mime_type,
               sha256, expires_at)
           VALUES ($1, 'default', 'named.pdf', $2, 12, 'application/pdf', $3, now() + interval '1 day')""",
        f"att_test_{uuid.uuid4().hex[:16]}",
        f"attachments/{old_day}/named.pdf",
        hashlib.sha256(b"%PDF-1.4 old").hexdigest(),
    )

    deleted = await sweep_expired(db, data_dir, datetime.now(UTC))
    assert deleted >= 2
    left = {
        r["attachment_id"]
        for r in await db.fetch(
            "SELECT attachment_id FROM email_attachments WHERE attachment_id = ANY($1::text[])", list(paths)
        )
    }
    assert left == {keep["attachment_id"]}
    assert paths[keep["attachment_id"]].exists() and not paths[gone["attachment_id"]].exists()
    assert not orphan.exists() and not leftover.exists() and named.exists()
    assert await db.fetchval("SELECT count(*) FROM email_attachments WHERE expires_at <= now()") == 0
    assert await sweep_expired(db, data_dir, datetime.now(UTC)) == 0

    # Sending with a swept attachment: 404 like any unknown id.
    r = await client.post(
        SEND, json={"to": "x@example.com", "subject": "s", "content": "c", "attachment_ids": [gone["attachment_id"]]}
    )
    assert r.status_code == 404 and r.json()["code"] == 2006
