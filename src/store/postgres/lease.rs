//! The cross-replica refresh lease in `refresh_lease_expires_at`, on the
//! database clock only. The claimed timestamp is the holder's fencing token.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::{announced, map_err};
use crate::store::lease::{self as shared, Missed};
use crate::store::{Lease, LeaseClaim, StoreError, StoredSecret, CHANGE_CHANNEL};

/// Claims the lease; see [`LinkStore::claim_refresh_lease`](crate::store::LinkStore::claim_refresh_lease).
pub(super) async fn claim(
    pool: &PgPool,
    provider_id: &str,
    user_id: Uuid,
    old_refresh: &StoredSecret,
    lease: Duration,
) -> Result<LeaseClaim, StoreError> {
    let attempt = || async move {
        sqlx::query_scalar(
            "UPDATE external_auth_links \
             SET refresh_lease_expires_at = now() + make_interval(secs => $4) \
             WHERE provider_id = $1 AND user_id = $2 AND oauth_refresh_token = $3 \
               AND (refresh_lease_expires_at IS NULL OR refresh_lease_expires_at <= now()) \
             RETURNING refresh_lease_expires_at",
        )
        .bind(provider_id)
        .bind(user_id)
        .bind(&old_refresh.0)
        .bind(lease.as_secs_f64())
        .fetch_optional(pool)
        .await
        .map_err(map_err)
    };
    let reread = || lease_state(pool, provider_id, user_id);
    let time = |t: &DateTime<Utc>| Ok(*t);
    shared::claim(provider_id, user_id, old_refresh, attempt, reread, time).await
}

/// The row's refresh token as stored, its lease and the database clock: what
/// explains a claim that did not apply (here and in Coder mode).
pub(in crate::store) async fn lease_state(
    pool: &PgPool,
    provider_id: &str,
    user_id: Uuid,
) -> Result<Missed<DateTime<Utc>>, StoreError> {
    sqlx::query_as(
        "SELECT oauth_refresh_token, refresh_lease_expires_at, now() \
         FROM external_auth_links WHERE provider_id = $1 AND user_id = $2",
    )
    .bind(provider_id)
    .bind(user_id)
    .fetch_optional(pool)
    .await
    .map_err(map_err)
}

/// Releases `lease` if it is still the row's, announcing it. It is also coderd's
/// release (`SetExternalAuthLinkRefreshLease` to NULL, fenced by the old value),
/// so Coder mode uses it unchanged.
pub(in crate::store) async fn release(pool: &PgPool, lease: &Lease) -> Result<(), StoreError> {
    let sql = announced(
        "UPDATE external_auth_links SET refresh_lease_expires_at = NULL \
         WHERE provider_id = $1 AND user_id = $2 AND refresh_lease_expires_at = $3 \
         RETURNING provider_id, user_id",
        "$4",
    );
    sqlx::query_scalar::<_, String>(&sql)
        .bind(&lease.provider_id)
        .bind(lease.user_id)
        .bind(lease.expires_at)
        .bind(CHANGE_CHANNEL)
        .fetch_all(pool)
        .await
        .map_err(map_err)?;
    Ok(())
}

/// Moves `lease` to `by` from now if the row still holds exactly its value.
pub(super) async fn extend(
    pool: &PgPool,
    lease: &Lease,
    by: Duration,
) -> Result<Option<Lease>, StoreError> {
    // Not announced: like a claim, an extension changes nothing a reader serves.
    let until: Option<DateTime<Utc>> = sqlx::query_scalar(
        "UPDATE external_auth_links \
         SET refresh_lease_expires_at = now() + make_interval(secs => $4) \
         WHERE provider_id = $1 AND user_id = $2 AND refresh_lease_expires_at = $3 \
         RETURNING refresh_lease_expires_at",
    )
    .bind(&lease.provider_id)
    .bind(lease.user_id)
    .bind(lease.expires_at)
    .bind(by.as_secs_f64())
    .fetch_optional(pool)
    .await
    .map_err(map_err)?;
    Ok(until.map(|expires_at| Lease {
        expires_at,
        ..lease.clone()
    }))
}
