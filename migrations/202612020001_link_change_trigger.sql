-- Announce every change to a link, whoever makes it: Coder's own code, a DBA's
-- UPDATE, a restore. tokenproxy's statements also call pg_notify themselves (a
-- database where this trigger is not installed still hears them); Postgres
-- delivers identical notifications of one transaction only once, so a
-- tokenproxy write is not announced twice.
--
-- The payload is the one the change feed parses: provider_id TAB user_id.
--
-- As on SQLite (migrations-sqlite/0002_link_changes.sql), a lease claim (only
-- refresh_lease_expires_at set, nothing else changed) is not announced: no
-- cached token changes. Its release (the lease back to NULL) is, so waiting
-- replicas re-read at once.

CREATE OR REPLACE FUNCTION tokenproxy_announce_link_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r external_auth_links;
BEGIN
    IF TG_OP = 'DELETE' THEN
        r := OLD;
    ELSE
        r := NEW;
    END IF;
    IF TG_OP = 'UPDATE'
        AND NEW.refresh_lease_expires_at IS NOT NULL
        AND NEW.oauth_access_token IS NOT DISTINCT FROM OLD.oauth_access_token
        AND NEW.oauth_refresh_token IS NOT DISTINCT FROM OLD.oauth_refresh_token
        AND NEW.oauth_expiry IS NOT DISTINCT FROM OLD.oauth_expiry
        AND NEW.oauth_refresh_failure_reason IS NOT DISTINCT FROM OLD.oauth_refresh_failure_reason
        AND NEW.provider_id IS NOT DISTINCT FROM OLD.provider_id
        AND NEW.user_id IS NOT DISTINCT FROM OLD.user_id
    THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('tokenproxy_links', r.provider_id || E'\t' || r.user_id::text);
    -- A key change (rare) also leaves the old key's cache entry stale.
    IF TG_OP = 'UPDATE' AND (NEW.provider_id, NEW.user_id) IS DISTINCT FROM (OLD.provider_id, OLD.user_id) THEN
        PERFORM pg_notify('tokenproxy_links', OLD.provider_id || E'\t' || OLD.user_id::text);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS external_auth_links_announce ON external_auth_links;
CREATE TRIGGER external_auth_links_announce
AFTER INSERT OR UPDATE OR DELETE ON external_auth_links
FOR EACH ROW EXECUTE FUNCTION tokenproxy_announce_link_change();
