"""Cancelling scheduled messages before the scheduler releases them (one, or a batch's)."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from services.ingest.limits import Quotas, month_bounds
from services.tracker import callbacks
from shared.events import EventV1, State
from shared.statistics import count_outcomes

# Takes each task's row lock, as the scheduler's release does: a message is either cancelled
# before its release or released, never both. $2: message ids, or $3: a batch; $4: who. A digest
# waiting for its window is not cancelled here: its messages are already 'digested' (delete the
# rule to stop new ones); a record that is not 'scheduled' any more is left as it is.
_CANCEL = """
WITH t AS (
    UPDATE scheduled_tasks t SET status = 'cancelled', updated_at = now()
    FROM message_records r
    WHERE t.tenant_id = $1 AND t.status = 'pending' AND t.reason IN ('scheduled', 'deferred')
      AND r.message_id = t.message_id AND r.tenant_id = $1 AND r.state = 'scheduled'
      AND (t.message_id = ANY($2::text[]) OR ($3::text IS NOT NULL AND r.batch_id = $3))
    RETURNING t.message_id
), m AS (
    UPDATE message_records r SET state = 'cancelled', status = 'failed', state_rank = 8,
        error_message = 'cancelled before its scheduled time', updated_at = now()
    FROM t WHERE r.message_id = t.message_id AND r.tenant_id = $1 AND r.state = 'scheduled'
    RETURNING r.message_id, r.message_type, r.created_at
), e AS (
    INSERT INTO message_events (event_id, message_id, tenant_id, state, attempt, service, channel,
        occurred_at, detail)
    SELECT m.message_id || ':0:cancelled', m.message_id, $1, 'cancelled', 0, 'ingest', m.message_type,
        now(), jsonb_build_object('by', $4::text)
    FROM m
    ON CONFLICT (event_id) DO NOTHING
)
SELECT message_id, message_type, created_at FROM m ORDER BY message_id
"""


async def cancel(
    conn: asyncpg.Connection,
    tenant_id: str,
    actor: str,
    *,
    message_ids: list[str] | None = None,
    batch_id: str | None = None,
    statistics: str = "postgres",
) -> list[asyncpg.Record]:
    """Cancel the named messages (or a batch's) still waiting for their time; answers those
    cancelled (message_id, message_type, created_at). Run it in the transaction that audits it.
    ``statistics``: where the cancellations are counted (HERALD_STATS_BACKEND)."""
    rows = await conn.fetch(_CANCEL, tenant_id, message_ids or [], batch_id, actor)
    if rows:
        # A status change the tracker's fold never sees: counted and called back from here, in
        # the transaction that makes it (each message once: only a 'scheduled' record moves).
        now = datetime.now(UTC)
        events = [
            EventV1(event_id=f"{r['message_id']}:0:cancelled", message_id=r["message_id"], tenant_id=tenant_id,
                    state=State.CANCELLED, service="ingest", channel=r["message_type"], occurred_at=now)
            for r in rows
        ]  # fmt: skip
        await callbacks.enqueue(conn, events)
        await count_outcomes(conn, events, backend=statistics)
    return rows


# A new time for a waiting message (not a digest's: its messages are kept only so long); its
# attachments are kept until a day after it.
RESCHEDULE = """
WITH t AS (
    UPDATE scheduled_tasks t SET scheduled_time = $3, updated_at = now()
    FROM message_records r
    WHERE t.tenant_id = $1 AND t.message_id = $2 AND t.status = 'pending' AND t.reason IN ('scheduled', 'deferred')
      AND r.message_id = t.message_id AND r.tenant_id = $1 AND r.state = 'scheduled'
    RETURNING t.message_id
), kept AS (
    UPDATE email_attachments a SET expires_at = GREATEST(a.expires_at, $3 + interval '1 day')
    FROM message_records r JOIN t ON t.message_id = r.message_id,
         jsonb_array_elements(COALESCE(r.request->'email'->'attachments', '[]'::jsonb)) AS att
    WHERE r.tenant_id = $1 AND a.tenant_id = $1 AND a.attachment_id = att->>'attachment_id'
)
UPDATE message_records r SET scheduled_at = $3,
    request = jsonb_set(r.request, '{scheduled_at}', to_jsonb($4::text)), updated_at = now()
FROM t WHERE r.message_id = t.message_id AND r.tenant_id = $1
RETURNING r.message_id, r.state, r.scheduled_at
"""


async def give_back_quota(quotas: Quotas, tenant_id: str, cancelled: list[asyncpg.Record]) -> None:
    """Cancelled messages are never sent: those counted against this month's quota give it back."""
    start, _ = month_bounds(datetime.now(UTC))
    by_channel: dict[str, int] = {}
    for row in cancelled:
        if row["created_at"] >= start:
            by_channel[row["message_type"]] = by_channel.get(row["message_type"], 0) + 1
    for channel, count in by_channel.items():
        await quotas.give_back(tenant_id, channel, count)
