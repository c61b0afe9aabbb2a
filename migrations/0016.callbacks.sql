-- Status callbacks (issue 11; seed 004 §5.1.7 and §5.2 webhook_configs; docs/callbacks.md).
--
-- A tenant registers callback endpoints (webhook_configs) that receive its messages' status
-- changes, filtered by state, and a send may name its own callback_url, signed with the tenant's
-- signing secret (callback_signing_secrets). The tracker writes one callback_deliveries row per
-- (event, endpoint or message URL) in the transaction that stores the event (an outbox), and its
-- delivery worker POSTs them signed per Standard Webhooks, recording every try in
-- callback_attempts. Secrets (the endpoints' auth tokens and every whsec_ signing secret) are
-- AES-256-GCM ciphertexts bound to their row (shared/crypto.py), never returned but once.
--
-- Departures from the seed's webhook_configs: tenant_id is the tenant's key (as every table
-- here); auth_token holds a ciphertext (TEXT, not VARCHAR(255)); a signing secret per endpoint
-- (and the previous one, which keeps signing beside it for a grace period after a rotation);
-- deletes are soft (the delivery log keeps naming the endpoint); times are TIMESTAMPTZ.

CREATE TABLE webhook_configs (
    id                   BIGSERIAL    PRIMARY KEY,
    tenant_id            VARCHAR(64)  NOT NULL REFERENCES tenants (tenant_key),
    callback_url         VARCHAR(500) NOT NULL,
    events               JSONB        NOT NULL DEFAULT '["*"]',   -- states subscribed, or ["*"]
    auth_type            VARCHAR(20)  NOT NULL DEFAULT 'none' CHECK (auth_type IN ('none', 'bearer', 'basic')),
    auth_token           TEXT,                                    -- ciphertext ("webhook_configs.auth_token:<id>")
    signing_secret       TEXT         NOT NULL,                   -- ciphertext of whsec_… ("webhook_configs.signing_secret:<id>")
    previous_secret      TEXT,                                    -- the one before the last rotation
    previous_secret_until TIMESTAMPTZ,                            -- signs beside the new one until then
    description          VARCHAR(500),
    is_active            BOOLEAN      NOT NULL DEFAULT true,
    disabled_reason      VARCHAR(200),                            -- e.g. the endpoint answered 410 Gone
    created_at           TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ  NOT NULL DEFAULT now(),
    deleted_at           TIMESTAMPTZ
);
CREATE INDEX idx_webhook_configs_tenant ON webhook_configs (tenant_id) WHERE deleted_at IS NULL;

-- The tenant's signing secret for the callback_url a send names (one per tenant).
CREATE TABLE callback_signing_secrets (
    tenant_id            VARCHAR(64)  PRIMARY KEY REFERENCES tenants (tenant_key),
    secret               TEXT         NOT NULL,                   -- ciphertext ("callback_signing_secrets:<tenant>")
    previous_secret      TEXT,
    previous_secret_until TIMESTAMPTZ,
    created_at           TIMESTAMPTZ  NOT NULL DEFAULT now(),
    rotated_at           TIMESTAMPTZ
);

-- The URL a send named, beside the message's other facts. Ingest stores the request (which
-- carries it) on the record; a record the tracker creates for a direct publisher's message gets
-- it from the 'accepted' event's snapshot (services/tracker/callbacks.py).
ALTER TABLE message_records ADD COLUMN callback_url VARCHAR(500);

CREATE FUNCTION message_records_callback_url() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.callback_url := left(NEW.request->>'callback_url', 500);
    RETURN NEW;
END $$;
-- Only for the rare record whose request names one: the WHEN clause costs the others nothing
-- but a jsonb key lookup.
CREATE TRIGGER trg_message_records_callback_url BEFORE INSERT ON message_records
    FOR EACH ROW WHEN (NEW.callback_url IS NULL AND NEW.request ? 'callback_url')
    EXECUTE FUNCTION message_records_callback_url();

-- The outbox: one row per (event, target). endpoint_id NULL: the message's own callback_url.
CREATE TABLE callback_deliveries (
    id               BIGSERIAL    PRIMARY KEY,
    tenant_id        VARCHAR(64)  NOT NULL,
    message_id       VARCHAR(64)  NOT NULL,
    event_id         VARCHAR(128) NOT NULL,
    endpoint_id      BIGINT       REFERENCES webhook_configs (id),
    url              VARCHAR(500) NOT NULL,   -- where the last try went (an endpoint's may change)
    event_type       VARCHAR(40)  NOT NULL,   -- message.sent ...
    payload          JSONB        NOT NULL,
    status           VARCHAR(20)  NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         INT          NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ  NOT NULL DEFAULT now(),
    last_status_code INT,
    last_error       TEXT,
    created_at       TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ  NOT NULL DEFAULT now(),
    delivered_at     TIMESTAMPTZ
);
CREATE UNIQUE INDEX uq_callback_deliveries_target ON callback_deliveries (event_id, COALESCE(endpoint_id, 0));
CREATE INDEX idx_callback_deliveries_due ON callback_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX idx_callback_deliveries_message ON callback_deliveries (tenant_id, message_id);
CREATE INDEX idx_callback_deliveries_created ON callback_deliveries (created_at);

-- Every try: when, where, the HTTP status or the error, how long it took.
CREATE TABLE callback_attempts (
    id           BIGSERIAL    PRIMARY KEY,
    delivery_id  BIGINT       NOT NULL REFERENCES callback_deliveries (id) ON DELETE CASCADE,
    attempt      INT          NOT NULL,
    attempted_at TIMESTAMPTZ  NOT NULL,
    url          VARCHAR(500) NOT NULL,
    status_code  INT,
    error        TEXT,
    duration_ms  DOUBLE PRECISION NOT NULL
);
CREATE INDEX idx_callback_attempts_delivery ON callback_attempts (delivery_id, attempt);

COMMENT ON TABLE webhook_configs IS 'status callback endpoints per tenant (seed 004 §5.2, issue 11)';
COMMENT ON TABLE callback_deliveries IS 'status callbacks to deliver and delivered (outbox, issue 11)';
COMMENT ON TABLE callback_attempts IS 'each try of a status callback';
