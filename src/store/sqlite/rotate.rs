//! The SQL of `keys rotate` on SQLite; [`crate::store::rotation`] decides which
//! rows change.
//!
//! Each row is rewritten by a compare-and-swap on all four token columns exactly
//! as read (`IS` is SQLite's null-safe equality).

use uuid::Uuid;

use super::{map_err, LinkRow, SqliteLinkRow, SqliteStore, LINK_COLUMNS};
use crate::crypto::Sealed;
use crate::store::rotation::PAGE;
use crate::store::StoreError;

/// Up to [`PAGE`] rows after `after`, in `(provider_id, user_id)` order.
pub(super) async fn rows_after(
    store: &SqliteStore,
    after: Option<&(String, Uuid)>,
) -> Result<Vec<LinkRow>, StoreError> {
    let rows: Vec<SqliteLinkRow> = sqlx::query_as(&format!(
        "SELECT {LINK_COLUMNS} FROM external_auth_links \
         WHERE ?1 IS NULL OR (provider_id, user_id) > (?1, ?2) \
         ORDER BY provider_id, user_id LIMIT ?3"
    ))
    .bind(after.map(|a| a.0.as_str()))
    .bind(after.map(|a| a.1.to_string()))
    .bind(PAGE)
    .fetch_all(store.pool())
    .await
    .map_err(map_err)?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// Writes both token columns while all four are still as in `row`.
pub(super) async fn swap_tokens(
    store: &SqliteStore,
    row: &LinkRow,
    access: &Sealed,
    refresh: &Sealed,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE external_auth_links SET \
           oauth_access_token = ?3, oauth_access_token_key_id = ?4, \
           oauth_refresh_token = ?5, oauth_refresh_token_key_id = ?6 \
         WHERE provider_id = ?1 AND user_id = ?2 \
           AND oauth_access_token = ?7 AND oauth_access_token_key_id IS ?8 \
           AND oauth_refresh_token = ?9 AND oauth_refresh_token_key_id IS ?10",
    )
    .bind(&row.provider_id)
    .bind(row.user_id.to_string())
    .bind(&access.value)
    .bind(&access.key_id)
    .bind(&refresh.value)
    .bind(&refresh.key_id)
    .bind(&row.oauth_access_token)
    .bind(&row.oauth_access_token_key_id)
    .bind(&row.oauth_refresh_token)
    .bind(&row.oauth_refresh_token_key_id)
    .execute(store.pool())
    .await
    .map_err(map_err)?;
    Ok(done.rows_affected() > 0)
}
