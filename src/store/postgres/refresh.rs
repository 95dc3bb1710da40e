//! The compare-and-swap writes that follow a refresh, success or failure.
//!
//! Both compare `oauth_refresh_token` with the value exactly as it was read. A
//! re-encryption (`keys rotate` here or in Coder) changes that value without
//! changing the token, so after a miss they check whether the row still holds
//! the same token under a new ciphertext and, if so, retry against it: losing a
//! refresh write would lose a token the provider has already rotated.

use secrecy::ExposeSecret;
use uuid::Uuid;

use super::{announced, expiry_to_db, map_err, PgStore, REFRESH};
use crate::crypto::ValueContext;
use crate::store::{Lease, StoreError, StoredSecret, TokenSet, CHANGE_CHANNEL};

impl PgStore {
    /// The refresh-token compare-and-swap write. Returns whether it applied.
    pub(super) async fn cas_write(
        &self,
        provider_id: &str,
        user_id: Uuid,
        old_refresh: &str,
        new: &TokenSet,
    ) -> Result<bool, StoreError> {
        let (access, refresh) = self.seal_pair(provider_id, user_id, new)?;
        let sql = announced(
            "UPDATE external_auth_links SET \
               oauth_access_token = $3, oauth_access_token_key_id = $4, \
               oauth_refresh_token = $5, oauth_refresh_token_key_id = $6, \
               oauth_expiry = $7, oauth_extra = $8, \
               oauth_refresh_failure_reason = '', refresh_lease_expires_at = NULL, \
               updated_at = now() \
             WHERE provider_id = $1 AND user_id = $2 AND oauth_refresh_token = $9 \
             RETURNING provider_id, user_id",
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
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(!rows.is_empty())
    }

    /// The compare-and-swap record of a permanent refresh failure.
    pub(super) async fn cas_failure(
        &self,
        provider_id: &str,
        user_id: Uuid,
        old_refresh: &str,
        lease: Option<&Lease>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        // With a lease, the holder is done: release it in the same write so waiters
        // re-read at once. Without one, leave whatever lease is there alone.
        let sql = announced(
            "UPDATE external_auth_links SET oauth_refresh_failure_reason = $4, \
               refresh_lease_expires_at = CASE WHEN $5::timestamptz IS NULL \
                 THEN refresh_lease_expires_at ELSE NULL END, \
               updated_at = now() \
             WHERE provider_id = $1 AND user_id = $2 AND oauth_refresh_token = $3 \
               AND ($5::timestamptz IS NULL OR refresh_lease_expires_at = $5) \
             RETURNING provider_id, user_id",
            "$6",
        );
        let rows: Vec<String> = sqlx::query_scalar(&sql)
            .bind(provider_id)
            .bind(user_id)
            .bind(old_refresh)
            .bind(reason)
            .bind(lease.map(|l| l.expires_at))
            .bind(CHANGE_CHANNEL)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(!rows.is_empty())
    }

    /// After a missed compare-and-swap: if the row still holds the same refresh
    /// token, only re-encrypted (by `keys rotate` here or in Coder), returns the
    /// value it holds now so the write can be retried against it.
    pub(super) async fn reencrypted_same_token(
        &self,
        provider_id: &str,
        user_id: Uuid,
        old_refresh: &StoredSecret,
    ) -> Result<Option<String>, StoreError> {
        if self.keyring.is_empty() {
            return Ok(None);
        }
        let Some(row) = self.fetch_row(provider_id, user_id).await? else {
            return Ok(None);
        };
        if row.oauth_refresh_token == old_refresh.0 {
            // Same value yet the CAS missed: a write raced and was undone; retry.
            return Ok(Some(row.oauth_refresh_token));
        }
        let current = self.open(&row, REFRESH)?;
        let ctx = ValueContext {
            provider_id,
            user_id,
            column: REFRESH,
        };
        let old = self.keyring.open_any(&old_refresh.0, ctx);
        use subtle::ConstantTimeEq;
        let (a, b) = (current.expose_secret(), old.expose_secret());
        let same = a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()));
        Ok(same.then_some(row.oauth_refresh_token))
    }
}
