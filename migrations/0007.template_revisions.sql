-- Template heads carry a revision that grows with every change, taken under the row's lock:
-- a head published late (a slow replica, a republish from an older read) is recognised as
-- stale by every reader of notify.config and ignored.
CREATE SEQUENCE template_revision_seq;
ALTER TABLE message_templates ADD COLUMN revision BIGINT NOT NULL DEFAULT nextval('template_revision_seq');
