//! The two [`Backend`]s: Postgres over a `#[sqlx::test]` pool, SQLite over a
//! file in a temporary directory.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use sqlx::{PgPool, SqlitePool};
use tokenproxy::config::DatabaseConfig;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::sqlite::SqliteStore;
use tokenproxy::store::LinkStore;
use uuid::Uuid;

use super::{Backend, RawTokens};

type RawRow = (String, Option<String>, String, Option<String>);

/// Postgres: every store shares the test's pool (its own database).
pub struct Pg(pub PgPool);

#[async_trait::async_trait]
impl Backend for Pg {
    async fn store(&self, keyring: Keyring) -> Arc<dyn LinkStore> {
        Arc::new(PgStore::from_pool(self.0.clone(), keyring))
    }

    async fn raw_tokens(&self, provider_id: &str, user_id: Uuid) -> RawTokens {
        let r: RawRow = sqlx::query_as(
            "SELECT oauth_access_token, oauth_access_token_key_id, oauth_refresh_token, \
             oauth_refresh_token_key_id FROM external_auth_links \
             WHERE provider_id = $1 AND user_id = $2",
        )
        .bind(provider_id)
        .bind(user_id)
        .fetch_one(&self.0)
        .await
        .unwrap();
        raw(r)
    }

    async fn expire_lease(&self, provider_id: &str, user_id: Uuid) {
        sqlx::query(
            "UPDATE external_auth_links SET refresh_lease_expires_at = now() - interval '1s' \
             WHERE provider_id = $1 AND user_id = $2",
        )
        .bind(provider_id)
        .bind(user_id)
        .execute(&self.0)
        .await
        .unwrap();
    }

    async fn insert_plain(&self, provider_id: &str, user_id: Uuid, access: &str, refresh: &str) {
        sqlx::query(
            "INSERT INTO external_auth_links (provider_id, user_id, created_at, updated_at, \
             oauth_access_token, oauth_refresh_token, oauth_expiry) \
             VALUES ($1, $2, now(), now(), $3, $4, '0001-01-01 00:00:00+00')",
        )
        .bind(provider_id)
        .bind(user_id)
        .bind(access)
        .bind(refresh)
        .execute(&self.0)
        .await
        .unwrap();
    }
}

/// SQLite: one file in a temporary directory; every store opens its own pool
/// on it, as separate processes would.
pub struct Sqlite {
    dir: tempfile::TempDir,
    raw: SqlitePool,
}

impl Sqlite {
    /// A fresh, empty database file (not migrated), in a directory that does not
    /// exist yet: opening a store must create it.
    pub async fn fresh() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::connect(&Self::config_in(dir.path()), Keyring::plaintext())
            .expect("open the SQLite file");
        let raw = store.pool().clone();
        Self { dir, raw }
    }

    /// A fresh database with every migration applied.
    pub async fn migrated() -> Self {
        let b = Self::fresh().await;
        b.store(Keyring::plaintext()).await.migrate().await.unwrap();
        b
    }

    /// The database config of the file in `dir`.
    pub fn config_in(dir: &std::path::Path) -> DatabaseConfig {
        let path = dir.join("data").join("tokenproxy.db");
        DatabaseConfig {
            url: SecretString::from(format!("sqlite://{}", path.display())),
            migrate_on_start: false,
            max_connections: 4,
            acquire_timeout: Duration::from_secs(10),
            ..Default::default()
        }
    }

    /// The database config of this backend's file.
    pub fn config(&self) -> DatabaseConfig {
        Self::config_in(self.dir.path())
    }

    /// A raw pool on the file.
    pub fn pool(&self) -> &SqlitePool {
        &self.raw
    }
}

#[async_trait::async_trait]
impl Backend for Sqlite {
    async fn store(&self, keyring: Keyring) -> Arc<dyn LinkStore> {
        Arc::new(SqliteStore::connect(&self.config(), keyring).unwrap())
    }

    async fn raw_tokens(&self, provider_id: &str, user_id: Uuid) -> RawTokens {
        let r: RawRow = sqlx::query_as(
            "SELECT oauth_access_token, oauth_access_token_key_id, oauth_refresh_token, \
             oauth_refresh_token_key_id FROM external_auth_links \
             WHERE provider_id = ?1 AND user_id = ?2",
        )
        .bind(provider_id)
        .bind(user_id.to_string())
        .fetch_one(&self.raw)
        .await
        .unwrap();
        raw(r)
    }

    async fn expire_lease(&self, provider_id: &str, user_id: Uuid) {
        sqlx::query(
            "UPDATE external_auth_links SET refresh_lease_expires_at = \
             strftime('%Y-%m-%dT%H:%M:%f000Z', 'now', '-1 seconds') \
             WHERE provider_id = ?1 AND user_id = ?2",
        )
        .bind(provider_id)
        .bind(user_id.to_string())
        .execute(&self.raw)
        .await
        .unwrap();
    }

    async fn insert_plain(&self, provider_id: &str, user_id: Uuid, access: &str, refresh: &str) {
        sqlx::query(
            "INSERT INTO external_auth_links (provider_id, user_id, created_at, updated_at, \
             oauth_access_token, oauth_refresh_token, oauth_expiry) \
             VALUES (?1, ?2, '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z', \
             ?3, ?4, '0001-01-01T00:00:00.000000Z')",
        )
        .bind(provider_id)
        .bind(user_id.to_string())
        .bind(access)
        .bind(refresh)
        .execute(&self.raw)
        .await
        .unwrap();
    }
}

fn raw((access, access_key_id, refresh, refresh_key_id): RawRow) -> RawTokens {
    RawTokens {
        access,
        access_key_id,
        refresh,
        refresh_key_id,
    }
}
