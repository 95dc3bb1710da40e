//! Persistence of OAuth2 links and proxy tokens.
//!
//! [`LinkStore`] is the one seam between tokenproxy and its database. Every SQL
//! statement lives in a backend module here (or in `migrations/` and
//! `migrations-sqlite/`); [`open`] picks the backend from `database.url`. The trait is
//! shaped around the refresh protocol: reads return the refresh token *exactly as
//! stored* ([`StoredSecret`]) so that every write after a refresh can be a
//! compare-and-swap on that value, and every conditional write reports whether it
//! applied, so a caller can tell a lost race from success.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use crate::config::{Config, DatabaseConfig};
use crate::crypto::{CryptoError, Keyring};

mod codec;
pub mod coder;
mod coder_lease;
mod coder_poll;
pub mod coder_store;
mod lease;
pub mod login;
pub mod postgres;
mod rotation;
pub mod sqlite;
pub mod timed;

/// Retries of a conditional write (or lease claim) whose row changed between the
/// attempt and the read that explains the miss. Each retry needs another
/// concurrent change, so a small bound suffices.
const CLAIM_ATTEMPTS: usize = 3;

/// Postgres channel on which every link change is announced.
pub const CHANGE_CHANNEL: &str = "tokenproxy_links";

/// A store failure. Messages never contain token values.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or did not answer in time.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A stored value could not be decrypted (wrong or missing key, tampered value).
    #[error("cannot decrypt {column} of link {provider_id}/{user_id}: {source}")]
    Decrypt {
        /// Provider of the row.
        provider_id: String,
        /// User of the row.
        user_id: Uuid,
        /// Column that failed.
        column: &'static str,
        /// Why.
        source: CryptoError,
    },
    /// Anything else the database rejected (constraint, bad data).
    #[error("database error: {0}")]
    Other(String),
}

/// A column value exactly as stored (ciphertext or plaintext), kept for
/// compare-and-swap. Never re-encrypt to compare: nonces are random.
#[derive(Clone)]
pub struct StoredSecret(pub String);

impl std::fmt::Debug for StoredSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoredSecret([redacted])")
    }
}

impl PartialEq for StoredSecret {
    fn eq(&self, other: &Self) -> bool {
        crate::crypto::same_text(&self.0, &other.0)
    }
}
impl Eq for StoredSecret {}

/// What a write after a refresh is fenced by: both token columns exactly as the
/// refresh read them. The refresh token alone fences nothing for a provider
/// that does not rotate it (and, with encryption on, every write re-encrypts
/// it); the access token changes with every refresh, so together they catch any
/// concurrent writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// `oauth_refresh_token` as read.
    pub refresh: StoredSecret,
    /// `oauth_access_token` as read.
    pub access: StoredSecret,
}

/// One user's link to one provider, decrypted.
#[derive(Debug, Clone)]
pub struct Link {
    /// `external_auth_links.provider_id`.
    pub provider_id: String,
    /// `external_auth_links.user_id`.
    pub user_id: Uuid,
    /// The current access token.
    pub access_token: SecretString,
    /// The current refresh token; empty when the provider issued none.
    pub refresh_token: SecretString,
    /// `oauth_refresh_token` exactly as stored, for compare-and-swap.
    pub refresh_token_stored: StoredSecret,
    /// `oauth_access_token` exactly as stored, for compare-and-swap.
    pub access_token_stored: StoredSecret,
    /// When the access token expires; `None` for Coder's zero time ("never").
    pub expiry: Option<DateTime<Utc>>,
    /// `oauth_extra`.
    pub extra: Option<serde_json::Value>,
    /// Why the last refresh failed permanently; empty when it did not.
    pub refresh_failure_reason: String,
    /// `refresh_lease_expires_at`.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// `created_at`.
    pub created_at: DateTime<Utc>,
    /// `updated_at`.
    pub updated_at: DateTime<Utc>,
}

impl Link {
    /// The fence of a write that follows a refresh of this row.
    pub fn fence(&self) -> Fence {
        Fence {
            refresh: self.refresh_token_stored.clone(),
            access: self.access_token_stored.clone(),
        }
    }
}

/// A link without its token values, for listings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkSummary {
    /// Provider id.
    pub provider_id: String,
    /// User id.
    pub user_id: Uuid,
    /// When the link was made.
    pub created_at: DateTime<Utc>,
    /// Last write.
    pub updated_at: DateTime<Utc>,
    /// Access token expiry; `None` = never.
    pub expiry: Option<DateTime<Utc>>,
    /// Whether a refresh token is stored.
    pub has_refresh_token: bool,
    /// Whether the token columns are encrypted.
    pub encrypted: bool,
    /// Permanent refresh failure, if any.
    pub refresh_failure_reason: String,
    /// When the refresh token itself expires (`oauth_extra.refresh_token_expires_at`,
    /// kept for providers that say so, e.g. GitHub Apps); `None` = unknown or never.
    pub refresh_expiry: Option<DateTime<Utc>>,
}

impl LinkSummary {
    /// The `refresh_token_expires_at` an `oauth_extra` value records, if any.
    pub fn refresh_expiry_of(extra: Option<&serde_json::Value>) -> Option<DateTime<Utc>> {
        let at = extra?.get("refresh_token_expires_at")?.as_str()?;
        DateTime::parse_from_rfc3339(at)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// What a link needs from its user, for operators (`tokenproxy_links{state}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Works, and keeps working (refreshable, or far from expiry).
    Ok,
    /// Has no refresh token and its access token expires within
    /// [`EXPIRING_SOON`]: the user must log in again soon.
    ExpiringSoon,
    /// The provider rejected its refresh token, or it expired with none: the user
    /// must log in again now.
    ReauthRequired,
}

/// How close to its expiry an unrefreshable link counts as `expiring_soon`.
pub const EXPIRING_SOON: Duration = Duration::from_secs(24 * 3600);

impl LinkState {
    /// The state of `link` at `now` (pure).
    pub fn of(link: &LinkSummary, now: DateTime<Utc>) -> Self {
        if !link.refresh_failure_reason.is_empty() {
            return Self::ReauthRequired;
        }
        match link.expiry {
            Some(exp) if !link.has_refresh_token && exp <= now => Self::ReauthRequired,
            Some(exp)
                if !link.has_refresh_token
                    && exp
                        <= now + chrono::Duration::from_std(EXPIRING_SOON).unwrap_or_default() =>
            {
                Self::ExpiringSoon
            }
            _ => Self::Ok,
        }
    }
}

/// Links counted by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStates {
    /// [`LinkState::Ok`].
    pub ok: u64,
    /// [`LinkState::ExpiringSoon`].
    pub expiring_soon: u64,
    /// [`LinkState::ReauthRequired`].
    pub reauth_required: u64,
}

/// Token values to write: from `link put`, a login, or a refresh.
#[derive(Debug, Clone)]
pub struct TokenSet {
    /// Access token.
    pub access_token: SecretString,
    /// Refresh token; empty when none.
    pub refresh_token: SecretString,
    /// Expiry; `None` = never.
    pub expiry: Option<DateTime<Utc>>,
    /// Fields kept in `oauth_extra`.
    pub extra: Option<serde_json::Value>,
}

/// A held cross-replica refresh lease.
///
/// The lease lives in Coder's `refresh_lease_expires_at` column, so Coder replicas
/// and tokenproxy replicas respect each other's. The exact timestamp the claim
/// wrote (database clock, microseconds) is the holder's fencing token: no other
/// claim can write the same value, because it may only claim once this one expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Provider of the leased link.
    pub provider_id: String,
    /// User of the leased link.
    pub user_id: Uuid,
    /// The value written to `refresh_lease_expires_at`; identifies the holder.
    pub expires_at: DateTime<Utc>,
}

/// Result of trying to claim the refresh lease.
#[derive(Debug, Clone)]
pub enum LeaseClaim {
    /// We hold it now.
    Acquired(Lease),
    /// Another holder has it until this time (database clock).
    Held {
        /// When the other holder's lease runs out.
        until: DateTime<Utc>,
    },
    /// The row no longer holds the refresh token that was read (or is gone): re-read.
    Changed,
}

/// A change announced by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeEvent {
    /// This link was written or deleted.
    Link {
        /// Provider id.
        provider_id: String,
        /// User id.
        user_id: Uuid,
    },
    /// The change feed (re)connected: notifications may have been lost, drop everything.
    Resync,
    /// The change feed lost its connection and is reconnecting; a `Resync`
    /// follows once it listens again. Nothing to drop yet: only reported.
    Lost,
}

/// A proxy token to create. Only the SHA-256 of the secret is stored.
#[derive(Debug, Clone)]
pub struct NewProxyToken {
    /// User the token acts for.
    pub user_id: Uuid,
    /// Human label.
    pub name: String,
    /// SHA-256 of the full `tpx_…` string.
    pub hash: [u8; 32],
    /// Providers it may use; empty = all.
    pub providers: Vec<String>,
    /// When it stops working; `None` = never.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A stored proxy token (without its secret, which is never stored).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProxyTokenInfo {
    /// Token id.
    pub id: Uuid,
    /// User the token acts for.
    pub user_id: Uuid,
    /// Human label.
    pub name: String,
    /// Providers it may use; empty = all.
    pub providers: Vec<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Expiry, if any.
    pub expires_at: Option<DateTime<Utc>>,
    /// Last use, if recorded.
    pub last_used_at: Option<DateTime<Utc>>,
    /// Revocation time, if revoked.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Outcome of `keys rotate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RotateReport {
    /// Rows re-encrypted with the first key.
    pub rotated: u64,
    /// Rows already under the first key.
    pub unchanged: u64,
    /// Rows skipped because a concurrent write changed them (re-run to finish).
    pub raced: u64,
}

/// Storage for links and proxy tokens. Implemented by each database backend.
#[async_trait::async_trait]
pub trait LinkStore: Send + Sync + 'static {
    /// Reads and decrypts one link.
    async fn get_link(&self, provider_id: &str, user_id: Uuid) -> Result<Option<Link>, StoreError>;

    /// Inserts or replaces a link (a login or `link put`): clears the failure reason
    /// and any lease, and announces the change.
    async fn put_link(
        &self,
        provider_id: &str,
        user_id: Uuid,
        tokens: &TokenSet,
    ) -> Result<(), StoreError>;

    /// Deletes a link; `true` when one existed. Announces the change.
    async fn delete_link(&self, provider_id: &str, user_id: Uuid) -> Result<bool, StoreError>;

    /// Lists links (of one user, or all), without token values.
    async fn list_links(&self, user_id: Option<Uuid>) -> Result<Vec<LinkSummary>, StoreError>;

    /// Claims the cross-replica refresh lease for `lease` long, only while the row
    /// still holds `old_refresh` and no unexpired lease exists (database clock).
    async fn claim_refresh_lease(
        &self,
        provider_id: &str,
        user_id: Uuid,
        old_refresh: &StoredSecret,
        lease: Duration,
    ) -> Result<LeaseClaim, StoreError>;

    /// Releases a lease we hold (only if it is still ours) and announces it so
    /// waiters re-read. Best effort for callers.
    async fn release_refresh_lease(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Extends a lease we still hold — the row's lease is exactly
    /// `lease.expires_at`, expired or not — to `by` from now (database clock).
    /// Returns the extended lease (its new value is the new fencing token), or
    /// `None` when another holder claimed the row or the lease was cleared.
    ///
    /// A holder whose provider already answered calls it while its write
    /// retries: the row's refresh token may be spent, so no one else may claim it.
    async fn extend_refresh_lease(
        &self,
        lease: &Lease,
        by: Duration,
    ) -> Result<Option<Lease>, StoreError>;

    /// Compare-and-swap after a successful refresh: writes `new` (encrypting it)
    /// only if the row still holds what was read (`read`); clears the failure
    /// reason and the lease; announces. `Ok(false)` = lost the race.
    ///
    /// When `new` rotated the refresh token, only `oauth_refresh_token` must
    /// still be as read: the provider may already have retired the old one, so
    /// the new one must be kept whenever the row still holds the one exchanged.
    /// When it did not rotate, the access token must be as read too, so a stale
    /// writer cannot overwrite a newer access token. A re-encryption alone
    /// (`keys rotate`) does not count as a change. Deliberately not fenced by
    /// the lease holder, for the same reason as the rotated case.
    async fn write_refreshed(
        &self,
        provider_id: &str,
        user_id: Uuid,
        read: &Fence,
        new: &TokenSet,
    ) -> Result<bool, StoreError>;

    /// Compare-and-swap record of a permanent refresh failure: sets
    /// `oauth_refresh_failure_reason` only if the row still holds both tokens as
    /// read (and, when `lease` is given, that lease is still the row's).
    /// Announces when applied.
    async fn record_refresh_failure(
        &self,
        provider_id: &str,
        user_id: Uuid,
        read: &Fence,
        lease: Option<&Lease>,
        reason: &str,
    ) -> Result<bool, StoreError>;

    /// Stores a new proxy token (hash only) and returns it.
    async fn create_proxy_token(&self, token: &NewProxyToken)
        -> Result<ProxyTokenInfo, StoreError>;

    /// Finds a proxy token by the SHA-256 of its secret (revoked and expired included;
    /// the caller decides).
    async fn find_proxy_token(&self, hash: &[u8; 32])
        -> Result<Option<ProxyTokenInfo>, StoreError>;

    /// Lists proxy tokens (of one user, or all).
    async fn list_proxy_tokens(
        &self,
        user_id: Option<Uuid>,
    ) -> Result<Vec<ProxyTokenInfo>, StoreError>;

    /// Revokes a proxy token; `true` when it existed and was not yet revoked.
    async fn revoke_proxy_token(&self, id: Uuid) -> Result<bool, StoreError>;

    /// Records that a proxy token was used now.
    async fn touch_proxy_token(&self, id: Uuid) -> Result<(), StoreError>;

    /// With `[coder]`: refuses a Coder database tokenproxy cannot share safely
    /// (no refresh lease; a primary key missing from or revoked in
    /// `dbcrypt_keys`; rows encrypted with a key we lack). See [`coder`].
    async fn check_coder_database(&self) -> Result<(), StoreError> {
        Err(StoreError::Other(
            "[coder] needs database.url to name Coder's Postgres database".into(),
        ))
    }

    /// The owner of the Coder workspace whose agent holds `auth_token`, resolved
    /// as coderd does (see [`coder::agent_owner`]); `None` when coderd would refuse
    /// it. Only a Postgres store over a Coder database can answer.
    async fn find_coder_agent_owner(&self, auth_token: Uuid) -> Result<Option<Uuid>, StoreError> {
        let _ = auth_token;
        Err(StoreError::Other(
            "callers.mode = \"coder_agent\" needs a Postgres Coder database".into(),
        ))
    }

    /// Re-encrypts every link with the first key by compare-and-swap, keeping
    /// failure reasons; announces each change.
    async fn rotate_keys(&self) -> Result<RotateReport, StoreError>;

    /// Applies every pending migration of this backend; a no-op when all are applied.
    ///
    /// Both database backends implement it; the default is for wrappers and test
    /// doubles, which have no schema of their own.
    async fn migrate(&self) -> Result<(), StoreError> {
        Err(StoreError::Other(
            "this store has no migrations of its own".into(),
        ))
    }

    /// Whether the database answers and every migration is applied.
    async fn ready(&self) -> Result<(), StoreError>;

    /// Pending browser sign-ins, when this store keeps them (both database
    /// backends do; wrappers and test doubles may not).
    fn login_store(&self) -> Option<&dyn login::LoginStore> {
        None
    }

    /// Counts every link by [`LinkState`] at `now` (one listing, no token values).
    /// Run in the background for `tokenproxy_links`, never per request.
    async fn count_link_states(&self, now: DateTime<Utc>) -> Result<LinkStates, StoreError> {
        let mut states = LinkStates::default();
        for link in self.list_links(None).await? {
            match LinkState::of(&link, now) {
                LinkState::Ok => states.ok += 1,
                LinkState::ExpiringSoon => states.expiring_soon += 1,
                LinkState::ReauthRequired => states.reauth_required += 1,
            }
        }
        Ok(states)
    }

    /// Starts the change feed. Emits [`ChangeEvent::Resync`] after every (re)connect.
    /// Every change that applied is announced, to every process on the database,
    /// except a lease claim. The feed stays open while the receiver lives.
    async fn watch_changes(&self) -> Result<tokio::sync::mpsc::Receiver<ChangeEvent>, StoreError>;
}

/// The database backends, told apart by the scheme of `database.url`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `postgres://` or `postgresql://`.
    Postgres,
    /// `sqlite://PATH` (or `sqlite:PATH`): one local file.
    Sqlite,
}

impl Backend {
    /// The backend a database URL names. The error never repeats the URL, which
    /// may hold a password.
    pub fn of_url(url: &str) -> Result<Self, StoreError> {
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("postgres" | "postgresql") => Ok(Self::Postgres),
            Some("sqlite") => Ok(Self::Sqlite),
            _ => Err(StoreError::Other(
                "database.url must start with postgres://, postgresql:// or sqlite://".into(),
            )),
        }
    }
}

/// Opens the store `cfg.url` names, over a lazily connecting pool: a database
/// that is down shows up as [`StoreError::Unavailable`] on first use. A SQLite
/// file (and its directory) is created when missing.
pub fn open(cfg: &DatabaseConfig, keyring: Keyring) -> Result<Arc<dyn LinkStore>, StoreError> {
    Ok(match Backend::of_url(cfg.url.expose_secret())? {
        Backend::Postgres => Arc::new(postgres::PgStore::connect(cfg, keyring)?),
        Backend::Sqlite => Arc::new(sqlite::SqliteStore::connect(cfg, keyring)?),
    })
}

/// The verdict of [`LinkStore::ready`] on the `(version, success)` rows of a
/// backend's `_sqlx_migrations` table: every up migration of `migrator` must
/// have applied. A table that cannot be read for any reason but connectivity
/// means the migrations never ran.
fn check_migrations(
    migrator: &sqlx::migrate::Migrator,
    applied: Result<Vec<(i64, bool)>, StoreError>,
) -> Result<(), StoreError> {
    let applied = applied.map_err(|e| match e {
        StoreError::Other(_) => StoreError::Other("migrations not applied".into()),
        unavailable => unavailable,
    })?;
    for m in migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
    {
        if !applied.iter().any(|&(v, ok)| v == m.version && ok) {
            return Err(StoreError::Other(format!(
                "migration {} ({}) not applied",
                m.version, m.description
            )));
        }
    }
    Ok(())
}

/// [`open`] with the keyring `[encryption]` describes.
/// With `[coder]`, the store of Coder mode over Coder's database
/// (`coder.database_url`, else `database.url`).
pub fn open_config(cfg: &Config) -> Result<Arc<dyn LinkStore>, StoreError> {
    let keyring = Keyring::new(cfg.encryption_keys(), cfg.encryption_format());
    let Some(coder) = &cfg.coder else {
        return open(&cfg.database, keyring);
    };
    let url = coder.database_url.as_ref().unwrap_or(&cfg.database.url);
    if Backend::of_url(url.expose_secret())? != Backend::Postgres {
        return Err(StoreError::Other(
            "[coder] needs Coder's Postgres database (coder.database_url or database.url)".into(),
        ));
    }
    let opts = coder_store::CoderOptions {
        install_trigger: coder.install_trigger,
        poll_interval: coder.poll_interval,
        watch_idle: coder.watch_idle,
        watch_capacity: cfg.tokens.cache_capacity as usize,
    };
    Ok(Arc::new(coder_store::CoderStore::connect(
        url,
        &cfg.database,
        keyring,
        opts,
    )?))
}
