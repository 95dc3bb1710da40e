//! The Postgres backend of [`LinkStore`].
//!
//! Every statement that changes a link announces it with `pg_notify` in the same
//! statement (a data-modifying CTE), so a notification is sent exactly when the
//! change commits and never for a write that did not apply. Every conditional
//! write is a compare-and-swap on `oauth_refresh_token` exactly as stored, and
//! leases use the database clock only, so replicas with skewed clocks still agree.
//!
//! The store reads and writes Coder's `external_auth_links` rows unchanged: Go's
//! zero time in `oauth_expiry` means "never", and the `*_key_id` columns say how
//! each token is encrypted (see [`crate::crypto`]).

mod dbcrypt;
mod feed;
pub(super) mod lease;
mod login;
pub(super) mod refresh;
mod rotate;
mod tokens;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use uuid::Uuid;

use super::codec::{self, LinkRow, LINK_COLUMNS};
use super::rotation::{self, RowSql};
use super::{
    ChangeEvent, Fence, Lease, LeaseClaim, Link, LinkState, LinkStates, LinkStore, LinkSummary,
    NewProxyToken, ProxyTokenInfo, RotateReport, StoreError, StoredSecret, TokenSet,
    CHANGE_CHANNEL,
};
use crate::config::{Config, DatabaseConfig, EncryptionFormat};
use crate::crypto::{Keyring, Sealed};

/// The embedded migrations (`migrations/*.sql`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The `pg_notify` payload of a link: `provider_id TAB user_id`.
const NOTIFY_EXPR: &str =
    "pg_notify($NOTIFY_CHANNEL, provider_id || E'\\t' || user_id::text)::text";

/// Postgres-backed [`LinkStore`].
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    keyring: Arc<Keyring>,
    /// Set once the first key is known to be in `dbcrypt_keys` (Coder format).
    key_registered: Arc<tokio::sync::OnceCell<()>>,
    /// How often the change feed checks that its connection still hears.
    feed_check: Duration,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("keyring", &self.keyring)
            .finish_non_exhaustive()
    }
}

/// Coder writes Go's zero time for "never expires".
fn coder_zero_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0)
        .single()
        .expect("0001-01-01 is a valid UTC time")
}

pub(crate) fn expiry_to_db(expiry: Option<DateTime<Utc>>) -> DateTime<Utc> {
    expiry.unwrap_or_else(coder_zero_time)
}

/// Maps a sqlx error: connectivity problems are `Unavailable` (the proxy answers
/// 503), everything else `Other`. Never includes query parameters.
pub(crate) fn map_err(e: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match &e {
        E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) | E::WorkerCrashed => {
            StoreError::Unavailable(e.to_string())
        }
        E::Database(db) => {
            let code = db.code().unwrap_or_default();
            // Class 08: connection exception; 57P0x: shutdown/cannot connect now;
            // 53300: too many connections.
            if code.starts_with("08") || code.starts_with("57P") || code == "53300" {
                StoreError::Unavailable(e.to_string())
            } else {
                StoreError::Other(e.to_string())
            }
        }
        _ => StoreError::Other(e.to_string()),
    }
}

/// Builds a statement that runs `dml` (which must `RETURNING provider_id, user_id`)
/// and announces each changed row; its result has one row per change.
pub(crate) fn announced(dml: &str, channel_param: &str) -> String {
    let notify = NOTIFY_EXPR.replace("$NOTIFY_CHANNEL", channel_param);
    format!("WITH changed AS ({dml}) SELECT {notify} FROM changed")
}

/// `pool` with every connection committing synchronously, whatever the server's
/// default. A rotated refresh token exists only in the row we write: with
/// `synchronous_commit = off` (a common tuning) a commit is acknowledged before
/// its WAL is written, and a crash or an immediate restart moments later rolls
/// the row back to the spent token — the link is lost although every write
/// "succeeded". A session `SET` rather than a startup option, because poolers
/// such as PgBouncer refuse unknown startup parameters.
pub fn durable(pool: PgPoolOptions) -> PgPoolOptions {
    pool.after_connect(|conn, _meta| {
        Box::pin(async move {
            sqlx::Executor::execute(&mut *conn, "SET synchronous_commit = on").await?;
            Ok(())
        })
    })
}

impl PgStore {
    /// A store over a lazily connecting pool sized by `cfg`: the database need not
    /// be up yet (requests answer `store_unavailable` until it is). Fails only on a
    /// malformed URL.
    pub fn connect(cfg: &DatabaseConfig, keyring: Keyring) -> Result<Self, StoreError> {
        let opts: PgConnectOptions = cfg
            .url
            .expose_secret()
            .parse()
            // The parse error may quote the URL, which can hold a password.
            .map_err(|_| StoreError::Other("database.url is not a valid Postgres URL".into()))?;
        let pool = durable(PgPoolOptions::new())
            .max_connections(cfg.max_connections)
            .acquire_timeout(cfg.acquire_timeout)
            .connect_lazy_with(opts);
        Ok(Self::from_pool(pool, keyring).with_listen_check_interval(cfg.listen_check_interval))
    }

    /// [`connect`](Self::connect) with the keyring `[encryption]` describes.
    pub fn from_config(cfg: &Config) -> Result<Self, StoreError> {
        let keyring = Keyring::new(cfg.encryption_keys(), cfg.encryption_format());
        Self::connect(&cfg.database, keyring)
    }

    /// A store over an existing pool (tests get one from `#[sqlx::test]`).
    pub fn from_pool(pool: PgPool, keyring: Keyring) -> Self {
        Self {
            pool,
            keyring: Arc::new(keyring),
            key_registered: Arc::new(tokio::sync::OnceCell::new()),
            feed_check: DatabaseConfig::default().listen_check_interval,
        }
    }

    /// Sets how often the change feed pings itself to prove its connection
    /// still hears (`database.listen_check_interval`). Zero is taken as 1 ms.
    pub fn with_listen_check_interval(mut self, every: Duration) -> Self {
        self.feed_check = every.max(Duration::from_millis(1));
        self
    }

    /// Never registers a key in `dbcrypt_keys`: in Coder mode coderd owns that
    /// table, and the start-up check ([`super::coder::check_keys`]) has already
    /// made sure the first key is active there.
    pub fn with_keys_owned_by_coder(self) -> Self {
        Self {
            key_registered: Arc::new(tokio::sync::OnceCell::new_with(Some(()))),
            ..self
        }
    }

    /// The pool, for callers that need their own connection (e.g. tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The keyring values are encrypted with.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Applies every pending migration; a no-op when all are applied.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(inner) => map_err(inner),
            other => StoreError::Other(other.to_string()),
        })
    }

    /// In Coder format, makes sure the first key is registered in `dbcrypt_keys`
    /// before anything is written with it: Coder's foreign keys require it and
    /// Coder checks the `test` column to tell whether it holds the key. A key that
    /// Coder revoked must not encrypt again.
    pub async fn ensure_key_registered(&self) -> Result<(), StoreError> {
        if self.keyring.format() != EncryptionFormat::Coder {
            return Ok(());
        }
        let Some(id) = self.keyring.primary_key_id().map(str::to_owned) else {
            return Ok(());
        };
        self.key_registered
            .get_or_try_init(|| self.register_key(id))
            .await
            .map(|_| ())
    }

    async fn register_key(&self, id: String) -> Result<(), StoreError> {
        dbcrypt::register_key(self, id).await
    }

    /// Encrypts both token columns of a row.
    fn seal_pair(
        &self,
        provider_id: &str,
        user_id: Uuid,
        tokens: &TokenSet,
    ) -> Result<(Sealed, Sealed), StoreError> {
        codec::seal_pair(&self.keyring, provider_id, user_id, tokens)
    }
}

/// A link write's `RETURNING provider_id, user_id` query.
type LinkWrite<'q> =
    sqlx::query::QueryScalar<'q, sqlx::Postgres, String, sqlx::postgres::PgArguments>;

/// Binds `$1`–`$8` of a link write — the key, the sealed pair with their key
/// ids, expiry and extra — in the column order the upsert and the refresh CAS
/// share, so the two cannot drift apart.
pub(super) fn bind_link<'q>(
    sql: &'q str,
    provider_id: &'q str,
    user_id: Uuid,
    (access, refresh): &'q (Sealed, Sealed),
    tokens: &'q TokenSet,
) -> LinkWrite<'q> {
    sqlx::query_scalar::<_, String>(sql)
        .bind(provider_id)
        .bind(user_id)
        .bind(&access.value)
        .bind(&access.key_id)
        .bind(&refresh.value)
        .bind(&refresh.key_id)
        .bind(expiry_to_db(tokens.expiry))
        .bind(&tokens.extra)
}

#[async_trait::async_trait]
impl LinkStore for PgStore {
    fn login_store(&self) -> Option<&dyn super::login::LoginStore> {
        Some(self)
    }

    async fn get_link(&self, provider_id: &str, user_id: Uuid) -> Result<Option<Link>, StoreError> {
        self.fetch_row(provider_id, user_id)
            .await?
            .map(|r| codec::decode(&self.keyring, r))
            .transpose()
    }

    async fn put_link(
        &self,
        provider_id: &str,
        user_id: Uuid,
        tokens: &TokenSet,
    ) -> Result<(), StoreError> {
        self.ensure_key_registered().await?;
        let sealed = self.seal_pair(provider_id, user_id, tokens)?;
        let sql = announced(
            "INSERT INTO external_auth_links (provider_id, user_id, created_at, updated_at, \
               oauth_access_token, oauth_access_token_key_id, oauth_refresh_token, \
               oauth_refresh_token_key_id, oauth_expiry, oauth_extra, \
               oauth_refresh_failure_reason, refresh_lease_expires_at) \
             VALUES ($1, $2, now(), now(), $3, $4, $5, $6, $7, $8, '', NULL) \
             ON CONFLICT (provider_id, user_id) DO UPDATE SET \
               updated_at = now(), \
               oauth_access_token = EXCLUDED.oauth_access_token, \
               oauth_access_token_key_id = EXCLUDED.oauth_access_token_key_id, \
               oauth_refresh_token = EXCLUDED.oauth_refresh_token, \
               oauth_refresh_token_key_id = EXCLUDED.oauth_refresh_token_key_id, \
               oauth_expiry = EXCLUDED.oauth_expiry, oauth_extra = EXCLUDED.oauth_extra, \
               oauth_refresh_failure_reason = '', refresh_lease_expires_at = NULL \
             RETURNING provider_id, user_id",
            "$9",
        );
        bind_link(&sql, provider_id, user_id, &sealed, tokens)
            .bind(CHANGE_CHANNEL)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn delete_link(&self, provider_id: &str, user_id: Uuid) -> Result<bool, StoreError> {
        let sql = announced(
            "DELETE FROM external_auth_links WHERE provider_id = $1 AND user_id = $2 \
             RETURNING provider_id, user_id",
            "$3",
        );
        let rows: Vec<String> = sqlx::query_scalar(&sql)
            .bind(provider_id)
            .bind(user_id)
            .bind(CHANGE_CHANNEL)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(!rows.is_empty())
    }

    async fn list_links(&self, user_id: Option<Uuid>) -> Result<Vec<LinkSummary>, StoreError> {
        let rows = sqlx::query_as::<_, LinkRow>(&format!(
            "SELECT {LINK_COLUMNS} FROM external_auth_links \
             WHERE $1::uuid IS NULL OR user_id = $1 ORDER BY user_id, provider_id"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(rows
            .into_iter()
            .map(|r| codec::summarize(&self.keyring, r))
            .collect())
    }

    /// Counted in the database where the columns decide (a recorded failure; an
    /// expiry beyond [`super::EXPIRING_SOON`] or none); only the links whose state
    /// hangs on whether they hold a refresh token (which needs decrypting) are
    /// read, one row at a time. Listing every link each minute held the whole
    /// table in memory: +17 MiB RSS with 100,000 links.
    async fn count_link_states(&self, now: DateTime<Utc>) -> Result<LinkStates, StoreError> {
        use futures_util::TryStreamExt;
        let soon = now + chrono::Duration::from_std(super::EXPIRING_SOON).unwrap_or_default();
        let (reauth, ok): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE oauth_refresh_failure_reason <> ''),                     count(*) FILTER (WHERE oauth_refresh_failure_reason = ''                                      AND (oauth_expiry IS NULL OR oauth_expiry > $1))              FROM external_auth_links",
        )
        .bind(soon)
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        let mut states = LinkStates {
            ok: ok as u64,
            expiring_soon: 0,
            reauth_required: reauth as u64,
        };
        let sql = format!(
            "SELECT {LINK_COLUMNS} FROM external_auth_links \
             WHERE oauth_refresh_failure_reason = '' AND oauth_expiry <= $1"
        );
        let mut rows = sqlx::query_as::<_, LinkRow>(&sql)
            .bind(soon)
            .fetch(&self.pool);
        while let Some(row) = rows.try_next().await.map_err(map_err)? {
            match LinkState::of(&codec::summarize(&self.keyring, row), now) {
                LinkState::Ok => states.ok += 1,
                LinkState::ExpiringSoon => states.expiring_soon += 1,
                LinkState::ReauthRequired => states.reauth_required += 1,
            }
        }
        Ok(states)
    }

    async fn claim_refresh_lease(
        &self,
        provider_id: &str,
        user_id: Uuid,
        old_refresh: &StoredSecret,
        lease: Duration,
    ) -> Result<LeaseClaim, StoreError> {
        lease::claim(&self.pool, provider_id, user_id, old_refresh, lease).await
    }

    async fn release_refresh_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        lease::release(&self.pool, lease).await
    }

    async fn extend_refresh_lease(
        &self,
        lease: &Lease,
        by: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        lease::extend(&self.pool, lease, by).await
    }

    async fn write_refreshed(
        &self,
        provider_id: &str,
        user_id: Uuid,
        read: &Fence,
        new: &TokenSet,
    ) -> Result<bool, StoreError> {
        self.ensure_key_registered().await?;
        rotation::write_refreshed(self, provider_id, user_id, read, new).await
    }

    async fn record_refresh_failure(
        &self,
        provider_id: &str,
        user_id: Uuid,
        read: &Fence,
        lease: Option<&Lease>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        rotation::record_refresh_failure(self, provider_id, user_id, read, lease, reason).await
    }

    async fn create_proxy_token(
        &self,
        token: &NewProxyToken,
    ) -> Result<ProxyTokenInfo, StoreError> {
        tokens::create(&self.pool, token).await
    }

    async fn find_proxy_token(
        &self,
        hash: &[u8; 32],
    ) -> Result<Option<ProxyTokenInfo>, StoreError> {
        tokens::find(&self.pool, hash).await
    }

    async fn list_proxy_tokens(
        &self,
        user_id: Option<Uuid>,
    ) -> Result<Vec<ProxyTokenInfo>, StoreError> {
        tokens::list(&self.pool, user_id).await
    }

    async fn revoke_proxy_token(&self, id: Uuid) -> Result<bool, StoreError> {
        tokens::revoke(&self.pool, id).await
    }

    async fn check_coder_database(&self) -> Result<(), StoreError> {
        super::coder::check_lease_support(&self.pool).await?;
        super::coder::check_keys(&self.pool, &self.keyring).await
    }

    async fn find_coder_agent_owner(&self, auth_token: Uuid) -> Result<Option<Uuid>, StoreError> {
        super::coder::agent_owner(&self.pool, auth_token).await
    }

    async fn touch_proxy_token(&self, id: Uuid) -> Result<(), StoreError> {
        tokens::touch(&self.pool, id).await
    }

    async fn rotate_keys(&self) -> Result<RotateReport, StoreError> {
        self.ensure_key_registered().await?;
        rotation::rotate(self).await
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        PgStore::migrate(self).await
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let applied = sqlx::query_as("SELECT version, success FROM _sqlx_migrations")
            .fetch_all(&self.pool)
            .await
            .map_err(map_err);
        super::check_migrations(&MIGRATOR, applied)
    }

    async fn watch_changes(&self) -> Result<tokio::sync::mpsc::Receiver<ChangeEvent>, StoreError> {
        feed::watch(&self.pool, self.feed_check).await
    }
}
