-- MPF's "bad audit commands": a transaction whose audit rows could not be written stays in
-- the transaction log and is tried again every sweep; this says why, and how often.
CREATE TABLE audit_failures (
    tx_id    uuid        PRIMARY KEY,
    error    text        NOT NULL,
    attempts integer     NOT NULL DEFAULT 1,
    first_at timestamptz NOT NULL DEFAULT now(),
    last_at  timestamptz NOT NULL DEFAULT now()
);
