"""The ingest API: FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from redis.asyncio import Redis

from services.ingest.access import AccessMiddleware
from services.ingest.attachments import run_sweeper as run_attachment_sweeper
from services.ingest.auth import Authenticator, Scope, Tokens, signing_key
from services.ingest.dedup import Guard
from services.ingest.deps import Services, caller
from services.ingest.frequency import RuleDistributor
from services.ingest.http import JSONResponse, RequestContextMiddleware, install_error_handlers
from services.ingest.limits import Quotas, RateLimiter
from services.ingest.publish import Publisher, RecordBatcher
from services.ingest.routes import (
    accounts,
    api_keys,
    attachments,
    audit_log,
    auth,
    batches,
    dead_letters,
    digest_rules,
    frequency_caps,
    health,
    messages,
    providers,
    recipients,
    routing,
    statistics,
    templates,
    tenants,
    webhooks,
)
from services.ingest.routing import RoutingDistributor, RuleCache
from services.ingest.sweeper import run_sweeper as run_stalled_sweeper
from services.ingest.templates import TemplateDistributor
from services.ingest.tenants import TenantSettingsCache
from services.statistics_clickhouse import from_settings
from shared.crypto import SecretBox
from shared.db import create_pool, migrate
from shared.events import EVENT_MODELS, json_schema
from shared.kafka import ensure_topics, keep_topics, make_producer, stop_quietly
from shared.settings import Settings
from shared.template_store import ConfigFollower, TemplateStore

log = logging.getLogger("herald.ingest")


def create_app(settings: Settings) -> FastAPI:
    """Build the ingest app; resources open in the lifespan, so building it is cheap.
    A missing or malformed encryption key stops it here, before anything starts."""
    secret_box = SecretBox.from_setting(settings.encryption_key.get_secret_value() if settings.encryption_key else None)
    tokens = Tokens(signing_key(settings), settings.jwt_ttl_s)
    limiter = RateLimiter(settings)  # no connection until the first request

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.run_migrations:
            await migrate(settings)
        await ensure_topics(settings)
        pool = await create_pool(settings)
        # Short timeouts: a Redis that hangs must not hold a request (dedup then fails open).
        redis = Redis.from_url(
            settings.redis_url.get_secret_value(),
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        producer = make_producer(settings)
        await producer.start()
        batcher = RecordBatcher(
            pool, settings.record_batch_max, settings.record_batch_wait_ms, settings.idempotency_ttl_s
        )
        batcher.start()
        store = TemplateStore()
        distributor = TemplateDistributor(pool, producer, store, settings.publish_timeout_s)
        rules = RuleDistributor(pool, producer, settings.publish_timeout_s)
        routing_config = RoutingDistributor(pool, producer, settings.publish_timeout_s)
        follower = ConfigFollower(settings, store)  # other replicas' changes
        await follower.start()
        authenticator = Authenticator(pool, tokens, settings)
        await authenticator.load_revoked(pool)
        background = [
            asyncio.create_task(
                run_attachment_sweeper(pool, Path(settings.data_dir), settings.attachment_sweep_interval_s),
                name="attachment-sweep",
            ),
            asyncio.create_task(run_stalled_sweeper(pool, producer, settings), name="stalled-sweep"),
            asyncio.create_task(
                keep_topics(
                    settings, lambda _: (distributor.dirty.set(), rules.dirty.set(), routing_config.dirty.set())
                ),
                name="keep-topics",
            ),
            asyncio.create_task(rules.run(), name="rule-distributor"),
            asyncio.create_task(routing_config.run(), name="routing-distributor"),
            asyncio.create_task(distributor.run(), name="template-distributor"),
            asyncio.create_task(authenticator.listen(), name="auth-listener"),
            asyncio.create_task(authenticator.flush_usage(), name="key-usage"),
        ]
        app.state.services = Services(
            settings=settings,
            pool=pool,
            redis=redis,
            producer=producer,
            publisher=Publisher(pool, producer, batcher, settings.publish_timeout_s, settings.record_timeout_s),
            guard=Guard(redis, settings.idempotency_ttl_s, settings.dedup_fail_open),
            tenants=TenantSettingsCache(pool, settings.dedup_window_s, settings.record_timeout_s),
            templates=distributor,
            tokens=tokens,
            auth=authenticator,
            limiter=limiter,
            quotas=Quotas(redis, pool, settings.rate_limit_fail_open),
            rules=rules,
            routing=routing_config,
            routing_rules=RuleCache(pool),
        )
        # Statistics are read from ClickHouse when it keeps them (docs/clickhouse.md); else from
        # PostgreSQL's rollups (routes/statistics.py store_of).
        app.state.statistics = from_settings(settings, pool=pool)
        log.info("ingest ready on %s:%s", settings.ingest_host, settings.ingest_port)
        try:
            yield
        finally:
            if app.state.statistics is not None:
                await app.state.statistics.close()
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await authenticator.write_usage()
            await batcher.stop()
            await follower.stop()
            await stop_quietly(producer)
            await redis.aclose()
            await pool.close()

    app = FastAPI(
        title="Herald",
        version="0.1.0",
        description="Self-hosted notification hub. Responses use the envelope "
        "`{code, message, data, request_id}`; errors carry seed 004's codes.",
        default_response_class=JSONResponse,
        lifespan=lifespan,
    )
    app.state.secret_box = secret_box
    install_error_handlers(app)
    # Starlette runs the last added outermost: request id and body limit, then access.
    app.add_middleware(AccessMiddleware, public_docs=settings.public_docs)
    app.add_middleware(
        RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, exempt_paths=(attachments.UPLOAD_PATH,)
    )
    app.include_router(health.router)
    app.include_router(messages.router)
    app.include_router(batches.router)
    app.include_router(accounts.router)
    app.include_router(dead_letters.router)
    app.include_router(attachments.router)
    app.include_router(tenants.router)
    app.include_router(templates.router)
    app.include_router(frequency_caps.router)
    app.include_router(digest_rules.router)
    app.include_router(providers.router)
    app.include_router(routing.router)
    app.include_router(recipients.router)
    app.include_router(auth.router)
    app.include_router(api_keys.router)
    app.include_router(audit_log.router)
    app.include_router(webhooks.router)
    app.include_router(statistics.router)

    @app.get("/api/v1/schemas/{name}", tags=["schemas"], summary="JSON Schema of an event")
    async def event_schema(name: str, request: Request) -> JSONResponse:
        """The schema of ``notify.request.v1`` and the other events, for direct publishers."""
        from shared.errors import ErrorCode, HeraldError

        caller(request, Scope.READ)
        key = name.removesuffix(".json")
        if key not in EVENT_MODELS:
            raise HeraldError(ErrorCode.NOT_FOUND, f"no schema named {name}", field="name")
        return JSONResponse(json_schema(key))

    return app
