-- Operator actions on in-doubt transactions (retry the rollback, or resolve by hand with a
-- note). The queue manager records them; the leading auditor, which has the providers and
-- every log server, carries them out. The table is also their audit trail.
CREATE TABLE operator_commands (
    id           uuid        PRIMARY KEY,
    kind         text        NOT NULL CHECK (kind IN ('retry_rollback', 'resolve')),
    request_id   text        NOT NULL,
    tx_id        uuid        NOT NULL,
    requested_by text        NOT NULL,
    note         text,
    status       text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'failed')),
    result       jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    done_at      timestamptz
);
CREATE INDEX operator_commands_pending ON operator_commands (created_at) WHERE status = 'pending';
