//! The store of Coder mode (`[coder]`): Coder's own database, shared with coderd.
//!
//! It reads and writes Coder's `external_auth_links` through [`PgStore`], and
//! changes what must follow coderd rather than tokenproxy's native rules:
//!
//! - the refresh lease is claimed, fenced and released as coderd does it, and
//!   permanent failures are recorded coderd's way (`store::coder_lease`);
//! - coderd's writes are seen by polling `updated_at` (`store::coder_poll`),
//!   or, with `coder.install_trigger`, by a NOTIFY trigger the operator allowed;
//! - tokenproxy's own tables live in schema `tokenproxy` (`migrations-coder/`):
//!   every connection's `search_path` is `tokenproxy, public`, so unqualified
//!   names find tokenproxy's tables there and Coder's in `public`, and
//!   `migrate` creates nothing in Coder's schema;
//! - `dbcrypt_keys` is only read: keys are coderd's to register.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use uuid::Uuid;

use super::coder_lease::{self, Fenced};
use super::coder_poll::{self, Watched};
use super::postgres::{map_err, PgStore};
use super::{
    rotation, ChangeEvent, Fence, Lease, LeaseClaim, Link, LinkStore, LinkSummary, NewProxyToken,
    ProxyTokenInfo, RotateReport, StoreError, StoredSecret, TokenSet,
};
use crate::config::DatabaseConfig;
use crate::crypto::Keyring;

/// tokenproxy's schema on a Coder database.
pub const SCHEMA: &str = "tokenproxy";
/// The schema Coder's tables are in.
pub const CODER_SCHEMA: &str = "public";

/// tokenproxy's migrations on a Coder database (`migrations-coder/*.sql`).
pub static CODER_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations-coder");

/// The NOTIFY trigger of `coder.install_trigger` (the one tokenproxy installs
/// on its own databases); its function lands in schema `tokenproxy`.
const TRIGGER_SQL: &str = include_str!("../../migrations/202612020001_link_change_trigger.sql");

/// How Coder mode watches for coderd's writes.
#[derive(Debug, Clone)]
pub struct CoderOptions {
    /// Install a NOTIFY trigger on Coder's `external_auth_links` (opt-in) instead of polling.
    pub install_trigger: bool,
    /// How often the `updated_at` of watched links is polled.
    pub poll_interval: Duration,
    /// A link not read for this long is no longer watched (and is announced, so
    /// caches forget it).
    pub watch_idle: Duration,
    /// Most links watched at once.
    pub watch_capacity: usize,
}

impl Default for CoderOptions {
    fn default() -> Self {
        Self {
            install_trigger: false,
            poll_interval: Duration::from_secs(1),
            watch_idle: Duration::from_secs(600),
            watch_capacity: 100_000,
        }
    }
}

/// [`LinkStore`] over a Coder database.
pub struct CoderStore {
    pg: PgStore,
    /// The lease value this process holds per link (claimed or extended).
    leases: Mutex<HashMap<(String, Uuid), DateTime<Utc>>>,
    watched: Arc<Watched>,
    opts: CoderOptions,
}

impl std::fmt::Debug for CoderStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoderStore").finish_non_exhaustive()
    }
}

/// `opts` with the `search_path` of Coder mode.
pub fn coder_connect_options(opts: PgConnectOptions) -> PgConnectOptions {
    opts.options([("search_path", format!("{SCHEMA},{CODER_SCHEMA}"))])
}

impl CoderStore {
    /// A store over a lazily connecting pool to `url`, sized by `cfg`.
    pub fn connect(
        url: &SecretString,
        cfg: &DatabaseConfig,
        keyring: Keyring,
        opts: CoderOptions,
    ) -> Result<Self, StoreError> {
        let conn: PgConnectOptions = url
            .expose_secret()
            .parse()
            // The parse error may quote the URL, which can hold a password.
            .map_err(|_| {
                StoreError::Other("coder.database_url is not a valid Postgres URL".into())
            })?;
        let pool = super::postgres::durable(PgPoolOptions::new())
            .max_connections(cfg.max_connections)
            .acquire_timeout(cfg.acquire_timeout)
            .connect_lazy_with(coder_connect_options(conn));
        let pg =
            PgStore::from_pool(pool, keyring).with_listen_check_interval(cfg.listen_check_interval);
        Ok(Self::from_pg(pg, opts))
    }

    /// A store over connections made with `conn` (tests pass their database's).
    pub fn from_connect_options(
        conn: PgConnectOptions,
        keyring: Keyring,
        opts: CoderOptions,
    ) -> Self {
        let pool = super::postgres::durable(PgPoolOptions::new())
            .max_connections(8)
            .connect_lazy_with(coder_connect_options(conn));
        Self::from_pg(PgStore::from_pool(pool, keyring), opts)
    }

    fn from_pg(pg: PgStore, opts: CoderOptions) -> Self {
        Self {
            pg: pg.with_keys_owned_by_coder(),
            leases: Mutex::new(HashMap::new()),
            watched: Arc::new(Watched::new(opts.watch_capacity, opts.watch_idle)),
            opts,
        }
    }

    /// The pool (its connections use Coder mode's `search_path`).
    pub fn pool(&self) -> &PgPool {
        self.pg.pool()
    }

    /// Links currently watched for coderd's writes.
    pub fn watched_links(&self) -> usize {
        self.watched.len()
    }

    /// One poll of the watched links' `updated_at`, as the feed runs it every
    /// `coder.poll_interval`; returns how many changed (for measuring its cost).
    pub async fn poll_changes_once(&self) -> Result<usize, StoreError> {
        coder_poll::poll_once(self.pool(), &self.watched)
            .await
            .map(|c| c.len())
    }

    fn held(&self, provider_id: &str, user_id: Uuid) -> Option<DateTime<Utc>> {
        self.leases
            .lock()
            .get(&(provider_id.to_owned(), user_id))
            .copied()
    }

    fn hold(&self, lease: &Lease) {
        self.leases
            .lock()
            .insert((lease.provider_id.clone(), lease.user_id), lease.expires_at);
    }

    /// Forgets our lease on a link if it is still `value` (`None`: whatever it is).
    fn forget(&self, provider_id: &str, user_id: Uuid, value: Option<DateTime<Utc>>) {
        let mut leases = self.leases.lock();
        let key = (provider_id.to_owned(), user_id);
        if value.is_none() || leases.get(&key).copied() == value {
            leases.remove(&key);
        }
    }

    fn fenced(&self, provider_id: &str, user_id: Uuid) -> Fenced<'_> {
        Fenced {
            pg: &self.pg,
            lease: self.held(provider_id, user_id),
        }
    }

    /// Remembers what a read saw, for the poller.
    fn saw(&self, provider_id: &str, user_id: Uuid, updated_at: Option<DateTime<Utc>>) {
        self.watched
            .saw((provider_id.to_owned(), user_id), updated_at);
    }
}

#[async_trait::async_trait]
impl LinkStore for CoderStore {
    async fn get_link(&self, provider_id: &str, user_id: Uuid) -> Result<Option<Link>, StoreError> {
        let link = self.pg.get_link(provider_id, user_id).await?;
        self.saw(provider_id, user_id, link.as_ref().map(|l| l.updated_at));
        Ok(link)
    }

    async fn put_link(
        &self,
        provider_id: &str,
        user_id: Uuid,
        tokens: &TokenSet,
    ) -> Result<(), StoreError> {
        self.pg.put_link(provider_id, user_id, tokens).await
    }

    async fn delete_link(&self, provider_id: &str, user_id: Uuid) -> Result<bool, StoreError> {
        self.pg.delete_link(provider_id, user_id).await
    }

    async fn list_links(&self, user_id: Option<Uuid>) -> Result<Vec<LinkSummary>, StoreError> {
        self.pg.list_links(user_id).await
    }

    async fn claim_refresh_lease(
        &self,
        provider_id: &str,
        user_id: Uuid,
        old_refresh: &StoredSecret,
        lease: Duration,
    ) -> Result<LeaseClaim, StoreError> {
        let claim =
            coder_lease::claim(self.pool(), provider_id, user_id, old_refresh, lease).await?;
        if let LeaseClaim::Acquired(held) = &claim {
            self.hold(held);
        }
        Ok(claim)
    }

    async fn release_refresh_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        self.forget(&lease.provider_id, lease.user_id, Some(lease.expires_at));
        coder_lease::release(self.pool(), lease).await
    }

    async fn extend_refresh_lease(
        &self,
        lease: &Lease,
        by: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        // coderd's SetExternalAuthLinkRefreshLease, fenced by the old value.
        let extended = self.pg.extend_refresh_lease(lease, by).await?;
        match &extended {
            Some(l) => self.hold(l),
            None => self.forget(&lease.provider_id, lease.user_id, Some(lease.expires_at)),
        }
        Ok(extended)
    }

    async fn write_refreshed(
        &self,
        provider_id: &str,
        user_id: Uuid,
        read: &Fence,
        new: &TokenSet,
    ) -> Result<bool, StoreError> {
        let fenced = self.fenced(provider_id, user_id);
        let applied = rotation::write_refreshed(&fenced, provider_id, user_id, read, new).await?;
        if applied {
            // The write released the lease.
            self.forget(provider_id, user_id, fenced.lease);
        }
        Ok(applied)
    }

    async fn record_refresh_failure(
        &self,
        provider_id: &str,
        user_id: Uuid,
        read: &Fence,
        lease: Option<&Lease>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let fenced = self.fenced(provider_id, user_id);
        let applied =
            rotation::record_refresh_failure(&fenced, provider_id, user_id, read, lease, reason)
                .await?;
        if applied {
            self.forget(provider_id, user_id, None);
        }
        Ok(applied)
    }

    async fn create_proxy_token(
        &self,
        token: &NewProxyToken,
    ) -> Result<ProxyTokenInfo, StoreError> {
        self.pg.create_proxy_token(token).await
    }

    async fn find_proxy_token(
        &self,
        hash: &[u8; 32],
    ) -> Result<Option<ProxyTokenInfo>, StoreError> {
        self.pg.find_proxy_token(hash).await
    }

    async fn list_proxy_tokens(
        &self,
        user_id: Option<Uuid>,
    ) -> Result<Vec<ProxyTokenInfo>, StoreError> {
        self.pg.list_proxy_tokens(user_id).await
    }

    async fn revoke_proxy_token(&self, id: Uuid) -> Result<bool, StoreError> {
        self.pg.revoke_proxy_token(id).await
    }

    async fn touch_proxy_token(&self, id: Uuid) -> Result<(), StoreError> {
        self.pg.touch_proxy_token(id).await
    }

    async fn check_coder_database(&self) -> Result<(), StoreError> {
        self.pg.check_coder_database().await
    }

    async fn find_coder_agent_owner(&self, auth_token: Uuid) -> Result<Option<Uuid>, StoreError> {
        self.pg.find_coder_agent_owner(auth_token).await
    }

    async fn rotate_keys(&self) -> Result<RotateReport, StoreError> {
        // Re-encryption is coderd's (`coder server dbcrypt rotate`): it owns the keys.
        Err(StoreError::Other(
            "in Coder mode keys are rotated by coderd (coder server dbcrypt rotate)".into(),
        ))
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
            .execute(self.pool())
            .await
            .map_err(map_err)?;
        CODER_MIGRATOR.run(self.pool()).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(inner) => map_err(inner),
            other => StoreError::Other(other.to_string()),
        })?;
        if self.opts.install_trigger {
            sqlx::raw_sql(TRIGGER_SQL)
                .execute(self.pool())
                .await
                .map_err(map_err)?;
        }
        Ok(())
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let applied = sqlx::query_as(&format!(
            "SELECT version, success FROM {SCHEMA}._sqlx_migrations"
        ))
        .fetch_all(self.pool())
        .await
        .map_err(map_err);
        super::check_migrations(&CODER_MIGRATOR, applied)
    }

    async fn watch_changes(&self) -> Result<tokio::sync::mpsc::Receiver<ChangeEvent>, StoreError> {
        // tokenproxy replicas still announce their own writes on the channel.
        let mut feed = self.pg.watch_changes().await?;
        if self.opts.install_trigger {
            return Ok(feed);
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let forward = tx.clone();
        tokio::spawn(async move {
            while let Some(e) = feed.recv().await {
                if forward.send(e).await.is_err() {
                    return;
                }
            }
        });
        coder_poll::spawn(
            self.pool().clone(),
            self.watched.clone(),
            self.opts.poll_interval,
            tx,
        );
        Ok(rx)
    }
}
