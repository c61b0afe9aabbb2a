"""Dead letters (seed 004 §3.1.6): every record Herald could not process or deliver, with its
reason; list them, look at one, and send them again (one or in bulk).

Replaying a letter publishes again what it holds:
- a message that ran out of attempts (``retries_exhausted``) or failed permanently has its stored
  request published with the next attempt number, so it gets one more delivery attempt (and the
  tracker, which orders by attempt, follows it);
- any other letter (a malformed request, an unusable command) has its original payload published
  to its source topic unchanged — useful once the producer or the configuration was fixed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from services.ingest import audit
from services.ingest.auth import Scope
from services.ingest.deps import services_of, tenant_of
from services.ingest.http import envelope, json_body_schema, parse_body
from services.ingest.recipients import text_without_profiles, without_profiles
from shared.errors import ErrorCode, HeraldError
from shared.kafka import Topics, message_key

router = APIRouter(prefix="/api/v1/dead-letters", tags=["dead letters"])

_COLUMNS = """id, source_topic, partition, "offset", message_id, service, reason, errors, payload, headers,
    occurred_at, recorded_at, replayed_at, replay_count"""


class BulkReplay(BaseModel):
    """Which letters to replay: the ids, or every letter matching the filters (not yet replayed)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[int] | None = Field(default=None, min_length=1, max_length=1000)
    reason: str | None = Field(default=None, max_length=64)
    service: str | None = Field(default=None, max_length=32)
    limit: int = Field(default=100, ge=1, le=1000)


def _out(row: asyncpg.Record) -> dict[str, Any]:
    """A letter as ``read`` keys see it: a request to a user in its payload names the user, not
    their profile (replays publish the stored payload, whole)."""
    out = dict(row)
    out["payload"] = text_without_profiles(out["payload"])
    out["errors"] = without_profiles(out["errors"])
    for key in ("occurred_at", "recorded_at", "replayed_at"):
        if out.get(key) is not None:
            out[key] = out[key].astimezone(UTC).isoformat().replace("+00:00", "Z")
    return out


@router.get("", summary="List dead letters")
async def list_dead_letters(
    request: Request,
    reason: str | None = Query(default=None, max_length=64),
    service: str | None = Query(default=None, max_length=32),
    message_id: str | None = Query(default=None, max_length=64),
    replayed: bool | None = Query(default=None),
    page: int = Query(default=1, ge=1, le=100_000),
    page_size: int = Query(default=20, ge=1, le=100),
):
    services, tenant_id = services_of(request), tenant_of(request, Scope.READ)
    where, args = ["tenant_id = $1"], [tenant_id]
    for column, value in (("reason", reason), ("service", service), ("message_id", message_id)):
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    if replayed is not None:
        where.append("replayed_at IS NOT NULL" if replayed else "replayed_at IS NULL")
    clause = " AND ".join(where)
    async with services.pool.acquire() as conn:
        total = await conn.fetchval(f"SELECT count(*) FROM dead_letters WHERE {clause}", *args)
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM dead_letters WHERE {clause} ORDER BY recorded_at DESC, id DESC "
            f"LIMIT {page_size} OFFSET {(page - 1) * page_size}",
            *args,
        )
    return envelope({"total": total, "page": page, "page_size": page_size, "records": [_out(r) for r in rows]})


@router.get("/{letter_id}", summary="One dead letter")
async def get_dead_letter(letter_id: int, request: Request):
    services, tenant_id = services_of(request), tenant_of(request, Scope.READ)
    row = await services.pool.fetchrow(
        f"SELECT {_COLUMNS} FROM dead_letters WHERE tenant_id = $1 AND id = $2", tenant_id, letter_id
    )
    if row is None:
        raise HeraldError(ErrorCode.NOT_FOUND, f"dead letter {letter_id} not found", field="letter_id")
    return envelope(_out(row))


async def _replay(request: Request, conn: asyncpg.Connection, letter: asyncpg.Record) -> dict[str, Any]:
    """Publish one letter again and mark it replayed."""
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    producer = services.producer
    topic, value, key = letter["source_topic"], letter["payload"].encode(), None
    record = None
    if letter["message_id"]:
        record = await conn.fetchrow(
            "SELECT recipient, attempt, request, state FROM message_records WHERE tenant_id = $1 AND message_id = $2",
            tenant_id,
            letter["message_id"],
        )
    if record is not None and record["request"] is not None and record["state"] in ("dead", "failed"):
        body = dict(record["request"])
        body["attempt"] = record["attempt"] + 1
        body["recorded"] = True
        topic, value = Topics.REQUESTS, orjson.dumps(body)
        key = message_key(tenant_id, record["recipient"])
    elif topic not in Topics.all():
        raise HeraldError(ErrorCode.INVALID_PARAMS, f"cannot replay to {topic}", field="source_topic")
    await producer.send_and_wait(topic, value, key=key)
    await conn.execute(
        "UPDATE dead_letters SET replayed_at = now(), replay_count = replay_count + 1 WHERE id = $1", letter["id"]
    )
    await audit.record(conn, request, "dead_letter.replay", "dead_letter", letter["id"],
                       {"topic": topic, "message_id": letter["message_id"]})  # fmt: skip
    return {"id": letter["id"], "topic": topic, "message_id": letter["message_id"]}


@router.post("/{letter_id}/replay", summary="Send one dead letter again")
async def replay_dead_letter(letter_id: int, request: Request):
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    async with services.pool.acquire() as conn:
        letter = await conn.fetchrow(
            "SELECT id, source_topic, message_id, payload FROM dead_letters WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            letter_id,
        )
        if letter is None:
            raise HeraldError(ErrorCode.NOT_FOUND, f"dead letter {letter_id} not found", field="letter_id")
        return envelope(await _replay(request, conn, letter))


@router.post("/replay", summary="Send dead letters again in bulk", openapi_extra=json_body_schema(BulkReplay))
async def replay_many(request: Request):
    services, tenant_id = services_of(request), tenant_of(request, Scope.CONFIG)
    body = await parse_body(request, BulkReplay)
    where, args = ["tenant_id = $1"], [tenant_id]
    if body.ids is not None:
        args.append(body.ids)
        where.append(f"id = ANY(${len(args)}::bigint[])")
    else:
        where.append("replayed_at IS NULL")
    for column, value in (("reason", body.reason), ("service", body.service)):
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    if body.ids is None and body.reason is None and body.service is None:
        raise HeraldError(ErrorCode.INVALID_PARAMS, "give ids, reason or service", field="ids")
    async with services.pool.acquire() as conn:
        letters = await conn.fetch(
            f"SELECT id, source_topic, message_id, payload FROM dead_letters WHERE {' AND '.join(where)} "
            f"ORDER BY id LIMIT {body.limit}",
            *args,
        )
        replayed = [await _replay(request, conn, letter) for letter in letters]
    return envelope({"replayed": len(replayed), "records": replayed, "at": datetime.now(UTC).isoformat()})
