"""Keeping ``notify.config`` converged on PostgreSQL, for every kind of configuration routers
read from it (templates, frequency caps, digest rules): PostgreSQL is the record, the topic the
distribution. A committed change is published at once; if the broker does not take it, the change
stands and everything is published again a few seconds later, as at start-up and when the broker
came back without its topics (``dirty``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from aiokafka.errors import KafkaError

log = logging.getLogger("herald.ingest.distribute")

RESYNC_DIRTY_EVERY_S = 5.0


class Distributor:
    """Publishes one kind of configuration; a subclass says how to publish everything."""

    what = "configuration"  # in log lines

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.dirty = asyncio.Event()

    async def publish_change(self, publishing: Awaitable[None]) -> None:
        """Publish a committed change, bounded; on failure, mark everything for publishing again."""
        try:
            await asyncio.wait_for(publishing, self.timeout_s)
        except (TimeoutError, KafkaError, OSError) as exc:
            log.warning("%s change not published (%s); publishing again shortly", self.what, type(exc).__name__)
            self.dirty.set()

    async def republish_all(self) -> int:
        """Publish everything from the database; answers how many items."""
        raise NotImplementedError

    async def run(self) -> None:
        """Publish everything at start-up, and again whenever a publish failed."""
        self.dirty.set()
        while True:
            await self.dirty.wait()
            # Cleared before reading: a change that fails to publish meanwhile sets it again.
            self.dirty.clear()
            try:
                count = await self.republish_all()
                log.info("%s published to the config topic: %d", self.what, count)
            except Exception as exc:  # broker or database away: try again shortly
                self.dirty.set()
                log.warning("%s republish failed (%s)", self.what, type(exc).__name__)
            await asyncio.sleep(RESYNC_DIRTY_EVERY_S)
