-- Fencing checks (`id = … AND engine_id = … AND finished_at IS NULL`) must find their row by
-- primary key. The partial index `transactions_unfinished` matched their `finished_at IS NULL`
-- too, and keeps an entry for every row version written while unfinished until vacuum
-- reaches it; the planner chose it for array lookups and read every one of those entries
-- per check (docs/decisions.md, "Fencing looks rows up by primary key"). Recovery's scan
-- (`finished_at IS NULL AND lease_until < now()`) implies this index's predicate; the
-- fencing checks do not, so they use the primary key.
DROP INDEX IF EXISTS transactions_unfinished;
CREATE INDEX transactions_expiring ON transactions (lease_until)
    WHERE finished_at IS NULL AND lease_until IS NOT NULL;
