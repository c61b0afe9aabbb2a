"""The sender's provider for every channel but email: the tenant's configured providers of the
channel (``providers`` rows, kept in memory, followed through NOTIFY) and their plugins.

For each dispatch: choose the configured provider (endpoint channels: the one ``to`` names;
others: the one the send named, else the tenant's first active one by priority), wait for a
slot under its rate limits (:mod:`services.senders.pacing`), then let its plugin deliver. The
outcome names the provider, its configuration and the message's cost. Choosing by cost and
live quality, failover and circuit breakers are the router's (issue 10).

HTTP providers cannot tell the moment a request is written from the moment it is answered, so
no hand-off is marked: a sender killed mid-request delivers again (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, ClassVar

import asyncpg
import httpx
from redis.asyncio import Redis

from services.senders.base import (
    Deferred,
    DeliveryError,
    Handoff,
    HealthHook,
    Permanent,
    Retryable,
    SendResult,
    Unavailable,
)
from services.senders.pacing import Pacer
from services.senders.plugins.base import Message, Plugin
from services.senders.plugins.config import Configured, configured
from shared.channels import spec
from shared.crypto import SecretBox
from shared.db import create_pool, follow_notifications, migrate
from shared.errors import ErrorCode
from shared.events import Channel, DispatchV1
from shared.logging import log_event
from shared.outbound import guarded_client
from shared.settings import Settings

log = logging.getLogger("herald.sender")


class _Shared:
    """What the plugin senders of one process share (it may run every channel): one small pool,
    one Redis client, one listener on ``herald_providers`` waking the channel a change is about.
    Without it a process of 16 channels held ~48 PostgreSQL connections."""

    def __init__(self) -> None:
        self.senders: dict[str, ChannelSender] = {}
        self.pool: asyncpg.Pool | None = None
        self.redis: Redis | None = None
        self.follow: asyncio.Task | None = None
        self.lock = asyncio.Lock()

    async def join(self, sender_cls: type[ChannelSender], settings: Settings) -> tuple[asyncpg.Pool, Redis]:
        async with self.lock:
            if self.pool is None or self.redis is None:
                if settings.run_migrations:  # the providers table, on a first start
                    await migrate(settings)
                self.pool = await create_pool(settings, max_size=4)
                self.redis = Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=2)
                self.follow = asyncio.create_task(
                    follow_notifications(
                        settings.database_url.get_secret_value(),
                        "herald_providers",
                        self._notified,
                        self._listening,
                        name="providers",
                    )  # fmt: skip
                )
            return self.pool, self.redis

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        sender = self.senders.get(payload.rpartition(" ")[2])
        if sender is not None:
            sender._reload_soon.set()

    async def _listening(self, _conn: asyncpg.Connection) -> None:
        for sender in self.senders.values():  # whatever changed while nobody listened
            sender._reload_soon.set()

    async def leave(self, channel: str) -> None:
        async with self.lock:
            self.senders.pop(channel, None)
            if self.senders:
                return
            if self.follow is not None:
                self.follow.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.follow
            if self.redis is not None:
                await self.redis.aclose()
            if self.pool is not None:
                await self.pool.close()
            self.pool, self.redis, self.follow = None, None, None


_SHARED = _Shared()

_COLUMNS = """id, tenant_id, channel, provider, name, config, secrets, priority, weight, costs, rate_limit,
    is_active, revision"""


class Directory:
    """The configured providers of one channel, by tenant (read whole: these tables are small)."""

    def __init__(self, channel: str, box: SecretBox) -> None:
        self.channel = channel
        self.box = box
        self.by_tenant: dict[str, list[Configured]] = {}
        self.loaded = asyncio.Event()
        self.broken: dict[int, str] = {}  # rows that cannot be used, and why

    async def load(self, conn: asyncpg.Connection | asyncpg.Pool) -> None:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM providers WHERE channel = $1 AND deleted_at IS NULL ORDER BY priority, id",
            self.channel,
        )
        by_tenant: dict[str, list[Configured]] = {}
        broken: dict[int, str] = {}
        for row in rows:
            try:
                entry = configured(row, self.box)
            except Exception as exc:  # a row that no longer validates or decrypts: skipped, said
                broken[row["id"]] = _why(exc)
                continue
            by_tenant.setdefault(entry.tenant_id, []).append(entry)
        for provider_id, why in broken.items():
            if self.broken.get(provider_id) != why:
                log_event(log, logging.ERROR, "configured provider unusable; skipped", provider_id=provider_id,
                          error=why)  # fmt: skip
        self.by_tenant, self.broken = by_tenant, broken
        self.loaded.set()

    def choose(self, dispatch: DispatchV1) -> Configured:
        """The configured provider of ``dispatch`` (Permanent 2011 when there is none)."""
        active = [p for p in self.by_tenant.get(dispatch.tenant_id, []) if p.is_active]
        wanted = dispatch.to[0] if spec(self.channel).endpoint else dispatch.provider
        if wanted is not None:
            for p in active:
                if p.name == wanted:
                    return p
            raise Permanent(
                f"no active {self.channel} provider named {wanted!r} for tenant {dispatch.tenant_id}",
                code=ErrorCode.PROVIDER_NOT_CONFIGURED,
            )
        if not active:
            raise Permanent(
                f"no active {self.channel} provider configured for tenant {dispatch.tenant_id}",
                code=ErrorCode.PROVIDER_NOT_CONFIGURED,
            )
        return active[0]  # ordered by priority, then id


def options_for(options: dict[str, Any] | None, entry: Configured) -> dict[str, Any]:
    """A send's options as one provider reads them: the common ones, then those under
    ``options.providers.<plugin>`` (``aliyun``), then under ``options.providers.<configured
    name>``. SMS vendors approve templates of their own, so a message that may fail over from
    Aliyun to Tencent names each one's template code and parameters there."""
    merged = dict(options or {})
    overrides = merged.pop("providers", None)
    if isinstance(overrides, dict):
        for key in (entry.provider, entry.name):
            extra = overrides.get(key)
            if isinstance(extra, dict):
                merged.update(extra)
    return merged


def provider_fault(exc: DeliveryError) -> bool:
    """Whether a failure says something about the provider (its quality, its breaker): a 5xx, the
    network, its credentials or quota do; a refused recipient or content, or our own rate limit's
    wait, do not."""
    if isinstance(exc, Deferred) or exc.code == ErrorCode.RATE_LIMITED:
        return False  # a vendor's throttling (even per number) says nothing of its health
    if exc.code in (ErrorCode.RECIPIENT_INVALID, ErrorCode.CHANNEL_SEND_FAILED):
        return exc.sender_fault
    return True


def _try(exc: DeliveryError) -> dict[str, Any]:
    """A failed try of a provider before the next one was tried (for its 'retrying' event)."""
    return {"provider": exc.provider, "error_code": exc.code, "error": exc.message, "detail": dict(exc.detail),
            "deferred": isinstance(exc, Deferred)}  # fmt: skip


def _after(exc: DeliveryError, tries: list[DeliveryError]) -> DeliveryError:
    """The failure that ends the attempt, carrying the tries before it. When several providers
    failed, the attempt is retried if any failure was transient (a rate-limit wait is kept as a
    deferral: the same attempt soon); only when every one failed for good is it permanent."""
    if not tries or exc.code == ErrorCode.RECIPIENT_INVALID:
        final = exc
    else:
        everything = [*tries, exc]
        deferred = [e for e in everything if isinstance(e, Deferred)]
        transient = [e for e in everything if isinstance(e, Retryable) and not isinstance(e, Deferred)]
        if deferred and not transient:
            final = min(deferred, key=lambda e: e.retry_after or 0)
        elif transient:
            final = transient[-1]
        else:
            final = exc
    final.tries = [_try(t) for t in [*tries, exc] if t is not final]
    return final


def _why(exc: Exception) -> str:
    """Why a row is unusable, without its values (a validation error quotes its input: secrets)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        found = errors(include_input=False)
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['type']}" for e in found)
    return exc.__class__.__name__


class ChannelSender:
    """The :class:`~services.senders.base.Provider` of a plugin channel (see the module doc)."""

    channel: ClassVar[str]
    name: ClassVar[str] = "plugins"

    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: Redis, box: SecretBox) -> None:
        self.settings = settings
        self.pool = pool
        self.directory = Directory(self.channel, box)
        self.pacer = Pacer(redis, settings.pacing_max_wait_s)
        self._plugins: dict[int, tuple[int, Plugin]] = {}  # provider id -> (revision, plugin)
        self._clients: list[httpx.AsyncClient] = []
        self._default_client = self._client({})
        self._reload_soon = asyncio.Event()
        self._reloader: asyncio.Task | None = None

    @classmethod
    def bound(cls, channel: str) -> type[ChannelSender]:
        Channel(channel)  # ValueError for an unknown channel
        return type(f"{channel.title()}Sender", (cls,), {"channel": channel})

    @classmethod
    def check(cls, settings: Settings) -> None:
        SecretBox.from_setting(settings.encryption_key.get_secret_value())

    @classmethod
    async def open(cls, settings: Settings, health: HealthHook) -> ChannelSender:
        pool, redis = await _SHARED.join(cls, settings)
        sender = cls(settings, pool, redis, SecretBox.from_setting(settings.encryption_key.get_secret_value()))
        await sender.directory.load(pool)
        _SHARED.senders[cls.channel] = sender
        sender._reloader = asyncio.create_task(sender._reload_loop())
        return sender

    # --- following the configuration --------------------------------------------------------

    async def _reload_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload_soon.wait(), self.settings.provider_reload_s)
            self._reload_soon.clear()
            try:
                await self.directory.load(self.pool)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("%s providers not reloaded (%s); keeping the ones known", self.channel, exc)
                self._reload_soon.set()  # the change that asked for it is still to be read
                await asyncio.sleep(1)
                continue
            self.forget_removed()

    # --- delivering -------------------------------------------------------------------------

    def _client(self, options: dict[str, Any]) -> httpx.AsyncClient:
        # Redirects are not followed unless a plugin says so (a 3xx is an answer to classify).
        options = {"timeout": self.settings.provider_timeout_s, "follow_redirects": False, **options}
        client = guarded_client(self.settings.outbound_allow, **options)
        self._clients.append(client)
        return client

    def plugin_for(self, entry: Configured) -> Plugin:
        """The plugin instance of a configured provider, kept until its configuration changes
        (so tokens it caches live as long as the configuration)."""
        known = self._plugins.get(entry.id)
        if known is not None and known[0] == entry.revision:
            return known[1]
        if known is not None:
            self._retire(known[1])
        cls = entry.plugin
        options = cls.client_options(entry.config)
        instance = cls(entry.config, self._client(options) if options else self._default_client)
        self._plugins[entry.id] = (entry.revision, instance)
        return instance

    def forget_removed(self) -> None:
        """Drop the plugins of providers no longer configured (deleted, after a reload)."""
        live = {p.id for entries in self.directory.by_tenant.values() for p in entries}
        for provider_id in [i for i in self._plugins if i not in live]:
            self._retire(self._plugins.pop(provider_id)[1])

    def _retire(self, plugin: Plugin) -> None:
        """A replaced plugin's own HTTP client (APNs's HTTP/2 one) is closed once the requests it
        may still be serving are over (a minute: six provider timeouts)."""
        if plugin.http is self._default_client or plugin.http not in self._clients:
            return
        self._clients.remove(plugin.http)
        loop = asyncio.get_running_loop()
        loop.call_later(60, lambda c=plugin.http: asyncio.ensure_future(c.aclose()))

    async def send(self, dispatch: DispatchV1, handoff: Handoff | None = None) -> SendResult:
        """Deliver through the router's candidates in order: a provider that fails moves the
        dispatch to the next at once (its failure kept in ``tries`` for the timeline and the
        provider's quality); a recipient the vendor refused (another would refuse it too) and a
        request that may have reached the vendor (a timeout after it was written) stop there.
        Without candidates (a router that knew no provider yet), the
        configured choice of :meth:`Directory.choose`."""
        entries = await self._entries(dispatch)
        tries: list[DeliveryError] = []
        for i, entry in enumerate(entries):
            try:
                result = await self._send_with(entry, dispatch)
            except DeliveryError as exc:
                last = i == len(entries) - 1
                if last or exc.code == ErrorCode.RECIPIENT_INVALID or exc.unsure:
                    # A refused recipient would be refused elsewhere too; a request that may
                    # have landed is retried later rather than sent again elsewhere now.
                    raise _after(exc, tries) from None
                tries.append(exc)
                continue
            result.tries = [_try(t) for t in tries]
            return result
        raise AssertionError("no provider to try")  # _entries answers at least one

    async def _entries(self, dispatch: DispatchV1) -> list[Configured]:
        """The configured providers to try: the router's candidates still configured, else the
        configured choice (Permanent 2011 when there is none, after reading the rows again: a
        provider configured a moment ago may not have been notified yet)."""
        try:
            return self._known(dispatch)
        except Permanent:
            try:
                await self.directory.load(self.pool)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise Unavailable(f"providers could not be read: {exc.__class__.__name__}") from None
            return self._known(dispatch)

    def _known(self, dispatch: DispatchV1) -> list[Configured]:
        active = {p.id: p for p in self.directory.by_tenant.get(dispatch.tenant_id, []) if p.is_active}
        found = [active[c.id] for c in dispatch.candidates if c.id in active]
        return found or [self.directory.choose(dispatch)]

    async def _send_with(self, entry: Configured, dispatch: DispatchV1) -> SendResult:
        plugin = self.plugin_for(entry)
        message = Message(
            message_id=dispatch.message_id,
            dispatch_id=dispatch.dispatch_id,
            tenant_id=dispatch.tenant_id,
            to=dispatch.to[0],
            content=dispatch.content,
            format=dispatch.content_type.value,  # type: ignore[arg-type]
            title=dispatch.subject,
            card=dispatch.card,
            options=options_for(dispatch.options, entry),
            attempt=dispatch.attempt,
        )
        started = time.perf_counter()
        try:
            waited = await self.pacer.wait(entry, message.to)
            started = time.perf_counter()
            result = await plugin.send(message)
        except DeliveryError as exc:
            exc.provider = entry.provider
            exc.detail = {
                "provider_id": entry.id,
                "provider_name": entry.name,
                "provider_fault": provider_fault(exc),
                "provider_ms": round((time.perf_counter() - started) * 1000, 1),
            }
            raise
        result.provider = entry.provider
        result.detail = {
            **result.detail,
            "provider_id": entry.id,
            "provider_name": entry.name,
            "cost": str(entry.cost(message.to)),
            "provider_ms": round((time.perf_counter() - started) * 1000, 1),
            **({"paced_ms": round(waited * 1000, 1)} if waited else {}),
        }
        return result

    async def ready(self) -> None:
        if not self.directory.loaded.is_set():
            raise Unavailable("providers not loaded yet")

    async def close(self) -> None:
        if self._reloader is not None:
            self._reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloader
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.aclose()
        await _SHARED.leave(self.channel)
