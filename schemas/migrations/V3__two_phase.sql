-- Two-phase transactions: `prepared` (every participant prepared) and `committing` (the
-- commit decision, logged before any participant commits; recovery commits what it finds
-- prepared for such a transaction and rolls back the prepared ones of any other).
ALTER TABLE transactions DROP CONSTRAINT transactions_status_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_status_check CHECK (status IN
    ('running', 'prepared', 'committing', 'committed', 'rolling_back', 'rolled_back', 'in_doubt', 'failed'));
