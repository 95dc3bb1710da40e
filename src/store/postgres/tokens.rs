//! Proxy-token statements. Only the SHA-256 of a token is ever stored or looked
//! up, so nothing here handles a secret.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use super::map_err;
use crate::store::{NewProxyToken, ProxyTokenInfo, StoreError};

const COLUMNS: &str =
    "id, user_id, name, providers, created_at, expires_at, last_used_at, revoked_at";

#[derive(FromRow)]
struct Row {
    id: Uuid,
    user_id: Uuid,
    name: String,
    providers: Vec<String>,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl From<Row> for ProxyTokenInfo {
    fn from(r: Row) -> Self {
        Self {
            id: r.id,
            user_id: r.user_id,
            name: r.name,
            providers: r.providers,
            created_at: r.created_at,
            expires_at: r.expires_at,
            last_used_at: r.last_used_at,
            revoked_at: r.revoked_at,
        }
    }
}

pub(super) async fn create(pool: &PgPool, t: &NewProxyToken) -> Result<ProxyTokenInfo, StoreError> {
    let row: Row = sqlx::query_as(&format!(
        "INSERT INTO proxy_tokens (id, user_id, name, hash, providers, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, now(), $6) RETURNING {COLUMNS}"
    ))
    .bind(Uuid::new_v4())
    .bind(t.user_id)
    .bind(&t.name)
    .bind(&t.hash[..])
    .bind(&t.providers)
    .bind(t.expires_at)
    .fetch_one(pool)
    .await
    .map_err(map_err)?;
    Ok(row.into())
}

pub(super) async fn find(
    pool: &PgPool,
    hash: &[u8; 32],
) -> Result<Option<ProxyTokenInfo>, StoreError> {
    let row: Option<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM proxy_tokens WHERE hash = $1"
    ))
    .bind(&hash[..])
    .fetch_optional(pool)
    .await
    .map_err(map_err)?;
    Ok(row.map(Into::into))
}

pub(super) async fn list(
    pool: &PgPool,
    user_id: Option<Uuid>,
) -> Result<Vec<ProxyTokenInfo>, StoreError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM proxy_tokens WHERE $1::uuid IS NULL OR user_id = $1 \
         ORDER BY created_at, id"
    ))
    .bind(user_id)
    .fetch_all(pool)
    .await
    .map_err(map_err)?;
    Ok(rows.into_iter().map(Into::into).collect())
}

pub(super) async fn revoke(pool: &PgPool, id: Uuid) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE proxy_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .execute(pool)
    .await
    .map_err(map_err)?;
    Ok(done.rows_affected() > 0)
}

pub(super) async fn touch(pool: &PgPool, id: Uuid) -> Result<(), StoreError> {
    sqlx::query("UPDATE proxy_tokens SET last_used_at = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .map_err(map_err)?;
    Ok(())
}
