"""The router's faust app: wiring only. Decisions live in :mod:`services.router.routing`.

faust acks a source record even when the agent raises (faust's agents guide), so every
record's failure is handled here and sent to ``notify.dlq``; agents keep concurrency 1
(faust #606: concurrency > 1 can commit past an in-flight record). faust flushes its producer
before it commits offsets, so a record's outputs are on the broker before its offset is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import faust
from redis.asyncio import Redis

from services.router.frequency import Frequency
from services.router.retry import serve_relay
from services.router.routing import (
    Held,
    Origin,
    Parked,
    Rejected,
    Routed,
    Routing,
    Unavailable,
    Unknown,
    decision_labels,
    plan,
    settle_unknown,
)
from services.router.schedule import serve_scheduler
from shared.events import Channel, DeadLetterV1, utcnow
from shared.frequency import RuleStore
from shared.health import HealthServer
from shared.ids import new_request_id
from shared.kafka import Topics, Trace, keep_topics, message_key
from shared.logging import log_event, request_id_var, traceparent_var
from shared.metrics import (
    CONSUMER_LAST_PROGRESS,
    MESSAGES_PARKED,
    MESSAGES_REJECTED,
    MESSAGES_ROUTED,
    ROUTING_DECISIONS,
    WORKER_TASKS,
)
from shared.routing import HealthStore, Probes, RoutingStore
from shared.settings import Settings
from shared.template_store import ConfigFollower, TemplateStore
from shared.templates import Renderer

log = logging.getLogger("herald.router")


def create_app(settings: Settings) -> faust.App:
    """Build the router app for ``settings``."""
    app = faust.App(
        "herald-router",
        broker=[f"kafka://{s}" for s in settings.bootstrap_servers],
        web_enabled=False,
        store="memory://",
        topic_partitions=settings.kafka_topic_partitions,
        topic_replication_factor=settings.kafka_replication_factor,
        producer_acks=-1,
        producer_linger=settings.kafka_linger_ms / 1000,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_rebalance_timeout=settings.kafka_rebalance_timeout_s,
        broker_heartbeat_interval=settings.kafka_heartbeat_interval_s,
        broker_request_timeout=max(settings.kafka_request_timeout_s, settings.kafka_session_timeout_s + 1),
        broker_commit_every=100,
        broker_commit_interval=0.5,
        datadir=None,
        loghandlers=[],
    )
    requests = app.topic(Topics.REQUESTS, key_serializer="raw", value_serializer="raw")
    events_topic = app.topic(Topics.EVENTS, key_serializer="raw", value_serializer="raw")
    dlq = app.topic(Topics.DLQ, key_serializer="raw", value_serializer="raw")
    dispatch_topics = {
        channel: app.topic(Topics.dispatch(channel), key_serializer="raw", value_serializer="raw")
        for channel in Channel
    }
    state = {"assigned": False}
    # Templates come from notify.config, read whole before the first request is routed.
    templates = TemplateStore()
    rules = RuleStore()  # frequency caps and digest rules, from the same topic
    # Providers, routing rules and policies come the same way; providers' live quality from the
    # compacted notify.provider-health (the tracker's), read whole and followed by every router.
    health_store = HealthStore(stale_after_s=4 * settings.quality_refresh_s)
    routing = Routing(RoutingStore(), health_store, Probes(every_s=settings.breaker_probe_every_s))
    follower = ConfigFollower(settings, templates, rules, routing.store)
    health_follower = ConfigFollower(settings, routing.health, topic=Topics.PROVIDER_HEALTH)
    app.herald_routing = routing  # type: ignore[attr-defined]
    renderer = Renderer()
    app.herald_templates = templates  # type: ignore[attr-defined]
    # Windows of frequency caps and digest buckets (no connection until the first command; short
    # timeouts: a Redis that hangs must not hold the stream, caps then fail open).
    redis = Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )
    frequency = Frequency(redis, rules, templates, renderer, settings)

    @app.on_rebalance_complete.connect
    async def _assigned(sender: object, **kwargs: object) -> None:
        state["assigned"] = True

    loading = asyncio.Lock()

    async def templates_loaded() -> None:
        """Read the config topic whole (once) before the first request is routed; retried
        (the exception propagates) while the broker cannot be reached."""
        if not follower.loaded.is_set():
            async with loading:
                if not follower.loaded.is_set():
                    await follower.start()

    @app.task(on_leader=False)
    async def _read_config() -> None:
        await templates_loaded()

    @app.task(on_leader=False)
    async def _read_health() -> None:
        # Without it routing still works (on cost and priority alone): retried until it starts.
        while True:
            try:
                await health_follower.start(timeout=10)
                return
            except Exception as exc:  # the broker away at start-up
                log.warning("provider health not followed yet (%s); retrying", type(exc).__name__)
                await asyncio.sleep(2)

    async def ready() -> None:
        if not follower.loaded.is_set():
            raise RuntimeError("templates not loaded yet")
        if not state["assigned"]:
            raise RuntimeError("no partitions assigned yet")
        if app.rebalancing:
            raise RuntimeError("rebalancing")

    health = HealthServer("0.0.0.0", settings.router_http_port, {"kafka": ready})

    @app.task(on_leader=False)
    async def _serve_health() -> None:
        await health.start()

    @app.agent(requests, concurrency=1)
    async def route(stream: faust.StreamT) -> None:
        async for record in stream.events():
            trace = Trace.from_headers(record.headers)
            rid = request_id_var.set(trace.request_id or new_request_id())
            tp = traceparent_var.set(trace.traceparent)
            try:
                WORKER_TASKS.inc("router", await _handle(record, trace))
            except Exception:  # never let one record stop the agent: it goes to the DLQ
                WORKER_TASKS.inc("router", "failure")
                log.exception("routing failed; sending the record to the dead-letter topic")
                await _dead_letter(record, trace, "router_error", [], None)
            finally:
                CONSUMER_LAST_PROGRESS.labels("router").set(time.time())
                request_id_var.reset(rid)
                traceparent_var.reset(tp)

    async def _handle(record: faust.types.EventT, trace: Trace) -> str:
        """Route one request; answers its outcome for celery_tasks_total (shared/metrics.py)."""
        msg = record.message
        stamped = datetime.fromtimestamp(msg.timestamp, UTC) if msg.timestamp else utcnow()
        origin = Origin(msg.topic, msg.partition, msg.offset, stamped)
        await templates_loaded()
        horizon = settings.schedule_horizon_s
        decide = {"origin": origin, "templates": templates, "renderer": renderer, "horizon_s": horizon,
                  "routing": routing}  # fmt: skip
        decision = plan(record.value, **decide)
        if isinstance(decision, Unknown) or (isinstance(decision, Rejected) and decision.reason == "no_route"):
            # A template version, or a routing rule, published a moment ago? Read the config
            # topic to its end, then decide again.
            synced = await follower.sync(timeout=10)
            decision = plan(record.value, **decide)
            if isinstance(decision, Unknown):
                decision = settle_unknown(decision, record.value, synced=synced, templates=templates)
        if isinstance(decision, Routed) and decision.children:
            # An "all" rule's other channels: messages of their own, routed (and capped) on
            # their own, whatever becomes of this one.
            for child in decision.children:
                await requests.send(key=message_key(child.tenant_id, child.to[0]), value=child.to_bytes(),
                                        headers=trace.headers())  # fmt: skip
        if isinstance(decision, Routed):
            # Frequency caps and digests, before the dispatch is sent (services/router/frequency.py).
            decision = await frequency.apply(decision, record.value)
        if isinstance(decision, Held):  # suppressed or digested: only its events
            await _emit(decision.events, trace)
            return "success"
        if isinstance(decision, Unavailable):
            await _dead_letter(record, trace, "template_unavailable", decision.errors, decision.message_id)
            return "failure"
        if isinstance(decision, Parked):
            await _emit(decision.events, trace)
            MESSAGES_PARKED.labels(decision.reason).inc()
            log_event(log, logging.INFO, "message parked until its time", message_id=decision.request.message_id,
                      until=decision.until.isoformat(), reason=decision.reason)  # fmt: skip
            return "success"
        if isinstance(decision, Routed):
            trace = Trace(trace.request_id or decision.request.request_id, trace.traceparent)
            await _emit(decision.events, trace)
            dispatch = decision.dispatch
            await dispatch_topics[dispatch.channel.value].send(
                key=message_key(dispatch.tenant_id, dispatch.to[0]),
                value=dispatch.to_bytes(),
                headers=trace.headers(),
            )
            MESSAGES_ROUTED.labels(dispatch.channel.value).inc()
            ROUTING_DECISIONS.labels(*decision_labels(decision)).inc()
            log_event(
                log,
                logging.INFO,
                "message routed",
                message_id=dispatch.message_id,
                channel=dispatch.channel.value,
                recipient=dispatch.to[0],
                provider=dispatch.candidates[0].name if dispatch.candidates else None,
            )
            return "success"
        assert isinstance(decision, Rejected)
        await _emit(decision.events, trace)
        tenant_id = decision.events[0].tenant_id if decision.events else None
        await _dead_letter(record, trace, decision.reason, decision.errors, decision.message_id, tenant_id)
        return "rejected"

    async def _emit(events: list, trace: Trace) -> None:
        for event in events:
            await events_topic.send(key=event.message_id.encode(), value=event.to_bytes(), headers=trace.headers())

    async def _dead_letter(
        record, trace: Trace, reason: str, errors: list, message_id: str | None, tenant_id: str | None = None
    ) -> None:
        msg = record.message
        letter = DeadLetterV1(
            source_topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
            reason=reason,
            errors=errors[:50],
            message_id=message_id,
            service="router",
            tenant_id=tenant_id,
            occurred_at=utcnow(),
            key=msg.key.decode("utf-8", "replace") if isinstance(msg.key, bytes) else None,
            payload=(record.value or b"").decode("utf-8", "replace")
            if isinstance(record.value, bytes | type(None))
            else str(record.value),
            headers={
                k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
                for k, v in (record.headers or {}).items()
            },
            letter_id=f"{msg.topic}:{msg.partition}:{msg.offset}:{reason}",
        )
        await dlq.send(
            key=message_id.encode() if message_id else None,
            value=letter.to_bytes(),
            headers=trace.headers(),
        )
        MESSAGES_REJECTED.labels("router", reason).inc()
        log_event(
            log,
            logging.WARNING,
            "record rejected to the dead-letter topic",
            reason=reason,
            message_id=message_id,
            errors=errors[:5],
        )

    @app.task(on_leader=False)
    async def _retry_relay() -> None:
        await serve_relay(settings)

    @app.task(on_leader=False)
    async def _scheduler() -> None:
        await serve_scheduler(settings)

    @app.task(on_leader=False)
    async def _keep_topics() -> None:
        await keep_topics(settings)

    @app.on_before_shutdown.connect
    async def _stop_health(sender: object, **kwargs: object) -> None:
        await health.stop()
        await follower.stop()
        await health_follower.stop()
        await redis.aclose()

    return app
