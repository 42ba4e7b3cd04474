-- Dead letters as operators see them. Every auditor records each message of
-- `{prefix}.dead.status` here, in the transaction that decides its request's status, so that
-- the HTTP API can list, requeue and discard them (`{prefix}.dead` stays the broker's raw
-- archive, bounded by a length limit). Credentials never reach this table: a message that
-- carried some is stored with `credentials` replaced and `credentials_redacted` set, and
-- cannot be requeued (its producer must submit it again).
CREATE TABLE dead_letters (
    id                   bigserial   PRIMARY KEY,
    -- The request whose message this is; NULL when the message is nobody's (no id, an unknown
    -- id, or a body that is not the request's message): such a letter can only be deleted.
    request_id           text,
    -- What the message said it was (`message_id`, else the envelope's `id`).
    message_id           text,
    reason               text        NOT NULL,
    error                text        NOT NULL,
    namespace            text,
    procedure            text,
    -- Where it would run again: the lane (`high`, `normal`, `low`), or the trusted queue.
    lane                 text,
    trusted              boolean     NOT NULL DEFAULT false,
    -- The queue the broker dead-lettered it from, or the engine that refused it.
    source               text,
    -- Whether `x-provisio-signature` verified with the fleet's signing key: only an envelope
    -- the queue manager signed is signed again and republished.
    signed               boolean     NOT NULL DEFAULT false,
    -- The envelope (JSON bodies only; a body that is not JSON is kept in the broker archive).
    envelope             jsonb,
    credentials_redacted boolean     NOT NULL DEFAULT false,
    body_bytes           integer     NOT NULL,
    -- How the auditor settled it: marked_dead, not_queued, unknown_request, mismatch.
    settled              text        NOT NULL,
    -- SHA-256 of body and headers: a redelivered message (the auditor stopped before its ack)
    -- is recorded once.
    fingerprint          text        NOT NULL,
    status               text        NOT NULL DEFAULT 'dead' CHECK (status IN ('dead', 'requeued')),
    dead_at              timestamptz NOT NULL DEFAULT now(),
    requeued_at          timestamptz,
    requeued_by          text
);
CREATE UNIQUE INDEX dead_letters_once ON dead_letters (fingerprint) WHERE status = 'dead';
CREATE INDEX dead_letters_request ON dead_letters (request_id);
