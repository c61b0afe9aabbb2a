-- Delivery guarantees (issue 6): what the idempotency check compares, the request as published
-- (so the sweeper can publish it again after a broker lost it), and fail-open dedup marking.

ALTER TABLE message_records
    ADD COLUMN request_hash  CHAR(64),
    ADD COLUMN request       JSONB,
    ADD COLUMN dedup_skipped BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN republished   INT     NOT NULL DEFAULT 0;

COMMENT ON COLUMN message_records.request_hash IS 'SHA-256 of the send request, compared when its idempotency key is reused';
COMMENT ON COLUMN message_records.request IS 'notify.request.v1 as published; the sweeper re-publishes it when the message stalls';

-- The sweeper looks for messages that stopped moving.
CREATE INDEX idx_message_records_stalled ON message_records (state, updated_at)
    WHERE state IN ('accepted', 'routed', 'sending', 'retrying');

ALTER TABLE dead_letters
    ADD COLUMN tenant_id   VARCHAR(64) NOT NULL DEFAULT 'default',
    ADD COLUMN replayed_at TIMESTAMPTZ,
    ADD COLUMN replay_count INT NOT NULL DEFAULT 0;

CREATE INDEX idx_dead_letters_tenant ON dead_letters (tenant_id, recorded_at DESC);
