-- Scheduled requests wait in PostgreSQL, not in the broker: the envelope to publish when due.
ALTER TABLE requests ADD COLUMN envelope jsonb;
CREATE INDEX requests_due ON requests (not_before) WHERE status = 'scheduled';
