//! The SQL steps of the shared refresh writes and key rotation
//! ([`crate::store::rotation`]), which decides when to retry them.
//!
//! Both refresh writes compare the token columns with the values exactly as
//! they were read, and announce what they change in the same statement. Coder
//! mode runs the same statements with coderd's lease fence added
//! ([`LeaseFence`]).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{announced, bind_link, map_err, rotate, PgStore};
use crate::crypto::{Keyring, Sealed};
use crate::store::codec::{LinkRow, LINK_COLUMNS};
use crate::store::coder_lease::truncate_reason;
use crate::store::rotation::RowSql;
use crate::store::{Fence, Lease, StoreError, TokenSet, CHANGE_CHANNEL};

#[async_trait::async_trait]
impl RowSql for PgStore {
    fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    async fn fetch_row(
        &self,
        provider_id: &str,
        user_id: Uuid,
    ) -> Result<Option<LinkRow>, StoreError> {
        sqlx::query_as::<_, LinkRow>(&format!(
            "SELECT {LINK_COLUMNS} FROM external_auth_links \
             WHERE provider_id = $1 AND user_id = $2"
        ))
        .bind(provider_id)
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)
    }

    async fn rows_after(&self, after: Option<&(String, Uuid)>) -> Result<Vec<LinkRow>, StoreError> {
        rotate::rows_after(self, after).await
    }

    async fn swap_tokens(
        &self,
        row: &LinkRow,
        access: &Sealed,
        refresh: &Sealed,
    ) -> Result<bool, StoreError> {
        rotate::swap_tokens(self, row, access, refresh).await
    }

    async fn cas_write(
        &self,
        provider_id: &str,
        user_id: Uuid,
        old_refresh: &str,
        old_access: Option<&str>,
        new: &TokenSet,
    ) -> Result<bool, StoreError> {
        cas_write(
            self,
            provider_id,
            user_id,
            old_refresh,
            old_access,
            new,
            LeaseFence::Own,
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
        cas_failure(
            self,
            provider_id,
            user_id,
            read,
            lease,
            reason,
            LeaseFence::Own,
        )
        .await
    }
}

/// How the writes after a refresh are fenced by the row's refresh lease.
///
/// Both the statements of tokenproxy's own schema and those shared with coderd
/// are built here, from one text each, so the two cannot drift apart: they
/// differ only in the lease condition (and, for a failure, in coderd's failure
/// convention).
#[derive(Debug, Clone, Copy)]
pub(crate) enum LeaseFence {
    /// tokenproxy's own rows: the compare-and-swap on the token columns is the
    /// fence; a failure written under a lease requires and releases it.
    Own,
    /// coderd's fence: `refresh_lease_expires_at = <the lease held>`. With none
    /// held (it was lost while the database was away) a write applies only while
    /// nobody else holds a live lease: it would otherwise land in the middle of
    /// another holder's refresh.
    Coder(Option<DateTime<Utc>>),
}

impl LeaseFence {
    /// The lease condition of a write, `$n` being the lease held; empty for `Own`.
    fn condition(self, n: u8) -> String {
        match self {
            LeaseFence::Own => String::new(),
            LeaseFence::Coder(_) => format!(
                " AND (refresh_lease_expires_at = ${n} OR (${n}::timestamptz IS NULL AND \
                 (refresh_lease_expires_at IS NULL OR refresh_lease_expires_at < now())))"
            ),
        }
    }
}

/// Stores `new` over the row if it still holds `old_refresh` (and `old_access`,
/// when given) and passes `fence`; clears any failure reason and the lease.
pub(crate) async fn cas_write(
    pg: &PgStore,
    provider_id: &str,
    user_id: Uuid,
    old_refresh: &str,
    old_access: Option<&str>,
    new: &TokenSet,
    fence: LeaseFence,
) -> Result<bool, StoreError> {
    let sealed = pg.seal_pair(provider_id, user_id, new)?;
    let sql = announced(
        &format!(
            "UPDATE external_auth_links SET \
               oauth_access_token = $3, oauth_access_token_key_id = $4, \
               oauth_refresh_token = $5, oauth_refresh_token_key_id = $6, \
               oauth_expiry = $7, oauth_extra = $8, \
               oauth_refresh_failure_reason = '', refresh_lease_expires_at = NULL, \
               updated_at = now() \
             WHERE provider_id = $1 AND user_id = $2 AND oauth_refresh_token = $9 \
               AND ($11::text IS NULL OR oauth_access_token = $11){} \
             RETURNING provider_id, user_id",
            fence.condition(12)
        ),
        "$10",
    );
    let mut query = bind_link(&sql, provider_id, user_id, &sealed, new)
        .bind(old_refresh)
        .bind(CHANGE_CHANNEL)
        .bind(old_access);
    if let LeaseFence::Coder(lease) = fence {
        query = query.bind(lease);
    }
    let rows = query.fetch_all(pg.pool()).await.map_err(map_err)?;
    Ok(!rows.is_empty())
}

/// Records a permanent refresh failure on the row read as `read`, under `lease`
/// when one is held.
///
/// `Own` keeps the tokens and sets the reason; with a lease the holder is done,
/// so it requires and releases it in the same write, and without one leaves
/// whatever lease is there alone. `Coder` writes coderd's convention, so its UI
/// shows our failure and its refresher stops too: no refresh token (encrypted
/// when encryption is on) plus the reason cut to coderd's limit, the lease
/// (`lease`, else the one the fence holds) cleared.
pub(crate) async fn cas_failure(
    pg: &PgStore,
    provider_id: &str,
    user_id: Uuid,
    read: &Fence,
    lease: Option<&Lease>,
    reason: &str,
    fence: LeaseFence,
) -> Result<bool, StoreError> {
    let held = lease.map(|l| l.expires_at);
    let query = match fence {
        LeaseFence::Own => {
            let sql = announced(
                "UPDATE external_auth_links SET oauth_refresh_failure_reason = $4, \
                   refresh_lease_expires_at = CASE WHEN $5::timestamptz IS NULL \
                     THEN refresh_lease_expires_at ELSE NULL END, \
                   updated_at = now() \
                 WHERE provider_id = $1 AND user_id = $2 AND oauth_refresh_token = $3 \
                   AND oauth_access_token = $7 \
                   AND ($5::timestamptz IS NULL OR refresh_lease_expires_at = $5) \
                 RETURNING provider_id, user_id",
                "$6",
            );
            sqlx::query_scalar::<_, String>(&sql)
                .bind(provider_id)
                .bind(user_id)
                .bind(&read.refresh.0)
                .bind(reason)
                .bind(held)
                .bind(CHANGE_CHANNEL)
                .bind(&read.access.0)
                .fetch_all(pg.pool())
                .await
        }
        LeaseFence::Coder(fenced) => {
            let empty: Sealed = pg.keyring().seal_empty_as_coder().map_err(|e| {
                StoreError::Other(format!("cannot encrypt oauth_refresh_token: {e}"))
            })?;
            let sql = announced(
                &format!(
                    "UPDATE external_auth_links SET oauth_refresh_token = $3, \
                       oauth_refresh_token_key_id = $4, oauth_refresh_failure_reason = $5, \
                       refresh_lease_expires_at = NULL, updated_at = now() \
                     WHERE provider_id = $1 AND user_id = $2 AND oauth_refresh_token = $6 \
                       AND oauth_access_token = $7{} \
                     RETURNING provider_id, user_id",
                    fence.condition(9)
                ),
                "$8",
            );
            sqlx::query_scalar::<_, String>(&sql)
                .bind(provider_id)
                .bind(user_id)
                .bind(&empty.value)
                .bind(&empty.key_id)
                .bind(truncate_reason(reason))
                .bind(&read.refresh.0)
                .bind(&read.access.0)
                .bind(CHANGE_CHANNEL)
                .bind(held.or(fenced))
                .fetch_all(pg.pool())
                .await
        }
    };
    Ok(!query.map_err(map_err)?.is_empty())
}
