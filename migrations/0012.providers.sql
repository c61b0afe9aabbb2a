-- Providers of every channel other than the email pool (issue 9): a tenant configures several
-- per channel (an SMS account at Aliyun and one at Tencent; a Feishu bot per group). Non-secret
-- settings are in config (JSON); the fields the plugin marks secret are in secrets, one
-- AES-256-GCM ciphertext of their JSON bound to the row (purpose "providers.secrets:<id>"),
-- never returned by the API. Senders read the rows and follow changes through NOTIFY.

CREATE TABLE providers (
    id           BIGSERIAL    PRIMARY KEY,
    tenant_id    VARCHAR(64)  NOT NULL REFERENCES tenants (tenant_key),
    channel      VARCHAR(20)  NOT NULL,
    provider     VARCHAR(40)  NOT NULL,          -- the plugin: aliyun, tencent, feishu ...
    name         VARCHAR(64)  NOT NULL,          -- the tenant's name for it; endpoint channels' "to"
    config       JSONB        NOT NULL DEFAULT '{}',
    secrets      TEXT         NOT NULL DEFAULT '',
    priority     INT          NOT NULL DEFAULT 100,  -- lower first when a send names none
    weight       INT          NOT NULL DEFAULT 100 CHECK (weight >= 0),
    costs        JSONB        NOT NULL DEFAULT '{}', -- {"default": 0.05, "by_country": {"86": 0.045}}
    rate_limit   JSONB,                             -- {"count": 20, "per_s": 60}: tighter than the vendor's
    is_active    BOOLEAN      NOT NULL DEFAULT true,
    description  VARCHAR(500),
    revision     BIGINT       NOT NULL DEFAULT 1,
    created_at   TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ  NOT NULL DEFAULT now(),
    deleted_at   TIMESTAMPTZ
);
CREATE UNIQUE INDEX uq_providers_live_name ON providers (tenant_id, channel, name) WHERE deleted_at IS NULL;
CREATE INDEX idx_providers_channel ON providers (channel, tenant_id) WHERE deleted_at IS NULL;

-- Senders keep the rows in memory; every change says so (payload: tenant and channel).
CREATE FUNCTION providers_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('herald_providers', NEW.tenant_id || ' ' || NEW.channel);
    RETURN NEW;
END $$;
CREATE TRIGGER trg_providers_changed AFTER INSERT OR UPDATE ON providers
    FOR EACH ROW EXECUTE FUNCTION providers_changed();

COMMENT ON TABLE providers IS 'per-tenant provider configurations of the non-email channels (issue 9)';
