-- Tenants (seed 004 §5.2). Every table already carries tenant_id as the tenant's key
-- ('default' until API keys land, issue 7); this table holds each tenant's settings.
-- dedup_window_s: the content-fingerprint window of issue 6, NULL = the service default
-- (HERALD_DEDUP_WINDOW_S), 0 = off.
CREATE TABLE tenants (
    id                  BIGSERIAL    PRIMARY KEY,
    tenant_key          VARCHAR(64)  NOT NULL UNIQUE,
    tenant_name         VARCHAR(100) NOT NULL UNIQUE,
    status              VARCHAR(20)  NOT NULL DEFAULT 'active'
                        CHECK (status IN ('active', 'suspended', 'closed')),
    email_quota         INT          NOT NULL DEFAULT 10000,
    sms_quota           INT          NOT NULL DEFAULT 5000,
    current_email_usage INT          NOT NULL DEFAULT 0,
    current_sms_usage   INT          NOT NULL DEFAULT 0,
    quota_reset_date    DATE,
    dedup_window_s      INT          CHECK (dedup_window_s BETWEEN 0 AND 86400),
    created_at          TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ  NOT NULL DEFAULT now()
);

INSERT INTO tenants (tenant_key, tenant_name) VALUES ('default', 'Default tenant');

COMMENT ON COLUMN tenants.tenant_key IS 'the tenant_id every other table carries';
COMMENT ON COLUMN tenants.dedup_window_s IS 'content-fingerprint window in seconds; NULL = service default, 0 = off';
