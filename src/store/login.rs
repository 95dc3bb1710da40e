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
