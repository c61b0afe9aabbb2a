"""PostgreSQL: the asyncpg pool and the migrations (yoyo, plain SQL files in ``migrations/``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import orjson

from shared.metrics import DB_POOLS
from shared.settings import Settings

log = logging.getLogger(__name__)

# PostgreSQL is down or going away (connection refused or cut, server shutting down
# or starting, out of connections, a failover's read-only standby, a deadlock): transient, and
# no dispatch's fault. InternalClientError: a connection the server terminated while idle
# (fast shutdown) fails its next query with "cannot switch to state ...; another operation is
# in progress".
DB_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.TransactionRollbackError,
)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


class _Connection(asyncpg.Connection):
    """No reset query on release: asyncpg's default (``RESET ALL``, unlisten, advisory locks)
    is a round trip per release, ~9% of the sender's CPU in a profile. Herald keeps no session
    state on pooled connections: no SET, LISTEN, advisory locks or temporary tables."""

    def get_reset_query(self) -> str:
        return ""


async def create_pool(settings: Settings, *, attempts: int = 30, max_size: int | None = None) -> asyncpg.Pool:
    """A pool with JSON codecs; retried while the server is still starting. ``max_size``: a
    smaller size for a service that needs only a few connections (``HERALD_DB_POOL_MAX`` still
    caps it, so a deployment can budget every workload's connections). Its connections in use and
    its size are exported at scrape time (``db_connections_active{pool=<service>}``)."""
    size = min(max_size, settings.db_pool_max) if max_size else settings.db_pool_max
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            pool = await asyncpg.create_pool(
                settings.database_url.get_secret_value(),
                min_size=min(settings.db_pool_min, size),
                max_size=size,
                init=_init_connection,
                connection_class=_Connection,
                command_timeout=30,
            )
            DB_POOLS.track(pool, settings.service_name)
            return pool
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if attempt == attempts:
                raise
            log.warning("database not ready (%s), retrying", exc.__class__.__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


def apply_migrations(database_url: str) -> list[str]:
    """Apply pending migrations under yoyo's lock (safe when several services start at once)."""
    from yoyo import get_backend, read_migrations

    backend = get_backend(database_url)
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [m.id for m in pending]


async def migrate(settings: Settings, *, attempts: int = 30) -> list[str]:
    """Run :func:`apply_migrations` off the event loop, retried while the server starts."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            applied = await asyncio.to_thread(apply_migrations, settings.database_url.get_secret_value())
            if applied:
                log.info("applied migrations %s", ", ".join(applied))
            return applied
        except Exception as exc:  # psycopg2's OperationalError while the server starts
            if attempt == attempts:
                raise
            log.warning("migrations not applied yet (%s), retrying", exc.__class__.__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


async def follow_notifications(
    dsn: str,
    channel: str,
    on_notify: Callable[..., object],
    on_listening: Callable[[asyncpg.Connection], Awaitable[None]],
    *,
    name: str,
    ping_s: float = 5.0,
) -> None:
    """Keep a connection listening on ``channel`` for as long as the caller runs: reconnect when
    it is lost (noticed by its termination or by a ping every ``ping_s``, which also catches a
    connection that died silently). ``on_listening(conn)`` runs each time listening starts, after
    the listener is added, so that nothing committed in between is missed (re-read state there)."""
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            await conn.add_listener(channel, on_notify)
            await on_listening(conn)
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), ping_s)
                if not lost.is_set():
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), ping_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: reconnect
            log.warning("%s listener lost (%s); reconnecting", name, type(exc).__name__)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)
        await asyncio.sleep(1)
