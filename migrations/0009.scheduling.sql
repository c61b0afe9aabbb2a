-- Scheduled and delayed sends, categories and batches (issue 8).
-- scheduled_tasks follows seed 004 §4.3 with these departures (docs/decisions.md): message_id is
-- the text id every other table uses (the seed's BIGINT pointed at an integer key), tenant_id on
-- the row, times are TIMESTAMPTZ, and `seq` / `reason` record which parking of the message this is
-- (a message deferred by a frequency cap is parked again after each release: one row, moved on).

ALTER TABLE message_records
    ADD COLUMN scheduled_at TIMESTAMPTZ,
    ADD COLUMN category     VARCHAR(64),
    ADD COLUMN batch_id     VARCHAR(64);

CREATE INDEX idx_message_records_batch ON message_records (batch_id, status) WHERE batch_id IS NOT NULL;
CREATE INDEX idx_message_records_category ON message_records (tenant_id, category, created_at DESC)
    WHERE category IS NOT NULL;

CREATE TABLE scheduled_tasks (
    id             BIGSERIAL    PRIMARY KEY,
    task_id        VARCHAR(64)  NOT NULL UNIQUE,
    message_id     VARCHAR(64)  NOT NULL UNIQUE,
    tenant_id      VARCHAR(64)  NOT NULL DEFAULT 'default',
    scheduled_time TIMESTAMPTZ  NOT NULL,
    status         VARCHAR(20)  NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'executed', 'cancelled')),
    reason         VARCHAR(20)  NOT NULL DEFAULT 'scheduled'
                   CHECK (reason IN ('scheduled', 'deferred', 'digest')),
    seq            INT          NOT NULL DEFAULT 0,
    executed_at    TIMESTAMPTZ,
    created_at     TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ  NOT NULL DEFAULT now()
);

-- The scheduler's one question: the earliest pending task (and all those due).
CREATE INDEX idx_scheduled_tasks_due ON scheduled_tasks (scheduled_time) WHERE status = 'pending';
CREATE INDEX idx_scheduled_tasks_tenant ON scheduled_tasks (tenant_id, status, scheduled_time);

COMMENT ON TABLE scheduled_tasks IS 'messages waiting for their time (seed 004 scheduled_tasks); released by the router''s scheduler';
COMMENT ON COLUMN scheduled_tasks.seq IS 'which parking of the message this is (0: the send asked for a time; n: the n-th deferral)';
