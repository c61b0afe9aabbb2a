"""What the upload accepts, decided by content (not only by the name), and filename cleaning."""

from __future__ import annotations

import pytest

from services.ingest.attachments import classify, clean_filename
from shared.errors import HeraldError

PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 16
ZIP = b"PK\x03\x04" + b"\x14\x00\x00\x00\x08\x00" + b"\x00" * 24
ELF = b"\x7fELF\x02\x01\x01" + b"\x00" * 25
PE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00" + b"\x00" * 54 + b"PE\x00\x00"
OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 24


@pytest.mark.parametrize(
    ("name", "head", "text", "mime"),
    [
        ("report.pdf", PDF, False, "application/pdf"),
        ("图表.png", PNG, False, "image/png"),
        ("bundle.zip", ZIP, False, "application/zip"),
        ("notes.txt", "中文笔记\n".encode(), True, "text/plain"),
        ("table.csv", b"a,b\n1,2\n", True, "text/csv"),
        ("old.doc", OLE, False, "application/msword"),
    ],
)
def test_allowed_types(name: str, head: bytes, text: bool, mime: str) -> None:
    assert classify(name, head, text)[0] == mime


@pytest.mark.parametrize(
    ("name", "head", "text"),
    [
        ("invoice.pdf", ELF, False),  # an executable renamed
        ("setup.pdf", PE, False),
        ("photo.png", PDF, False),  # content contradicts the name
        ("program.exe", PE, False),
        ("notes.txt", b"\x00\x01binary", False),  # not UTF-8 text
        ("archive.pdf", ZIP, False),
        ("macro.exe", OLE, False),
        ("mystery.bin", b"\x01\x02\x03\x04", False),
    ],
)
def test_refused_types(name: str, head: bytes, text: bool) -> None:
    with pytest.raises(HeraldError) as refused:
        classify(name, head, text)
    assert refused.value.code == 1001 and refused.value.field == "file"


def test_filenames_lose_their_path_and_keep_non_ascii() -> None:
    assert clean_filename("C:\\Users\\x\\报告 2026.pdf") == "报告 2026.pdf"
    assert clean_filename("../../etc/passwd") == "passwd"
    for bad in ("a\r\nb.pdf", "nul\x00.pdf", "..", "", "x" * 256 + ".pdf"):
        with pytest.raises(HeraldError):
            clean_filename(bad)
