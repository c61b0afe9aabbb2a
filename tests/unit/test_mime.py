"""Building the MIME message of an email dispatch."""

from __future__ import annotations

import email
import email.policy
import hashlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.senders.base import Permanent
from services.senders.email.mime import build_message, envelope_recipients, html_to_text, load_attachments
from shared.events import AttachmentRef, ContentType, DispatchV1, EmailOptions


def dispatch(**changes: object) -> DispatchV1:
    base = dict(
        dispatch_id="msg_20261123_abc:1",
        message_id="msg_20261123_abc",
        tenant_id="default",
        channel="email",
        to=["a@example.com", "b@example.com"],
        subject="你好 report",
        content="<p>Hi <b>there</b></p><script>x()</script>",
        email=EmailOptions(cc=["c@example.com"], bcc=["d@example.com"], from_name="Ops 运维"),
    )
    return DispatchV1(**{**base, **changes})


def parse(built) -> email.message.EmailMessage:
    return email.message_from_bytes(built.data, policy=email.policy.default)


def test_html_gets_a_text_alternative_and_no_bcc_header() -> None:
    built = build_message(dispatch(), "noreply@example.org", "Herald", "example.org")
    wire = built.data
    assert b"d@example.com" not in wire
    wire.decode("ascii")  # 7-bit clean
    msg = email.message_from_bytes(wire, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/alternative"
    assert msg.get_body(("plain",)).get_content().strip() == "Hi there"
    assert "<b>there</b>" in msg.get_body(("html",)).get_content()
    assert msg["Subject"] == "你好 report"
    assert msg["From"].addresses[0].display_name == "Ops 运维"
    assert msg["From"].addresses[0].addr_spec == "noreply@example.org"
    assert msg["Cc"] == "c@example.com"
    assert msg["X-Herald-Message-ID"] == "msg_20261123_abc"
    assert msg["Message-ID"] == built.message_id == "<msg_20261123_abc@example.org>"  # same on a resend
    assert msg.defects == [] and all(not part.defects for part in msg.walk())
    assert b"\r\n" in wire and b"\n" not in wire.replace(b"\r\n", b"")


def test_text_content_is_a_single_plain_part() -> None:
    msg = parse(
        build_message(dispatch(content="<b>literal</b>", content_type=ContentType.TEXT), "n@example.org", "", "x")
    )
    assert msg.get_content_type() == "text/plain"
    assert "<b>literal</b>" in msg.get_content()


def test_envelope_includes_cc_and_bcc_once() -> None:
    d = dispatch(email=EmailOptions(cc=["a@example.com"], bcc=["z@example.com"]))
    assert envelope_recipients(d) == ["a@example.com", "b@example.com", "z@example.com"]


def test_html_to_text_keeps_links_and_blocks() -> None:
    text = html_to_text("<h1>Title</h1><p>See <a href='https://x.example/p'>this</a> &amp; more</p><style>p{}</style>")
    assert text == "Title\n\nSee this (https://x.example/p) & more\n"


# --- attachments -----------------------------------------------------------------------------

PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(255, -1, -1)) * 3


def ref(attachment_id: str, filename: str, mime_type: str, data: bytes) -> AttachmentRef:
    return AttachmentRef(
        attachment_id=attachment_id,
        filename=filename,
        mime_type=mime_type,
        size=len(data),
        path=f"attachments/2026-11-23/{attachment_id}.bin",
        sha256=hashlib.sha256(data).hexdigest(),
    )


def attached(msg: email.message.EmailMessage) -> list[tuple[str | None, str, bytes]]:
    return [(p.get_filename(), p.get_content_type(), p.get_payload(decode=True)) for p in msg.iter_attachments()]


def test_attachments_make_a_mixed_message_with_the_body_first_and_exact_bytes() -> None:
    files = [
        (ref("att_1", "报告 2026.pdf", "application/pdf", PDF), PDF),
        (ref("att_2", "chart.png", "image/png", PNG), PNG),
        (ref("att_3", "data.csv", "text/csv", b"a,b\r\n1,\xe4\xbd\xa0\n"), b"a,b\r\n1,\xe4\xbd\xa0\n"),
    ]
    built = build_message(dispatch(), "noreply@example.org", "Herald", "example.org", attachments=files)
    wire = built.data
    wire.decode("ascii")  # still 7-bit clean
    assert b"d@example.com" not in wire  # still no Bcc header
    assert max(len(line) for line in wire.split(b"\r\n")) <= 998
    assert b"\n" not in wire.replace(b"\r\n", b"")
    msg = parse(built)
    assert msg.defects == [] and all(not part.defects for part in msg.walk())
    assert msg.get_content_type() == "multipart/mixed"
    body, *rest = msg.iter_parts()
    assert body.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in body.iter_parts()] == ["text/plain", "text/html"]
    assert msg.get_body(("plain",)).get_content().strip() == "Hi there"
    assert [p.get_content_disposition() for p in rest] == ["attachment"] * 3
    assert all(p["Content-Transfer-Encoding"] == "base64" for p in rest)
    assert attached(msg) == [(r.filename, r.mime_type, data) for r, data in files]
    assert rest[2].get_content_charset() == "utf-8"
    # RFC 2231 for the non-ASCII name, in Content-Disposition and Content-Type's name.
    assert b"filename*=utf-8''%E6%8A%A5%E5%91%8A%202026.pdf" in wire
    assert rest[0].get_param("name") == "报告 2026.pdf"
    assert msg["Subject"] == "你好 report" and msg["X-Herald-Message-ID"] == "msg_20261123_abc"


def test_text_body_with_an_attachment_and_awkward_filenames() -> None:
    long_name = "季度报告" * 60 + ".pdf"  # ~2200 characters once percent-encoded
    files = [
        (ref("att_a", long_name, "application/pdf", PDF), PDF),
        (ref("att_b", 'say "hi" \\ o/.txt', "text/plain", b"hi\n"), b"hi\n"),
        (ref("att_c", "empty.zip", "application/zip", b""), b""),
    ]
    built = build_message(
        dispatch(content="plain body", content_type=ContentType.TEXT), "n@example.org", "", "x", attachments=files
    )
    assert max(len(line) for line in built.data.split(b"\r\n")) <= 78  # continuations fold it
    assert b"filename*0*=utf-8''" in built.data and b"filename*1*=" in built.data
    msg = parse(built)
    assert msg.defects == [] and all(not part.defects for part in msg.walk())
    assert all(not part["Content-Disposition"].defects for part in msg.iter_attachments())
    assert msg.get_content_type() == "multipart/mixed"
    first = next(msg.iter_parts())
    assert first.get_content_type() == "text/plain" and first.get_content() == "plain body"
    assert attached(msg) == [(r.filename, r.mime_type, data) for r, data in files]


def test_without_attachments_the_message_is_unchanged() -> None:
    msg = parse(build_message(dispatch(), "n@example.org", "", "x", attachments=[]))
    assert msg.get_content_type() == "multipart/alternative"


def test_attachment_ref_refuses_header_injection_and_escaping_paths() -> None:
    good = ref("att_x", "a.pdf", "application/pdf", PDF).model_dump()
    for changes in (
        {"filename": "a.pdf\r\nBcc: evil@example.com"},
        {"filename": "a\x00.pdf"},
        {"path": "../etc/passwd"},
        {"path": "/etc/passwd"},
        {"path": "attachments/../../x"},
        {"sha256": "xyz"},
        {"mime_type": "text/plain\r\nX: y"},
    ):
        with pytest.raises(ValidationError):
            AttachmentRef(**{**good, **changes})


def write_stored(data_dir: Path, r: AttachmentRef, data: bytes) -> None:
    path = data_dir / r.path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


async def test_load_attachments_reads_and_verifies_files(tmp_path: Path) -> None:
    a, b = ref("att_1", "a.pdf", "application/pdf", PDF), ref("att_2", "b.png", "image/png", PNG)
    write_stored(tmp_path, a, PDF)
    write_stored(tmp_path, b, PNG)
    d = dispatch(email=EmailOptions(attachments=[a, b]))
    assert await load_attachments(d, tmp_path) == [(a, PDF), (b, PNG)]
    assert await load_attachments(dispatch(), tmp_path) == []

    (tmp_path / b.path).write_bytes(PNG[:-1] + b"X")  # same size, other content
    with pytest.raises(Permanent) as exc:
        await load_attachments(d, tmp_path)
    assert exc.value.code == 2006 and "sha256" in exc.value.message

    (tmp_path / b.path).write_bytes(PNG + b"more")
    with pytest.raises(Permanent) as exc:
        await load_attachments(d, tmp_path)
    assert exc.value.code == 2006

    (tmp_path / b.path).unlink()
    with pytest.raises(Permanent) as exc:
        await load_attachments(d, tmp_path)
    assert exc.value.code == 2006 and "att_2" in exc.value.message


async def test_load_attachments_stays_inside_the_data_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside.pdf"
    outside.write_bytes(PDF)
    data_dir = tmp_path / "data"
    (data_dir / "attachments").mkdir(parents=True)
    (data_dir / "attachments" / "link.pdf").symlink_to(outside)
    r = ref("att_l", "l.pdf", "application/pdf", PDF).model_copy(update={"path": "attachments/link.pdf"})
    with pytest.raises(Permanent) as exc:
        await load_attachments(dispatch(email=EmailOptions(attachments=[r])), data_dir)
    assert exc.value.code == 2006 and "outside" in exc.value.message


def test_a_given_text_alternative_is_used_instead_of_the_derived_one() -> None:
    d = dispatch(email=EmailOptions(text="Plain words, written by hand."))
    msg = parse(build_message(d, "n@example.org", "", "example.org"))
    assert msg.get_body(("plain",)).get_content().strip() == "Plain words, written by hand."
    assert "<b>there</b>" in msg.get_body(("html",)).get_content()
