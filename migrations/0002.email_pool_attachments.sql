-- The SMTP mailbox pool (seed 004 email_accounts) and uploaded attachments (email_attachments).
-- Departures (docs/decisions.md): tenant_id on every row; TLS mode per account; the seed's
-- BEFORE SELECT trigger (not valid PostgreSQL) is replaced by resetting the counter on the
-- first use of a new day inside the atomic reservation statement (services/senders/email/pool.py).

CREATE TABLE email_accounts (
    id               BIGSERIAL PRIMARY KEY,
    tenant_id        VARCHAR(64)  NOT NULL DEFAULT 'default',
    email            VARCHAR(255) NOT NULL,
    smtp_host        VARCHAR(255) NOT NULL,
    smtp_port        INT          NOT NULL CHECK (smtp_port BETWEEN 1 AND 65535),
    smtp_username    VARCHAR(255) NOT NULL DEFAULT '',
    smtp_password    TEXT         NOT NULL DEFAULT '',   -- AES-256-GCM, shared/crypto.py
    tls_mode         VARCHAR(10)  NOT NULL DEFAULT 'starttls' CHECK (tls_mode IN ('none', 'starttls', 'tls')),
    display_name     VARCHAR(100),
    daily_limit      INT          NOT NULL DEFAULT 500 CHECK (daily_limit >= 0),
    daily_sent_count INT          NOT NULL DEFAULT 0,
    last_reset_date  DATE         NOT NULL DEFAULT CURRENT_DATE,
    is_active        BOOLEAN      NOT NULL DEFAULT true,
    priority         INT          NOT NULL DEFAULT 0,
    failure_count    INT          NOT NULL DEFAULT 0,
    last_failure_at  TIMESTAMPTZ,
    last_error       TEXT,
    disabled_reason  TEXT,
    created_at       TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ  NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, email)
);

CREATE INDEX idx_email_accounts_pick ON email_accounts (tenant_id, is_active, priority DESC, daily_sent_count ASC);

COMMENT ON TABLE email_accounts IS 'SMTP mailbox pool (seed 004)';
COMMENT ON COLUMN email_accounts.priority IS 'higher first';
COMMENT ON COLUMN email_accounts.failure_count IS 'consecutive failures; 3 disable the account';

CREATE TABLE email_attachments (
    id            BIGSERIAL PRIMARY KEY,
    attachment_id VARCHAR(64)  NOT NULL UNIQUE,
    tenant_id     VARCHAR(64)  NOT NULL DEFAULT 'default',
    filename      VARCHAR(255) NOT NULL,
    file_path     VARCHAR(500) NOT NULL,
    file_size     BIGINT       NOT NULL,
    mime_type     VARCHAR(100),
    sha256        CHAR(64),
    uploaded_by   VARCHAR(100),
    created_at    TIMESTAMPTZ  NOT NULL DEFAULT now(),
    expires_at    TIMESTAMPTZ  NOT NULL
);

CREATE INDEX idx_email_attachments_expires ON email_attachments (expires_at);
CREATE INDEX idx_email_attachments_tenant ON email_attachments (tenant_id, attachment_id);

COMMENT ON TABLE email_attachments IS 'uploaded attachments, deleted with their files after expires_at';
