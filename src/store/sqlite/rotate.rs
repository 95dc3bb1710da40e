//! `keys rotate` on SQLite: re-encrypt every link with the first key.
//!
//! Each row is rewritten by a compare-and-swap on all four token columns exactly
//! as read (`IS` is SQLite's null-safe equality), so a concurrent refresh or login
//! is never overwritten with older tokens; such rows count as `raced`. Failure
//! reason, expiry and lease are left as they are.

use secrecy::ExposeSecret;

use super::{map_err, LinkRow, SqliteStore, ACCESS, LINK_COLUMNS, REFRESH};
use crate::crypto::{Sealed, ValueContext};
use crate::store::{RotateReport, StoreError};

/// Rows read per page, to bound memory on large tables.
const PAGE: i64 = 500;

pub(super) async fn rotate(store: &SqliteStore) -> Result<RotateReport, StoreError> {
    let mut report = RotateReport::default();
    let mut after: Option<(String, String)> = None;
    loop {
        let rows: Vec<LinkRow> = sqlx::query_as(&format!(
            "SELECT {LINK_COLUMNS} FROM external_auth_links \
             WHERE ?1 IS NULL OR (provider_id, user_id) > (?1, ?2) \
             ORDER BY provider_id, user_id LIMIT ?3"
        ))
        .bind(after.as_ref().map(|a| a.0.as_str()))
        .bind(after.as_ref().map(|a| a.1.as_str()))
        .bind(PAGE)
        .fetch_all(store.pool())
        .await
        .map_err(map_err)?;
        let Some(last) = rows.last() else {
            return Ok(report);
        };
        after = Some((last.provider_id.clone(), last.user_id.to_string()));
        for row in &rows {
            match rotate_row(store, row).await? {
                Outcome::Unchanged => report.unchanged += 1,
                Outcome::Rotated => report.rotated += 1,
                Outcome::Raced => report.raced += 1,
            }
        }
    }
}

enum Outcome {
    Unchanged,
    Rotated,
    Raced,
}

/// The column as it should be stored now: `None` when it already is.
fn reseal(
    store: &SqliteStore,
    row: &LinkRow,
    column: &'static str,
) -> Result<Option<Sealed>, StoreError> {
    let plain = store.unseal(row, column)?;
    let key_id = match column {
        ACCESS => row.oauth_access_token_key_id.as_deref(),
        _ => row.oauth_refresh_token_key_id.as_deref(),
    };
    if store
        .keyring()
        .is_current(plain.expose_secret().is_empty(), key_id)
    {
        return Ok(None);
    }
    let ctx = ValueContext {
        provider_id: &row.provider_id,
        user_id: row.user_id,
        column,
    };
    store.seal(&plain, ctx).map(Some)
}

async fn rotate_row(store: &SqliteStore, row: &LinkRow) -> Result<Outcome, StoreError> {
    let access = reseal(store, row, ACCESS)?;
    let refresh = reseal(store, row, REFRESH)?;
    if access.is_none() && refresh.is_none() {
        return Ok(Outcome::Unchanged);
    }
    let keep = |v: &String, id: &Option<String>| Sealed {
        value: v.clone(),
        key_id: id.clone(),
    };
    let access =
        access.unwrap_or_else(|| keep(&row.oauth_access_token, &row.oauth_access_token_key_id));
    let refresh =
        refresh.unwrap_or_else(|| keep(&row.oauth_refresh_token, &row.oauth_refresh_token_key_id));
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
    Ok(if done.rows_affected() == 0 {
        Outcome::Raced
    } else {
        Outcome::Rotated
    })
}
