-- Grants to single principals (the `grants` table has allowed `principal_id` since V1), keys
-- that expire, revocation announced to every queue manager, and refused calls kept for audit.

-- A key past `expires_at` is refused like a revoked one; NULL: it does not expire.
ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;

-- Every change that can take access away (or give it) is announced on `provisio_auth`, sent
-- at commit by PostgreSQL itself: whoever changes these tables (the API, provisioctl, an
-- operator's SQL) cannot forget it. The queue managers empty their key caches on it.
CREATE FUNCTION provisio_auth_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('provisio_auth', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_keys_auth_changed AFTER UPDATE OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION provisio_auth_changed();
CREATE TRIGGER grants_auth_changed AFTER INSERT OR UPDATE OR DELETE ON grants
    FOR EACH STATEMENT EXECUTE FUNCTION provisio_auth_changed();
CREATE TRIGGER group_members_auth_changed AFTER INSERT OR UPDATE OR DELETE ON group_members
    FOR EACH STATEMENT EXECUTE FUNCTION provisio_auth_changed();
CREATE TRIGGER principals_auth_changed AFTER UPDATE OR DELETE ON principals
    FOR EACH STATEMENT EXECUTE FUNCTION provisio_auth_changed();

-- Refused calls (unauthenticated, expired key, forbidden, rate limited), one row each.
CREATE TABLE security_events (
    id             bigserial   PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    principal_id   uuid,
    principal_name text,
    -- `METHOD /route` for the HTTP API, `engine` for a delivery an engine refused.
    source         text        NOT NULL,
    reason         text        NOT NULL,
    detail         jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX security_events_at ON security_events (at DESC, id DESC);
