"""Batch sends (issue 8, seed 004 §5.1.6): the body of ``POST /api/v1/messages/batch`` and the
pure part of accepting it — reading the recipient list item by item.

One content (direct, or one template) goes to up to ``HERALD_BATCH_MAX_ITEMS`` recipients. Each
item of ``recipients`` is an address or an object ``{"to", "template_vars", "locale"}``; an item
that cannot be sent is reported as ``{index, field, code, message}`` (``field`` is its JSON path,
e.g. ``recipients.3.to``) and the others go ahead. What is wrong with the body as a whole (no
recipients, too many, an unknown template, a bad schedule) refuses the whole batch instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, ValidationError, WithJsonSchema

from services.ingest.sends import LOCALE, content_mode_error, missing_variable
from shared.errors import ErrorCode, HeraldError
from shared.events import NO_NEWLINES, CallbackURL, Category, ContentType


class BatchItem(BaseModel):
    """A recipient given as an object (an item may also be just its address)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    to: EmailStr
    template_vars: dict[str, Any] | None = Field(
        default=None, description="merged over the batch's template_vars (template mode only)"
    )
    locale: str | None = Field(default=None, max_length=35, pattern=LOCALE, description="overrides the batch's")


# The items are read one by one by :func:`read_recipients` (one bad item must not refuse the
# batch); the docs show what one may be.
RawItems = Annotated[
    list[Any],
    WithJsonSchema(
        {
            "type": "array",
            "minItems": 1,
            "items": {"anyOf": [{"type": "string", "format": "email"}, BatchItem.model_json_schema()]},
        }
    ),
]


class BatchSendRequest(BaseModel):
    """Body of ``POST /api/v1/messages/batch``: the common fields of an email send, and
    ``recipients``."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    channel: Literal["email"] = Field(default="email", description="the channel of every item")
    recipients: RawItems = Field(
        description="addresses, or objects {to, template_vars, locale}; one message each",
        examples=[["alice@example.com", {"to": "bob@example.com", "template_vars": {"name": "Bob"}}]],
    )
    subject: str | None = Field(default=None, min_length=1, max_length=998, pattern=NO_NEWLINES)
    content: str | None = Field(default=None, min_length=1)
    content_type: ContentType = ContentType.HTML
    text_content: str | None = Field(default=None, min_length=1, description="plain-text alternative")
    from_name: str | None = Field(default=None, max_length=100, pattern=NO_NEWLINES)
    reply_to: EmailStr | None = None
    template_id: int | None = Field(default=None, ge=1)
    template_name: str | None = Field(default=None, min_length=1, max_length=100)
    template_version: int | None = Field(default=None, ge=1)
    template_vars: dict[str, Any] | None = Field(default=None, description="common to every item")
    locale: str | None = Field(default=None, max_length=35, pattern=LOCALE)
    attachment_ids: list[str] = Field(default_factory=list, max_length=20)
    category: Category | None = None
    callback_url: CallbackURL | None = Field(
        default=None, description="each item's status changes are POSTed here, signed with the tenant's signing "
        "secret (docs/callbacks.md)",
    )  # fmt: skip
    scheduled_time: str | None = Field(default=None, examples=["2026-12-24T09:00:00+08:00"])
    delay: str | int | None = Field(default=None, examples=["30m"])
    timezone: str | None = Field(default=None, max_length=64)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255, pattern=NO_NEWLINES)
    dedup: bool = Field(
        default=True,
        description="false: no content-fingerprint check against earlier sends, repeated addresses allowed",
    )

    @property
    def templated(self) -> bool:
        return self.template_id is not None or self.template_name is not None

    def mode_error(self) -> HeraldError | None:
        """As for a single send (seed 004 §3.4.5)."""
        return content_mode_error(self)


@dataclass(frozen=True, slots=True)
class Item:
    """A recipient that can be sent to: its index in ``recipients``, its address and, in
    template mode, its variables (the batch's merged with its own) and locale."""

    index: int
    to: str
    template_vars: dict[str, Any] | None = None
    locale: str | None = None


@dataclass(frozen=True, slots=True)
class ItemError:
    """Why one item was not accepted."""

    index: int
    field: str
    message: str
    code: ErrorCode = ErrorCode.INVALID_PARAMS
    to: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "field": self.field,
            "code": int(self.code),
            "message": self.message,
        }
        if self.to is not None:
            out["to"] = self.to
        return out


def read_recipients(
    raw: Sequence[Any],
    *,
    templated: bool,
    common_vars: dict[str, Any] | None,
    required_vars: Sequence[str] = (),
    locale: str | None = None,
    allow_repeats: bool = False,
) -> tuple[list[Item], list[ItemError]]:
    """Each item of ``recipients`` read on its own: the items to send and the errors of the
    others, both in index order. In template mode every declared variable must be there once
    the item's variables are merged over the batch's (2004 naming the first missing); an
    address given twice is refused the second time (1006) unless ``allow_repeats``."""
    items: list[Item] = []
    errors: list[ItemError] = []
    seen: dict[str, int] = {}
    for index, value in enumerate(raw):
        found = _read_item(
            index, value, templated=templated, common_vars=common_vars, required_vars=required_vars, locale=locale
        )
        if isinstance(found, ItemError):
            errors.append(found)
            continue
        same = found.to.casefold()
        if not allow_repeats and same in seen:
            errors.append(
                ItemError(
                    index,
                    _to_path(index, value),
                    f"{found.to} is already recipients.{seen[same]} of this batch",
                    ErrorCode.DUPLICATE_REQUEST,
                    found.to,
                )
            )
            continue
        seen.setdefault(same, index)
        items.append(found)
    return items, errors


def _to_path(index: int, value: Any) -> str:
    return f"recipients.{index}.to" if isinstance(value, dict) else f"recipients.{index}"


def _read_item(
    index: int,
    value: Any,
    *,
    templated: bool,
    common_vars: dict[str, Any] | None,
    required_vars: Sequence[str],
    locale: str | None,
) -> Item | ItemError:
    path = f"recipients.{index}"
    if not isinstance(value, str | dict):
        return ItemError(index, path, "expected an address or an object {to, template_vars, locale}")
    try:
        item = BatchItem.model_validate(value if isinstance(value, dict) else {"to": value})
    except ValidationError as exc:
        # An unknown field is named before anything else (it is often a misspelt one).
        first = min(exc.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
        where = ".".join([path, *map(str, first["loc"])]) if isinstance(value, dict) else path
        echo = value.get("to") if isinstance(value, dict) else value
        return ItemError(index, where, first["msg"], to=echo[:320] if isinstance(echo, str) else None)
    if not templated:
        for name in ("template_vars", "locale"):
            if getattr(item, name) is not None:
                return ItemError(index, f"{path}.{name}", "only with template_id or template_name")
        return Item(index, item.to)
    merged = {**(common_vars or {}), **(item.template_vars or {})}
    if (missing := missing_variable(required_vars, merged)) is not None:
        name, message = missing
        return ItemError(index, f"{path}.template_vars.{name}", message, ErrorCode.TEMPLATE_RENDER_FAILED, item.to)
    return Item(index, item.to, merged, item.locale or locale)


def refusal_code(errors: Sequence[ItemError]) -> ErrorCode:
    """The code of a batch none of whose items could be accepted: the items' code when they all
    share one (every item a duplicate → 1006, every item missing a variable → 2004), else 1001."""
    codes = {e.code for e in errors}
    return codes.pop() if len(codes) == 1 else ErrorCode.INVALID_PARAMS


def item_hash(batch_hash: str, index: int) -> str:
    """What an item's record compares when the batch's idempotency key comes back: the batch's
    request hash and the item's place in it."""
    return hashlib.sha256(f"{batch_hash}:{index}".encode()).hexdigest()


def item_key(batch_id: str, index: int) -> str:
    """The idempotency key of an item of a keyed batch: a retry that takes over the batch
    (after a 503) finds the items already recorded and does not record them twice."""
    return f"{batch_id}:{index}"
