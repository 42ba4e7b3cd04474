-- Provisio's schema, version 2: the state of the `directory` and `resource` providers
-- (DESIGN §5). Each provider owns one schema and records the calls it has performed, keyed by
-- their idempotency key, in its own `idempotency` table, in the same PostgreSQL transaction as
-- the effect.

-- ---------------------------------------------------------------- directory
CREATE SCHEMA provider_directory;

CREATE TABLE provider_directory.organizations (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE provider_directory.users (
    id           uuid        PRIMARY KEY,
    -- No cascade: an organization with users is never deleted behind their back.
    org_id       uuid        NOT NULL REFERENCES provider_directory.organizations (id),
    name         text        NOT NULL,
    display_name text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

CREATE TABLE provider_directory.groups (
    id      uuid NOT NULL PRIMARY KEY,
    -- An organization without users has groups without members: those go with it.
    org_id  uuid NOT NULL REFERENCES provider_directory.organizations (id) ON DELETE CASCADE,
    name    text NOT NULL,
    UNIQUE (org_id, name)
);

CREATE TABLE provider_directory.group_members (
    group_id uuid NOT NULL REFERENCES provider_directory.groups (id) ON DELETE CASCADE,
    user_id  uuid NOT NULL REFERENCES provider_directory.users (id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX group_members_user ON provider_directory.group_members (user_id);

CREATE TABLE provider_directory.aliases (
    alias   text PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES provider_directory.users (id) ON DELETE CASCADE
);
CREATE INDEX aliases_user ON provider_directory.aliases (user_id);

-- `key` is a call's idempotency key (its result is the call's output and rollback data), or
-- `rollback:{key}` once that call has been rolled back.
CREATE TABLE provider_directory.idempotency (
    key    text        PRIMARY KEY,
    result jsonb       NOT NULL,
    at     timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------- resource manager
CREATE SCHEMA provider_resource;

-- Allocations lock their pool's row (`FOR UPDATE`): one allocation per pool at a time.
CREATE TABLE provider_resource.pools (
    name     text PRIMARY KEY,
    strategy text NOT NULL DEFAULT 'least_used' CHECK (strategy IN ('least_used', 'ranked'))
);

CREATE TABLE provider_resource.resources (
    id       uuid    PRIMARY KEY,
    pool     text    NOT NULL REFERENCES provider_resource.pools (name) ON DELETE CASCADE,
    name     text    NOT NULL,
    capacity integer NOT NULL CHECK (capacity >= 0),
    used     integer NOT NULL DEFAULT 0,
    rank     integer NOT NULL DEFAULT 0,
    UNIQUE (pool, name),
    CHECK (used >= 0 AND used <= capacity)
);

CREATE TABLE provider_resource.allocations (
    id              uuid        PRIMARY KEY,
    -- The allocating call's idempotency key: repeating the call finds its allocation.
    idempotency_key text        NOT NULL UNIQUE,
    resource_id     uuid        NOT NULL REFERENCES provider_resource.resources (id),
    amount          integer     NOT NULL CHECK (amount > 0),
    consumer        text,
    allocated_at    timestamptz NOT NULL DEFAULT now(),
    released_at     timestamptz
);
CREATE INDEX allocations_active ON provider_resource.allocations (resource_id)
    WHERE released_at IS NULL;

-- Results of `release` calls, and `rollback:{key}` markers of rollbacks already performed.
CREATE TABLE provider_resource.idempotency (
    key    text        PRIMARY KEY,
    result jsonb       NOT NULL,
    at     timestamptz NOT NULL DEFAULT now()
);
