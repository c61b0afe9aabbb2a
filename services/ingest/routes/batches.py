"""Batch sends and their progress (issue 8, seed 004 §5.1.6).

``POST /api/v1/messages/batch`` turns each valid item into one message, through the same
acceptance path as a single send (recorded in PostgreSQL — concurrent records go in a few
INSERTs — then published), all carrying one ``batch_id``. The batch is all or nothing for what
concerns the body (bad schedule, unknown template, over the limit, quota): nothing is recorded.
Items are not: the invalid ones are listed in ``errors`` and the rest go ahead.

``GET /api/v1/batches/{batch_id}`` counts the batch's messages by status and state.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from fastapi import APIRouter, Query, Request

from services.ingest import audit, scheduled
from services.ingest.attachments import resolve_attachments
from services.ingest.auth import Scope
from services.ingest.batches import (
    BatchSendRequest,
    Item,
    ItemError,
    item_hash,
    item_key,
    read_recipients,
    refusal_code,
)
from services.ingest.dedup import fingerprint_of, request_hash
from services.ingest.deps import Services, services_of, tenant_of
from services.ingest.http import JSONResponse, envelope, error_response, iso_z, json_body_schema, parse_body
from services.ingest.limits import QuotaExceeded
from services.ingest.publish import NewRecord, Outcome
from services.ingest.routes.messages import status_column
from services.ingest.routes.templates import resolve as resolve_template
from services.ingest.routes.webhooks import check_message_callback
from services.ingest.sends import due_time, idempotency_key
from shared.db import DB_UNAVAILABLE
from shared.errors import ErrorCode, HeraldError
from shared.events import Channel, EmailOptions, RequestV1, Status, TemplateRef
from shared.ids import new_batch_id, new_message_id
from shared.kafka import Trace
from shared.logging import log_event
from shared.metrics import BATCH_ITEMS

log = logging.getLogger("herald.ingest.batches")

router = APIRouter(tags=["batches"])

# A batch left 'accepting' this long was abandoned (its ingest stopped mid-way): a retry with its
# idempotency key may take it over.
_ABANDONED_S = 60

_BATCH_COLUMNS = """batch_id, channel, state, total, accepted, rejected, subject, template_id,
    template_version, category, scheduled_at, idempotency_key, request_id, created_at, updated_at"""


@router.post(
    "/api/v1/messages/batch",
    status_code=202,
    summary="Send one email to many recipients",
    openapi_extra=json_body_schema(BatchSendRequest),
)
async def send_batch(request: Request):
    """Accept one email content (direct or a template) for up to 1,000 recipients, each its own
    message with its own id; answers 202 with ``batch_id``, the message of each accepted item
    and the errors of the others. Follow it with ``GET /api/v1/batches/{batch_id}``."""
    services, tenant_id = services_of(request), tenant_of(request, Scope.SEND)
    body = await parse_body(request, BatchSendRequest)
    now = datetime.now(UTC)
    # A retry with its key replays the first answer before anything else is checked (a time it
    # named may have passed since).
    key = idempotency_key(body.idempotency_key, request)
    digest = request_hash(body.model_dump(mode="json"))
    store = _BatchStore(services.pool, services.settings.record_timeout_s, services.settings.idempotency_ttl_s)
    taking_over: str | None = None
    if key is not None and (earlier := await store.find(tenant_id, key)) is not None:
        if (answer := _answer_for_earlier(earlier, digest)) is not None:
            return answer
        taking_over = earlier.batch_id
    plan = await _plan(request, services, tenant_id, body, now)

    items, errors = read_recipients(
        body.recipients,
        templated=plan.template is not None,
        common_vars=body.template_vars,
        required_vars=plan.required_vars,
        locale=body.locale,
        allow_repeats=not body.dedup,
    )
    batch_id = taking_over or new_batch_id(now)
    trace = Trace(request.state.request_id, request.state.traceparent)
    records = _records(body, plan, items, tenant_id, batch_id, key, digest, trace, now)
    tenant = await services.tenants.get(tenant_id)
    claims: list[tuple[str, str]] = []
    if key is None and body.dedup and records:
        records, claims, duplicates = await _claim_fingerprints(services, records, tenant.dedup_window_s)
        errors = sorted([*errors, *duplicates], key=lambda e: e.index)
    if not records:
        BATCH_ITEMS.labels("rejected").inc(len(errors))
        return _refusal(errors)

    try:
        counted = await services.quotas.take(tenant_id, "email", tenant.quotas.get("email"), count=len(records))
    except QuotaExceeded as exc:
        await services.guard.release_many(claims)
        raise HeraldError(
            ErrorCode.QUOTA_EXCEEDED,
            f"the monthly email quota of {exc.limit} messages does not cover this batch's {len(records)} "
            f"({exc.used} used this month); nothing was sent; it renews at "
            f"{exc.resets_at.isoformat().replace('+00:00', 'Z')}",
        ) from None
    try:
        started = await store.start(
            batch_id,
            tenant_id,
            body,
            plan,
            len(records),
            errors,
            key,
            digest,
            trace.request_id,
            taking_over=taking_over,
        )
    except HeraldError:
        await _undo(services, tenant_id, counted, len(records), claims)
        raise
    if not started:  # a concurrent request with the same key got there first
        await _undo(services, tenant_id, counted, len(records), claims)
        earlier = await store.find(tenant_id, key or "")
        if earlier is not None and (answer := _answer_for_earlier(earlier, digest)) is not None:
            return answer
        return _in_progress(batch_id)

    outcomes = await _accept_all(services, [p.record for p in records], trace, services.settings.record_batch_max)
    return await _settle(services, store, body, plan, batch_id, key, records, outcomes, errors, claims, counted)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the body settles for every item: when, with which template, which attachments."""

    scheduled_at: datetime | None
    template: TemplateRef | None  # without variables: each item brings its own
    required_vars: list[str]
    attachments: list | None


async def _plan(request: Request, services: Services, tenant_id: str, body: BatchSendRequest, now: datetime) -> _Plan:
    """The checks of the body as a whole; any failure refuses the batch and records nothing."""
    settings = services.settings
    if (error := body.mode_error()) is not None:
        raise error
    total = len(body.recipients)
    if total == 0:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "at least one recipient", field="recipients")
    if total > settings.batch_max_items:
        raise HeraldError(
            ErrorCode.INVALID_PARAMS,
            f"at most {settings.batch_max_items} recipients in a batch ({total} given)",
            field="recipients",
        )
    scheduled_at = due_time(settings, body.scheduled_time, body.delay, body.timezone, now)
    if body.callback_url is not None:
        await check_message_callback(services, tenant_id, body.callback_url)
    required: list[str] = []
    template: TemplateRef | None = None
    if body.templated:
        version = await resolve_template(
            request, tenant_id, body.template_id, body.template_name, body.template_version
        )
        if not any(v.channel == "email" for v in version.variants):
            raise HeraldError(
                ErrorCode.TEMPLATE_NOT_FOUND,
                f"template {version.template_id} has no email variant",
                field="template_id" if body.template_id is not None else "template_name",
            )
        required = version.variables
        template = TemplateRef(template_id=version.template_id, version=version.version)
    attachments = None
    if body.attachment_ids:
        attachments = await resolve_attachments(
            services.pool, tenant_id, body.attachment_ids, now, settings.attachments_total_max_bytes
        )
    return _Plan(scheduled_at, template, required, attachments)


def _records(
    body: BatchSendRequest,
    plan: _Plan,
    items: list[Item],
    tenant_id: str,
    batch_id: str,
    key: str | None,
    digest: str,
    trace: Trace,
    now: datetime,
) -> list[_Pending]:
    """One message record per valid item, as a single send would make it, plus ``batch_id``."""
    email = EmailOptions(
        from_name=body.from_name, reply_to=body.reply_to, text=body.text_content, attachments=plan.attachments
    )
    records = []
    for item in items:
        template = None
        if plan.template is not None:
            template = plan.template.model_copy(update={"vars": item.template_vars or {}, "locale": item.locale})
        request = RequestV1(
            message_id=new_message_id(now),
            tenant_id=tenant_id,
            channel=Channel.EMAIL,
            to=[item.to],
            subject=body.subject,
            content=body.content or "",
            content_type=body.content_type,
            template=template,
            email=email,
            idempotency_key=item_key(batch_id, item.index) if key is not None else None,
            request_id=trace.request_id,
            accepted_at=now,
            recorded=True,
            scheduled_at=plan.scheduled_at,
            category=body.category,
            batch_id=batch_id,
            callback_url=body.callback_url,
        )
        record = NewRecord(request, {"to": [item.to], "cc": [], "bcc": []}, now, item_hash(digest, item.index))
        records.append(_Pending(item, record))
    return records


@dataclass(frozen=True, slots=True)
class _Pending:
    """A valid item and the record it becomes."""

    item: Item
    record: NewRecord


async def _settle(
    services: Services,
    store: _BatchStore,
    body: BatchSendRequest,
    plan: _Plan,
    batch_id: str,
    key: str | None,
    records: list[_Pending],
    outcomes: list[Outcome | HeraldError],
    errors: list[ItemError],
    claims: list[tuple[str, str]],
    counted: bool,
) -> JSONResponse:
    """The answer once every item was accepted or not, and the batch row that keeps it."""
    tenant_id, total = records[0].record.request.tenant_id, len(body.recipients)
    messages: list[dict[str, Any]] = []
    failed: list[tuple[_Pending, HeraldError]] = []
    created = 0
    for pending, outcome in zip(records, outcomes, strict=True):
        item, record = pending.item, pending.record
        if isinstance(outcome, HeraldError):
            failed.append((pending, outcome))
        elif outcome.created or outcome.request_hash == record.request_hash:
            created += outcome.created  # False when a retry taking the batch over found it recorded
            messages.append({"index": item.index, "to": item.to, "message_id": outcome.message_id})
        else:  # the item's key names another message (a key of the caller's own that looks like ours)
            message = f"idempotency key {record.request.idempotency_key} already names {outcome.message_id}"
            errors.append(
                ItemError(item.index, f"recipients.{item.index}", message, ErrorCode.DUPLICATE_REQUEST, item.to)
            )
    if counted and created < len(records):
        await services.quotas.give_back(tenant_id, "email", len(records) - created)
    if failed and claims:  # not accepted: their fingerprints are free again
        lost = {pending.record.request.message_id for pending, _ in failed}
        await services.guard.release_many([c for c in claims if c[1] in lost])
    BATCH_ITEMS.labels("accepted").inc(len(messages))
    BATCH_ITEMS.labels("rejected").inc(len(errors))
    BATCH_ITEMS.labels("failed").inc(len(failed))
    if failed and (key is not None or not messages):
        # Not all of it could be recorded or queued. A keyed batch is retried whole with its key
        # (the items already accepted answer their first message and are not sent twice).
        await store.finish(
            batch_id, tenant_id, "failed", len(messages), total - len(messages), [e.as_dict() for e in errors], None
        )
        first = failed[0][1]
        retry = "retry with the same idempotency key: accepted items are not sent twice" if key else "retry the batch"
        raise HeraldError(
            first.code,
            f"{len(messages)} of {len(records)} items accepted; the others could not be recorded or queued "
            f"({first.message}); {retry}",
            http_status=503,
        )
    for pending, exc in failed:  # without a key the client resends just these
        item = pending.item
        errors.append(
            ItemError(item.index, f"recipients.{item.index}", f"not accepted: {exc.message}", exc.code, item.to)
        )
    errors.sort(key=lambda e: e.index)
    response: dict[str, Any] = {
        "batch_id": batch_id,
        "total": total,
        "accepted": len(messages),
        "rejected": total - len(messages),
        "messages": sorted(messages, key=lambda m: m["index"]),
        "errors": [e.as_dict() for e in errors],
    }
    if plan.scheduled_at is not None:
        response["scheduled_at"] = iso_z(plan.scheduled_at)
    try:
        await store.finish(
            batch_id,
            tenant_id,
            "accepted",
            len(messages),
            total - len(messages),
            response["errors"],
            response if key is not None else None,
        )
    except HeraldError:
        # Its messages are accepted and will be sent: answer so. The row stays 'accepting'; a
        # retry with the key takes it over once abandoned and finds every item already there.
        log.exception("batch %s accepted but its row not updated", batch_id)
    log_event(
        log,
        logging.INFO,
        "batch accepted",
        batch_id=batch_id,
        total=total,
        accepted=len(messages),
        rejected=total - len(messages),
        scheduled=plan.scheduled_at is not None,
    )
    return envelope(response, status_code=202)


@router.post("/api/v1/batches/{batch_id}/cancel", summary="Cancel a scheduled batch's messages not yet released")
async def cancel_batch(batch_id: str, request: Request):
    """Every message of the batch still waiting for its time is cancelled and never sent; those
    already released go on. 409 / 1009 when none was waiting any more."""
    services, tenant_id = services_of(request), tenant_of(request, Scope.SEND)
    principal = request.scope["state"]["principal"]
    async with services.pool.acquire() as conn, conn.transaction():
        await _known(conn, tenant_id, batch_id)
        cancelled = await scheduled.cancel(
            conn, tenant_id, principal.actor, batch_id=batch_id, statistics=services.settings.stats_backend
        )
        if not cancelled:
            raise HeraldError(
                ErrorCode.STATE_CONFLICT,
                f"no message of batch {batch_id} is waiting for its time: nothing to cancel",
                field="batch_id",
            )
        await audit.record(conn, request, "batch.cancel", "batch", batch_id, {"cancelled": len(cancelled)})
    await scheduled.give_back_quota(services.quotas, tenant_id, cancelled)
    return envelope({"batch_id": batch_id, "cancelled": len(cancelled),
                     "message_ids": [r["message_id"] for r in cancelled]})  # fmt: skip


# --- reading batches ------------------------------------------------------------------------------


@router.get("/api/v1/batches/{batch_id}", summary="One batch and the progress of its messages")
async def get_batch(batch_id: str, request: Request):
    """The batch, its item errors, and its messages counted by seed status (pending, sending,
    success, failed) and lifecycle state; ``done`` once none is pending or sending."""
    services, tenant_id = services_of(request), tenant_of(request, Scope.READ)
    async with services.pool.acquire() as conn:
        row = await conn.fetchrow(
            f"SELECT {_BATCH_COLUMNS}, errors FROM batches WHERE tenant_id = $1 AND batch_id = $2", tenant_id, batch_id
        )
        if row is None:
            raise _not_found(batch_id)
        counts = await _counts(conn, tenant_id, [batch_id])
    return envelope(_batch(row, counts.get(batch_id, [])))


@router.get("/api/v1/batches", summary="Batches, newest first")
async def list_batches(
    request: Request,
    category: str | None = Query(default=None, max_length=64),
    page: int = Query(default=1, ge=1, le=100_000),
    page_size: int = Query(default=20, ge=1, le=100),
):
    services, tenant_id = services_of(request), tenant_of(request, Scope.READ)
    where, args = "tenant_id = $1", [tenant_id]
    if category:
        where += " AND category = $2"
        args.append(category)
    async with services.pool.acquire() as conn:
        total = await conn.fetchval(f"SELECT count(*) FROM batches WHERE {where}", *args)
        rows = await conn.fetch(
            f"""SELECT {_BATCH_COLUMNS} FROM batches WHERE {where}
                ORDER BY created_at DESC, id DESC LIMIT {page_size} OFFSET {(page - 1) * page_size}""",
            *args,
        )
        counts = await _counts(conn, tenant_id, [r["batch_id"] for r in rows])
    records = [_batch(r, counts.get(r["batch_id"], [])) for r in rows]
    return envelope({"total": total, "page": page, "page_size": page_size, "records": records})


@router.get("/api/v1/batches/{batch_id}/messages", summary="A batch's messages, with a status filter")
async def list_batch_messages(
    batch_id: str,
    request: Request,
    status: str | None = Query(
        default=None, description="seed status (pending/sending/success/failed) or a lifecycle state"
    ),
    page: int = Query(default=1, ge=1, le=100_000),
    page_size: int = Query(default=100, ge=1, le=1000),
):
    services, tenant_id = services_of(request), tenant_of(request, Scope.READ)
    where, args = "tenant_id = $1 AND batch_id = $2", [tenant_id, batch_id]
    if status:
        where += f" AND {status_column(status)} = $3"
        args.append(status)
    async with services.pool.acquire() as conn:
        await _known(conn, tenant_id, batch_id)
        total = await conn.fetchval(f"SELECT count(*) FROM message_records WHERE {where}", *args)
        rows = await conn.fetch(
            f"""SELECT message_id, recipient, status, state, retry_count, error_code, error_message,
                       scheduled_at, created_at, sent_at
                FROM message_records WHERE {where}
                ORDER BY id LIMIT {page_size} OFFSET {(page - 1) * page_size}""",
            *args,
        )
    records = [{k: (iso_z(v) if isinstance(v, datetime) else v) for k, v in r.items()} for r in rows]
    return envelope({"total": total, "page": page, "page_size": page_size, "records": records})


# --- helpers --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Earlier:
    """A batch that an idempotency key already names."""

    batch_id: str
    state: str
    request_hash: str | None
    response: dict | None
    abandoned: bool


class _BatchStore:
    """The ``batches`` rows, every statement bounded (503 rather than a hanging request)."""

    def __init__(self, pool: asyncpg.Pool, timeout_s: float, key_ttl_s: float) -> None:
        self.pool, self.timeout_s, self.key_ttl_s = pool, timeout_s, float(key_ttl_s)

    async def _run(self, method: str, sql: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(getattr(self.pool, method)(sql, *args), self.timeout_s)
        except (TimeoutError, *DB_UNAVAILABLE) as exc:
            raise HeraldError(
                ErrorCode.SERVICE_UNAVAILABLE,
                "database unavailable: the batch was not accepted; try again",
                http_status=503,
            ) from exc

    async def find(self, tenant_id: str, key: str) -> _Earlier | None:
        """The batch the key names, while the key lives (``HERALD_IDEMPOTENCY_TTL_S``)."""
        row = await self._run(
            "fetchrow",
            f"""SELECT batch_id, state, request_hash, response,
                       updated_at < now() - interval '{_ABANDONED_S} seconds' AS abandoned
                FROM batches WHERE tenant_id = $1 AND idempotency_key = $2
                  AND created_at >= now() - make_interval(secs => $3)""",
            tenant_id,
            key,
            self.key_ttl_s,
        )
        if row is None:
            return None
        return _Earlier(row["batch_id"], row["state"], row["request_hash"], row["response"], row["abandoned"])

    async def start(
        self,
        batch_id: str,
        tenant_id: str,
        body: BatchSendRequest,
        plan: _Plan,
        valid: int,
        errors: list[ItemError],
        key: str | None,
        digest: str,
        request_id: str | None,
        *,
        taking_over: str | None,
    ) -> bool:
        """Record the batch as 'accepting' (or take over a failed or abandoned one); False when
        another request holds the key."""
        if taking_over is not None:
            return bool(
                await self._run(
                    "fetchval",
                    f"""UPDATE batches SET state = 'accepting', request_id = $3, updated_at = now()
                    WHERE tenant_id = $1 AND batch_id = $2 AND (state = 'failed' OR (state = 'accepting'
                      AND updated_at < now() - interval '{_ABANDONED_S} seconds'))
                    RETURNING 1""",
                    tenant_id,
                    taking_over,
                    request_id,
                )
            )
        if key is not None:  # a key past its time to live no longer names its batch
            await self._run(
                "execute",
                """UPDATE batches SET idempotency_key = NULL WHERE tenant_id = $1 AND idempotency_key = $2
                   AND created_at < now() - make_interval(secs => $3)""",
                tenant_id,
                key,
                self.key_ttl_s,
            )
        inserted = await self._run(
            "fetchval",
            """INSERT INTO batches (batch_id, tenant_id, channel, state, total, accepted, rejected, errors,
                   subject, template_id, template_version, category, scheduled_at, idempotency_key,
                   request_hash, request_id)
               VALUES ($1, $2, $3, 'accepting', $4, $5, $6, $7::jsonb, $8, $9, $10, $11, $12, $13, $14, $15)
               ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
               RETURNING 1""",
            batch_id,
            tenant_id,
            body.channel,
            len(body.recipients),
            valid,
            len(body.recipients) - valid,
            [e.as_dict() for e in errors],
            body.subject,
            plan.template.template_id if plan.template else None,
            plan.template.version if plan.template else None,
            body.category,
            plan.scheduled_at,
            key,
            digest,
            request_id,
        )
        return bool(inserted)

    async def finish(
        self, batch_id: str, tenant_id: str, state: str, accepted: int, rejected: int, errors: list, response: Any
    ) -> None:
        await self._run(
            "execute",
            """UPDATE batches SET state = $3, accepted = $4, rejected = $5, errors = $6::jsonb,
                   response = $7::jsonb, updated_at = now()
               WHERE tenant_id = $1 AND batch_id = $2""",
            tenant_id,
            batch_id,
            state,
            accepted,
            rejected,
            errors,
            response,
        )


def _answer_for_earlier(earlier: _Earlier, digest: str) -> JSONResponse | None:
    """What a key naming ``earlier`` answers: 409 for another body, the first answer again, 409
    while it is being accepted; None when the new request may take the batch over (it failed,
    or was abandoned mid-way)."""
    if earlier.request_hash is not None and earlier.request_hash != digest:
        raise HeraldError(
            ErrorCode.DUPLICATE_REQUEST,
            f"idempotency key already used for batch {earlier.batch_id} with a different request body",
            field="idempotency_key",
        )
    if earlier.state == "accepted" and earlier.response is not None:
        return envelope(earlier.response, status_code=202, headers={"Idempotent-Replayed": "true"})
    if earlier.state == "accepting" and not earlier.abandoned:
        return _in_progress(earlier.batch_id)
    return None


def _in_progress(batch_id: str) -> JSONResponse:
    """409 while the first request with a key is still being accepted (DESIGN.md: a concurrent
    duplicate gets 409 with ``Retry-After``)."""
    message = f"batch {batch_id} with this idempotency key is still being accepted; retry shortly"
    return error_response(
        ErrorCode.DUPLICATE_REQUEST,
        f"idempotency_key: {message}",
        errors=[{"field": "idempotency_key", "message": message}],
        headers={"Retry-After": "1"},
    )


async def _claim_fingerprints(
    services: Services, records: list[_Pending], window_s: int
) -> tuple[list[_Pending], list[tuple[str, str]], list[ItemError]]:
    """Each item's content fingerprint, as a single send computes it (a batch item and a single
    send of the same email within the window are duplicates of each other): the records still
    to accept, the claims made for them, and an error for each duplicate."""
    claims = [(fingerprint_of(p.record.request), p.record.request.message_id or "") for p in records]
    earlier, skipped = await services.guard.claim_many(claims, window_s)
    kept, made, duplicates = [], [], []
    for pending, claim, first in zip(records, claims, earlier, strict=True):
        if first is None:
            pending.record.dedup_skipped = skipped
            kept.append(pending)
            made.append(claim)
        else:
            message = (
                f"duplicate of {first}: same recipient, subject and content within {window_s} s "
                '(send with "dedup": false to force)'
            )
            item = pending.item
            duplicates.append(
                ItemError(item.index, f"recipients.{item.index}", message, ErrorCode.DUPLICATE_REQUEST, item.to)
            )
    return kept, made, duplicates


async def _accept_all(
    services: Services, records: list[NewRecord], trace: Trace, concurrency: int
) -> list[Outcome | HeraldError]:
    """``publisher.accept`` for every record, ``concurrency`` at a time (the record batcher's
    batch size: each wave is one INSERT)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(record: NewRecord) -> Outcome | HeraldError:
        async with gate:
            try:
                return await services.publisher.accept(record, trace)
            except HeraldError as exc:
                return exc
            except Exception:  # one item's unexpected failure must not lose the others' answers
                log.exception("batch item %s not accepted", record.request.message_id)
                return HeraldError(ErrorCode.INTERNAL_ERROR, "internal error", http_status=503)

    return await asyncio.gather(*(one(r) for r in records))


async def _undo(services: Services, tenant_id: str, counted: bool, count: int, claims: list[tuple[str, str]]) -> None:
    if counted:
        await services.quotas.give_back(tenant_id, "email", count)
    await services.guard.release_many(claims)


def _refusal(errors: list[ItemError]) -> JSONResponse:
    """No item can be sent: the batch is refused with every item's error; nothing is recorded."""
    code = refusal_code(errors)
    listed = "; ".join(f"{e.field}: {e.message}" for e in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return error_response(code, f"no recipient can be sent to: {listed}{more}", errors=[e.as_dict() for e in errors])


def _not_found(batch_id: str) -> HeraldError:
    return HeraldError(ErrorCode.NOT_FOUND, f"batch {batch_id} not found", field="batch_id")


async def _known(conn: asyncpg.Connection, tenant_id: str, batch_id: str) -> None:
    """404 unless the tenant has this batch."""
    if not await conn.fetchval("SELECT 1 FROM batches WHERE tenant_id = $1 AND batch_id = $2", tenant_id, batch_id):
        raise _not_found(batch_id)


async def _counts(conn: asyncpg.Connection, tenant_id: str, batch_ids: list[str]) -> dict[str, list]:
    rows = await conn.fetch(
        """SELECT batch_id, status, state, count(*)::int AS n FROM message_records
           WHERE batch_id = ANY($1::text[]) AND tenant_id = $2 GROUP BY batch_id, status, state""",
        batch_ids,
        tenant_id,
    )
    out: dict[str, list] = {}
    for r in rows:
        out.setdefault(r["batch_id"], []).append(r)
    return out


def _batch(row: Any, counts: list) -> dict[str, Any]:
    out = {k: (iso_z(v) if isinstance(v, datetime) else v) for k, v in row.items()}
    by_status = {s.value: 0 for s in Status}
    by_state: dict[str, int] = {}
    for r in counts:
        by_status[r["status"]] = by_status.get(r["status"], 0) + r["n"]
        by_state[r["state"]] = by_state.get(r["state"], 0) + r["n"]
    unfinished = by_status[Status.PENDING.value] + by_status[Status.SENDING.value]
    out["progress"] = {
        "messages": sum(by_status.values()),
        "by_status": by_status,
        "by_state": by_state,
        "done": row["state"] != "accepting" and unfinished == 0,
    }
    return out
