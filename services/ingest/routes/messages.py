"""Sending and querying messages (seed 004 §3.4.5–§3.4.8)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from time import monotonic
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import AliasChoices, BaseModel, ConfigDict, Discriminator, EmailStr, Field, Tag

from services.ingest import audit, scheduled
from services.ingest.attachments import resolve_attachments
from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.http import envelope, iso_z, json_body_schema, parse_body
from services.ingest.recipients import load_profile, without_profiles
from services.ingest.routes.templates import resolve as resolve_template
from services.ingest.routes.webhooks import check_message_callback
from services.ingest.sends import (
    LOCALE,
    accept,
    check_route,
    content_mode_error,
    due_time,
    missing_variable,
    open_send,
    replay_keyed,
)
from shared.channels import AddressError, check_address
from shared.channels import spec as channel_spec
from shared.errors import ErrorCode, HeraldError
from shared.events import (
    NO_NEWLINES,
    CallbackURL,
    Card,
    Category,
    Channel,
    ContentType,
    EmailOptions,
    Priority,
    RecipientProfile,
    RequestV1,
    State,
    Status,
    TemplateRef,
    UserId,
)
from shared.ids import new_message_id
from shared.kafka import Trace

router = APIRouter(prefix="/api/v1/messages", tags=["messages"])


class EmailSendRequest(BaseModel):
    """Body of ``POST /api/v1/messages/email/send`` (seed 004 §3.4.5)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, populate_by_name=True)

    to: EmailStr | list[EmailStr] = Field(
        description="One address or a list of addresses", examples=["receiver@example.com"]
    )
    cc: list[EmailStr] = Field(default_factory=list, max_length=100)
    bcc: list[EmailStr] = Field(default_factory=list, max_length=100)
    subject: str | None = Field(default=None, min_length=1, max_length=998, pattern=NO_NEWLINES)
    content: str | None = Field(default=None, min_length=1)
    content_type: Literal[ContentType.HTML, ContentType.TEXT] = ContentType.HTML
    text_content: str | None = Field(
        default=None, min_length=1, description="Plain-text alternative of an HTML body; derived when absent"
    )
    from_name: str | None = Field(default=None, max_length=100, pattern=NO_NEWLINES, description="Sender display name")
    reply_to: EmailStr | None = None
    template_id: int | None = Field(default=None, ge=1)
    template_name: str | None = Field(default=None, min_length=1, max_length=100)
    template_version: int | None = Field(default=None, ge=1, description="pin a version; default the current one")
    template_vars: dict[str, Any] | None = None
    locale: str | None = Field(
        default=None, max_length=35, pattern=LOCALE, description="e.g. zh-CN"
    )
    attachment_ids: list[str] = Field(default_factory=list, max_length=20)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255, pattern=NO_NEWLINES)
    dedup: bool = Field(default=True, description="false: skip the content-fingerprint duplicate check")
    async_: bool = Field(default=True, alias="async")
    scheduled_time: str | None = Field(
        default=None,
        description="send at this time: ISO 8601 with a zone, or 'YYYY-MM-DD HH:MM:SS' read in `timezone`",
        examples=["2026-12-24T09:00:00+08:00"],
    )
    delay: str | int | None = Field(
        default=None, description="send after this long: 30m, 2h, 3d, 1h30m, PT30M or seconds", examples=["30m"]
    )
    timezone: str | None = Field(
        default=None, max_length=64, description="IANA zone of a scheduled_time without one (default: the service's)"
    )
    category: Category | None = Field(
        default=None, description="kind of message, for frequency caps and digests", examples=["marketing"]
    )
    priority: Priority = Field(default="normal", description="urgent messages go through quiet hours")
    callback_url: CallbackURL | None = Field(
        default=None, description="status changes of this message are POSTed here, signed with the tenant's signing "
        "secret (POST /api/v1/webhooks/signing-secret; docs/callbacks.md)", examples=["https://example.com/hooks/herald"],
    )  # fmt: skip

    def mode_error(self) -> HeraldError | None:
        return content_mode_error(self)

    @property
    def to_list(self) -> list[str]:
        return [self.to] if isinstance(self.to, str) else list(self.to)


class EmailFields(BaseModel):
    """Email-only fields of a generic send (attachments: ``/messages/email/send``)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    cc: list[EmailStr] = Field(default_factory=list, max_length=100)
    bcc: list[EmailStr] = Field(default_factory=list, max_length=100)
    from_name: str | None = Field(default=None, max_length=100, pattern=NO_NEWLINES)
    reply_to: EmailStr | None = None
    text_content: str | None = Field(default=None, min_length=1)


_Recipient = Annotated[str, Field(min_length=1, max_length=320)]


class UserRef(BaseModel):
    """``to`` of a send to a user: their profile (``/api/v1/recipients``) gives the address."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    user_id: UserId


def _to_kind(value: Any) -> str:
    # The tags are names the error handler leaves out of field paths: errors name `to.user_id`,
    # `to.1` or `to`, never the branch of the union.
    return "dict" if isinstance(value, dict | UserRef) else "list" if isinstance(value, list) else "str"


_To = Annotated[
    Annotated[_Recipient, Tag("str")] | Annotated[list[_Recipient], Tag("list")] | Annotated[UserRef, Tag("dict")],
    Discriminator(_to_kind),
]


class SendRequest(BaseModel):
    """Body of ``POST /api/v1/messages/send``: one message on any channel."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, populate_by_name=True)

    channel: Channel | None = Field(
        default=None,
        description="the channel; may be left out when `to` names a user: the tenant's routing rules choose (a send "
        "no rule matches, or whose rule gives only channels the profile has no address on, is refused)",
        examples=["sms"],
    )
    to: _To = Field(
        description="the recipient in the channel's form (GET /api/v1/providers/catalogue): an E.164 number, a chat "
        "id, a device token; on bot and webhook channels the configured provider's name. Email: up to "
        'max_recipients addresses; other channels: one. Or a user: {"user_id": "u1"} (their profile\'s address '
        "on `channel`, or without `channel` the channels the routing rules choose)",
        examples=["+8613800138000"],
    )
    provider: str | None = Field(
        default=None, max_length=64, description="a configured provider's name; default: the first by priority"
    )
    subject: str | None = Field(
        default=None,
        min_length=1,
        max_length=998,
        pattern=NO_NEWLINES,
        validation_alias=AliasChoices("subject", "title"),
        description="subject (email) or title (push, IM); alias title",
    )
    content: str | None = Field(default=None, min_length=1)
    content_type: ContentType | None = Field(default=None, description="default: html for email, text otherwise")
    card: Card | None = Field(default=None, description="with content_type card: rendered natively by IM channels")
    options: dict[str, Any] | None = Field(
        default=None, description="the channel's own fields (SMS template_code and params, WeChat MP data, ...)"
    )
    email: EmailFields | None = None
    template_id: int | None = Field(default=None, ge=1)
    template_name: str | None = Field(default=None, min_length=1, max_length=100)
    template_version: int | None = Field(default=None, ge=1)
    template_vars: dict[str, Any] | None = None
    locale: str | None = Field(default=None, max_length=35, pattern=LOCALE)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255, pattern=NO_NEWLINES)
    dedup: bool = True
    scheduled_time: str | None = None
    delay: str | int | None = None
    timezone: str | None = Field(default=None, max_length=64)
    category: Category | None = None
    priority: Priority = Field(default="normal", description="urgent, high, normal or low; urgent ignores quiet hours")
    callback_url: CallbackURL | None = Field(
        default=None, description="status changes of this message are POSTed here, signed with the tenant's signing "
        "secret (POST /api/v1/webhooks/signing-secret; docs/callbacks.md)", examples=["https://example.com/hooks/herald"],
    )  # fmt: skip

    @property
    def user(self) -> UserRef | None:
        return self.to if isinstance(self.to, UserRef) else None

    @property
    def to_list(self) -> list[str]:
        if isinstance(self.to, UserRef):
            return []
        return [self.to] if isinstance(self.to, str) else list(self.to)

    @property
    def text_content(self) -> str | None:  # what content_mode_error reads
        return self.email.text_content if self.email else None


class BatchQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message_ids: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(min_length=1, max_length=100)


_DETAIL_COLUMNS = """message_id, tenant_id, message_type, recipient, recipients, subject,
    content_type, status, state, attempt, retry_count, error_code, error_message,
    idempotency_key, request_id, sender_info, template_id, template_version, template_vars, locale,
    category, batch_id, scheduled_at, created_at, updated_at, sent_at"""


_TIMES = ("created_at", "updated_at", "sent_at", "scheduled_at")


def _record(row: Any) -> dict[str, Any]:
    out = {k: row[k] for k in row.keys() if k not in _TIMES}
    for k in _TIMES:
        if k in row.keys():
            out[k] = iso_z(row[k])
    return out


@router.post(
    "/email/send",
    status_code=202,
    summary="Send an email",
    openapi_extra=json_body_schema(EmailSendRequest),
)
async def send_email(request: Request):
    """Accept an email for delivery; answers 202 with its ``message_id`` once it is recorded
    and queued (or scheduled, with ``scheduled_time`` or ``delay``). Query its progress with
    ``GET /api/v1/messages/{message_id}``."""
    return await _send_email(request, schedule_required=False)


@router.post(
    "/email/send/scheduled",
    status_code=202,
    summary="Schedule an email (seed 004 §4.2.1)",
    openapi_extra=json_body_schema(EmailSendRequest),
)
async def send_email_scheduled(request: Request):
    """Like ``/email/send``, with ``scheduled_time`` (or ``delay``) required."""
    return await _send_email(request, schedule_required=True)


@router.post(
    "/send", status_code=202, summary="Send a message on any channel", openapi_extra=json_body_schema(SendRequest)
)
async def send(request: Request):
    """Accept one message for delivery on ``channel`` through the tenant's configured providers
    (``/api/v1/providers``); 202 with its ``message_id``. Content or a template (with a variant
    for the channel); scheduling, idempotency, dedup and categories as for email."""
    tenant_of(request, Scope.SEND)  # the scope before the body: a key without it learns nothing more
    return await _send(request, await parse_body(request, SendRequest))


class WeChatMpSendRequest(BaseModel):
    """Body of seed 004 §4.2.3 ``POST /api/v1/messages/wechat-mp/send``: a template message to
    a follower of the Official Account."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    openid: str = Field(min_length=1, max_length=64, description="the follower's OpenID")
    template_id: str = Field(min_length=1, max_length=128, description="the template's id in the WeChat MP admin")
    data: dict[str, Any] = Field(description='{"keyword1": {"value": "...", "color": "#173177"}, ...}')
    url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://")
    provider: str | None = Field(default=None, max_length=64, description="a configured wechat_mp provider's name")
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255, pattern=NO_NEWLINES)
    category: Category | None = None


@router.post(
    "/wechat-mp/send",
    status_code=202,
    summary="Send a WeChat Official Account template message (seed 004 §4.2.3)",
    openapi_extra=json_body_schema(WeChatMpSendRequest),
)
async def send_wechat_mp(request: Request):
    """The seed's body as a ``wechat_mp`` message of the generic send: the template's fields in
    ``options``, their values (in order) as the message's recorded content."""
    tenant_of(request, Scope.SEND)
    body = await parse_body(request, WeChatMpSendRequest)
    values = [str(v.get("value", "")) if isinstance(v, dict) else str(v) for v in body.data.values()]
    generic = SendRequest(
        channel=Channel.WECHAT_MP,
        to=body.openid,
        provider=body.provider,
        content="\n".join(v for v in values if v) or body.template_id,
        options={"template_id": body.template_id, "data": body.data, **({"url": body.url} if body.url else {})},
        idempotency_key=body.idempotency_key,
        category=body.category,
    )
    try:
        return await _send(request, generic)
    except HeraldError as exc:  # name the seed's fields, not the generic send's
        exc.field = {"to": "openid", "provider": "provider"}.get(exc.field or "", exc.field)
        raise


async def _send(request: Request, body: SendRequest):
    services, tenant_id = services_of(request), tenant_of(request, Scope.SEND)
    settings = services.settings
    user = body.user
    if body.channel is None and user is None:
        raise HeraldError(
            ErrorCode.INVALID_PARAMS, 'field required unless `to` names a user ({"user_id": ...})', field="channel"
        )
    channel = body.channel
    templated = body.template_id is not None or body.template_name is not None
    if (error := _generic_mode_error(body, channel, templated)) is not None:
        raise error
    opening = await open_send(services, request, tenant_id, body, required=False)
    if opening.replayed is not None:
        return opening.replayed
    key, digest, scheduled_at = opening.key, opening.digest, opening.scheduled_at
    if body.callback_url is not None:
        await check_message_callback(services, tenant_id, body.callback_url)
    profile: RecipientProfile | None = None
    count_as: str | None = None  # without a channel: the quota the routing rules make it count against
    if user is not None:
        profile = await _recipient(services, tenant_id, user.user_id, channel)
        if channel is None:  # refused now if it can never be routed, before a fingerprint or quota is taken
            try:
                count_as = await check_route(services, tenant_id, profile, priority=body.priority,
                                             category=body.category, scheduled_at=scheduled_at,
                                             now=datetime.now(UTC))  # fmt: skip
            except HeraldError as exc:
                refused = exc.code is ErrorCode.INVALID_PARAMS  # not a 503: the database is away
                if refused and (replayed := await replay_keyed(services, tenant_id, key, digest)) is not None:
                    return replayed  # accepted before the rules changed: the first answer again
                raise
        # With a channel, the profile's address on it; without, the router's rules choose
        # channels and take the addresses from the snapshot the request carries.
        to = [profile.addresses[channel]] if channel is not None else []
        extra = len(body.email.cc) + len(body.email.bcc) if body.email else 0
        if len(to) + extra > settings.max_recipients:
            raise HeraldError(ErrorCode.INVALID_PARAMS, f"at most {settings.max_recipients} recipients in to, cc "
                              "and bcc", field="email")  # fmt: skip
    else:
        assert channel is not None
        to = _addresses(body, channel, settings.max_recipients)
    if channel is not None and channel is not Channel.EMAIL:
        await _provider_configured(services.pool, tenant_id, channel, body.provider, to[0])
    template = await _template_ref(request, tenant_id, body, channel.value if channel else None) if templated else None
    now = datetime.now(UTC)
    trace = Trace(request.state.request_id, request.state.traceparent)
    email = body.email
    req = RequestV1(
        message_id=new_message_id(now),
        tenant_id=tenant_id,
        channel=channel,
        to=to,
        subject=body.subject,
        content=body.content or "",
        content_type=body.content_type or (ContentType.HTML if channel is Channel.EMAIL else ContentType.TEXT),
        template=template,
        email=EmailOptions(cc=email.cc, bcc=email.bcc, from_name=email.from_name, reply_to=email.reply_to,
                           text=email.text_content) if email else None,  # fmt: skip
        card=body.card,
        options=body.options,
        provider=body.provider,
        idempotency_key=key,
        request_id=trace.request_id,
        accepted_at=now,
        recorded=True,
        scheduled_at=scheduled_at,
        category=body.category,
        priority=body.priority,
        recipient=profile,
        callback_url=body.callback_url,
    )
    recipients = {"to": req.to, **({"cc": list(email.cc), "bcc": list(email.bcc)} if email else {})}
    if user is not None:
        recipients["user_id"] = [user.user_id]
    return await accept(services, tenant_id, req, recipients, trace=trace, now=now, key=key, digest=digest,
                        dedup=body.dedup, count_as=count_as)  # fmt: skip


async def _recipient(services: Any, tenant_id: str, user_id: str, channel: Channel | None) -> RecipientProfile:
    """The tenant's profile of the user a send names, with an address on ``channel`` when one is
    given; else the send is refused (nothing recorded) naming ``to.user_id``."""
    profile = await load_profile(services.pool, tenant_id, user_id, services.settings.record_timeout_s)
    if profile is None:
        raise HeraldError(ErrorCode.NOT_FOUND, f"no recipient {user_id!r} (create their profile with "
                          "PUT /api/v1/recipients/{user_id})", field="to.user_id")  # fmt: skip
    if channel is not None and channel not in profile.addresses:
        raise HeraldError(ErrorCode.INVALID_PARAMS, f"the profile of {user_id!r} has no {channel.value} address "
                          "(add one to the profile, or leave channel out to let the routing rules choose)",
                          field="to.user_id")  # fmt: skip
    return profile


def _generic_mode_error(body: SendRequest, channel: Channel | None, templated: bool) -> HeraldError | None:
    """Email follows seed 004's rules (subject and content, or a template); other channels
    need content, a card, or a template, and a content type the channel takes. Without a channel
    (a send to a user the routing rules route) the channel's own limits are checked by the router."""
    if channel is None:
        if body.email is not None:
            return HeraldError(ErrorCode.INVALID_PARAMS, "only with channel email", field="email")
        if body.provider is not None:  # the routing chooses channels and their providers
            return HeraldError(ErrorCode.INVALID_PARAMS, "only with channel", field="provider")
        return _content_mode_error(body, templated) or _card_error(body)
    if channel is Channel.EMAIL:
        if (error := content_mode_error(body)) is not None:
            return error
    else:
        if body.email is not None:
            return HeraldError(ErrorCode.INVALID_PARAMS, f"only for email, not {channel.value}", field="email")
        if (error := _content_mode_error(body, templated)) is not None:
            return error
    limits = channel_spec(channel)
    if body.content is not None and len(body.content) > limits.content_max:
        return HeraldError(ErrorCode.INVALID_PARAMS, f"at most {limits.content_max} characters on {channel.value}",
                           field="content")  # fmt: skip
    if body.subject is not None and len(body.subject) > limits.title_max:
        return HeraldError(ErrorCode.INVALID_PARAMS, f"at most {limits.title_max} characters on {channel.value}",
                           field="subject")  # fmt: skip
    formats = limits.formats
    content_type = body.content_type or (ContentType.CARD if body.card is not None and body.content is None else None)
    if content_type is not None and content_type.value not in formats:
        return HeraldError(ErrorCode.INVALID_PARAMS, f"{channel.value} takes {', '.join(sorted(formats))}",
                           field="content_type")  # fmt: skip
    return _card_error(body)


def _card_error(body: SendRequest) -> HeraldError | None:
    """A card goes with ``content_type: card`` (implied when a card comes without content)."""
    content_type = body.content_type or (ContentType.CARD if body.card is not None and body.content is None else None)
    if content_type is ContentType.CARD and body.card is None:
        return HeraldError(ErrorCode.INVALID_PARAMS, "field required with content_type card", field="card")
    if body.card is not None and content_type is not ContentType.CARD:
        return HeraldError(ErrorCode.INVALID_PARAMS, 'only with "content_type": "card"', field="card")
    if body.content_type is None and content_type is ContentType.CARD:
        body.content_type = ContentType.CARD
    return None


def _content_mode_error(body: SendRequest, templated: bool) -> HeraldError | None:
    """Channels other than email: content, a card or a template, one of them."""
    if body.template_id is not None and body.template_name is not None:
        return HeraldError(
            ErrorCode.INVALID_PARAMS, "give template_id or template_name, not both", field="template_name"
        )
    if templated and body.content is not None:
        return HeraldError(ErrorCode.INVALID_PARAMS, "content and template_id are mutually exclusive",
                           field="content")  # fmt: skip
    if not templated:
        if body.content is None and body.card is None:
            if body.content_type is ContentType.CARD:
                return HeraldError(ErrorCode.INVALID_PARAMS, "field required with content_type card", field="card")
            return HeraldError(ErrorCode.INVALID_PARAMS, "field required without template_id or card",
                               field="content")  # fmt: skip
        for name in ("template_vars", "template_version", "locale"):
            if getattr(body, name) is not None:
                return HeraldError(ErrorCode.INVALID_PARAMS, "only with template_id or template_name", field=name)
    return None


def _addresses(body: SendRequest, channel: Channel, max_recipients: int) -> list[str]:
    """The recipients in the channel's form (normalised), or 1001 naming the first bad one."""
    to = body.to_list
    if not to:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "at least one recipient", field="to")
    if channel is Channel.EMAIL:
        extra = len(body.email.cc) + len(body.email.bcc) if body.email else 0
        if len(to) + extra > max_recipients:
            raise HeraldError(ErrorCode.INVALID_PARAMS, f"at most {max_recipients} recipients in to, cc and bcc",
                              field="to")  # fmt: skip
    elif len(to) > 1:
        raise HeraldError(ErrorCode.INVALID_PARAMS, f"one recipient per message on {channel.value}", field="to")
    out = []
    for i, address in enumerate(to):
        try:
            out.append(check_address(channel, address))
        except AddressError as exc:
            raise HeraldError(ErrorCode.INVALID_PARAMS, str(exc), field="to" if len(to) == 1 else f"to.{i}") from None
    return out


# A send checks that a provider could deliver it; a yes is remembered this long, so a stream of
# sends costs one query per tenant, channel and provider every few seconds, not one per send (a
# provider deleted meanwhile fails its messages with 2011 at the sender). A no is never kept: a
# provider just configured is found at once.
_CONFIGURED_TTL_S = 10.0
_CONFIGURED: dict[tuple[str, str, str | None], float] = {}


async def _provider_configured(pool: Any, tenant_id: str, channel: Channel, name: str | None, to: str) -> None:
    """A message nobody could deliver is refused now (2011), not failed later: the provider
    the send names (on bot and webhook channels, ``to``) or, else, any, must be configured
    and active."""
    endpoint = channel_spec(channel).endpoint
    wanted, field = (to, "to") if endpoint else (name, "provider")
    known = (tenant_id, channel.value, wanted)
    if _CONFIGURED.get(known, 0.0) > monotonic():
        return
    found = await pool.fetchval(
        """SELECT count(*) FROM providers WHERE tenant_id = $1 AND channel = $2 AND is_active
           AND deleted_at IS NULL AND ($3::text IS NULL OR name = $3)""",
        tenant_id,
        channel.value,
        wanted,
    )
    if found:
        if len(_CONFIGURED) > 10_000:
            _CONFIGURED.clear()
        _CONFIGURED[known] = monotonic() + _CONFIGURED_TTL_S
        return
    what = f"no active {channel.value} provider" + (f" named {wanted!r}" if wanted else "")
    raise HeraldError(ErrorCode.PROVIDER_NOT_CONFIGURED, f"{what} (configure one with POST /api/v1/providers)",
                      field=field if wanted else "channel")  # fmt: skip


async def _send_email(request: Request, *, schedule_required: bool):
    services, tenant_id = services_of(request), tenant_of(request, Scope.SEND)
    body = await parse_body(request, EmailSendRequest)
    settings = services.settings
    if (error := body.mode_error()) is not None:
        raise error
    opening = await open_send(services, request, tenant_id, body, required=schedule_required)
    if opening.replayed is not None:
        return opening.replayed
    key, digest, scheduled_at = opening.key, opening.digest, opening.scheduled_at
    if body.callback_url is not None:
        await check_message_callback(services, tenant_id, body.callback_url)
    to = body.to_list
    if not to:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "at least one recipient", field="to")
    if len(to) + len(body.cc) + len(body.bcc) > settings.max_recipients:
        raise HeraldError(
            ErrorCode.INVALID_PARAMS,
            f"at most {settings.max_recipients} recipients in to, cc and bcc together",
            field="to",
        )
    template = None
    if body.template_id is not None or body.template_name is not None:
        template = await _template_ref(request, tenant_id, body)
    attachments = (
        await resolve_attachments(
            services.pool, tenant_id, body.attachment_ids, datetime.now(UTC), settings.attachments_total_max_bytes
        )
        if body.attachment_ids
        else None
    )
    now = datetime.now(UTC)
    trace = Trace(request.state.request_id, request.state.traceparent)
    req = RequestV1(
        message_id=new_message_id(now),
        tenant_id=tenant_id,
        channel=Channel.EMAIL,
        to=to,
        subject=body.subject,
        content=body.content or "",
        content_type=body.content_type,
        template=template,
        email=EmailOptions(
            cc=body.cc,
            bcc=body.bcc,
            from_name=body.from_name,
            reply_to=body.reply_to,
            text=body.text_content,
            attachments=attachments,
        ),
        idempotency_key=key,
        request_id=trace.request_id,
        accepted_at=now,
        recorded=True,
        scheduled_at=scheduled_at,
        category=body.category,
        priority=body.priority,
        callback_url=body.callback_url,
    )
    recipients = {"to": req.to, "cc": list(body.cc), "bcc": list(body.bcc)}
    return await accept(services, tenant_id, req, recipients, trace=trace, now=now, key=key, digest=digest,
                        dedup=body.dedup)  # fmt: skip


async def _template_ref(request: Request, tenant_id: str, body: Any, channel: str | None = "email") -> TemplateRef:
    """The template version this send uses, pinned; its declared variables must all be given
    (2004 naming the first one missing) and it needs a variant for the channel (2003; without a
    channel the router takes the variant of the channel it routes to). Answered from ingest's
    template store."""
    version = await resolve_template(request, tenant_id, body.template_id, body.template_name, body.template_version)
    variables = body.template_vars or {}
    if (missing := missing_variable(version.variables, variables)) is not None:
        raise HeraldError(ErrorCode.TEMPLATE_RENDER_FAILED, missing[1], field=f"template_vars.{missing[0]}")
    if channel is not None and not any(v.channel == channel for v in version.variants):
        raise HeraldError(ErrorCode.TEMPLATE_NOT_FOUND, f"template {version.template_id} has no {channel} variant",
                          field="template_id")  # fmt: skip
    return TemplateRef(template_id=version.template_id, version=version.version, vars=variables, locale=body.locale)


class Reschedule(BaseModel):
    """Body of ``POST /api/v1/messages/{message_id}/reschedule``: the new time."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    scheduled_time: str | None = Field(default=None, examples=["2026-12-24T09:00:00+08:00"])
    delay: str | int | None = Field(default=None, examples=["2h"])
    timezone: str | None = Field(default=None, max_length=64)


async def _not_pending(conn: Any, tenant_id: str, message_id: str, action: str) -> HeraldError:
    """Why a message cannot be cancelled or rescheduled: unknown (2008), a digest (1009), or past
    its release (1009)."""
    row = await conn.fetchrow(
        """SELECT m.state, t.reason FROM message_records m
           LEFT JOIN scheduled_tasks t ON t.message_id = m.message_id AND t.status = 'pending'
           WHERE m.tenant_id=$1 AND m.message_id=$2""",
        tenant_id,
        message_id,
    )
    if row is None:
        return HeraldError(ErrorCode.MESSAGE_NOT_FOUND, f"message {message_id} not found", field="message_id")
    state = row["state"]
    if row["reason"] == "digest":
        return HeraldError(
            ErrorCode.STATE_CONFLICT,
            f"message {message_id} is a digest waiting for its window: it cannot be {action} "
            "(its messages are already in it; delete the digest rule to stop new ones)",
            field="message_id",
        )
    return HeraldError(
        ErrorCode.STATE_CONFLICT,
        f"message {message_id} is {state}: only a scheduled message not yet released can be {action}",
        field="message_id",
    )


@router.get("/scheduled", summary="Messages waiting for their scheduled time")
async def list_scheduled(
    request: Request,
    before: str | None = Query(default=None, description="due before this ISO 8601 time"),
    after: str | None = Query(default=None, description="due at or after this ISO 8601 time"),
    reason: Literal["scheduled", "deferred", "digest"] | None = Query(default=None),
    page: int = Query(default=1, ge=1, le=100_000),
    page_size: int = Query(default=20, ge=1, le=100),
):
    """Pending scheduled messages of the caller's tenant, soonest first (``reason``: asked for a
    time, deferred by a frequency cap, or a digest waiting for its window)."""
    services, tenant_id = services_of(request), tenant_of(request, Scope.READ)
    start = _parse_bound(after, "after", end=False)
    end = _parse_bound(before, "before", end=False)
    where = (
        "t.tenant_id = $1 AND t.status = 'pending' AND ($2::timestamptz IS NULL OR t.scheduled_time >= $2)"
        " AND ($3::timestamptz IS NULL OR t.scheduled_time < $3) AND ($4::text IS NULL OR t.reason = $4)"
    )
    args = [tenant_id, start, end, reason]
    async with services.pool.acquire() as conn:
        total = await conn.fetchval(f"SELECT count(*) FROM scheduled_tasks t WHERE {where}", *args)
        rows = await conn.fetch(
            f"""SELECT m.message_id, m.message_type, m.recipient, m.subject, m.category, m.batch_id,
                       t.scheduled_time AS scheduled_at, t.reason, m.created_at
                FROM scheduled_tasks t
                JOIN message_records m ON m.message_id = t.message_id AND m.tenant_id = t.tenant_id
                WHERE {where}
                ORDER BY t.scheduled_time, t.id LIMIT $5 OFFSET $6""",
            *args,
            page_size,
            (page - 1) * page_size,
        )
    records = []
    for r in rows:
        item = _record(r)
        item["scheduled_at"] = iso_z(r["scheduled_at"])
        records.append(item)
    return envelope({"total": total, "page": page, "page_size": page_size, "records": records})


@router.post("/{message_id}/cancel", summary="Cancel a scheduled message before it is released")
async def cancel_message(message_id: str, request: Request):
    """A scheduled message not yet released is cancelled and never sent; one already released
    (or never scheduled) answers 409 / 1009."""
    services, tenant_id = services_of(request), tenant_of(request, Scope.SEND)
    principal = request.scope["state"]["principal"]
    async with services.pool.acquire() as conn, conn.transaction():
        cancelled = await scheduled.cancel(
            conn, tenant_id, principal.actor, message_ids=[message_id], statistics=services.settings.stats_backend
        )
        if not cancelled:
            raise await _not_pending(conn, tenant_id, message_id, "cancelled")
        await audit.record(conn, request, "message.cancel", "message", message_id)
    await scheduled.give_back_quota(services.quotas, tenant_id, cancelled)
    return envelope({"message_id": message_id, "status": Status.FAILED.value, "state": State.CANCELLED.value})


@router.post(
    "/{message_id}/reschedule",
    summary="Move a scheduled message to another time",
    openapi_extra=json_body_schema(Reschedule),
)
async def reschedule_message(message_id: str, request: Request):
    """A new ``scheduled_time`` or ``delay`` (from now) for a scheduled message not yet released."""
    services, tenant_id = services_of(request), tenant_of(request, Scope.SEND)
    body = await parse_body(request, Reschedule)
    when = due_time(services.settings, body.scheduled_time, body.delay, body.timezone, datetime.now(UTC),
                    required=True)  # fmt: skip
    assert when is not None
    async with services.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(scheduled.RESCHEDULE, tenant_id, message_id, when, when.isoformat())
        if row is None:
            raise await _not_pending(conn, tenant_id, message_id, "rescheduled")
        await audit.record(conn, request, "message.reschedule", "message", message_id,
                           {"scheduled_at": when.isoformat()})  # fmt: skip
        await conn.execute("SELECT pg_notify('herald_schedule', '')")
    return envelope({"message_id": message_id, "state": row["state"], "scheduled_at": iso_z(row["scheduled_at"])})


@router.get("/{message_id}", summary="One message's status")
async def get_message(
    message_id: str,
    request: Request,
):
    services, tenant_id = services_of(request), tenant_of(request, Scope.READ)
    row = await services.pool.fetchrow(
        f"SELECT {_DETAIL_COLUMNS} FROM message_records WHERE tenant_id=$1 AND message_id=$2",
        tenant_id,
        message_id,
    )
    if row is None:
        raise HeraldError(ErrorCode.MESSAGE_NOT_FOUND, f"message {message_id} not found", field="message_id")
    out = _record(row)
    out["routing"] = _routing_of(await services.pool.fetch(_ROUTING_EVENTS, tenant_id, message_id))
    return envelope(out)


# The events that carry routing decisions: the router's (why these channels and providers, in
# this order) and the senders' hand-overs (a provider that failed over to the next, a channel whose
# rule's next channel took over).
_ROUTING_EVENTS = """
SELECT state, attempt, channel, provider, error_code, error, detail, occurred_at FROM message_events
WHERE tenant_id = $1 AND message_id = $2
  AND (state = 'routed' OR detail ? 'failover' OR detail ? 'fallback')
ORDER BY occurred_at, id
"""


def _routing_of(rows: list[Any]) -> dict[str, Any] | None:
    """The message's routing decision and what happened to it (smart routing, issue 10)."""
    decision: dict[str, Any] | None = None
    handovers: list[dict[str, Any]] = []
    for r in rows:
        detail = r["detail"] if isinstance(r["detail"], dict) else orjson.loads(r["detail"] or "{}")
        if r["state"] == State.ROUTED.value:
            decision = detail.get("routing") or decision
            continue
        item = {"at": iso_z(r["occurred_at"]), "attempt": r["attempt"], "channel": r["channel"],
                "provider": r["provider"], "provider_name": detail.get("provider_name"),
                "error_code": r["error_code"], "error": r["error"]}  # fmt: skip
        if detail.get("fallback"):
            item.update(kind="next_channel", to=detail["fallback"].get("to"), reason=detail["fallback"].get("reason"))
        else:
            item["kind"] = "next_provider"
        handovers.append(item)
    if decision is None and not handovers:
        return None
    return {"decision": decision, "handovers": handovers}


@router.get("/{message_id}/timeline", summary="Every event of one message, oldest first")
async def get_timeline(
    message_id: str,
    request: Request,
):
    services, tenant_id = services_of(request), tenant_of(request, Scope.READ)
    async with services.pool.acquire() as conn:
        exists = await conn.fetchval(
            "SELECT 1 FROM message_records WHERE tenant_id=$1 AND message_id=$2", tenant_id, message_id
        )
        if not exists:
            raise HeraldError(ErrorCode.MESSAGE_NOT_FOUND, f"message {message_id} not found", field="message_id")
        rows = await conn.fetch(
            """SELECT event_id, state, attempt, service, channel, provider, error_code, error,
                      detail, occurred_at
               FROM message_events WHERE tenant_id=$1 AND message_id=$2
               ORDER BY occurred_at, id""",
            tenant_id,
            message_id,
        )
    events = []
    for r in rows:
        item = {k: r[k] for k in r.keys() if k != "occurred_at"}
        item["occurred_at"] = iso_z(r["occurred_at"])
        # A message held for quiet hours: its 'scheduled' event holds the request, profile and all.
        item["detail"] = without_profiles(item["detail"])
        events.append(item)
    return envelope({"message_id": message_id, "events": events})


def status_column(status: str) -> str:
    """The column a ``status`` filter reads: a seed status (pending/sending/success/failed) or a
    lifecycle state; 1001 for anything else."""
    if status in Status._value2member_map_:
        return "status"
    if status in State._value2member_map_:
        return "state"
    raise HeraldError(
        ErrorCode.INVALID_PARAMS, "unknown status; use pending, sending, success, failed or a lifecycle state",
        field="status",
    )  # fmt: skip


def _parse_bound(value: str | None, field: str, *, end: bool) -> datetime | None:
    """A date (whole day, inclusive) or an ISO 8601 datetime; naive values are UTC."""
    if value is None or value == "":
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime.combine(day, time.min, tzinfo=UTC)
            return moment + timedelta(days=1) if end else moment
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise HeraldError(
            ErrorCode.INVALID_PARAMS, "expected YYYY-MM-DD or an ISO 8601 datetime", field=field
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@router.get("", summary="Message history with filters and pagination")
async def list_messages(
    request: Request,
    recipient: str | None = Query(default=None, max_length=320),
    status: str | None = Query(
        default=None, description="seed status (pending/sending/success/failed) or a lifecycle state"
    ),
    start_date: str | None = Query(default=None, description="YYYY-MM-DD or ISO 8601, inclusive"),
    end_date: str | None = Query(default=None, description="YYYY-MM-DD (whole day) or ISO 8601"),
    message_type: Channel | None = Query(default=None),
    category: str | None = Query(default=None, max_length=64),
    batch_id: str | None = Query(default=None, max_length=64),
    page: int = Query(default=1, ge=1, le=100_000),
    page_size: int = Query(default=20, ge=1, le=100),
):
    services, tenant_id = services_of(request), tenant_of(request, Scope.READ)
    where = ["tenant_id = $1"]
    args: list[Any] = [tenant_id]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if recipient:
        p = arg(recipient.strip())
        where.append(
            f"(recipient = {p} OR recipients @> jsonb_build_object('to', jsonb_build_array({p}::text))"
            f" OR recipients @> jsonb_build_object('cc', jsonb_build_array({p}::text))"
            # a send to a user (issue 10), whichever address it went to
            f" OR recipients @> jsonb_build_object('user_id', jsonb_build_array({p}::text)))"
        )
    if status:
        where.append(f"{status_column(status)} = {arg(status)}")
    start = _parse_bound(start_date, "start_date", end=False)
    end = _parse_bound(end_date, "end_date", end=True)
    if start and end and start >= end:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "must be after start_date", field="end_date")
    if start:
        where.append(f"created_at >= {arg(start)}")
    if end:
        op = "<" if end_date and len(end_date) == 10 else "<="
        where.append(f"created_at {op} {arg(end)}")
    if message_type:
        where.append(f"message_type = {arg(message_type)}")
    if category:
        where.append(f"category = {arg(category)}")
    if batch_id:
        where.append(f"batch_id = {arg(batch_id)}")
    clause = " AND ".join(where)
    offset = (page - 1) * page_size
    async with services.pool.acquire() as conn:
        total = await conn.fetchval(f"SELECT count(*) FROM message_records WHERE {clause}", *args)
        rows = await conn.fetch(
            f"""SELECT message_id, message_type, recipient, subject, status, state, retry_count,
                       error_message, created_at, sent_at
                FROM message_records WHERE {clause}
                ORDER BY created_at DESC, id DESC
                LIMIT {arg(page_size)} OFFSET {arg(offset)}""",
            *args,
        )
    return envelope({"total": total, "page": page, "page_size": page_size, "records": [_record(r) for r in rows]})


@router.post("/batch/query", summary="Status of up to 100 messages at once", openapi_extra=json_body_schema(BatchQuery))
async def batch_query(request: Request):
    """Answers the messages found, in the order asked; ids not found are listed in
    ``X-Not-Found`` count and simply absent from ``data`` (seed 004 §3.4.7)."""
    services, tenant_id = services_of(request), tenant_of(request, Scope.READ)
    body = await parse_body(request, BatchQuery)
    ids = list(dict.fromkeys(body.message_ids))
    rows = await services.pool.fetch(
        """SELECT message_id, message_type, recipient, subject, status, state, retry_count,
                  error_code, error_message, created_at, sent_at
           FROM message_records WHERE tenant_id=$1 AND message_id = ANY($2::text[])""",
        tenant_id,
        ids,
    )
    by_id = {r["message_id"]: _record(r) for r in rows}
    found = [by_id[i] for i in ids if i in by_id]
    return envelope(found, headers={"X-Not-Found": str(len(ids) - len(found))})
