-- Batch sends (issue 8): one row per POST /api/v1/messages/batch that got past validation. Each
-- accepted item is its own message record carrying `batch_id` (0009 added the column and the index
-- the progress query groups over). Seed 004 has no batch table; decisions in docs/decisions.md.

CREATE TABLE batches (
    id               BIGSERIAL    PRIMARY KEY,
    batch_id         VARCHAR(64)  NOT NULL UNIQUE,
    tenant_id        VARCHAR(64)  NOT NULL DEFAULT 'default',
    channel          VARCHAR(20)  NOT NULL DEFAULT 'email',
    -- accepting: its items are being recorded; accepted: done (some may be rejected, see errors);
    -- failed: no item could be recorded or published (503), a retry with its key takes it over.
    state            VARCHAR(20)  NOT NULL DEFAULT 'accepting'
                     CHECK (state IN ('accepting', 'accepted', 'failed')),
    total            INT          NOT NULL CHECK (total >= 0),
    accepted         INT          NOT NULL DEFAULT 0 CHECK (accepted >= 0),
    rejected         INT          NOT NULL DEFAULT 0 CHECK (rejected >= 0),
    errors           JSONB        NOT NULL DEFAULT '[]'::jsonb,
    subject          VARCHAR(998),
    template_id      BIGINT,
    template_version INT,
    category         VARCHAR(64),
    scheduled_at     TIMESTAMPTZ,
    idempotency_key  VARCHAR(255),
    request_hash     CHAR(64),
    -- The first answer, replayed for a retry with the same key (kept for keyed batches only).
    response         JSONB,
    request_id       VARCHAR(64),
    created_at       TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ  NOT NULL DEFAULT now()
);

CREATE INDEX idx_batches_tenant_created ON batches (tenant_id, created_at DESC);
CREATE UNIQUE INDEX idx_batches_idempotency
    ON batches (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

COMMENT ON TABLE batches IS 'one row per batch send; its messages are message_records with this batch_id';
COMMENT ON COLUMN batches.errors IS 'items not accepted: [{index, field, code, message}]';
