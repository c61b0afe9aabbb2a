-- Message records (seed 004 §3.3.3 message_records) and their event timeline.
-- Departures from the seed, see docs/decisions.md: tenant_id on every row; `state` keeps
-- DESIGN.md's finer lifecycle beside the seed's `status`; `recipients` holds to/cc/bcc
-- (the seed's single `recipient` column keeps the first To address); timestamps are
-- TIMESTAMPTZ; MySQL-style inline INDEX clauses became CREATE INDEX statements.

CREATE TABLE message_records (
    id               BIGSERIAL PRIMARY KEY,
    message_id       VARCHAR(64)  NOT NULL UNIQUE,
    tenant_id        VARCHAR(64)  NOT NULL DEFAULT 'default',
    message_type     VARCHAR(20)  NOT NULL DEFAULT 'email',
    template_id      BIGINT,
    template_version INT,
    recipient        VARCHAR(320) NOT NULL,
    recipients       JSONB        NOT NULL DEFAULT '{}'::jsonb,
    subject          VARCHAR(998),
    content          TEXT,
    content_type     VARCHAR(10),
    template_vars    JSONB,
    status           VARCHAR(20)  NOT NULL DEFAULT 'pending',
    state            VARCHAR(20)  NOT NULL DEFAULT 'accepted',
    state_rank       SMALLINT     NOT NULL DEFAULT 0,
    attempt          INT          NOT NULL DEFAULT 0,
    retry_count      INT          NOT NULL DEFAULT 0,
    error_code       INT,
    error_message    TEXT,
    retry_logs       JSONB,
    sender_info      JSONB,
    idempotency_key  VARCHAR(255),
    request_id       VARCHAR(64),
    created_at       TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ  NOT NULL DEFAULT now(),
    sent_at          TIMESTAMPTZ
);

CREATE INDEX idx_message_records_tenant_created ON message_records (tenant_id, created_at DESC);
CREATE INDEX idx_message_records_recipient ON message_records (tenant_id, recipient);
CREATE INDEX idx_message_records_status ON message_records (tenant_id, status);
CREATE INDEX idx_message_records_recipients ON message_records USING GIN (recipients jsonb_path_ops);
CREATE UNIQUE INDEX idx_message_records_idempotency
    ON message_records (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

COMMENT ON TABLE message_records IS 'one row per message (seed 004 message_records)';
COMMENT ON COLUMN message_records.status IS 'seed 004 status: pending/sending/success/failed';
COMMENT ON COLUMN message_records.state IS 'DESIGN.md lifecycle: accepted, routed, sending, sent, ...';

CREATE TABLE message_events (
    id           BIGSERIAL PRIMARY KEY,
    event_id     VARCHAR(128) NOT NULL UNIQUE,
    message_id   VARCHAR(64)  NOT NULL,
    tenant_id    VARCHAR(64)  NOT NULL DEFAULT 'default',
    state        VARCHAR(20)  NOT NULL,
    attempt      INT          NOT NULL DEFAULT 0,
    service      VARCHAR(32)  NOT NULL,
    channel      VARCHAR(20),
    provider     VARCHAR(64),
    error_code   INT,
    error        TEXT,
    detail       JSONB,
    occurred_at  TIMESTAMPTZ  NOT NULL,
    recorded_at  TIMESTAMPTZ  NOT NULL DEFAULT now()
);

CREATE INDEX idx_message_events_message ON message_events (message_id, occurred_at, id);

COMMENT ON TABLE message_events IS 'timeline of every message: one row per notify.event.v1';

CREATE TABLE dead_letters (
    id            BIGSERIAL PRIMARY KEY,
    source_topic  VARCHAR(255) NOT NULL,
    partition     INT          NOT NULL,
    "offset"      BIGINT       NOT NULL,
    message_id    VARCHAR(64),
    service       VARCHAR(32)  NOT NULL,
    reason        TEXT         NOT NULL,
    errors        JSONB,
    payload       TEXT         NOT NULL,
    headers       JSONB,
    occurred_at   TIMESTAMPTZ  NOT NULL,
    recorded_at   TIMESTAMPTZ  NOT NULL DEFAULT now()
);

CREATE INDEX idx_dead_letters_message ON dead_letters (message_id);
CREATE INDEX idx_dead_letters_recorded ON dead_letters (recorded_at DESC);

COMMENT ON TABLE dead_letters IS 'every record that reached notify.dlq, with the reason';
