//! The SQLite backend of [`LinkStore`]: one file, no server.
//!
//! It exists so that tokenproxy runs on a laptop, or as a self-contained
//! sidecar, without Postgres. The tables and column names are Postgres's (see
//! `migrations-sqlite/`), with types adapted: uuids and timestamps are text.
//! Every timestamp has one shape, `YYYY-MM-DDTHH:MM:SS.ffffffZ`, so text
//! comparison is time comparison, and `NOW` (SQLite's own clock) writes it too:
//! leases use that clock only, as the Postgres backend uses `now()`.
//!
//! Every conditional write — compare-and-swap, lease claim, fenced release — is a
//! single `UPDATE ... WHERE` statement. SQLite runs each statement under its one
//! writer lock, so these stay atomic across processes sharing the file (WAL mode;
//! a writer waits up to `busy_timeout` for another). There is no NOTIFY: triggers
//! append every change to `link_changes`, which each process's change feed polls.

mod feed;
mod lease;
mod login;
mod refresh;
mod rotate;
mod tokens;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::ExposeSecret;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{FromRow, Row};
use uuid::Uuid;

use super::codec::{self, LinkRow, LINK_COLUMNS};
use super::rotation::{self, RowSql};
use super::{
    ChangeEvent, Fence, Lease, LeaseClaim, Link, LinkStore, LinkSummary, NewProxyToken,
    ProxyTokenInfo, RotateReport, StoreError, StoredSecret, TokenSet,
};
use crate::config::{Config, DatabaseConfig};
use crate::crypto::{Keyring, Sealed};

/// The embedded migrations (`migrations-sqlite/*.sql`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations-sqlite");

/// The database clock in the stored timestamp shape. SQLite keeps `'now'` fixed
/// within one statement, so a statement that both compares and writes it sees
/// one instant. Its resolution is a millisecond; the last three digits are zero.
pub(crate) const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')";

/// Go's zero time, kept for "never expires" as in Coder's rows.
const ZERO_TIME: &str = "0001-01-01T00:00:00.000000Z";

/// A writer waits at least this long for another process's write to finish.
const MIN_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Formats a time in the one stored shape (microseconds, UTC, `Z`).
pub(crate) fn ts_to_db(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses a stored timestamp.
fn ts_from_db(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn decode_err(column: &str, what: &str) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: format!("not a valid {what}").into(),
    }
}

/// Reads a timestamp column.
pub(crate) fn time_col(row: &SqliteRow, column: &str) -> Result<DateTime<Utc>, sqlx::Error> {
    let s: String = row.try_get(column)?;
    ts_from_db(&s).ok_or_else(|| decode_err(column, "timestamp"))
}

/// Reads a nullable timestamp column.
pub(crate) fn opt_time_col(
    row: &SqliteRow,
    column: &str,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let s: Option<String> = row.try_get(column)?;
    s.map(|s| ts_from_db(&s).ok_or_else(|| decode_err(column, "timestamp")))
        .transpose()
}

/// Reads a uuid column (text).
pub(crate) fn uuid_col(row: &SqliteRow, column: &str) -> Result<Uuid, sqlx::Error> {
    let s: String = row.try_get(column)?;
    Uuid::parse_str(&s).map_err(|_| decode_err(column, "uuid"))
}

fn expiry_to_db(expiry: Option<DateTime<Utc>>) -> String {
    expiry.map_or_else(|| ZERO_TIME.to_owned(), ts_to_db)
}

/// Maps a sqlx error: a busy or unreachable file is `Unavailable` (the proxy
/// answers 503), everything else `Other`. Never includes query parameters.
pub(crate) fn map_err(e: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match &e {
        E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::WorkerCrashed => {
            StoreError::Unavailable(e.to_string())
        }
        E::Database(db) => {
            // Primary result codes: 5 BUSY, 6 LOCKED, 10 IOERR, 13 FULL, 14 CANTOPEN.
            let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0) & 0xff;
            if matches!(code, 5 | 6 | 10 | 13 | 14) {
                StoreError::Unavailable(e.to_string())
            } else {
                StoreError::Other(e.to_string())
            }
        }
        _ => StoreError::Other(e.to_string()),
    }
}

/// A [`LinkRow`] read from SQLite's text columns.
struct SqliteLinkRow(LinkRow);

impl<'r> FromRow<'r, SqliteRow> for SqliteLinkRow {
    fn from_row(row: &'r SqliteRow) -> Result<Self, sqlx::Error> {
        let extra: Option<String> = row.try_get("oauth_extra")?;
        let oauth_extra = extra
            .map(|s| serde_json::from_str(&s).map_err(|_| decode_err("oauth_extra", "JSON")))
            .transpose()?;
        Ok(Self(LinkRow {
            provider_id: row.try_get("provider_id")?,
            user_id: uuid_col(row, "user_id")?,
            created_at: time_col(row, "created_at")?,
            updated_at: time_col(row, "updated_at")?,
            oauth_access_token: row.try_get("oauth_access_token")?,
            oauth_access_token_key_id: row.try_get("oauth_access_token_key_id")?,
            oauth_refresh_token: row.try_get("oauth_refresh_token")?,
            oauth_refresh_token_key_id: row.try_get("oauth_refresh_token_key_id")?,
            oauth_expiry: time_col(row, "oauth_expiry")?,
            oauth_extra,
            oauth_refresh_failure_reason: row.try_get("oauth_refresh_failure_reason")?,
            refresh_lease_expires_at: opt_time_col(row, "refresh_lease_expires_at")?,
        }))
    }
}

/// SQLite-backed [`LinkStore`].
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    keyring: Arc<Keyring>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("keyring", &self.keyring)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// A store over a lazily connecting pool on the file `cfg.url` names
    /// (`sqlite://PATH`). The file and its parent directory are created when
    /// missing; the file opens in WAL mode with foreign keys on. Fails on a
    /// malformed URL or a directory that cannot be created.
    pub fn connect(cfg: &DatabaseConfig, keyring: Keyring) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str(cfg.url.expose_secret())
            .map_err(|_| StoreError::Other("database.url is not a valid SQLite URL".into()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL, not WAL's usual NORMAL: NORMAL may lose the last commits on
            // power loss, and a lost commit can be a refresh token the provider
            // has already rotated, i.e. a broken link. Writes are rare; fsync them.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(cfg.acquire_timeout.max(MIN_BUSY_TIMEOUT));
        create_parent_dir(opts.get_filename())?;
        let pool = SqlitePoolOptions::new()
            .max_connections(cfg.max_connections.max(1))
            .acquire_timeout(cfg.acquire_timeout)
            .connect_lazy_with(opts);
        Ok(Self::from_pool(pool, keyring))
    }

    /// [`connect`](Self::connect) with the keyring `[encryption]` describes.
    pub fn from_config(cfg: &Config) -> Result<Self, StoreError> {
        let keyring = Keyring::new(cfg.encryption_keys(), cfg.encryption.format);
        Self::connect(&cfg.database, keyring)
    }

    /// A store over an existing pool.
    pub fn from_pool(pool: SqlitePool, keyring: Keyring) -> Self {
        Self {
            pool,
            keyring: Arc::new(keyring),
        }
    }

    /// The pool, for callers that need their own connection (e.g. tests).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The keyring values are encrypted with.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Applies every pending migration; a no-op when all are applied.
    ///
    /// sqlx takes no lock for SQLite, so two processes starting together may both
    /// try to apply a migration; the loser fails on the bookkeeping row after the
    /// winner committed, and simply runs again to find everything applied.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        // sqlx takes no migration lock on SQLite: processes starting together race,
        // and the loser of each step fails on `_sqlx_migrations`' unique version.
        // Every retry re-reads what is applied, so each one makes progress; the
        // backoff lets the winner commit its step first.
        const MIGRATE_ATTEMPTS: u32 = 10;
        let mut last = None;
        for attempt in 0..MIGRATE_ATTEMPTS {
            match MIGRATOR.run(&self.pool).await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(
                20 * u64::from(attempt + 1),
            ))
            .await;
        }
        Err(match last {
            Some(sqlx::migrate::MigrateError::Execute(inner)) => map_err(inner),
            Some(other) => StoreError::Other(other.to_string()),
            None => StoreError::Other("migrations did not run".into()),
        })
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

/// Creates the directory a database file lives in, so that the first run of a
/// quick start needs no preparation.
fn create_parent_dir(file: &Path) -> Result<(), StoreError> {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => std::fs::create_dir_all(dir)
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot create database directory {}: {e}",
                    dir.display()
                ))
            }),
        _ => Ok(()),
    }
}

#[async_trait::async_trait]
impl LinkStore for SqliteStore {
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
        let (access, refresh) = self.seal_pair(provider_id, user_id, tokens)?;
        let extra = tokens.extra.as_ref().map(|v| v.to_string());
        sqlx::query(&format!(
            "INSERT INTO external_auth_links (provider_id, user_id, created_at, updated_at, \
               oauth_access_token, oauth_access_token_key_id, oauth_refresh_token, \
               oauth_refresh_token_key_id, oauth_expiry, oauth_extra, \
               oauth_refresh_failure_reason, refresh_lease_expires_at) \
             VALUES (?1, ?2, {NOW}, {NOW}, ?3, ?4, ?5, ?6, ?7, ?8, '', NULL) \
             ON CONFLICT (provider_id, user_id) DO UPDATE SET \
               updated_at = {NOW}, \
               oauth_access_token = excluded.oauth_access_token, \
               oauth_access_token_key_id = excluded.oauth_access_token_key_id, \
               oauth_refresh_token = excluded.oauth_refresh_token, \
               oauth_refresh_token_key_id = excluded.oauth_refresh_token_key_id, \
               oauth_expiry = excluded.oauth_expiry, oauth_extra = excluded.oauth_extra, \
               oauth_refresh_failure_reason = '', refresh_lease_expires_at = NULL"
        ))
        .bind(provider_id)
        .bind(user_id.to_string())
        .bind(&access.value)
        .bind(&access.key_id)
        .bind(&refresh.value)
        .bind(&refresh.key_id)
        .bind(expiry_to_db(tokens.expiry))
        .bind(extra)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn delete_link(&self, provider_id: &str, user_id: Uuid) -> Result<bool, StoreError> {
        let done =
            sqlx::query("DELETE FROM external_auth_links WHERE provider_id = ?1 AND user_id = ?2")
                .bind(provider_id)
                .bind(user_id.to_string())
                .execute(&self.pool)
                .await
                .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn list_links(&self, user_id: Option<Uuid>) -> Result<Vec<LinkSummary>, StoreError> {
        let rows = sqlx::query_as::<_, SqliteLinkRow>(&format!(
            "SELECT {LINK_COLUMNS} FROM external_auth_links \
             WHERE ?1 IS NULL OR user_id = ?1 ORDER BY user_id, provider_id"
        ))
        .bind(user_id.map(|u| u.to_string()))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(rows
            .into_iter()
            .map(|r| codec::summarize(&self.keyring, r.0))
            .collect())
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

    async fn touch_proxy_token(&self, id: Uuid) -> Result<(), StoreError> {
        tokens::touch(&self.pool, id).await
    }

    async fn rotate_keys(&self) -> Result<RotateReport, StoreError> {
        rotation::rotate(self).await
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        SqliteStore::migrate(self).await
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let applied = sqlx::query_as("SELECT version, success FROM _sqlx_migrations")
            .fetch_all(&self.pool)
            .await
            .map_err(map_err);
        super::check_migrations(&MIGRATOR, applied)
    }

    async fn watch_changes(&self) -> Result<tokio::sync::mpsc::Receiver<ChangeEvent>, StoreError> {
        feed::watch(&self.pool).await
    }
}
