-- Templates (issue 5; seed 004 §3.3.3 message_templates / message_template_history).
-- Departures: tenant_id on both tables (names are unique per tenant among templates not
-- deleted); `variants` holds every channel/locale variant (subject/content are the variant of
-- template_type in the default locale, as the seed has them); every version, the first
-- included, has its history row, so any version can be rendered and the config topic rebuilt.
CREATE TABLE message_templates (
    id            BIGSERIAL    PRIMARY KEY,
    tenant_id     VARCHAR(64)  NOT NULL DEFAULT 'default',
    template_name VARCHAR(100) NOT NULL,
    template_type VARCHAR(20)  NOT NULL DEFAULT 'email',
    subject       VARCHAR(255),
    content       TEXT         NOT NULL,
    variables     JSONB,
    variants      JSONB        NOT NULL,
    version       INT          NOT NULL DEFAULT 1,
    is_active     BOOLEAN      NOT NULL DEFAULT true,
    description   TEXT,
    created_by    VARCHAR(100),
    updated_by    VARCHAR(100),
    created_at    TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ  NOT NULL DEFAULT now(),
    deleted_at    TIMESTAMPTZ
);

CREATE UNIQUE INDEX uq_message_templates_name ON message_templates (tenant_id, template_name)
    WHERE deleted_at IS NULL;
CREATE INDEX idx_message_templates_type ON message_templates (tenant_id, template_type);
CREATE INDEX idx_message_templates_active ON message_templates (is_active);
CREATE INDEX idx_message_templates_deleted ON message_templates (deleted_at);

COMMENT ON TABLE message_templates IS 'message templates; the current version of each';
COMMENT ON COLUMN message_templates.content IS 'Jinja2 (sandboxed), e.g. Hello {{ username }}';
COMMENT ON COLUMN message_templates.variables IS 'JSON array of the variables the template uses';
COMMENT ON COLUMN message_templates.variants IS 'JSON array of {channel, locale, format, subject, content, text_content}';

CREATE TABLE message_template_history (
    id                 BIGSERIAL    PRIMARY KEY,
    template_id        BIGINT       NOT NULL REFERENCES message_templates (id) ON DELETE CASCADE,
    tenant_id          VARCHAR(64)  NOT NULL DEFAULT 'default',
    version            INT          NOT NULL,
    template_name      VARCHAR(100) NOT NULL,
    template_type      VARCHAR(20)  NOT NULL,
    subject            VARCHAR(255),
    content            TEXT         NOT NULL,
    variables          JSONB,
    variants           JSONB        NOT NULL,
    change_description TEXT,
    created_by         VARCHAR(100),
    created_at         TIMESTAMPTZ  NOT NULL DEFAULT now(),
    UNIQUE (template_id, version)
);

CREATE INDEX idx_template_history_template ON message_template_history (template_id);

COMMENT ON TABLE message_template_history IS 'every version of every template, for history, pinned sends and rollback';

-- message_records has template_id, template_version and template_vars since 0001.
ALTER TABLE message_records
    ADD CONSTRAINT fk_message_records_template FOREIGN KEY (template_id)
        REFERENCES message_templates (id) ON DELETE SET NULL,
    ADD COLUMN locale VARCHAR(35);
