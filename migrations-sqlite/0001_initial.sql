-- tokenproxy's schema for the embedded SQLite store: the same tables and column
-- names as migrations/0001_initial.sql (Postgres), with types adapted.
--
-- * uuids are TEXT in lower-case hyphenated form;
-- * timestamps are TEXT 'YYYY-MM-DDTHH:MM:SS.ffffffZ' (always UTC, always six
--   fractional digits), so they compare correctly as strings and the database
--   clock, strftime('%Y-%m-%dT%H:%M:%f000Z', 'now'), writes the same shape;
-- * oauth_extra and proxy_tokens.providers are JSON text;
-- * proxy token hashes are 32-byte BLOBs.
--
-- No dbcrypt_keys table: it exists in Postgres only so that Coder's foreign keys
-- hold, and a SQLite file is never shared with Coder.

CREATE TABLE IF NOT EXISTS external_auth_links (
    provider_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    oauth_access_token TEXT NOT NULL,
    oauth_refresh_token TEXT NOT NULL,
    -- '0001-01-01T00:00:00.000000Z' (Go's zero time) means "never expires".
    oauth_expiry TEXT NOT NULL,
    oauth_access_token_key_id TEXT,
    oauth_refresh_token_key_id TEXT,
    oauth_extra TEXT,
    oauth_refresh_failure_reason TEXT NOT NULL DEFAULT '',
    refresh_lease_expires_at TEXT,
    CONSTRAINT git_auth_links_provider_id_user_id_key UNIQUE (provider_id, user_id)
);

CREATE INDEX IF NOT EXISTS external_auth_links_user_id_idx ON external_auth_links (user_id);

-- Caller credentials. Only the SHA-256 of the secret `tpx_...` string is stored.
CREATE TABLE IF NOT EXISTS proxy_tokens (
    id TEXT NOT NULL PRIMARY KEY,
    user_id TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    hash BLOB NOT NULL UNIQUE CHECK (length(hash) = 32),
    -- JSON array of the providers the token may use; empty means all.
    providers TEXT NOT NULL DEFAULT '[]',
    created_at TEXT NOT NULL,
    expires_at TEXT,
    last_used_at TEXT,
    revoked_at TEXT
);

CREATE INDEX IF NOT EXISTS proxy_tokens_user_id_idx ON proxy_tokens (user_id);
