-- Fencing: the attempt that owns a request. Only the transaction named here may write the
-- request's outcome, so an engine whose lease was taken over cannot overwrite what recovery
-- (or a later attempt) wrote.
ALTER TABLE requests ADD COLUMN current_tx uuid;
-- Intents: a call about to start is logged (with its input) in the same commit as the
-- previous step's completion, so that recovery can undo a call whose outcome the engine
-- never logged because it died during the call.
ALTER TABLE tx_steps DROP CONSTRAINT tx_steps_kind_check;
ALTER TABLE tx_steps ADD CONSTRAINT tx_steps_kind_check CHECK (kind IN ('intent', 'execute', 'rollback', 'error'));
-- Recovery looks for unfinished transactions whose lease expired, whatever their status.
DROP INDEX IF EXISTS transactions_running;
CREATE INDEX transactions_unfinished ON transactions (lease_until) WHERE finished_at IS NULL;
