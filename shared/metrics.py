"""Prometheus metrics, defined once (names from seed 004 §3.1.9 where it names them)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, Metric, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

HTTP_REQUESTS = Counter("http_requests_total", "HTTP requests", ["path", "method", "status"])
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "HTTP request duration",
    ["path", "method"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LIMITED = Counter("herald_rate_limited_total", "Requests refused with 429, by limit", ["kind"])
LIMIT_BYPASSED = Counter(
    "herald_rate_limit_bypassed_total", "Requests let through unchecked because Redis could not be asked", ["kind"]
)
AUTH_FAILURES = Counter("herald_auth_failures_total", "Requests refused with 401, by reason", ["reason"])
MESSAGES_ACCEPTED = Counter("herald_messages_accepted_total", "Messages accepted by ingest", ["type"])
MESSAGES_ROUTED = Counter("herald_messages_routed_total", "Requests routed to a channel", ["type"])
MESSAGES_REJECTED = Counter(
    "herald_messages_rejected_total", "Events rejected to the dead-letter topic", ["service", "reason"]
)
MESSAGES_SENT = Counter("messages_sent_total", "Delivery attempts by outcome", ["type", "status", "provider"])
SEND_DURATION = Histogram(
    "messages_send_duration_seconds",
    "Time spent by a provider on one delivery attempt",
    ["type", "provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
EVENTS_FOLDED = Counter("herald_tracker_events_folded_total", "Events folded into PostgreSQL", ["state"])
FOLD_BATCH = Histogram(
    "herald_tracker_batch_size",
    "Events per tracker batch",
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000),
)
CONSUMER_LAST_PROGRESS = Gauge(
    "herald_consumer_last_progress_timestamp_seconds",
    "When a worker last processed a record",
    ["service"],
)


def render_latest() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST


EMAIL_POOL_AVAILABLE = Gauge("email_pool_available_accounts", "Active mailboxes below their daily limit", ["tenant"])
EMAIL_POOL_DAILY_SENT = Gauge("email_pool_daily_sent", "Emails counted against a mailbox's limit today", ["account"])
RETRIES_SCHEDULED = Counter(
    "herald_retries_scheduled_total", "Delivery attempts scheduled for a retry", ["channel", "tier"]
)
DEDUP_SKIPPED = Counter(
    "herald_dedup_skipped_total", "Requests accepted without the duplicate check (Redis unavailable)"
)
MESSAGES_REPUBLISHED = Counter("herald_messages_republished_total", "Stalled messages the sweeper published again")
MESSAGES_PARKED = Counter(
    "herald_messages_parked_total",
    "Requests parked until a later time, by reason (scheduled, deferred, digest)",
    ["reason"],
)
SCHEDULED_RELEASED = Counter("herald_scheduled_released_total", "Scheduled messages released by the scheduler")
SCHEDULE_LATENESS = Histogram(
    "herald_scheduled_release_lateness_seconds",
    "How long after its time a scheduled message was released",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
SCHEDULED_PENDING = Gauge("herald_scheduled_pending", "Scheduled tasks waiting for their time (seen by the scheduler)")
SCHEDULED_OVERDUE = Gauge(
    "herald_scheduled_overdue_seconds",
    "How far past its time the earliest pending task is (0 when none is due; alert when it grows)",
)
BATCH_ITEMS = Counter(
    "herald_batch_items_total",
    "Items of batch sends by outcome (accepted; rejected: invalid or duplicate; failed: not recorded or published)",
    ["outcome"],
)
# Frequency caps and digests (issue 8).
FREQUENCY_CAPPED = Counter(
    "herald_frequency_capped_total", "Messages a frequency cap held back, by action (suppress, defer)", ["action"]
)
FREQUENCY_UNCHECKED = Counter(
    "herald_frequency_unchecked_total",
    "Messages routed without a frequency check because Redis could not be asked, by check (cap, digest)",
    ["check"],
)
DIGEST_ITEMS = Counter("herald_digest_items_total", "Messages handed to a digest")
DIGESTS_DELIVERED = Histogram(
    "herald_digest_size", "Messages listed by each digest routed", buckets=(1, 2, 3, 5, 10, 20, 50, 100, 200, 500)
)
DIGEST_RELEASE_FAILED = Counter(
    "herald_digest_release_failed_total",
    "Digests not routed when due, by reason (redis: postponed; lost: their messages were gone)",
    ["reason"],
)
FREQUENCY_RULE_REVISION = Gauge(
    "herald_frequency_rule_revision",
    "Highest revision of a frequency cap or digest rule applied from notify.config (API answers show each rule's)",
)
# Provider quality and circuit breakers (issue 10), set by the tracker that publishes them.
PROVIDER_BREAKER_OPEN = Gauge(
    "herald_provider_breaker_open", "1 while a configured provider's circuit breaker is open", ["provider_id"]
)
PROVIDER_SUCCESS_RATE = Gauge(
    "herald_provider_success_rate",
    "A configured provider's share of successful tries over the quality window",
    ["provider_id"],
)
# Status callbacks (issue 11), counted by the tracker that delivers them: each try's outcome
# (delivered; retrying: failed, another try is scheduled; failed: the last try failed or the
# failure is permanent) and how long the receiver took to answer.
CALLBACKS = Counter(
    "herald_callbacks_total", "Tries of status callbacks by outcome (delivered, retrying, failed)", ["outcome"]
)
CALLBACK_DURATION = Histogram(
    "herald_callback_duration_seconds",
    "How long a status callback's receiver took to answer (or to fail)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


# Observability (issue 11): the rest of seed 004 §3.1.9 under its names, consumer lag, routing
# decisions. docs/observability.md says what each means; deploy/prometheus and deploy/grafana use them.
#
# Kafka has no queue length: queue_length{queue} is the backlog of a topic, the consumer lag of
# the group that consumes it summed over its partitions; herald_consumer_lag{group,topic} the
# same per group. Both, and redis_memory_usage_bytes, are set by one tracker at a time (the one
# holding the provider-quality lease, services/tracker/lag.py), so that sums over instances do
# not count twice; the others leave them empty.
QUEUE_LENGTH = Gauge("queue_length", "Records waiting in a topic: its consuming group's lag, summed", ["queue"])
# Retry tiers' lag: records waiting their delay on purpose, kept out of queue_length (and its alert).
RETRIES_WAITING = Gauge(
    "herald_retries_waiting",
    "Attempts in a retry tier (notify.retry.*) the retry relay has not relayed yet: mostly waiting for "
    "their delay on purpose (its group's lag, summed over partitions)",
    ["queue"],
)
CONSUMER_LAG = Gauge(
    "herald_consumer_lag", "End offset minus committed offset, summed over the topic's partitions", ["group", "topic"]
)
REDIS_MEMORY = Gauge(
    "redis_memory_usage_bytes", "Redis INFO memory used_memory, polled (redis: its host:port/db)", ["redis"]
)
ROUTING_DECISIONS = Counter(
    "herald_routing_decisions_total",
    "Messages the router dispatched, by channel, the provider it put first (plugin) and why",
    ["channel", "provider", "reason"],
)


class _PoolCollector:
    """db_connections_active and the pool's size, read from each asyncpg pool at scrape time
    (nothing per query). Pools register themselves (shared/db.create_pool); closed ones drop out."""

    def __init__(self) -> None:
        self.pools: list[tuple[str, Any]] = []

    def track(self, pool: Any, name: str) -> None:
        self.pools = [(n, p) for n, p in self.pools if not p.is_closing()]
        self.pools.append((name, pool))

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> list[Metric]:
        active, opened, most = self._families()
        sums: dict[str, list[int]] = {}
        for name, pool in self.pools:
            if pool.is_closing():
                continue
            size, idle = pool.get_size(), pool.get_idle_size()
            total = sums.setdefault(name, [0, 0, 0])
            total[0] += size - idle
            total[1] += size
            total[2] += pool.get_max_size()
        for name, (in_use, size, top) in sorted(sums.items()):
            active.add_metric([name], in_use)
            opened.add_metric([name], size)
            most.add_metric([name], top)
        return [active, opened, most]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("db_connections_active", "PostgreSQL connections in use (checked out of the pool)",
                              labels=["pool"]),
            GaugeMetricFamily("herald_db_pool_open_connections", "PostgreSQL connections the pool holds open",
                              labels=["pool"]),
            GaugeMetricFamily("herald_db_pool_max_connections", "The pool's maximum size", labels=["pool"]),
        )  # fmt: skip


DB_POOLS = _PoolCollector()
REGISTRY.register(DB_POOLS)  # type: ignore[arg-type]

# Celery's task counter, for Kafka workers (there is no Celery): one task is one record a worker
# took off its topic and finished. router: a request (success: dispatched, parked or held by a
# cap/digest; rejected: to notify.dlq as invalid; failure: an error or a template unavailable);
# sender: a delivery attempt, read from messages_sent_total (success and unconfirmed: success;
# failed: failure; deferred: retry, a rate-limit wait); tracker: an event folded (success) or a
# record refused (rejected).
_SENDER_TASK_STATUS = {"success": "success", "unconfirmed": "success", "failed": "failure", "deferred": "retry"}


class _WorkerTasks:
    def __init__(self, attempts: Counter = MESSAGES_SENT) -> None:
        self.counts: dict[tuple[str, str], float] = {}
        self.attempts = attempts  # the senders' delivery attempts

    def inc(self, service: str, status: str, amount: float = 1) -> None:
        key = (service, status)
        self.counts[key] = self.counts.get(key, 0) + amount

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        totals = dict(self.counts)
        for metric in self.attempts.collect():
            for sample in metric.samples:
                if sample.name == "messages_sent_total":
                    status = _SENDER_TASK_STATUS.get(sample.labels["status"], sample.labels["status"])
                    totals[("sender", status)] = totals.get(("sender", status), 0) + sample.value
        family = self._family()
        for (service, status), value in sorted(totals.items()):
            family.add_metric([service, status], value)
        return [family]

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "celery_tasks", "Records Kafka workers finished, by service and outcome", labels=["service", "status"]
        )


WORKER_TASKS = _WorkerTasks()
REGISTRY.register(WORKER_TASKS)  # type: ignore[arg-type]
# Statistics kept in ClickHouse (issue 11): outcomes it refused for a reason retrying cannot mend
# (logged with the reason); an unreachable ClickHouse holds the tracker's batch instead.
STATISTICS_DROPPED = Counter(
    "herald_statistics_dropped_total", "Outcomes ClickHouse refused for good, so not in its statistics"
)
