"""Status callbacks (issue 11): placeholder until the callbacks work lands."""

from __future__ import annotations

import asyncpg

from shared.events import EventV1


async def enqueue(conn: asyncpg.Connection, events: list[EventV1]) -> None:
    """Called by write_fold inside the fold's transaction with the events stored for the first time."""
    return None
