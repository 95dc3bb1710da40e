//! The refresh lease shared with coderd, statement for statement.
//!
//! Modelled on coder/coder (`coderd/database/queries/externalauth.sql` and the
//! migration that adds `refresh_lease_expires_at`):
//!
//! - a claim is Coder's own function `acquire_external_auth_link_refresh_lease`
//!   (so both sides run the same `UPDATE … WHERE lease IS NULL OR lease < NOW()`);
//!   it raises `check_violation` on constraint `external_auth_link_active_lease`
//!   while another holder has the row, and returns no row once the link is gone;
//! - every write of the holder is fenced by the lease value it claimed
//!   (`AND refresh_lease_expires_at = $lease`, coderd's `UpdateExternalAuthLink`),
//!   and so is the release (`SetExternalAuthLinkRefreshLease` to NULL);
//! - a permanent failure is recorded coderd's way: `oauth_refresh_token = ''`
//!   (with encryption on, the ciphertext of `''` and its key id) and the reason,
//!   cut to 400 bytes, in `oauth_refresh_failure_reason`.
//!
//! tokenproxy's own compare-and-swap on the token columns stays on top of the
//! lease fence, so a write can only ever replace the tokens it exchanged.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::codec::{self, LinkRow};
use super::postgres::{announced, expiry_to_db, map_err, PgStore};
use super::rotation::RowSql;
use super::{
    Fence, Lease, LeaseClaim, StoreError, StoredSecret, TokenSet, CHANGE_CHANNEL, CLAIM_ATTEMPTS,
};

use crate::crypto::{Keyring, Sealed};

/// coderd's `failureReasonLimit`: the longest reason it stores.
pub const FAILURE_REASON_LIMIT: usize = 400;

/// The constraint name coderd's lease function raises `check_violation` with.
const ACTIVE_LEASE: &str = "external_auth_link_active_lease";

/// Whether `e` is the lease function saying another holder has the row.
fn is_active_lease(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("23514") && db.constraint() == Some(ACTIVE_LEASE))
}

/// `reason` cut to coderd's limit (at a character boundary, where Go cuts bytes).
pub fn truncate_reason(reason: &str) -> &str {
    let mut end = reason.len().min(FAILURE_REASON_LIMIT);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// What a claim returns of the leased row: the refresh token as stored and the lease.
type Claimed = (String, Option<DateTime<Utc>>);

/// Claims the lease through coderd's function; `Changed` when the row is gone
/// or no longer holds `old_refresh` (a lease taken on a changed row is given
/// back at once, so the new token is served without calling the provider).
pub(super) async fn claim(
    pool: &PgPool,
    provider_id: &str,
    user_id: Uuid,
    old_refresh: &StoredSecret,
    lease: Duration,
) -> Result<LeaseClaim, StoreError> {
    let timeout_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX).max(1);
    for _ in 0..CLAIM_ATTEMPTS {
        let claimed: Result<Option<Claimed>, sqlx::Error> = sqlx::query_as(
            "SELECT oauth_refresh_token, refresh_lease_expires_at \
                 FROM acquire_external_auth_link_refresh_lease($1, $2, $3)",
        )
        .bind(provider_id)
        .bind(user_id)
        .bind(timeout_ms)
        .fetch_optional(pool)
        .await;
        match claimed {
            Ok(None) | Ok(Some((_, None))) => return Ok(LeaseClaim::Changed),
            Ok(Some((stored, Some(expires_at)))) => {
                let held = Lease {
                    provider_id: provider_id.to_owned(),
                    user_id,
                    expires_at,
                };
                if StoredSecret(stored) == *old_refresh {
                    return Ok(LeaseClaim::Acquired(held));
                }
                release(pool, &held).await?;
                return Ok(LeaseClaim::Changed);
            }
            Err(e) if is_active_lease(&e) => {
                let row: Option<(String, Option<DateTime<Utc>>, DateTime<Utc>)> = sqlx::query_as(
                    "SELECT oauth_refresh_token, refresh_lease_expires_at, now() \
                     FROM external_auth_links WHERE provider_id = $1 AND user_id = $2",
                )
                .bind(provider_id)
                .bind(user_id)
                .fetch_optional(pool)
                .await
                .map_err(map_err)?;
                match row {
                    None => return Ok(LeaseClaim::Changed),
                    Some((stored, _, _)) if StoredSecret(stored.clone()) != *old_refresh => {
                        return Ok(LeaseClaim::Changed)
                    }
                    Some((_, Some(until), now)) if until >= now => {
                        return Ok(LeaseClaim::Held { until })
                    }
                    // Released or run out in between: claim again.
                    Some(_) => {}
                }
            }
            Err(e) => return Err(map_err(e)),
        }
    }
    Ok(LeaseClaim::Changed)
}

/// coderd's release: the lease back to NULL only while it is still `lease`.
/// Announced on tokenproxy's channel so waiting tokenproxy replicas re-read.
pub(super) async fn release(pool: &PgPool, lease: &Lease) -> Result<(), StoreError> {
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

/// The writes after a refresh, fenced by the lease the holder claimed (`None`:
/// this process holds no lease on the row any more). The rotation logic of
/// [`super::rotation`] drives it.
pub(super) struct Fenced<'a> {
    /// The store whose rows and keys are used.
    pub pg: &'a PgStore,
    /// The lease value this process holds on the row, if any.
    pub lease: Option<DateTime<Utc>>,
}

/// The lease condition every write of a holder carries. `$N` is the lease we
/// hold: then exactly coderd's fence. Without one (our lease was lost while the
/// database was away) a write applies only while nobody else holds a live lease:
/// it would otherwise land in the middle of another holder's refresh.
fn lease_fence(n: u8) -> String {
    format!(
        "(refresh_lease_expires_at = ${n} OR (${n}::timestamptz IS NULL AND \
         (refresh_lease_expires_at IS NULL OR refresh_lease_expires_at < now())))"
    )
}

#[async_trait::async_trait]
impl RowSql for Fenced<'_> {
    fn keyring(&self) -> &Keyring {
        self.pg.keyring()
    }

    async fn fetch_row(
        &self,
        provider_id: &str,
        user_id: Uuid,
    ) -> Result<Option<LinkRow>, StoreError> {
        self.pg.fetch_row(provider_id, user_id).await
    }

    async fn cas_write(
        &self,
        provider_id: &str,
        user_id: Uuid,
        old_refresh: &str,
        old_access: Option<&str>,
        new: &TokenSet,
    ) -> Result<bool, StoreError> {
        let (access, refresh) = codec::seal_pair(self.keyring(), provider_id, user_id, new)?;
        let sql = announced(
            &format!(
                "UPDATE external_auth_links SET \
                   oauth_access_token = $3, oauth_access_token_key_id = $4, \
                   oauth_refresh_token = $5, oauth_refresh_token_key_id = $6, \
                   oauth_expiry = $7, oauth_extra = $8, \
                   oauth_refresh_failure_reason = '', refresh_lease_expires_at = NULL, \
                   updated_at = now() \
                 WHERE provider_id = $1 AND user_id = $2 AND oauth_refresh_token = $9 \
                   AND ($11::text IS NULL OR oauth_access_token = $11) AND {} \
                 RETURNING provider_id, user_id",
                lease_fence(12)
            ),
            "$10",
        );
        let rows: Vec<String> = sqlx::query_scalar(&sql)
            .bind(provider_id)
            .bind(user_id)
            .bind(&access.value)
            .bind(&access.key_id)
            .bind(&refresh.value)
            .bind(&refresh.key_id)
            .bind(expiry_to_db(new.expiry))
            .bind(&new.extra)
            .bind(old_refresh)
            .bind(CHANGE_CHANNEL)
            .bind(old_access)
            .bind(self.lease)
            .fetch_all(self.pg.pool())
            .await
            .map_err(map_err)?;
        Ok(!rows.is_empty())
    }

    async fn cas_failure(
        &self,
        provider_id: &str,
        user_id: Uuid,
        read: &Fence,
        lease: Option<&Lease>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        // coderd's convention, so its UI shows our failure and its refresher
        // stops too: no refresh token (encrypted when encryption is on) plus
        // the reason. The holder is done, so the lease goes in the same write.
        let empty: Sealed = self
            .keyring()
            .seal_empty_as_coder()
            .map_err(|e| StoreError::Other(format!("cannot encrypt oauth_refresh_token: {e}")))?;
        let lease = lease.map(|l| l.expires_at).or(self.lease);
        let sql = announced(
            &format!(
                "UPDATE external_auth_links SET oauth_refresh_token = $3, \
                   oauth_refresh_token_key_id = $4, oauth_refresh_failure_reason = $5, \
                   refresh_lease_expires_at = NULL, updated_at = now() \
                 WHERE provider_id = $1 AND user_id = $2 AND oauth_refresh_token = $6 \
                   AND oauth_access_token = $7 AND {} \
                 RETURNING provider_id, user_id",
                lease_fence(9)
            ),
            "$8",
        );
        let rows: Vec<String> = sqlx::query_scalar(&sql)
            .bind(provider_id)
            .bind(user_id)
            .bind(&empty.value)
            .bind(&empty.key_id)
            .bind(truncate_reason(reason))
            .bind(&read.refresh.0)
            .bind(&read.access.0)
            .bind(CHANGE_CHANNEL)
            .bind(lease)
            .fetch_all(self.pg.pool())
            .await
            .map_err(map_err)?;
        Ok(!rows.is_empty())
    }

    async fn rows_after(&self, after: Option<&(String, Uuid)>) -> Result<Vec<LinkRow>, StoreError> {
        self.pg.rows_after(after).await
    }

    async fn swap_tokens(
        &self,
        row: &LinkRow,
        access: &Sealed,
        refresh: &Sealed,
    ) -> Result<bool, StoreError> {
        self.pg.swap_tokens(row, access, refresh).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_cut_like_coderd_at_a_character_boundary() {
        let long = "x".repeat(500);
        assert_eq!(truncate_reason(&long).len(), 400);
        let short = "invalid_grant";
        assert_eq!(truncate_reason(short), short);
        // 399 ASCII bytes then a two-byte character straddling the limit.
        let straddle = format!("{}é", "a".repeat(399));
        assert_eq!(truncate_reason(&straddle).len(), 399);
    }
}
