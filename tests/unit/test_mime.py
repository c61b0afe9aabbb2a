"""Building the MIME message of an email dispatch."""

from __future__ import annotations

import email
import email.policy

from services.senders.email.mime import build_message, envelope_recipients, html_to_text
from shared.events import ContentType, DispatchV1, EmailOptions


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
