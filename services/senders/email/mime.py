"""Building the MIME message of an email dispatch (pure; no I/O)."""

from __future__ import annotations

import html
import re
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from html.parser import HTMLParser

from shared.events import ContentType, DispatchV1, utcnow

# 7-bit on the wire: every part is quoted-printable or base64, so no server needs 8BITMIME.
_POLICY = SMTP.clone(cte_type="7bit")

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


def build_message(dispatch: DispatchV1, from_address: str, from_name: str, domain: str) -> EmailMessage:
    """The message to hand to SMTP. Bcc recipients are envelope-only: no Bcc header."""
    msg = EmailMessage(policy=_POLICY)
    options = dispatch.email
    name = (options.from_name if options and options.from_name else from_name) or ""
    msg["From"] = Address(display_name=name, addr_spec=from_address)
    msg["To"] = ", ".join(dispatch.to)
    if options and options.cc:
        msg["Cc"] = ", ".join(options.cc)
    if options and options.reply_to:
        msg["Reply-To"] = options.reply_to
    msg["Subject"] = dispatch.subject or ""
    msg["Date"] = format_datetime(utcnow())
    msg["Message-ID"] = make_msgid(idstring=dispatch.message_id.replace("_", "-"), domain=domain)
    msg["X-Herald-Message-ID"] = dispatch.message_id
    if dispatch.content_type is ContentType.HTML:
        msg.set_content(html_to_text(dispatch.content), subtype="plain", charset="utf-8")
        msg.add_alternative(dispatch.content, subtype="html", charset="utf-8")
    else:
        msg.set_content(dispatch.content, subtype="plain", charset="utf-8")
    return msg


def envelope_recipients(dispatch: DispatchV1) -> list[str]:
    options = dispatch.email
    extra = [*options.cc, *options.bcc] if options else []
    return list(dict.fromkeys([*dispatch.to, *extra]))
