//! The token source: cache → store → refresh.
//!
//! SKELETON (public API fixed by the lead; the token-source helper implements it).
//! [`TokenSource::get`] returns a usable access token for (provider, user) or a typed
//! error. Hits are served from a moka cache with no database query and no lock;
//! misses run one flight per key per process, which re-reads the row, takes the
//! cross-replica lease, refreshes through [`crate::oauth`], and writes the result with
//! a compare-and-swap on the refresh token that was read.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

/// Why no token could be served. Maps 1:1 onto DESIGN.md error codes.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// The user has no link for this provider (`link_missing`).
    #[error("no link for this provider")]
    LinkMissing,
    /// The provider rejected the refresh token; the user must log in again (`reauth_required`).
    #[error("the provider rejected the refresh token; log in again")]
    ReauthRequired,
    /// The token endpoint failed transiently (`idp_unavailable`).
    #[error("the provider's token endpoint is unavailable")]
    IdpUnavailable,
    /// The database is unreachable and nothing usable is cached (`store_unavailable`).
    #[error("the link store is unavailable")]
    StoreUnavailable,
}

/// A usable access token. Cheap to clone (shared), redacted in `Debug`.
#[derive(Clone)]
pub struct AccessToken(Arc<TokenValue>);

struct TokenValue {
    secret: SecretString,
    expiry: Option<DateTime<Utc>>,
}

impl AccessToken {
    /// Wraps a token value.
    pub fn new(secret: SecretString, expiry: Option<DateTime<Utc>>) -> Self {
        Self(Arc::new(TokenValue { secret, expiry }))
    }
    /// The token itself, for injection only.
    pub fn expose_secret(&self) -> &str {
        self.0.secret.expose_secret()
    }
    /// When it expires; `None` = never.
    pub fn expiry(&self) -> Option<DateTime<Utc>> {
        self.0.expiry
    }
    /// Whether two handles are the same token version (same cache entry).
    pub fn same_version(&self, other: &AccessToken) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.expose_secret() == other.expose_secret()
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"[redacted]")
            .field("expiry", &self.0.expiry)
            .finish()
    }
}

/// Source of time for expiry decisions, injectable so tests control it.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Finds, caches and refreshes access tokens.
pub struct TokenSource {
    _priv: (),
}

impl TokenSource {
    /// A usable access token for `user` at `provider`.
    pub async fn get(&self, _provider: &str, _user: Uuid) -> Result<AccessToken, TokenError> {
        todo!("token-source helper")
    }

    /// After an upstream answered 401 to `rejected`: drop it and refresh once through
    /// the same flight — at most once per token version, so a misbehaving upstream
    /// cannot cause a refresh storm. Returns the same token when it was already
    /// replaced or when a refresh for that version already happened.
    pub async fn refresh_rejected(
        &self,
        _provider: &str,
        _user: Uuid,
        _rejected: &AccessToken,
    ) -> Result<AccessToken, TokenError> {
        todo!("token-source helper")
    }
}
