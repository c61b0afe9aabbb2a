"""The sweeper: a message accepted in PostgreSQL must reach an outcome even if the broker lost
what it held (Tansu keeps everything in memory; any broker can lose an unreplicated write).

Every ``HERALD_SWEEP_INTERVAL_S`` it takes the messages whose state has not moved for
``HERALD_SWEEP_STALLED_AFTER_S`` (plus the longest retry delay for ``retrying``) and publishes
their stored ``notify.request.v1`` again, naming the attempt to dispatch:

- ``accepted`` / ``routed``: attempt 1, as the first time;
- ``sending``: the same attempt — if its outcome exists, the sender publishes it again instead of
  sending (its outcome record in Redis); if not, it delivers;
- ``retrying``: the next attempt, whose delay record was lost.

Event ids are deterministic and the tracker only moves states forward, so a message published
twice is still recorded once. Several ingest replicas may sweep at once: rows are claimed with
``FOR UPDATE SKIP LOCKED`` and their ``updated_at`` bumped in the same statement.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from shared.kafka import Topics, message_key
from shared.logging import log_event
from shared.metrics import MESSAGES_REPUBLISHED
from shared.settings import Settings

log = logging.getLogger("herald.ingest.sweeper")

_CLAIM = """
UPDATE message_records m SET republished = republished + 1, updated_at = now()
FROM (
    SELECT id FROM message_records
    WHERE state IN ('accepted', 'routed', 'sending', 'retrying') AND request IS NOT NULL
      AND updated_at < now() - make_interval(
          secs => CASE WHEN state = 'retrying' THEN $1::float8 + $2::float8 ELSE $1::float8 END)
    ORDER BY updated_at
    LIMIT $3::int
    FOR UPDATE SKIP LOCKED
) stalled
WHERE m.id = stalled.id
RETURNING m.message_id, m.tenant_id, m.recipient, m.state, m.attempt, m.request, m.request_id,
    -- A first_success rule's message that had moved on to a later channel resumes there.
    (SELECT max((e.detail->'fallback'->>'step')::int) FROM message_events e
     WHERE e.message_id = m.message_id AND e.tenant_id = m.tenant_id AND e.detail ? 'fallback') AS step
"""


def attempt_to_dispatch(state: str, attempt: int) -> int:
    """Which delivery attempt a stalled message gets (see the module docstring)."""
    if state == "sending":
        return max(attempt, 1)
    if state == "retrying":
        return attempt + 1
    return 1


async def sweep_stalled(pool: asyncpg.Pool, producer: AIOKafkaProducer, settings: Settings, limit: int = 500) -> int:
    """Publish the stalled messages again; answers how many."""
    longest_delay = max(settings.retry_delays)
    rows = await pool.fetch(_CLAIM, settings.sweep_stalled_after_s, longest_delay, limit)
    futures = []
    for row in rows:
        request = dict(row["request"])
        request["attempt"] = attempt_to_dispatch(row["state"], row["attempt"])
        request["recorded"] = True
        if row["step"]:
            request["step"] = row["step"]
        headers = [("request_id", row["request_id"].encode())] if row["request_id"] else []
        futures.append(
            await producer.send(
                Topics.REQUESTS,
                orjson.dumps(request),
                key=message_key(row["tenant_id"], row["recipient"]),
                headers=headers,
            )
        )
        log_event(log, logging.WARNING, "stalled message published again", message_id=row["message_id"],
                  state=row["state"], attempt=request["attempt"])  # fmt: skip
    await asyncio.gather(*futures)
    if rows:
        MESSAGES_REPUBLISHED.inc(len(rows))
    return len(rows)


async def run_sweeper(pool: asyncpg.Pool, producer: AIOKafkaProducer, settings: Settings) -> None:
    while True:
        await asyncio.sleep(settings.sweep_interval_s)
        try:
            await asyncio.wait_for(sweep_stalled(pool, producer, settings), settings.sweep_interval_s * 4)
        except Exception:  # the next round tries again; a sweep must never stop ingest
            log.warning("sweep failed", exc_info=True)
