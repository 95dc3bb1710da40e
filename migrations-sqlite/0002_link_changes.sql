-- The SQLite stand-in for Postgres's NOTIFY: every change to a link that the
-- Postgres backend announces is appended here by a trigger, in the same
-- statement as the change (so exactly when it commits), and each process's
-- change feed polls for rows after the last one it saw. Rows are pruned after a
-- while; a feed that fell further behind than that says "resync".
--
-- A lease claim (only refresh_lease_expires_at set, nothing else changed) is not
-- announced, as in Postgres; its release (the lease back to NULL) is, so waiting
-- processes re-read at once.

CREATE TABLE IF NOT EXISTS link_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    provider_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    changed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f000Z', 'now'))
);

CREATE INDEX IF NOT EXISTS link_changes_changed_at_idx ON link_changes (changed_at);

CREATE TRIGGER IF NOT EXISTS external_auth_links_announce_insert
AFTER INSERT ON external_auth_links
BEGIN
    INSERT INTO link_changes (provider_id, user_id) VALUES (NEW.provider_id, NEW.user_id);
END;

CREATE TRIGGER IF NOT EXISTS external_auth_links_announce_delete
AFTER DELETE ON external_auth_links
BEGIN
    INSERT INTO link_changes (provider_id, user_id) VALUES (OLD.provider_id, OLD.user_id);
END;

CREATE TRIGGER IF NOT EXISTS external_auth_links_announce_update
AFTER UPDATE ON external_auth_links
WHEN NEW.refresh_lease_expires_at IS NULL
    OR NEW.oauth_access_token IS NOT OLD.oauth_access_token
    OR NEW.oauth_refresh_token IS NOT OLD.oauth_refresh_token
    OR NEW.oauth_refresh_failure_reason IS NOT OLD.oauth_refresh_failure_reason
BEGIN
    INSERT INTO link_changes (provider_id, user_id) VALUES (NEW.provider_id, NEW.user_id);
END;
