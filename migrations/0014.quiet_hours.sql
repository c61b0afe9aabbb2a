-- Smart routing (issue 10): a message to a recipient in their quiet hours is parked until they
-- end, as a scheduled task of its own reason.
ALTER TABLE scheduled_tasks DROP CONSTRAINT IF EXISTS scheduled_tasks_reason_check;
ALTER TABLE scheduled_tasks ADD CONSTRAINT scheduled_tasks_reason_check
    CHECK (reason IN ('scheduled', 'deferred', 'digest', 'quiet_hours'));
