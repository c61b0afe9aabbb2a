-- Frequency caps and digest rules (issue 8). PostgreSQL is their record; routers hold them in
-- memory from the compacted notify.config topic (ingest publishes every change). Each change takes
-- a new revision from one sequence, under the row's lock: a record published late is recognised
-- as stale by every reader. Deletes are soft, so the deletion itself can be published again.

CREATE SEQUENCE frequency_revision_seq;

-- At most max_count messages of a category to one recipient in any window_s seconds (a sliding
-- window counted in Redis); a message over it is suppressed or deferred. channel NULL: all.
CREATE TABLE frequency_caps (
    id           BIGSERIAL    PRIMARY KEY,
    tenant_id    VARCHAR(64)  NOT NULL REFERENCES tenants (tenant_key),
    category     VARCHAR(64)  NOT NULL,
    channel      VARCHAR(20),
    max_count    INT          NOT NULL CHECK (max_count >= 1),
    window_s     INT          NOT NULL CHECK (window_s BETWEEN 1 AND 2678400),
    action       VARCHAR(10)  NOT NULL CHECK (action IN ('suppress', 'defer')),
    is_active    BOOLEAN      NOT NULL DEFAULT true,
    description  VARCHAR(500),
    revision     BIGINT       NOT NULL DEFAULT nextval('frequency_revision_seq'),
    created_at   TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ  NOT NULL DEFAULT now(),
    deleted_at   TIMESTAMPTZ
);
CREATE INDEX idx_frequency_caps_tenant ON frequency_caps (tenant_id, category) WHERE deleted_at IS NULL;

-- Messages of a category on a channel to one recipient within window_s seconds of the first are
-- delivered as one digest, rendered with template_id (or a built-in listing). One live rule per
-- tenant, category and channel.
CREATE TABLE digest_rules (
    id           BIGSERIAL    PRIMARY KEY,
    tenant_id    VARCHAR(64)  NOT NULL REFERENCES tenants (tenant_key),
    category     VARCHAR(64)  NOT NULL,
    channel      VARCHAR(20)  NOT NULL,
    window_s     INT          NOT NULL CHECK (window_s BETWEEN 1 AND 604800),
    template_id  BIGINT,
    is_active    BOOLEAN      NOT NULL DEFAULT true,
    description  VARCHAR(500),
    revision     BIGINT       NOT NULL DEFAULT nextval('frequency_revision_seq'),
    created_at   TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ  NOT NULL DEFAULT now(),
    deleted_at   TIMESTAMPTZ
);
CREATE UNIQUE INDEX uq_digest_rules_live ON digest_rules (tenant_id, category, channel) WHERE deleted_at IS NULL;

COMMENT ON TABLE frequency_caps IS 'at most max_count messages of a category per recipient per window (issue 8)';
COMMENT ON TABLE digest_rules IS 'messages of a category collected into one delivery per window (issue 8)';
