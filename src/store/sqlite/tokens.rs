//! Proxy-token statements on SQLite. Only the SHA-256 of a token is ever stored
//! or looked up, so nothing here handles a secret. `providers` is a JSON array.

use sqlx::sqlite::SqliteRow;
use sqlx::{FromRow, Row, SqlitePool};
use uuid::Uuid;

use super::{map_err, opt_time_col, time_col, ts_to_db, uuid_col, NOW};
use crate::store::{NewProxyToken, ProxyTokenInfo, StoreError};

const COLUMNS: &str =
    "id, user_id, name, providers, created_at, expires_at, last_used_at, revoked_at";

struct Info(ProxyTokenInfo);

impl<'r> FromRow<'r, SqliteRow> for Info {
    fn from_row(row: &'r SqliteRow) -> Result<Self, sqlx::Error> {
        let providers: String = row.try_get("providers")?;
        let providers =
            serde_json::from_str(&providers).map_err(|e| sqlx::Error::ColumnDecode {
                index: "providers".into(),
                source: Box::new(e),
            })?;
        Ok(Self(ProxyTokenInfo {
            id: uuid_col(row, "id")?,
            user_id: uuid_col(row, "user_id")?,
            name: row.try_get("name")?,
            providers,
            created_at: time_col(row, "created_at")?,
            expires_at: opt_time_col(row, "expires_at")?,
            last_used_at: opt_time_col(row, "last_used_at")?,
            revoked_at: opt_time_col(row, "revoked_at")?,
        }))
    }
}

pub(super) async fn create(
    pool: &SqlitePool,
    t: &NewProxyToken,
) -> Result<ProxyTokenInfo, StoreError> {
    let providers = serde_json::to_string(&t.providers)
        .map_err(|e| StoreError::Other(format!("cannot encode providers: {e}")))?;
    let row: Info = sqlx::query_as(&format!(
        "INSERT INTO proxy_tokens (id, user_id, name, hash, providers, created_at, expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, {NOW}, ?6) RETURNING {COLUMNS}"
    ))
    .bind(Uuid::new_v4().to_string())
    .bind(t.user_id.to_string())
    .bind(&t.name)
    .bind(&t.hash[..])
    .bind(providers)
    .bind(t.expires_at.map(ts_to_db))
    .fetch_one(pool)
    .await
    .map_err(map_err)?;
    Ok(row.0)
}

pub(super) async fn find(
    pool: &SqlitePool,
    hash: &[u8; 32],
) -> Result<Option<ProxyTokenInfo>, StoreError> {
    let row: Option<Info> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM proxy_tokens WHERE hash = ?1"
    ))
    .bind(&hash[..])
    .fetch_optional(pool)
    .await
    .map_err(map_err)?;
    Ok(row.map(|r| r.0))
}

pub(super) async fn list(
    pool: &SqlitePool,
    user_id: Option<Uuid>,
) -> Result<Vec<ProxyTokenInfo>, StoreError> {
    let rows: Vec<Info> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM proxy_tokens WHERE ?1 IS NULL OR user_id = ?1 \
         ORDER BY created_at, id"
    ))
    .bind(user_id.map(|u| u.to_string()))
    .fetch_all(pool)
    .await
    .map_err(map_err)?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

pub(super) async fn revoke(pool: &SqlitePool, id: Uuid) -> Result<bool, StoreError> {
    let done = sqlx::query(&format!(
        "UPDATE proxy_tokens SET revoked_at = {NOW} WHERE id = ?1 AND revoked_at IS NULL"
    ))
    .bind(id.to_string())
    .execute(pool)
    .await
    .map_err(map_err)?;
    Ok(done.rows_affected() > 0)
}

pub(super) async fn touch(pool: &SqlitePool, id: Uuid) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "UPDATE proxy_tokens SET last_used_at = {NOW} WHERE id = ?1"
    ))
    .bind(id.to_string())
    .execute(pool)
    .await
    .map_err(map_err)?;
    Ok(())
}
