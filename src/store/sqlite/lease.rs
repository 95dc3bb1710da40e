//! The cross-process refresh lease on SQLite.
//!
//! The claim is one conditional `UPDATE`: SQLite holds its single writer lock for
//! the whole statement, so of two processes claiming at once exactly one sees the
//! row unleased and writes its expiry; the other's statement then finds the lease
//! held. Both the comparison and the new expiry use SQLite's clock ([`NOW`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::SqlitePool;
use uuid::Uuid;

use super::{map_err, ts_from_db, ts_to_db, NOW};
use crate::store::lease as shared;
use crate::store::{Lease, LeaseClaim, StoreError, StoredSecret};

/// Claims the lease; see [`LinkStore::claim_refresh_lease`](crate::store::LinkStore::claim_refresh_lease).
pub(super) async fn claim(
    pool: &SqlitePool,
    provider_id: &str,
    user_id: Uuid,
    old_refresh: &StoredSecret,
    lease: Duration,
) -> Result<LeaseClaim, StoreError> {
    // A strftime modifier; a lease shorter than SQLite's millisecond clock
    // resolution would not fence, so round up to at least one.
    let plus = &format!("+{:.3} seconds", lease.as_secs_f64().max(0.001));
    let user = &user_id.to_string();
    let attempt = || async move {
        sqlx::query_scalar(&format!(
            "UPDATE external_auth_links \
             SET refresh_lease_expires_at = strftime('%Y-%m-%dT%H:%M:%f000Z', 'now', ?4) \
             WHERE provider_id = ?1 AND user_id = ?2 AND oauth_refresh_token = ?3 \
               AND (refresh_lease_expires_at IS NULL OR refresh_lease_expires_at <= {NOW}) \
             RETURNING refresh_lease_expires_at"
        ))
        .bind(provider_id)
        .bind(user)
        .bind(&old_refresh.0)
        .bind(plus)
        .fetch_optional(pool)
        .await
        .map_err(map_err)
    };
    let reread = || async move {
        sqlx::query_as(&format!(
            "SELECT oauth_refresh_token, refresh_lease_expires_at, {NOW} \
             FROM external_auth_links WHERE provider_id = ?1 AND user_id = ?2"
        ))
        .bind(provider_id)
        .bind(user)
        .fetch_optional(pool)
        .await
        .map_err(map_err)
    };
    let time = |t: &String| parse(t);
    shared::claim(provider_id, user_id, old_refresh, attempt, reread, time).await
}

/// Releases `lease` if it is still the row's.
pub(super) async fn release(pool: &SqlitePool, lease: &Lease) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE external_auth_links SET refresh_lease_expires_at = NULL \
         WHERE provider_id = ?1 AND user_id = ?2 AND refresh_lease_expires_at = ?3",
    )
    .bind(&lease.provider_id)
    .bind(lease.user_id.to_string())
    .bind(ts_to_db(lease.expires_at))
    .execute(pool)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// Moves `lease` to `by` from now if the row still holds exactly its value.
pub(super) async fn extend(
    pool: &SqlitePool,
    lease: &Lease,
    by: Duration,
) -> Result<Option<Lease>, StoreError> {
    let plus = format!("+{:.3} seconds", by.as_secs_f64().max(0.001));
    let until: Option<String> = sqlx::query_scalar(
        "UPDATE external_auth_links \
         SET refresh_lease_expires_at = strftime('%Y-%m-%dT%H:%M:%f000Z', 'now', ?4) \
         WHERE provider_id = ?1 AND user_id = ?2 AND refresh_lease_expires_at = ?3 \
         RETURNING refresh_lease_expires_at",
    )
    .bind(&lease.provider_id)
    .bind(lease.user_id.to_string())
    .bind(ts_to_db(lease.expires_at))
    .bind(plus)
    .fetch_optional(pool)
    .await
    .map_err(map_err)?;
    until
        .map(|t| {
            Ok(Lease {
                expires_at: parse(&t)?,
                ..lease.clone()
            })
        })
        .transpose()
}

fn parse(s: &str) -> Result<DateTime<Utc>, StoreError> {
    ts_from_db(s).ok_or_else(|| StoreError::Other("malformed lease timestamp".into()))
}
