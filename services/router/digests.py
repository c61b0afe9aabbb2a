"""Digests: the messages of a category to one recipient within a window, delivered as one message
that lists them. Pure functions; the buckets live in Redis (:mod:`services.router.frequency`).

The first message of a (tenant, rule, recipient) bucket opens it: the router parks a **digest
message** until the window ends (``park(..., "digest", ...)``), whose id is derived from the
opening message's, so opening it again after a crash gives the same id, the same events and the
same scheduled task. Every message of the bucket is stored in it (a hash keyed by message id, so
storing twice is storing once) and ends ``digested``, its event naming the digest. When the digest
message comes back from the scheduler, the router freezes the bucket (later messages open a new
one) and routes one delivery listing its messages, rendered with the rule's template or with
:func:`listing`. Freezing is idempotent: a digest routed again after a crash lists the same items.

A message goes into a digest only when it can be listed without loss: one recipient, no cc or
bcc, no attachments (:func:`eligible`); anything else is delivered on its own.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

import orjson
from markupsafe import Markup
from pydantic import ValidationError

from services.router.caps import Held, announced, recipient_tag, snapshot_of
from services.router.routing import Parked, Rejected, Routed, park, route_rendered, router_event
from shared.errors import ErrorCode
from shared.events import ContentType, DigestRef, EmailOptions, EventV1, RequestV1, State
from shared.frequency import DigestRule
from shared.ids import derived_message_id
from shared.template_store import TemplateStore
from shared.templates import Rendered, Renderer, TemplateProblem

# Each listed message's content is cut at this many bytes; the built-in listing lists contents
# until this many bytes in all, then subjects only (a message may weigh 768 KiB in all).
ITEM_CONTENT_MAX_BYTES = 12 * 1024
LISTING_MAX_BYTES = 512 * 1024
# The digest message's subject and content until it is rendered (what its record shows).
PLACEHOLDER = "A digest: the messages it lists are added when it is delivered."


def digest_message_id(opener_id: str) -> str:
    """The digest a message opens: derived from its id, so a replay opens the same one."""
    return derived_message_id(opener_id.split("_")[1], f"digest:{opener_id}")


def bucket_tag(tenant_id: str, rule_id: int, recipient: str) -> str:
    return f"{tenant_id}:{rule_id}:{recipient_tag(recipient)}"


def open_key(tag: str) -> str:
    """The id of the bucket's open digest (expires when its window ends). Every key of one bucket
    shares the hash tag, so one script may use them all in Redis Cluster."""
    return f"herald:digest:{{{tag}}}:open"


def member_key(tag: str, message_id: str) -> str:
    """Which digest a message went into (so a message routed twice goes into one)."""
    return f"herald:digest:{{{tag}}}:msg:{message_id}"


def digest_prefix(tag: str) -> str:
    """``<prefix><digest id>`` is a digest's state (until, open/frozen, count); ``…:items`` its
    messages."""
    return f"herald:digest:{{{tag}}}:d:"


def eligible(request: RequestV1) -> bool:
    """Whether a message can be listed in a digest without losing anything."""
    if request.digest is not None or len(request.to) != 1:
        return False
    email = request.email
    return not (email and (email.cc or email.bcc or email.attachments))


def _cut(text: str, limit: int) -> str:
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode(errors="ignore") + " …"


def item_of(request: RequestV1, now: datetime) -> bytes:
    """What a digest keeps of a message (content cut at :data:`ITEM_CONTENT_MAX_BYTES`)."""
    accepted = (request.accepted_at or now).astimezone(UTC)
    return orjson.dumps(
        {
            "message_id": request.message_id,
            "subject": request.subject or "",
            "content": _cut(request.content, ITEM_CONTENT_MAX_BYTES),
            "content_type": request.content_type.value,
            "accepted_at": accepted.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
    )


def digest_request(opener: RequestV1, rule: DigestRule, now: datetime) -> RequestV1:
    """The digest message a bucket's first message opens (not recorded yet: its 'accepted'
    event creates its record)."""
    assert opener.message_id is not None
    email = opener.email
    return RequestV1(
        message_id=digest_message_id(opener.message_id),
        tenant_id=opener.tenant_id,
        channel=opener.channel,
        to=[opener.to[0]],
        subject=f"Digest of {rule.category} messages",
        content=PLACEHOLDER,
        content_type=ContentType.TEXT,
        email=EmailOptions(from_name=email.from_name, reply_to=email.reply_to) if email else None,
        request_id=opener.request_id,
        accepted_at=now,
        category=rule.category,
        digest=DigestRef(rule_id=rule.rule_id, opened_by=opener.message_id, template_id=rule.template_id),
    )


def hold(
    routed: Routed,
    rule: DigestRule,
    digest_id: str,
    until_ms: int,
    state: str,
    now: datetime,
    opener_id: str | None = None,
) -> Held:
    """A message stored in digest ``digest_id``: its 'digested' event and, while that digest is
    open, the digest message's parking until ``until_ms``. Every member carries the parking, not
    only the message that opened it (``opener_id``): the digest's events and a member's travel on
    different partitions, and a broker that lost the opener's would otherwise leave the digest
    parked by nobody, its members 'digested' and never delivered. The ids are the opener's each
    time, so the tracker stores one digest and one task however many carry it."""
    request = routed.request
    message_id = request.message_id or routed.dispatch.message_id
    until = datetime.fromtimestamp(until_ms / 1000, UTC) if until_ms >= 0 else None
    if opener_id is None and digest_id == digest_message_id(message_id):
        opener_id = message_id  # a bucket opened before openers were stored
    events: list[EventV1] = []
    if opener_id is not None and digest_message_id(opener_id) == digest_id and state == "open" and until is not None:
        as_opener = request if opener_id == message_id else request.model_copy(update={"message_id": opener_id})
        events += park(digest_request(as_opener, rule, now), until, "digest", now).events
    detail: dict[str, Any] = {
        "reason": "digest",
        "digest_message_id": digest_id,
        "rule_id": rule.rule_id,
        "category": rule.category,
        "window_s": rule.window_s,
    }
    if until is not None:
        detail["deliver_at"] = until.isoformat()
    events += announced(routed)
    events.append(router_event(request, message_id, State.DIGESTED, now, detail=detail, message=snapshot_of(routed)))
    return Held(message_id, State.DIGESTED, events)


def retry_later(request: RequestV1, until: datetime, now: datetime) -> Parked:
    """A digest whose items could not be read (Redis away): parked again, to try at ``until``."""
    return park(request, until, "digest", now)


def lost(routed: Routed, now: datetime) -> Rejected:
    """A digest whose messages are gone from Redis (flushed, or released after
    ``HERALD_DIGEST_KEEP_S``): nothing to list. Rejected with 3002 and dead-lettered."""
    request = routed.request
    message_id = request.message_id or routed.dispatch.message_id
    errors = [{"field": "digest", "message": "the digest's messages are no longer in Redis"}]
    event = router_event(
        request,
        message_id,
        State.REJECTED,
        now,
        error_code=int(ErrorCode.REDIS_ERROR),
        error="digest_items_lost: the digest's messages are no longer in Redis",
        detail={"reason": "digest_items_lost", "errors": errors},
        message=snapshot_of(routed),
    )
    return Rejected(message_id, "digest_items_lost", errors, [event])


def items_of(stored: dict[Any, Any]) -> list[dict[str, Any]]:
    """A frozen bucket's messages, oldest first."""
    items = [orjson.loads(v) for v in stored.values()]
    return sorted(items, key=lambda i: (i.get("accepted_at") or "", i.get("message_id") or ""))


def _template_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items as a template sees them: an HTML message's content is markup (not escaped again)."""
    return [
        {
            "message_id": i["message_id"],
            "subject": i["subject"],
            "content": Markup(i["content"]) if i.get("content_type") == "html" else i["content"],
            "content_type": i.get("content_type", "html"),
            "accepted_at": i["accepted_at"],
        }
        for i in items
    ]


def _noun(count: int, category: str) -> str:
    return f"{count} {category} message" + ("" if count == 1 else "s")


def listing(items: list[dict[str, Any]], category: str) -> Rendered:
    """The built-in digest: a heading and each message's subject, time and content (contents until
    :data:`LISTING_MAX_BYTES`, then subjects only)."""
    parts = [f"<p>{html.escape(_noun(len(items), category))}:</p>", "<ol>"]
    budget = LISTING_MAX_BYTES
    for item in items:
        content = item["content"] if item.get("content_type") == "html" else html.escape(item["content"])
        if item.get("content_type") != "html":
            content = content.replace("\n", "<br>\n")
        budget -= len(content.encode())
        body = f"<div>{content}</div>" if budget >= 0 else ""
        parts.append(
            f"<li><p><strong>{html.escape(item['subject'])}</strong> <small>{html.escape(item['accepted_at'])}"
            f"</small></p>{body}</li>"
        )
    parts.append("</ol>")
    return Rendered(_noun(len(items), category), "\n".join(parts), None, "html", "default")


def render(
    request: RequestV1, items: list[dict[str, Any]], templates: TemplateStore, renderer: Renderer
) -> tuple[Rendered, str]:
    """The digest's subject and content, and how they were made: with its template when it has
    one that renders, else with :func:`listing` (a digest is never dropped for its template)."""
    ref = request.digest
    assert ref is not None
    category = request.category or "digest"
    if ref.template_id is None:
        return listing(items, category), "listing"
    variables = {"items": _template_items(items), "count": len(items), "category": category}
    try:
        # Its current version (a digest renders with the template as it is when it is delivered).
        version = templates.for_send(request.tenant_id, ref.template_id, None, None)
        if version is None:
            return listing(items, category), f"listing: template {ref.template_id} not available"
        return renderer.render(version, request.channel.value, None, variables), f"template {ref.template_id}"
    except TemplateProblem as exc:
        return listing(items, category), f"listing: template {ref.template_id} failed: {exc.message}"[:300]


def deliver(routed: Routed, items: list[dict[str, Any]], rendered: Rendered, how: str, now: datetime) -> Routed:
    """The digest message routed as one delivery of ``rendered``; its 'routed' event names the
    messages it lists."""
    request = routed.request
    try:
        out = route_rendered(request, rendered, now)
    except ValidationError:  # the template made something too long: the listing always fits
        out = route_rendered(request, listing(items, request.category or "digest"), now)
        how = "listing: the template's output is too long"
    ref = request.digest
    assert ref is not None
    for event in out.events:
        if event.state is State.ROUTED:
            event.detail = {
                **(event.detail or {}),
                "digest": {
                    "rule_id": ref.rule_id,
                    "opened_by": ref.opened_by,
                    "count": len(items),
                    "message_ids": [i["message_id"] for i in items],
                    "rendered_with": how,
                },
            }
    return out
