-- Delivery statistics (issue 11): rollups the tracker maintains as it folds events, and the
-- archive of counts that retention leaves when it deletes old message records.
--
-- Each message's outcome is counted once, when its outcome event is first stored (the event's id
-- is unique, so a batch folded again counts nothing again), in the bucket of the outcome's time,
-- at three widths: by minute (kept 2 days), by hour (90 days) and by day (kept). status is the
-- outcome's state: sent, delivered (a receipt after sent), failed, dead, rejected, cancelled,
-- suppressed, digested. provider is the configured provider's name (or the plugin's), '' when
-- none; template_id 0 when the message had no template. Latency is from acceptance (or its
-- scheduled time, if later) to the outcome, in milliseconds: a sum and counts per bucket of
-- LATENCY_BOUNDS_MS (shared/statistics.py; the last counts those above the last bound).
CREATE TABLE stats_minute (
    bucket_start    TIMESTAMPTZ    NOT NULL,
    tenant_id       VARCHAR(64)    NOT NULL,
    channel         VARCHAR(20)    NOT NULL,
    provider        VARCHAR(100)   NOT NULL DEFAULT '',
    template_id     BIGINT         NOT NULL DEFAULT 0,
    status          VARCHAR(20)    NOT NULL,
    count           BIGINT         NOT NULL DEFAULT 0,
    cost_sum        NUMERIC(20, 6) NOT NULL DEFAULT 0,
    latency_sum_ms  BIGINT         NOT NULL DEFAULT 0,
    latency_buckets BIGINT[]       NOT NULL,
    PRIMARY KEY (tenant_id, bucket_start, channel, provider, template_id, status)
);
CREATE TABLE stats_hour (LIKE stats_minute INCLUDING ALL);
CREATE TABLE stats_day (LIKE stats_minute INCLUDING ALL);
CREATE INDEX idx_stats_minute_time ON stats_minute (bucket_start);
CREATE INDEX idx_stats_hour_time ON stats_hour (bucket_start);
CREATE INDEX idx_stats_day_time ON stats_day (bucket_start);

-- What retention deleted, as counts (seed 004 §3.1.5: after 30 days only statistics remain):
-- per day of the message's creation, tenant, channel and seed status.
CREATE TABLE message_archive (
    day           DATE          NOT NULL,
    tenant_id     VARCHAR(64)   NOT NULL,
    channel       VARCHAR(20)   NOT NULL,
    status        VARCHAR(20)   NOT NULL,
    count         BIGINT        NOT NULL,
    archived_at   TIMESTAMPTZ   NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, day, channel, status)
);

-- Each archiving run: when, by whom (the periodic job or a tenant's manual trigger) and what it did.
CREATE TABLE archive_runs (
    id             BIGSERIAL     PRIMARY KEY,
    tenant_id      VARCHAR(64),
    trigger        VARCHAR(20)   NOT NULL CHECK (trigger IN ('schedule', 'manual')),
    started_at     TIMESTAMPTZ   NOT NULL DEFAULT now(),
    finished_at    TIMESTAMPTZ,
    records        BIGINT        NOT NULL DEFAULT 0,
    failed_records BIGINT        NOT NULL DEFAULT 0,
    events         BIGINT        NOT NULL DEFAULT 0,
    stats_rows     BIGINT        NOT NULL DEFAULT 0
);

-- Retention deletes records by their last change (their outcome, for a finished one): a message
-- scheduled weeks ahead is as young as its delivery.
CREATE INDEX idx_message_records_retention ON message_records (status, updated_at)
    WHERE status IN ('success', 'failed');

-- With ClickHouse keeping the statistics (HERALD_STATS_BACKEND=clickhouse), outcomes are written
-- here in the transaction that makes them (the fold's, a cancellation's, a rejection's) and shipped
-- to ClickHouse by the trackers: ClickHouse being away never holds the ledger, and nothing is lost.
-- A row ClickHouse refuses for good (its data) is kept with failed_at and the reason.
CREATE TABLE stats_outbox (
    id              BIGSERIAL      PRIMARY KEY,
    event_id        VARCHAR(128)   NOT NULL,
    tenant_id       VARCHAR(64)    NOT NULL,
    occurred_at     TIMESTAMPTZ    NOT NULL,
    channel         VARCHAR(20)    NOT NULL,
    provider        VARCHAR(100)   NOT NULL DEFAULT '',
    template_id     BIGINT         NOT NULL DEFAULT 0,
    status          VARCHAR(20)    NOT NULL,
    cost            NUMERIC(20, 6) NOT NULL DEFAULT 0,
    latency_ms      BIGINT,
    created_at      TIMESTAMPTZ    NOT NULL DEFAULT now(),
    failed_at       TIMESTAMPTZ,
    last_error      TEXT
);
CREATE INDEX idx_stats_outbox_due ON stats_outbox (id) WHERE failed_at IS NULL;
