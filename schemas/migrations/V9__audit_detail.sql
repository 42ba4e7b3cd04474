-- Audit detail: the procedure each logged step ran in (nested procedures included), and the
-- audit data procedures emit through an `audit:` expression.
ALTER TABLE tx_steps ADD COLUMN procedure text;
ALTER TABLE transactions ADD COLUMN audit_data jsonb;
