"""Building the MIME message of an email dispatch (pure; no I/O)."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import format_datetime, formataddr
from html.parser import HTMLParser

from shared.events import ContentType, DispatchV1, utcnow

# 7-bit on the wire (every non-ASCII part base64, headers RFC 2047), so no server needs
# 8BITMIME; CRLF line endings as SMTP wants them.
_POLICY = compat32.clone(linesep="\r\n")

_BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "hr"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in _BLOCK:
            self.parts.append("\n")
        elif tag == "a":
            self._href = dict(attrs).get("href")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head") and self._skip:
            self._skip -= 1
        elif tag in _BLOCK:
            self.parts.append("\n")
        elif tag == "a" and self._href:
            self.parts.append(f" ({self._href})")
            self._href = None

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """A readable plain-text alternative of an HTML body."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = html.unescape("".join(parser.parts))
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


@dataclass(frozen=True, slots=True)
class BuiltMessage:
    message_id: str  # the Message-ID header
    data: bytes  # the whole message, CRLF line endings, 7-bit


def _text_part(text: str, subtype: str) -> MIMEText:
    # ASCII stays 7bit and readable; anything else is base64 (C-accelerated, 7-bit safe).
    if text.isascii() and all(len(line) < 990 for line in text.splitlines()):
        return MIMEText(text, subtype, "us-ascii")
    return MIMEText(text, subtype, "utf-8")


def _header(value: str) -> str:
    return value if value.isascii() else Header(value, "utf-8").encode()


def build_message(dispatch: DispatchV1, from_address: str, from_name: str, domain: str) -> BuiltMessage:
    """The message to hand to SMTP. Bcc recipients are envelope-only: no Bcc header.

    Built with the compat32 MIME classes and serialised once: the modern ``EmailMessage`` API
    re-parses every header through its registry, which took ~40% of the sender's CPU.
    """
    options = dispatch.email
    name = (options.from_name if options and options.from_name else from_name) or ""
    if dispatch.content_type is ContentType.HTML:
        msg: Message = MIMEMultipart("alternative")
        msg.attach(_text_part(html_to_text(dispatch.content), "plain"))
        msg.attach(_text_part(dispatch.content, "html"))
    else:
        msg = _text_part(dispatch.content, "plain")
    # Deterministic: a resend of the same message (retry, redelivery) carries the same
    # Message-ID, which lets receiving systems drop the duplicate.
    message_id = f"<{dispatch.message_id}@{domain}>"
    msg["From"] = formataddr((name, from_address), charset="utf-8")
    msg["To"] = ", ".join(dispatch.to)
    if options and options.cc:
        msg["Cc"] = ", ".join(options.cc)
    if options and options.reply_to:
        msg["Reply-To"] = options.reply_to
    msg["Subject"] = _header(dispatch.subject or "")
    msg["Date"] = format_datetime(utcnow())
    msg["Message-ID"] = message_id
    msg["X-Herald-Message-ID"] = dispatch.message_id
    return BuiltMessage(message_id, msg.as_bytes(policy=_POLICY))


def envelope_recipients(dispatch: DispatchV1) -> list[str]:
    options = dispatch.email
    extra = [*options.cc, *options.bcc] if options else []
    return list(dict.fromkeys([*dispatch.to, *extra]))
