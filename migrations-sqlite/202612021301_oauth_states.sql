-- Pending browser sign-ins and spent login URLs (src/store/login.rs). Kept in
-- the database so a callback may reach any replica and each state is taken at
-- most once (DELETE ... RETURNING). Only hashes of the state parameter and of
-- the browser-binding cookie are stored. Times are Unix seconds; rows past
-- expires_at are pruned whenever a sign-in starts.

CREATE TABLE IF NOT EXISTS oauth_states (
    state_hash TEXT PRIMARY KEY,
    provider_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    browser_hash TEXT NOT NULL,
    pkce_verifier TEXT NOT NULL,
    nonce TEXT NOT NULL DEFAULT '',
    expires_at INTEGER NOT NULL
);

CREATE INDEX IF NOT EXISTS oauth_states_expires_at_idx ON oauth_states (expires_at);

CREATE TABLE IF NOT EXISTS oauth_login_tickets (
    ticket_id TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);

CREATE INDEX IF NOT EXISTS oauth_login_tickets_expires_at_idx ON oauth_login_tickets (expires_at);
