"""Phase 8: what the delivery statistics cost the tracker's fold (issue 11).

The tracker folds each batch of events into PostgreSQL in one transaction; since issue 11 the same
transaction counts the batch's outcomes into the rollups by minute, hour and day. Timed here against
a real PostgreSQL (the bench's own), in batches of the tracker's shape (each message's accepted,
routed, sending and sent events, 1,000 events a batch, spread over 5 channels, 20 providers and 40
templates): events folded per second with the rollups (``write_fold(..., statistics="postgres")``,
the default) against the same fold without them (``statistics="none"``: the fold as it was before, and as
it is with ClickHouse keeping the statistics). Rounds alternate in order, each after a VACUUM
ANALYZE and a CHECKPOINT; the best of 4 each.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from devstack import servers
from services.tracker.fold import fold_plan, write_fold
from shared.db import apply_migrations
from shared.events import EventV1, MessageSnapshot, State, event_id

FOLD_N = int(os.environ.get("BENCH_FOLD_N", "20000"))  # events per round
BATCH = 1000
CHANNELS = ("sms", "email", "feishu", "slack", "webhook")


def _batches(n: int) -> list[list[EventV1]]:
    tag = uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    events: list[EventV1] = []
    for i in range(n // 4):
        mid, channel = f"msg_bench_{tag}_{i}", CHANNELS[i % len(CHANNELS)]
        snap = MessageSnapshot(channel=channel, recipient=f"r{i}@example.com", accepted_at=now)
        at = now + timedelta(milliseconds=i)
        common = {"message_id": mid, "tenant_id": f"bench-{i % 3}", "service": "bench"}
        events += [
            EventV1(event_id=event_id(mid, 0, State.ACCEPTED), state=State.ACCEPTED, occurred_at=at, message=snap,
                    **common),
            EventV1(event_id=event_id(mid, 0, State.ROUTED), state=State.ROUTED, occurred_at=at, message=snap,
                    **common),
            EventV1(event_id=event_id(mid, 1, State.SENDING), state=State.SENDING, attempt=1, occurred_at=at,
                    channel=channel, **common),
            EventV1(event_id=event_id(mid, 1, State.SENT), state=State.SENT, attempt=1, channel=channel,
                    provider=f"p{i % 20}", occurred_at=at + timedelta(milliseconds=300 + i % 900),
                    detail={"provider_name": f"provider-{i % 20}", "cost": "0.035", "template": i % 40}, **common),
        ]  # fmt: skip
    return [events[i : i + BATCH] for i in range(0, len(events), BATCH)]


async def _rate(pool: asyncpg.Pool, n: int, rollups: bool) -> float:
    batches = _batches(n)
    # The previous round's aftermath (garbage, dirty pages, autovacuum) must not land in this one.
    gc.collect()
    async with pool.acquire() as conn:
        await conn.execute("VACUUM ANALYZE")
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
    started = time.perf_counter()
    async with pool.acquire() as conn:
        for batch in batches:
            await write_fold(conn, fold_plan(batch), statistics="postgres" if rollups else "none")
    return n / (time.perf_counter() - started)


async def _measure(dsn: str, n: int) -> dict:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        await _rate(pool, BATCH, True)  # warm-up: plans cached, tables touched
        rates: dict[bool, float] = {True: 0.0, False: 0.0}
        for round_ in range(4):  # the order alternates: neither mode always runs on the other's heels
            for rollups in ((False, True) if round_ % 2 == 0 else (True, False)):
                rates[rollups] = max(rates[rollups], await _rate(pool, n, rollups))
        rows = await pool.fetchval("SELECT count(*) FROM stats_minute")
    finally:
        await pool.close()
    return {
        "events": n,
        "baseline_per_s": round(rates[False]),
        "with_rollups_per_s": round(rates[True]),
        "ratio": round(rates[True] / rates[False], 3),
        "minute_rows": rows,
        "note": "write_fold in batches of 1,000 events against a real PostgreSQL; best of 4 rounds in "
        "alternating order; baseline: the same fold without the rollups",
    }


def phase_fold(n: int = FOLD_N, dsn: str | None = None, tmp: Path | None = None) -> dict:
    """Against ``dsn`` if given (the bench's database), else a PostgreSQL of its own in ``tmp``."""
    server = None
    if dsn is None:
        import tempfile

        tmp = tmp or Path(tempfile.mkdtemp(prefix="herald-bench-fold-"))
        os.chmod(tmp, 0o755)
        server = servers.start_postgres(tmp / "pg", servers.free_port(), fast=True)
        dsn = server.extra["dsn"]
    try:
        apply_migrations(dsn)
        return asyncio.run(_measure(dsn, n))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    import orjson

    print(orjson.dumps(phase_fold(), option=orjson.OPT_INDENT_2).decode())
