"""Per-tenant settings as ingest needs them on every request, cached for a few seconds.

A change made through the API reaches every ingest replica within ``_TTL_S``. When the database
cannot be asked, the service-wide defaults apply (the request is not held up for a setting).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import asyncpg

from shared.db import DB_UNAVAILABLE

log = logging.getLogger("herald.ingest.tenants")

_TTL_S = 5.0


@dataclass(frozen=True, slots=True)
class TenantSettings:
    dedup_window_s: int
    quotas: dict[str, int] = field(default_factory=dict)  # channel -> monthly limit; absent = unlimited


class TenantSettingsCache:
    def __init__(self, pool: asyncpg.Pool, default_dedup_window_s: int, timeout_s: float = 0.5) -> None:
        self.pool = pool
        self.defaults = TenantSettings(default_dedup_window_s)
        self.timeout_s = timeout_s
        self._cache: dict[str, tuple[float, TenantSettings]] = {}

    async def get(self, tenant_id: str) -> TenantSettings:
        hit = self._cache.get(tenant_id)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            row = await asyncio.wait_for(
                self.pool.fetchrow("SELECT dedup_window_s, quotas FROM tenants WHERE tenant_key = $1", tenant_id),
                self.timeout_s,
            )
        except (TimeoutError, *DB_UNAVAILABLE):
            log.warning("tenant settings unavailable; service defaults apply")
            return hit[1] if hit is not None else self.defaults
        if row is None:
            found = self.defaults
        else:
            window = row["dedup_window_s"]
            found = TenantSettings(self.defaults.dedup_window_s if window is None else window, dict(row["quotas"]))
        self._cache[tenant_id] = (now + _TTL_S, found)
        return found

    def forget(self, tenant_id: str) -> None:
        """This replica's own change is seen at once."""
        self._cache.pop(tenant_id, None)
