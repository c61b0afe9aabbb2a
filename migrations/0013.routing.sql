-- Smart routing (issue 10): routing rules, each tenant's quality policy, and recipient profiles.
-- PostgreSQL is the record of rules and policies; routers hold them in memory from the compacted
-- notify.config topic (ingest publishes every change, and every configured provider's public
-- facts). Each change takes a new revision from one sequence, so a record published late is
-- recognised as stale by every reader. Rule deletes are soft, so the deletion itself can be
-- published again. Recipient profiles are never published: ingest reads one when a message is
-- sent to its user and puts a snapshot of it on the request.

CREATE SEQUENCE routing_revision_seq;

-- Messages that match (priorities, categories, the recipient's attributes, the recipient's local
-- time) go to channels in order (first_success: the next when one fails or times out after
-- step_timeout_s) or to all of them at once. Lower position is tried first.
CREATE TABLE routing_rules (
    id              BIGSERIAL    PRIMARY KEY,
    tenant_id       VARCHAR(64)  NOT NULL REFERENCES tenants (tenant_key),
    name            VARCHAR(100) NOT NULL,
    position        INT          NOT NULL DEFAULT 100 CHECK (position BETWEEN 0 AND 100000),
    match           JSONB        NOT NULL DEFAULT '{}',  -- {priorities, categories, attributes, local_time}
    channels        TEXT[]       NOT NULL CHECK (cardinality(channels) BETWEEN 1 AND 8),
    strategy        VARCHAR(20)  NOT NULL DEFAULT 'first_success' CHECK (strategy IN ('first_success', 'all')),
    step_timeout_s  INT          NOT NULL DEFAULT 300 CHECK (step_timeout_s BETWEEN 5 AND 86400),
    is_active       BOOLEAN      NOT NULL DEFAULT true,
    description     VARCHAR(500),
    revision        BIGINT       NOT NULL DEFAULT nextval('routing_revision_seq'),
    created_at      TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ  NOT NULL DEFAULT now(),
    deleted_at      TIMESTAMPTZ
);
CREATE UNIQUE INDEX uq_routing_rules_live_name ON routing_rules (tenant_id, name) WHERE deleted_at IS NULL;
CREATE INDEX idx_routing_rules_tenant ON routing_rules (tenant_id, position, id) WHERE deleted_at IS NULL;

-- A tenant's quality threshold: providers below it get traffic only when no other can. No row:
-- the defaults (shared/routing.py RoutingPolicy).
CREATE TABLE routing_policies (
    tenant_id         VARCHAR(64)       PRIMARY KEY REFERENCES tenants (tenant_key),
    min_success_rate  DOUBLE PRECISION  NOT NULL DEFAULT 0.9 CHECK (min_success_rate BETWEEN 0 AND 1),
    max_p95_ms        DOUBLE PRECISION  CHECK (max_p95_ms > 0),
    min_samples       INT               NOT NULL DEFAULT 10 CHECK (min_samples BETWEEN 1 AND 10000),
    revision          BIGINT            NOT NULL DEFAULT nextval('routing_revision_seq'),
    updated_at        TIMESTAMPTZ       NOT NULL DEFAULT now()
);

-- A tenant's recipients (contact data): an address per channel, stored normalised (E.164 phone
-- numbers, lower-case email domains), language, time zone, what they opted out of, quiet hours,
-- and attributes routing rules match on. Deleted for real: nothing of a removed profile is kept
-- (messages already accepted carry their own snapshot).
CREATE TABLE recipients (
    tenant_id    VARCHAR(64)   NOT NULL REFERENCES tenants (tenant_key),
    user_id      VARCHAR(128)  NOT NULL,
    addresses    JSONB         NOT NULL DEFAULT '{}',  -- {"email": "a@example.com", "sms": "+8613800138000"}
    locale       VARCHAR(35),
    timezone     VARCHAR(64)   NOT NULL DEFAULT 'UTC',
    opt_outs     JSONB         NOT NULL DEFAULT '{}',  -- {"categories": [...], "channels": [...]}
    quiet_hours  JSONB,                                -- {"start": "22:00", "end": "07:00"}
    attributes   JSONB         NOT NULL DEFAULT '{}',
    created_at   TIMESTAMPTZ   NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ   NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);

COMMENT ON TABLE routing_rules IS 'per-tenant rules choosing the channels of a message sent to a user (issue 10)';
COMMENT ON TABLE routing_policies IS 'per-tenant provider quality threshold for routing (issue 10)';
COMMENT ON TABLE recipients IS 'per-tenant recipient profiles: addresses, preferences, attributes (issue 10)';
