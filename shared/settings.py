"""Herald's one configuration object, read from the environment (prefix ``HERALD_``).

Every service builds a :class:`Settings` once at start-up and passes it into its factories;
nothing deeper in the code reads ``os.environ``. Invalid values fail at start-up.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All settings of all services; each service reads the part it needs."""

    model_config = SettingsConfigDict(env_prefix="HERALD_", env_file=None, extra="ignore", frozen=True)

    # --- identity and logging -------------------------------------------------------------
    service_name: str = "herald"
    log_level: str = "INFO"
    log_json: bool = True

    # --- Kafka ----------------------------------------------------------------------------
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    # Tansu (the embedded broker) refuses InitProducerId, so idempotence is off by default;
    # turn it on against Apache Kafka / Strimzi.
    kafka_enable_idempotence: bool = False
    kafka_topic_partitions: int = Field(default=3, ge=1)
    kafka_replication_factor: int = Field(default=1, ge=1)
    kafka_linger_ms: int = Field(default=5, ge=0)
    kafka_request_timeout_s: float = Field(default=10.0, gt=0)
    kafka_session_timeout_s: float = Field(default=10.0, gt=0)
    # Tansu completes a group join only when the rebalance timeout runs out; a short one
    # keeps start-up and rebalances quick.
    kafka_rebalance_timeout_s: float = Field(default=6.0, gt=0)
    kafka_heartbeat_interval_s: float = Field(default=1.0, gt=0)
    kafka_max_batch: int = Field(default=500, ge=1)
    # Every service checks this often that its topics still exist and creates them again
    # (a broker restarted without its data); clients refresh their metadata at least this often.
    kafka_topic_check_interval_s: float = Field(default=10.0, gt=0)
    kafka_metadata_max_age_s: float = Field(default=30.0, gt=0)

    # --- PostgreSQL and Redis ------------------------------------------------------------
    database_url: SecretStr = SecretStr("postgresql://herald@127.0.0.1:5433/herald")
    db_pool_min: int = Field(default=2, ge=1)
    db_pool_max: int = Field(default=20, ge=1)
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6380/0")
    run_migrations: bool = True

    # --- ingest ---------------------------------------------------------------------------
    ingest_host: str = "127.0.0.1"
    ingest_port: int = 8000
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_recipients: int = Field(default=100, ge=1)
    record_batch_max: int = Field(default=256, ge=1)
    record_batch_wait_ms: float = Field(default=2.0, ge=0)
    # Ingest answers 503 / 5001 rather than wait longer than these (broker, PostgreSQL).
    publish_timeout_s: float = Field(default=4.0, gt=0)
    record_timeout_s: float = Field(default=1.0, gt=0)
    public_url: str = ""
    # Idempotency keys hold this long (seed 004: 5 minutes; at most 24 h).
    idempotency_ttl_s: int = Field(default=300, ge=1, le=86400)
    # Same recipient + subject + content within this window is a duplicate (0: off).
    dedup_window_s: int = Field(default=300, ge=0, le=86400)
    # Redis down: True accepts the request unchecked (marked dedup_skipped); False answers 503.
    dedup_fail_open: bool = True
    redis_timeout_s: float = Field(default=0.5, gt=0)
    # The sweeper re-publishes a message that made no progress for this long.
    sweep_stalled_after_s: float = Field(default=120.0, gt=0)
    sweep_interval_s: float = Field(default=15.0, gt=0)
    # User-given outbound URLs (webhooks, callbacks) may reach these private ranges and hosts
    # (comma-separated CIDRs and names; shared/ssrf.py). Empty: public addresses only.
    outbound_allow: str = ""
    # Each field of a template (subject, content, text) at most this many bytes.
    template_max_bytes: int = Field(default=65536, ge=1024, le=1_048_576)

    # --- access: API keys, tokens, limits (issue 7) ---------------------------------------
    # HS256 signing key for access tokens, at least 32 bytes. Unset: derived from
    # HERALD_ENCRYPTION_KEY with HKDF-SHA256 (one secret less to manage; rotating the
    # encryption key then also signs everyone out).
    jwt_secret: SecretStr | None = None
    jwt_ttl_s: int = Field(default=3600, ge=60, le=86400)
    # A token may be exchanged for a new one (and revoked) in its last this-many seconds.
    jwt_refresh_window_s: int = Field(default=300, ge=10)
    # bcrypt work factor of API secrets (12: ~0.25 s per check on one core).
    api_secret_bcrypt_rounds: int = Field(default=12, ge=4, le=16)
    # A key's state (enabled, scopes, tier) is re-read at least this often; changes made
    # through the API reach every replica at once through PostgreSQL NOTIFY.
    auth_cache_ttl_s: float = Field(default=60.0, gt=0)
    # Requests not carrying a valid token (including POST /auth/token), per client IP.
    rate_limit_ip: str = "100/minute"
    # Per API key, by the key's tier ("" = no limit). Format: limits' "N/second|minute|hour|day".
    rate_limit_tiers: dict[str, str] = Field(
        default_factory=lambda: {
            "basic": "600/minute",
            "standard": "6000/minute",
            "premium": "60000/minute",
            "unlimited": "",
        }
    )
    default_key_tier: str = "standard"
    # Redis down: True lets requests through unlimited (logged); False answers 503.
    rate_limit_fail_open: bool = True
    # Client IPs are taken from X-Forwarded-For only when the peer is one of these proxies
    # (uvicorn's forwarded_allow_ips; comma-separated, "*" = any). Empty: the peer address.
    forwarded_allow_ips: str = ""
    # /docs, /redoc and /openapi.json without a token (development); otherwise they need one.
    public_docs: bool = False

    # --- scheduling, batches, frequency control (issue 8) --------------------------------
    # A send may be scheduled at most this far ahead (30 days).
    schedule_horizon_s: int = Field(default=30 * 86400, ge=60)
    # Naive times (seed 004's "2025-10-25 10:00:00") are read in the request's `timezone`, or this.
    default_timezone: str = "Asia/Shanghai"
    # The scheduler sleeps until the earliest task is due, woken early by PostgreSQL NOTIFY when
    # one is added or moved; this bounds each sleep (a missed notification costs at most this).
    scheduler_max_sleep_s: float = Field(default=5.0, gt=0, le=300)
    scheduler_batch: int = Field(default=500, ge=1, le=10_000)
    # Items of one POST /api/v1/messages/batch.
    batch_max_items: int = Field(default=1000, ge=1, le=10_000)
    # A digest lists at most this many messages; the next one opens the next digest.
    digest_max_items: int = Field(default=50, ge=1, le=500)
    # A digest's messages stay in Redis this long after its window (a digest released later than
    # that finds them gone), and a delivered digest's list this long (a replay lists the same).
    digest_keep_s: int = Field(default=7 * 86400, ge=3600)

    # --- workers' health/metrics ports ---------------------------------------------------
    router_http_port: int = 8101
    sender_http_port: int = 8102
    tracker_http_port: int = 8103

    # --- secrets at rest --------------------------------------------------------------------
    # 32 bytes, base64: AES-256-GCM key for stored secrets (SMTP passwords, provider keys).
    # Required by the services that read or write secrets; start-up stops without it.
    encryption_key: SecretStr | None = None

    # --- data folder (attachments) ------------------------------------------------------
    data_dir: str = ".data"
    attachment_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    attachments_total_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    attachment_expire_days: int = Field(default=7, ge=1)
    attachment_sweep_interval_s: float = Field(default=3600, gt=0)

    # --- retries (seed 004: after 1, 5, 10 minutes) ---------------------------------------
    retry_delays_s: str = "60,300,600"

    # --- email sender: the mailbox pool ----------------------------------------------------
    # Counters reset on the first use of a new day in this timezone (seed 004: Asia/Shanghai).
    pool_timezone: str = "Asia/Shanghai"
    pool_failure_threshold: int = Field(default=3, ge=1)
    # Mailbox slots counted per database round trip (1 = exact order, one UPDATE per email).
    pool_lease_size: int = Field(default=8, ge=1, le=1000)
    smtp_ca_file: str | None = None  # extra CA bundle trusted for SMTP TLS (private relays)
    # Bootstrap account: when HERALD_SMTP_HOST is set and the default tenant has no mailbox
    # yet, the sender adds this one to the pool at start-up (make run points it at the sink).
    smtp_host: str = ""
    smtp_port: int = 1025
    smtp_daily_limit: int = Field(default=500, ge=0)
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_tls_mode: Literal["none", "starttls", "tls"] = "starttls"
    smtp_timeout_s: float = Field(default=30.0, gt=0)
    smtp_from_address: str = "herald@localhost"
    smtp_from_name: str = "Herald"
    sender_concurrency: int = Field(default=32, ge=1)
    sender_done_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    # Providers of the other channels (issue 9): each HTTP request's timeout, and how often the
    # configured providers are read again besides the NOTIFY of every change.
    provider_timeout_s: float = Field(default=10.0, gt=0)
    provider_reload_s: float = Field(default=60.0, gt=0)
    # A provider's rate limit is waited for in the sender up to this long; a longer wait goes
    # to a retry topic (services/senders/pacing.py).
    pacing_max_wait_s: float = Field(default=30.0, ge=0)
    # Smart routing (issue 10): a router lets one message probe a provider whose breaker is open
    # and cooled down (half-open) this often.
    breaker_probe_every_s: float = Field(default=5.0, gt=0)

    # --- tracker --------------------------------------------------------------------------
    tracker_batch_max: int = Field(default=1000, ge=1)
    # One tracker at a time (the provider-quality publisher) reads every consuming group's lag and
    # Redis's memory this often: queue_length, herald_consumer_lag, redis_memory_usage_bytes
    # (services/tracker/lag.py, docs/observability.md).
    lag_poll_s: float = Field(default=5.0, gt=0, le=300)

    # --- retention and statistics (issue 11; shared/retention.py) ---------------------------
    # Seed 004 §3.1.5: message records (and their timelines) are kept retention_days, failed ones
    # retention_failed_days, then folded into message_archive as counts. A record still on its
    # way (pending, sending) is never deleted by age. Rollups by minute and by hour are kept
    # stats_minute_days and stats_hour_days; by day, until deleted by hand.
    retention_days: int = Field(default=30, ge=1)
    retention_failed_days: int = Field(default=90, ge=1)
    stats_minute_days: int = Field(default=2, ge=1)
    stats_hour_days: int = Field(default=90, ge=1)
    # One tracker at a time (a PostgreSQL advisory lock) archives this often; each transaction
    # deletes at most archive_batch records.
    archive_interval_s: float = Field(default=3600, gt=0)
    archive_batch: int = Field(default=5000, ge=1, le=100_000)
    # Where statistics are read from: the rollups in PostgreSQL, or ClickHouse (docs/clickhouse.md).
    stats_backend: Literal["postgres", "clickhouse"] = "postgres"
    clickhouse_url: SecretStr = SecretStr("http://default:@127.0.0.1:8123/herald")

    # --- provider quality and circuit breakers (issue 10; services/tracker/quality.py) -----
    # Tries of configured providers are counted in Redis per bucket of this many seconds, and a
    # provider is judged over the last quality_window_s (whole buckets: the window is 0 to one
    # bucket shorter; events older than the window are not counted).
    quality_bucket_s: int = Field(default=10, ge=1, le=3600)
    quality_window_s: int = Field(default=300, ge=1, le=86_400)
    # One tracker (holding a Redis lease) publishes to notify.provider-health: it looks every
    # quality_tick_s, publishes what changed, and republishes every provider seen in the window
    # or with an open breaker at least every quality_refresh_s. Routers take a record older than
    # 4 x quality_refresh_s for unknown (shared/routing.HealthStore's stale_after_s), so a record
    # never goes stale while a tracker leads. Every refresh is one more record on the topic, and
    # Tansu never compacts it: broker memory and each router's start-up read grow with it, hence
    # not much more often than this.
    quality_tick_s: float = Field(default=1.0, gt=0, le=60)
    quality_refresh_s: float = Field(default=30.0, gt=0)
    # A provider's breaker opens after this many consecutive provider faults, or when at least
    # breaker_min_samples tries in the window fail at breaker_error_rate or more. Open, routers
    # send it nothing (unless no other provider is left) until breaker_cooldown_s has passed,
    # then probe it with one message: a success at or after opened + cooldown (a probe's) closes
    # it (statistics start afresh), a failure then opens it for another cooldown. Tries within
    # the cooldown were on their way before routers heard it opened: they change nothing.
    breaker_failures: int = Field(default=5, ge=1)
    breaker_error_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_min_samples: int = Field(default=10, ge=1)
    breaker_cooldown_s: float = Field(default=30.0, gt=0)

    # --- status callbacks (issue 11; services/tracker/callbacks.py, docs/callbacks.md) -----
    # Waits before the 2nd, 3rd and 4th try of a callback; after the last failure it is 'failed'.
    callback_retry_delays_s: str = "10,60,300"
    callback_timeout_s: float = Field(default=10.0, gt=0)  # each try
    callback_concurrency: int = Field(default=16, ge=1, le=1000)  # tries in flight per tracker
    # The worker sleeps until the next try is due (woken by NOTIFY after a fold), never longer.
    callback_max_sleep_s: float = Field(default=5.0, gt=0)
    # After a rotation the previous signing secret signs beside the new one this long.
    callback_secret_grace_s: int = Field(default=86_400, ge=0)
    # Delivered and failed callbacks (and their tries) are deleted after this many days.
    callback_keep_days: int = Field(default=30, ge=1)

    @property
    def callback_retry_delays(self) -> list[float]:
        return _seconds(self.callback_retry_delays_s)

    @field_validator("quality_window_s")
    @classmethod
    def _window_holds_a_bucket(cls, value: int, info: ValidationInfo) -> int:
        bucket = info.data.get("quality_bucket_s")
        if bucket is not None and value < bucket:
            raise ValueError("quality_window_s: at least one bucket (quality_bucket_s)")
        return value

    @field_validator("log_level")
    @classmethod
    def _upper_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return level

    @field_validator("pool_timezone", "default_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        ZoneInfo(value)  # raises for an unknown zone
        return value

    @field_validator("retry_delays_s", "callback_retry_delays_s")
    @classmethod
    def _delays(cls, value: str, info: ValidationInfo) -> str:
        """Comma-separated positive seconds; the delivery retries' at least one (callbacks may have
        none: one try)."""
        delays = _seconds(value)
        if any(d <= 0 for d in delays) or (not delays and info.field_name == "retry_delays_s"):
            raise ValueError(f"{info.field_name}: a comma-separated list of positive seconds")
        return value

    @property
    def retry_delays(self) -> list[float]:
        return _seconds(self.retry_delays_s)

    @property
    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.kafka_bootstrap_servers.split(",") if s.strip()]


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment, with explicit overrides on top."""
    return Settings(**overrides)  # type: ignore[arg-type]


def _seconds(value: str) -> list[float]:
    """``"60, 300,600"`` → ``[60.0, 300.0, 600.0]`` (a ValueError for anything not a number)."""
    return [float(v) for v in value.split(",") if v.strip()]
