//! The store conformance suite: every behaviour the refresh protocol relies on,
//! written once against `Arc<dyn LinkStore>` and run against each backend.
//!
//! A [`Backend`] hands out stores over one database (each with its own keyring,
//! as separate replicas would have) and does the few things a test must do
//! behind the store's back: read raw columns, expire a lease on the database
//! clock, insert a row the way an older release would have. `tests/store.rs`
//! instantiates every suite function for Postgres and for SQLite.
#![allow(dead_code)]

pub mod backends;
pub mod suite;

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use secrecy::{SecretBox, SecretString};
use tokenproxy::config::EncryptionFormat;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::{Fence, Link, LinkStore, StoredSecret, TokenSet};
use uuid::Uuid;

/// The four token columns of a row, exactly as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawTokens {
    /// `oauth_access_token`.
    pub access: String,
    /// `oauth_access_token_key_id`.
    pub access_key_id: Option<String>,
    /// `oauth_refresh_token`.
    pub refresh: String,
    /// `oauth_refresh_token_key_id`.
    pub refresh_key_id: Option<String>,
}

/// One database under test, and the raw-SQL tricks the suite needs.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// A store over this database using `keyring` (its own pool where that is
    /// cheap, so two stores behave like two replicas).
    async fn store(&self, keyring: Keyring) -> Arc<dyn LinkStore>;

    /// The token columns of a row as stored.
    async fn raw_tokens(&self, provider_id: &str, user_id: Uuid) -> RawTokens;

    /// Moves the row's lease into the past on the database clock, as if its
    /// holder had crashed and the lease had run out.
    async fn expire_lease(&self, provider_id: &str, user_id: Uuid);

    /// Inserts a plain-text row that never expires, with raw SQL (as a release
    /// from before encryption was turned on would have left it).
    async fn insert_plain(&self, provider_id: &str, user_id: Uuid, access: &str, refresh: &str);
}

/// First test key.
pub const KEY_A: [u8; 32] = [0x11; 32];
/// Second test key.
pub const KEY_B: [u8; 32] = [0x22; 32];

/// A keyring of `keys` in `format`.
pub fn keyring(format: EncryptionFormat, keys: &[[u8; 32]]) -> Keyring {
    Keyring::new(
        keys.iter().map(|k| SecretBox::new(Box::new(*k))).collect(),
        format,
    )
}

/// A token set with a fixed expiry and some extra fields.
pub fn tokens(access: &str, refresh: &str) -> TokenSet {
    TokenSet {
        access_token: SecretString::from(access.to_owned()),
        refresh_token: SecretString::from(refresh.to_owned()),
        expiry: Some(Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap()),
        extra: Some(serde_json::json!({"scope": "repo"})),
    }
}

/// A stored value.
pub fn stored(s: &str) -> StoredSecret {
    StoredSecret(s.to_owned())
}

/// A fence of stored refresh and access token values.
pub fn fence(refresh: &str, access: &str) -> Fence {
    Fence {
        refresh: stored(refresh),
        access: stored(access),
    }
}

/// Puts a `github` link for `user` with tokens `a0`/`r0` and reads it back.
pub async fn put_and_read(store: &dyn LinkStore, user: Uuid) -> Link {
    store
        .put_link("github", user, &tokens("a0", "r0"))
        .await
        .unwrap();
    store.get_link("github", user).await.unwrap().unwrap()
}
