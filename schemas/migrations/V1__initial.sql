-- Provisio's schema, version 1. Every binary applies pending migrations at start-up under an
-- advisory lock (see shared/src/db.rs), so replicas starting together do not race.

-- ---------------------------------------------------------------- configuration
-- Namespaces are immutable per version; the current version is the highest one.
CREATE TABLE namespaces (
    name        text        NOT NULL,
    version     integer     NOT NULL CHECK (version > 0),
    document    jsonb       NOT NULL,
    source      text,
    applied_by  text,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- ---------------------------------------------------------------- security
CREATE TABLE principals (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL UNIQUE,
    kind        text        NOT NULL DEFAULT 'service' CHECK (kind IN ('person', 'service')),
    -- The RabbitMQ user a direct AMQP producer connects as (validated `user_id`).
    amqp_user   text        UNIQUE,
    disabled    boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE groups (
    name        text PRIMARY KEY,
    description text NOT NULL DEFAULT ''
);

CREATE TABLE group_members (
    group_name   text NOT NULL REFERENCES groups (name) ON DELETE CASCADE,
    principal_id uuid NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    PRIMARY KEY (group_name, principal_id)
);

-- Keys are shown once and stored as argon2 hashes. `lookup` is a short prefix of the key's
-- SHA-256, so that a presented key finds its row without trying every hash.
CREATE TABLE api_keys (
    id           uuid        PRIMARY KEY,
    principal_id uuid        NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    lookup       text        NOT NULL,
    hash         text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX api_keys_lookup ON api_keys (lookup) WHERE revoked_at IS NULL;

CREATE TABLE grants (
    id           bigserial PRIMARY KEY,
    permission   text NOT NULL CHECK (permission IN
                   ('execute', 'execute_with_credentials', 'execute_trusted', 'execute_private', 'admin')),
    group_name   text REFERENCES groups (name) ON DELETE CASCADE,
    principal_id uuid REFERENCES principals (id) ON DELETE CASCADE,
    CHECK ((group_name IS NULL) <> (principal_id IS NULL))
);
CREATE UNIQUE INDEX grants_unique ON grants (permission, coalesce(group_name, ''), coalesce(principal_id::text, ''));

INSERT INTO groups (name, description) VALUES
    ('admins', 'everything'),
    ('trusted-users', 'trusted requests: run_as and inline steps'),
    ('producers', 'queued requests for public procedures');
INSERT INTO grants (permission, group_name) VALUES
    ('admin', 'admins'),
    ('execute', 'admins'),
    ('execute_with_credentials', 'admins'),
    ('execute_trusted', 'admins'),
    ('execute_private', 'admins'),
    ('execute', 'trusted-users'),
    ('execute_trusted', 'trusted-users'),
    ('execute_with_credentials', 'trusted-users'),
    ('execute', 'producers');

-- ---------------------------------------------------------------- requests
CREATE TABLE requests (
    id                text        PRIMARY KEY,
    -- SHA-256 of the canonical body: same id + same body = the same request, else 409.
    body_hash         text        NOT NULL,
    namespace         text        NOT NULL,
    procedure         text        NOT NULL,
    namespace_version integer,
    kind              text        NOT NULL DEFAULT 'queued' CHECK (kind IN ('queued', 'trusted')),
    principal_id      uuid,
    priority          text        NOT NULL DEFAULT 'normal' CHECK (priority IN ('high', 'normal', 'low')),
    status            text        NOT NULL CHECK (status IN
                        ('scheduled', 'queued', 'running', 'succeeded', 'failed', 'in_doubt', 'parked', 'dead', 'cancelled')),
    input             jsonb       NOT NULL DEFAULT 'null',
    output            jsonb,
    error             jsonb,
    steps             jsonb,
    attempts          integer     NOT NULL DEFAULT 0,
    not_before        timestamptz,
    submitted_at      timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz
);
CREATE INDEX requests_newest ON requests (submitted_at DESC, id DESC);
CREATE INDEX requests_status ON requests (status, submitted_at DESC);

-- ---------------------------------------------------------------- transaction log
-- One row per attempt at running a request. `lease_until` is renewed by the engine running it;
-- an expired lease on a running transaction means its engine died and recovery takes over.
CREATE TABLE transactions (
    id                uuid        PRIMARY KEY,
    request_id        text        NOT NULL,
    attempt           integer     NOT NULL,
    namespace         text        NOT NULL,
    procedure         text        NOT NULL,
    namespace_version integer,
    model             text        NOT NULL CHECK (model IN ('read', 'compensating', 'two_phase')),
    status            text        NOT NULL CHECK (status IN
                        ('running', 'committed', 'rolling_back', 'rolled_back', 'in_doubt', 'failed')),
    audit             boolean     NOT NULL DEFAULT false,
    engine_id         text,
    lease_until       timestamptz,
    output            jsonb,
    error             jsonb,
    started_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    UNIQUE (request_id, attempt)
);
CREATE INDEX transactions_running ON transactions (lease_until) WHERE status IN ('running', 'rolling_back');

-- Step records: an `execute` row for every completed step (with what its rollback needs),
-- a `rollback` row for every step undone.
CREATE TABLE tx_steps (
    tx_id         uuid        NOT NULL REFERENCES transactions (id) ON DELETE CASCADE,
    seq           integer     NOT NULL,
    kind          text        NOT NULL CHECK (kind IN ('execute', 'rollback', 'error')),
    path          text        NOT NULL,
    provider      text,
    action        text,
    input         jsonb,
    output        jsonb,
    rollback_data jsonb,
    error         jsonb,
    at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tx_id, seq)
);

-- ---------------------------------------------------------------- audit (filled by the auditor)
CREATE TABLE audit_transactions (
    tx_id        uuid        PRIMARY KEY,
    request_id   text        NOT NULL,
    namespace    text        NOT NULL,
    procedure    text        NOT NULL,
    status       text        NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    data         jsonb,
    swept_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE audit_procedures (
    tx_id        uuid    NOT NULL,
    step_number  integer NOT NULL,
    namespace    text    NOT NULL,
    procedure    text    NOT NULL,
    PRIMARY KEY (tx_id, step_number)
);

CREATE TABLE audit_errors (
    tx_id        uuid NOT NULL,
    seq          integer NOT NULL,
    source       text NOT NULL,
    code         text NOT NULL,
    description  text NOT NULL,
    PRIMARY KEY (tx_id, seq)
);

-- ---------------------------------------------------------------- the test provider's own store
CREATE SCHEMA provider_test;
CREATE TABLE provider_test.calls (
    id         bigserial   PRIMARY KEY,
    tx_id      uuid,
    step_path  text        NOT NULL,
    action     text        NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('execute', 'rollback')),
    input      jsonb,
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE provider_test.counters (
    key   text    PRIMARY KEY,
    calls integer NOT NULL
);
