"""Prometheus metrics, defined once (names from seed 004 §3.1.9 where it names them)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

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
