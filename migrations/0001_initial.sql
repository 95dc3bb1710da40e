-- tokenproxy's schema, written to sit beside (or inside) a Coder database.
--
-- external_auth_links and dbcrypt_keys keep Coder's exact shape so that Coder and
-- tokenproxy can read and write the same rows. On a Coder database they already
-- exist, hence IF NOT EXISTS; the ALTERs add the columns an older Coder may lack.
-- Unlike Coder we declare no foreign keys (users(id), dbcrypt_keys digests):
-- tokenproxy has no users table and its native key ids are not registered in
-- dbcrypt_keys. On a Coder database Coder's foreign keys stay in force, which is
-- why encryption.format must be "coder" there.

CREATE TABLE IF NOT EXISTS dbcrypt_keys (
    number integer NOT NULL PRIMARY KEY,
    active_key_digest text UNIQUE,
    revoked_key_digest text UNIQUE,
    created_at timestamp with time zone DEFAULT CURRENT_TIMESTAMP,
    revoked_at timestamp with time zone DEFAULT NULL,
    test text NOT NULL
);

CREATE TABLE IF NOT EXISTS external_auth_links (
    provider_id text NOT NULL,
    user_id uuid NOT NULL,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    oauth_access_token text NOT NULL,
    oauth_refresh_token text NOT NULL,
    -- Go's zero time ('0001-01-01 00:00:00+00') means "never expires".
    oauth_expiry timestamp with time zone NOT NULL,
    oauth_access_token_key_id text,
    oauth_refresh_token_key_id text,
    oauth_extra jsonb,
    oauth_refresh_failure_reason text NOT NULL DEFAULT '',
    refresh_lease_expires_at timestamp with time zone,
    CONSTRAINT git_auth_links_provider_id_user_id_key UNIQUE (provider_id, user_id)
);

ALTER TABLE external_auth_links
    ADD COLUMN IF NOT EXISTS oauth_refresh_failure_reason text NOT NULL DEFAULT '';
ALTER TABLE external_auth_links
    ADD COLUMN IF NOT EXISTS refresh_lease_expires_at timestamp with time zone;

CREATE INDEX IF NOT EXISTS external_auth_links_user_id_idx ON external_auth_links (user_id);

-- Caller credentials. Only the SHA-256 of the secret `tpx_...` string is stored.
CREATE TABLE IF NOT EXISTS proxy_tokens (
    id uuid NOT NULL PRIMARY KEY,
    user_id uuid NOT NULL,
    name text NOT NULL DEFAULT '',
    hash bytea NOT NULL UNIQUE CHECK (octet_length(hash) = 32),
    -- Providers the token may use; empty means all.
    providers text[] NOT NULL DEFAULT '{}',
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    expires_at timestamp with time zone,
    last_used_at timestamp with time zone,
    revoked_at timestamp with time zone
);

CREATE INDEX IF NOT EXISTS proxy_tokens_user_id_idx ON proxy_tokens (user_id);
