-- tokenproxy's own tables on a Coder database (`[coder]`), in schema
-- `tokenproxy`: nothing in Coder's schema is created, altered or dropped.
-- `tokenproxy migrate` creates the schema before this runs, so sqlx's
-- _sqlx_migrations lands there too (the connection's search_path puts
-- `tokenproxy` first). Coder's external_auth_links and dbcrypt_keys are used
-- as coderd created them.

-- Caller credentials. Only the SHA-256 of the secret `tpx_...` string is stored.
CREATE TABLE IF NOT EXISTS tokenproxy.proxy_tokens (
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

CREATE INDEX IF NOT EXISTS proxy_tokens_user_id_idx ON tokenproxy.proxy_tokens (user_id);
