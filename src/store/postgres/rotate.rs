//! The SQL of `keys rotate` on Postgres; [`crate::store::rotation`] decides
//! which rows change.
//!
//! Each row is rewritten by a compare-and-swap on all four token columns exactly
//! as read. A refresh that lands after the rewrite still applies:
//! `write_refreshed` recognises a re-encrypted copy of the token it exchanged.

use uuid::Uuid;

use super::{announced, map_err, LinkRow, PgStore, LINK_COLUMNS};
use crate::crypto::Sealed;
use crate::store::rotation::PAGE;
use crate::store::{StoreError, CHANGE_CHANNEL};

/// Up to [`PAGE`] rows after `after`, in `(provider_id, user_id)` order.
pub(super) async fn rows_after(
    store: &PgStore,
    after: Option<&(String, Uuid)>,
) -> Result<Vec<LinkRow>, StoreError> {
    sqlx::query_as(&format!(
        "SELECT {LINK_COLUMNS} FROM external_auth_links \
         WHERE $1::text IS NULL OR (provider_id, user_id) > ($1, $2) \
         ORDER BY provider_id, user_id LIMIT $3"
    ))
    .bind(after.map(|a| a.0.as_str()))
    .bind(after.map(|a| a.1))
    .bind(PAGE)
    .fetch_all(store.pool())
    .await
    .map_err(map_err)
}

/// Writes both token columns while all four are still as in `row`; announces.
pub(super) async fn swap_tokens(
    store: &PgStore,
    row: &LinkRow,
    access: &Sealed,
    refresh: &Sealed,
) -> Result<bool, StoreError> {
    let sql = announced(
        "UPDATE external_auth_links SET \
           oauth_access_token = $3, oauth_access_token_key_id = $4, \
           oauth_refresh_token = $5, oauth_refresh_token_key_id = $6 \
         WHERE provider_id = $1 AND user_id = $2 \
           AND oauth_access_token = $7 \
           AND oauth_access_token_key_id IS NOT DISTINCT FROM $8 \
           AND oauth_refresh_token = $9 \
           AND oauth_refresh_token_key_id IS NOT DISTINCT FROM $10 \
         RETURNING provider_id, user_id",
        "$11",
    );
    let applied: Vec<String> = sqlx::query_scalar(&sql)
        .bind(&row.provider_id)
        .bind(row.user_id)
        .bind(&access.value)
        .bind(&access.key_id)
        .bind(&refresh.value)
        .bind(&refresh.key_id)
        .bind(&row.oauth_access_token)
        .bind(&row.oauth_access_token_key_id)
        .bind(&row.oauth_refresh_token)
        .bind(&row.oauth_refresh_token_key_id)
        .bind(CHANGE_CHANNEL)
        .fetch_all(store.pool())
        .await
        .map_err(map_err)?;
    Ok(!applied.is_empty())
}
