//! Key rotation and the writes that must survive it, for every backend.
//!
//! `keys rotate` rewrites each row by a compare-and-swap on all four token
//! columns exactly as read, so a concurrent refresh or login is never
//! overwritten with older tokens; such rows count as `raced` (run again to
//! finish them). Failure reason, expiry and lease are left as they are.
//!
//! The refresh writes are fenced by both token columns exactly as they were
//! read ([`Fence`]): the refresh token alone cannot tell a concurrent writer
//! from none when the provider does not rotate it. Only a write whose refresh
//! token rotated drops the access-token condition — the old refresh token may
//! already be dead, so the new one must be stored whenever the row still holds
//! the one exchanged. A re-encryption (`keys rotate` here or in Coder) changes
//! the stored values without changing the tokens, so after a miss they check
//! whether the row still holds the same tokens under new ciphertexts and, if
//! so, retry against them. The decisions live here once; each backend supplies
//! the SQL steps through [`RowSql`].

use uuid::Uuid;

use super::codec::{self, LinkRow};
use super::{Fence, Lease, RotateReport, StoreError, TokenSet, CLAIM_ATTEMPTS};
use crate::crypto::{Keyring, Sealed};

/// Rows read per page, to bound memory on large tables.
pub(super) const PAGE: i64 = 500;

/// The SQL steps a backend supplies; each is one statement.
#[async_trait::async_trait]
pub(super) trait RowSql: Sync {
    /// The keyring values are encrypted with.
    fn keyring(&self) -> &Keyring;

    /// The row of one link, if any.
    async fn fetch_row(
        &self,
        provider_id: &str,
        user_id: Uuid,
    ) -> Result<Option<LinkRow>, StoreError>;

    /// The compare-and-swap write after a refresh: applies only while
    /// `oauth_refresh_token` equals `old_refresh` and, when given,
    /// `oauth_access_token` equals `old_access`; whether it applied.
    async fn cas_write(
        &self,
        provider_id: &str,
        user_id: Uuid,
        old_refresh: &str,
        old_access: Option<&str>,
        new: &TokenSet,
    ) -> Result<bool, StoreError>;

    /// The compare-and-swap record of a permanent refresh failure, while both
    /// token columns are as in `read`; whether it applied.
    async fn cas_failure(
        &self,
        provider_id: &str,
        user_id: Uuid,
        read: &Fence,
        lease: Option<&Lease>,
        reason: &str,
    ) -> Result<bool, StoreError>;

    /// Up to [`PAGE`] rows after `after` in `(provider_id, user_id)` order.
    async fn rows_after(&self, after: Option<&(String, Uuid)>) -> Result<Vec<LinkRow>, StoreError>;

    /// Writes both token columns only while all four are still as in `row`;
    /// whether it applied.
    async fn swap_tokens(
        &self,
        row: &LinkRow,
        access: &Sealed,
        refresh: &Sealed,
    ) -> Result<bool, StoreError>;
}

/// Re-encrypts every link with the first key.
pub(super) async fn rotate(sql: &impl RowSql) -> Result<RotateReport, StoreError> {
    let mut report = RotateReport::default();
    let mut after: Option<(String, Uuid)> = None;
    loop {
        let rows = sql.rows_after(after.as_ref()).await?;
        let Some(last) = rows.last() else {
            return Ok(report);
        };
        after = Some((last.provider_id.clone(), last.user_id));
        for row in &rows {
            match codec::rotated(sql.keyring(), row)? {
                None => report.unchanged += 1,
                Some((access, refresh)) => {
                    if sql.swap_tokens(row, &access, &refresh).await? {
                        report.rotated += 1;
                    } else {
                        report.raced += 1;
                    }
                }
            }
        }
    }
}

/// [`LinkStore::write_refreshed`](super::LinkStore::write_refreshed).
pub(super) async fn write_refreshed(
    sql: &impl RowSql,
    provider_id: &str,
    user_id: Uuid,
    read: &Fence,
    new: &TokenSet,
) -> Result<bool, StoreError> {
    let with_access = !codec::rotates(
        sql.keyring(),
        provider_id,
        user_id,
        read,
        &new.refresh_token,
    );
    let access = |f: &Fence| with_access.then(|| f.access.0.clone());
    if sql
        .cas_write(
            provider_id,
            user_id,
            &read.refresh.0,
            access(read).as_deref(),
            new,
        )
        .await?
    {
        return Ok(true);
    }
    // Bounded: each retry needs another concurrent re-encryption.
    for _ in 0..CLAIM_ATTEMPTS {
        let Some(current) =
            reencrypted_same_tokens(sql, provider_id, user_id, read, with_access).await?
        else {
            return Ok(false);
        };
        if sql
            .cas_write(
                provider_id,
                user_id,
                &current.refresh.0,
                access(&current).as_deref(),
                new,
            )
            .await?
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// [`LinkStore::record_refresh_failure`](super::LinkStore::record_refresh_failure).
pub(super) async fn record_refresh_failure(
    sql: &impl RowSql,
    provider_id: &str,
    user_id: Uuid,
    read: &Fence,
    lease: Option<&Lease>,
    reason: &str,
) -> Result<bool, StoreError> {
    if sql
        .cas_failure(provider_id, user_id, read, lease, reason)
        .await?
    {
        return Ok(true);
    }
    // A re-encrypted copy of the same tokens still is what was rejected. Stop
    // once the values stop changing: then the miss was the lease (or a real
    // change), not a re-encryption.
    let mut tried = read.clone();
    for _ in 0..CLAIM_ATTEMPTS {
        match reencrypted_same_tokens(sql, provider_id, user_id, read, true).await? {
            Some(current) if current != tried => {
                if sql
                    .cas_failure(provider_id, user_id, &current, lease, reason)
                    .await?
                {
                    return Ok(true);
                }
                tried = current;
            }
            _ => return Ok(false),
        }
    }
    Ok(false)
}

/// After a missed compare-and-swap: if the row still holds the same tokens
/// (the access token only when `with_access`), only re-encrypted, returns the
/// values it holds now so the write can be retried against them. Without keys
/// nothing is ever re-encrypted.
async fn reencrypted_same_tokens(
    sql: &impl RowSql,
    provider_id: &str,
    user_id: Uuid,
    read: &Fence,
    with_access: bool,
) -> Result<Option<Fence>, StoreError> {
    if sql.keyring().is_empty() {
        return Ok(None);
    }
    match sql.fetch_row(provider_id, user_id).await? {
        Some(row) => codec::same_tokens(sql.keyring(), row, read, with_access),
        None => Ok(None),
    }
}
