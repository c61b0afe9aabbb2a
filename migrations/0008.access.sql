-- Access and isolation (issue 7): API keys (seed 004 §3.3.3 api_keys, plus the tenant that owns a
-- key, its scopes and its rate-limit tier), revoked tokens, the audit log, and per-channel
-- monthly quotas on tenants.

CREATE TABLE api_keys (
    id               BIGSERIAL    PRIMARY KEY,
    tenant_id        VARCHAR(64)  NOT NULL REFERENCES tenants (tenant_key),
    key_name         VARCHAR(100) NOT NULL,
    api_key          VARCHAR(64)  NOT NULL UNIQUE,
    api_secret_hash  VARCHAR(255) NOT NULL,
    scopes           TEXT[]       NOT NULL,
    tier             VARCHAR(32)  NOT NULL,
    is_active        BOOLEAN      NOT NULL DEFAULT true,
    expire_at        TIMESTAMPTZ,
    last_used_at     TIMESTAMPTZ,
    usage_count      BIGINT       NOT NULL DEFAULT 0,
    description      TEXT,
    created_by       VARCHAR(100),
    created_at       TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ  NOT NULL DEFAULT now(),
    deleted_at       TIMESTAMPTZ,
    CHECK (scopes <@ ARRAY['send', 'read', 'templates', 'config', 'admin']::TEXT[] AND cardinality(scopes) > 0)
);
CREATE INDEX idx_api_keys_tenant ON api_keys (tenant_id, created_at DESC);
CREATE INDEX idx_api_keys_is_active ON api_keys (is_active);
COMMENT ON COLUMN api_keys.api_secret_hash IS 'bcrypt hash of the API secret; the secret itself is shown once';

-- A token revoked before its expiry (refreshed, or revoked by its holder). Rows are useless
-- once expires_at has passed (the token is refused anyway) and are deleted then.
CREATE TABLE revoked_tokens (
    jti         VARCHAR(64)  PRIMARY KEY,
    api_key     VARCHAR(64)  NOT NULL,
    expires_at  TIMESTAMPTZ  NOT NULL,
    revoked_at  TIMESTAMPTZ  NOT NULL DEFAULT now()
);
CREATE INDEX idx_revoked_tokens_expires ON revoked_tokens (expires_at);

CREATE TABLE audit_log (
    id           BIGSERIAL    PRIMARY KEY,
    tenant_id    VARCHAR(64)  NOT NULL,
    actor        VARCHAR(100) NOT NULL,      -- the API key, or cli:<os user>
    action       VARCHAR(64)  NOT NULL,      -- e.g. api_key.create, template.update
    target_type  VARCHAR(32)  NOT NULL,
    target_id    VARCHAR(100),
    details      JSONB        NOT NULL DEFAULT '{}'::jsonb,
    source_ip    VARCHAR(64),
    request_id   VARCHAR(64),
    created_at   TIMESTAMPTZ  NOT NULL DEFAULT now()
);
CREATE INDEX idx_audit_log_tenant ON audit_log (tenant_id, created_at DESC, id DESC);

-- Monthly quotas per channel: {"email": 10000, "sms": 5000, ...}; a channel absent = unlimited.
-- Seed 004's email_quota and sms_quota become read-only views of it (generated columns).
ALTER TABLE tenants ADD COLUMN quotas JSONB NOT NULL DEFAULT '{"email": 10000, "sms": 5000}'::jsonb;
UPDATE tenants SET quotas = jsonb_build_object('email', email_quota, 'sms', sms_quota);
ALTER TABLE tenants DROP COLUMN email_quota, DROP COLUMN sms_quota;
ALTER TABLE tenants ADD COLUMN email_quota INT GENERATED ALWAYS AS ((quotas ->> 'email')::int) STORED;
ALTER TABLE tenants ADD COLUMN sms_quota INT GENERATED ALWAYS AS ((quotas ->> 'sms')::int) STORED;
COMMENT ON COLUMN tenants.quotas IS 'monthly message quota per channel; a channel not listed is unlimited';
