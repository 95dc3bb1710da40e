//! Pending browser sign-ins (`/_tokenproxy/oauth/{provider}/login` → callback).
//!
//! A sign-in's state lives in the database, not in the replica that started it,
//! so the provider may send the browser back to any replica. Taking a state is a
//! `DELETE … RETURNING`: of two callbacks presenting it, on any replicas, exactly
//! one gets the row. Signed login URLs are single-use the same way: starting a
//! flow with one inserts its id, and a second start finds it there.
//!
//! Only hashes of the `state` parameter and of the browser cookie are stored, so
//! a database reader cannot complete someone's sign-in; the PKCE verifier is
//! sealed with the store's keyring like the tokens (bound to the provider, the
//! user and the column), so the row holds no secret in plain text when
//! encryption is on. Rows expire after the flow's lifetime and are pruned
//! whenever a new flow starts.

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use uuid::Uuid;

use super::StoreError;
use crate::crypto::{Keyring, ValueContext};

/// The tables whose expired rows are pruned whenever a sign-in starts.
pub(crate) const PRUNED_TABLES: [&str; 2] = ["oauth_states", "oauth_login_tickets"];

// The statements both dialects run. `$N` placeholders are PostgreSQL's and are
// also read positionally by sqlx's SQLite driver, so one text serves both; what
// differs (pool types, how a UUID is bound) stays in each store.

/// Deletes a table's rows past their expiry (`$1`: now, Unix seconds).
pub(crate) fn prune_sql(table: &str) -> String {
    format!("DELETE FROM {table} WHERE expires_at < $1")
}

/// Spends a login URL's ticket; 0 rows affected = already spent.
pub(crate) const SPEND_TICKET_SQL: &str =
    "INSERT INTO oauth_login_tickets (ticket_id, expires_at) VALUES ($1, $2) \
     ON CONFLICT (ticket_id) DO NOTHING";

/// Remembers a sign-in until its callback.
pub(crate) const INSERT_STATE_SQL: &str =
    "INSERT INTO oauth_states (state_hash, provider_id, user_id, browser_hash, \
     pkce_verifier, nonce, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// Takes a state once: of two callbacks presenting it, one gets the row.
pub(crate) const TAKE_STATE_SQL: &str =
    "DELETE FROM oauth_states WHERE state_hash = $1 RETURNING provider_id, user_id, \
     browser_hash, pkce_verifier, nonce, expires_at";

/// A taken `oauth_states` row as read, before its verifier is opened.
pub(crate) struct TakenRow {
    /// `provider_id`.
    pub provider_id: String,
    /// `user_id`.
    pub user_id: Uuid,
    /// `browser_hash`.
    pub browser_hash: String,
    /// `pkce_verifier` as stored (sealed).
    pub sealed_verifier: String,
    /// `nonce`.
    pub nonce: String,
    /// `expires_at`, Unix seconds.
    pub expires_at: i64,
}

impl TakenRow {
    /// The sign-in the row held, its verifier opened with `keyring`.
    pub(crate) fn into_state(self, keyring: &Keyring, state_hash: &str) -> LoginState {
        LoginState {
            state_hash: state_hash.to_string(),
            pkce_verifier: open_verifier(
                keyring,
                &self.provider_id,
                self.user_id,
                &self.sealed_verifier,
            ),
            provider_id: self.provider_id,
            user_id: self.user_id,
            browser_hash: self.browser_hash,
            nonce: self.nonce,
            expires_at: DateTime::from_timestamp(self.expires_at, 0).unwrap_or_default(),
        }
    }
}

/// The column name the verifier's encryption is bound to.
const VERIFIER_COLUMN: &str = "oauth_states.pkce_verifier";

/// The `pkce_verifier` column value of `state`: sealed with the first key
/// (plain text only without keys, as the tokens are).
pub(crate) fn seal_verifier(keyring: &Keyring, state: &LoginState) -> Result<String, StoreError> {
    use secrecy::ExposeSecret;
    let ctx = ValueContext {
        provider_id: &state.provider_id,
        user_id: state.user_id,
        column: VERIFIER_COLUMN,
    };
    keyring
        .seal(state.pkce_verifier.expose_secret(), ctx)
        .map(|s| s.value)
        .map_err(|e| StoreError::Other(format!("sealing a sign-in's PKCE verifier: {e}")))
}

/// The verifier from its column value. No key id is kept beside it (a state
/// lives 10 minutes), so every configured key is tried; a value none opens is
/// one written before encryption was turned on, taken as plain text.
pub(crate) fn open_verifier(
    keyring: &Keyring,
    provider_id: &str,
    user_id: Uuid,
    value: &str,
) -> SecretString {
    let ctx = ValueContext {
        provider_id,
        user_id,
        column: VERIFIER_COLUMN,
    };
    keyring.open_any(value, ctx)
}

/// A sign-in to remember until its callback.
#[derive(Debug, Clone)]
pub struct LoginState {
    /// Hex SHA-256 of the `state` parameter sent to the provider.
    pub state_hash: String,
    /// Provider id.
    pub provider_id: String,
    /// The user the link will belong to.
    pub user_id: Uuid,
    /// Hex SHA-256 of the browser-binding cookie set when the flow started.
    pub browser_hash: String,
    /// The PKCE code verifier (RFC 7636).
    pub pkce_verifier: SecretString,
    /// The OIDC `nonce` sent (empty when none).
    pub nonce: String,
    /// When the state stops being accepted.
    pub expires_at: DateTime<Utc>,
}

/// A signed login URL being spent.
#[derive(Debug, Clone)]
pub struct SpentTicket {
    /// The ticket's random id.
    pub id: String,
    /// When the ticket would have expired anyway (the row may be pruned after).
    pub expires_at: DateTime<Utc>,
}

/// Outcome of [`LoginStore::begin_login`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeginLogin {
    /// The state is stored (and the ticket, if any, spent).
    Started,
    /// The ticket was spent before: nothing was stored.
    TicketAlreadyUsed,
}

/// Storage of pending sign-ins. Implemented by both database backends.
#[async_trait::async_trait]
pub trait LoginStore: Send + Sync {
    /// Stores `state`, spending `ticket` in the same transaction; prunes expired
    /// states and tickets first.
    async fn begin_login(
        &self,
        state: &LoginState,
        ticket: Option<&SpentTicket>,
    ) -> Result<BeginLogin, StoreError>;

    /// Removes and returns the state with this hash, expired or not (the caller
    /// tells the browser which). `None`: unknown or already taken.
    async fn take_login_state(&self, state_hash: &str) -> Result<Option<LoginState>, StoreError>;
}
