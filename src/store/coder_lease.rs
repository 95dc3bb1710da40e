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
//! lease fence, so a write can only ever replace the tokens it exchanged. The
//! statements themselves are tokenproxy's own (`postgres::refresh`,
//! `postgres::lease`) with the fence as a parameter ([`LeaseFence::Coder`]), so
//! the two schemas' writes cannot drift apart; only the claim, which runs
//! coderd's function, is Coder mode's own.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::codec::LinkRow;
use super::postgres::lease as pg_lease;
use super::postgres::refresh::{self, LeaseFence};
use super::postgres::{map_err, PgStore};
use super::rotation::RowSql;
use super::{Fence, Lease, LeaseClaim, StoreError, StoredSecret, TokenSet, CLAIM_ATTEMPTS};

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
                match pg_lease::lease_state(pool, provider_id, user_id).await? {
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

/// coderd's release: the lease back to NULL only while it is still `lease` —
/// the statement tokenproxy's own schema uses, announced on tokenproxy's channel
/// so waiting tokenproxy replicas re-read.
pub(super) async fn release(pool: &PgPool, lease: &Lease) -> Result<(), StoreError> {
    pg_lease::release(pool, lease).await
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
        let fence = LeaseFence::Coder(self.lease);
        refresh::cas_write(
            self.pg,
            provider_id,
            user_id,
            old_refresh,
            old_access,
            new,
            fence,
        )
        .await
    }

    async fn cas_failure(
        &self,
        provider_id: &str,
        user_id: Uuid,
        read: &Fence,
        lease: Option<&Lease>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let fence = LeaseFence::Coder(self.lease);
        refresh::cas_failure(self.pg, provider_id, user_id, read, lease, reason, fence).await
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
