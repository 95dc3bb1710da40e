//! The compare-and-swap writes that follow a refresh, success or failure.
//!
//! As in the Postgres backend, both compare `oauth_refresh_token` with the value
//! exactly as it was read, and after a miss check whether the row still holds
//! the same token under a new ciphertext (`keys rotate`); if so they retry
//! against it, since losing a refresh write would lose a token the provider has
//! already rotated. Each write is one `UPDATE`, atomic under SQLite's writer lock.

use secrecy::ExposeSecret;
use uuid::Uuid;

use super::{expiry_to_db, map_err, ts_to_db, SqliteStore, CLAIM_ATTEMPTS, NOW, REFRESH};
use crate::crypto::ValueContext;
use crate::store::{Lease, StoreError, StoredSecret, TokenSet};

impl SqliteStore {
    /// [`LinkStore::write_refreshed`](crate::store::LinkStore::write_refreshed).
    pub(super) async fn write_refreshed_cas(
        &self,
        provider_id: &str,
        user_id: Uuid,
        old_refresh: &StoredSecret,
        new: &TokenSet,
    ) -> Result<bool, StoreError> {
        if self
            .cas_write(provider_id, user_id, &old_refresh.0, new)
            .await?
        {
            return Ok(true);
        }
        // Bounded: each retry needs another concurrent re-encryption.
        for _ in 0..CLAIM_ATTEMPTS {
            let Some(current) = self
                .reencrypted_same_token(provider_id, user_id, old_refresh)
                .await?
            else {
                return Ok(false);
            };
            if self.cas_write(provider_id, user_id, &current, new).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// [`LinkStore::record_refresh_failure`](crate::store::LinkStore::record_refresh_failure).
    pub(super) async fn record_failure_cas(
        &self,
        provider_id: &str,
        user_id: Uuid,
        old_refresh: &StoredSecret,
        lease: Option<&Lease>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        if self
            .cas_failure(provider_id, user_id, &old_refresh.0, lease, reason)
            .await?
        {
            return Ok(true);
        }
        // Stop once the value stops changing: then the miss was the lease (or a
        // real change), not a re-encryption.
        let mut tried = old_refresh.0.clone();
        for _ in 0..CLAIM_ATTEMPTS {
            match self
                .reencrypted_same_token(provider_id, user_id, old_refresh)
                .await?
            {
                Some(current) if current != tried => {
                    if self
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

    /// The refresh-token compare-and-swap write. Returns whether it applied.
    async fn cas_write(
        &self,
        provider_id: &str,
        user_id: Uuid,
        old_refresh: &str,
        new: &TokenSet,
    ) -> Result<bool, StoreError> {
        let (access, refresh) = self.seal_pair(provider_id, user_id, new)?;
        let done = sqlx::query(&format!(
            "UPDATE external_auth_links SET \
               oauth_access_token = ?3, oauth_access_token_key_id = ?4, \
               oauth_refresh_token = ?5, oauth_refresh_token_key_id = ?6, \
               oauth_expiry = ?7, oauth_extra = ?8, \
               oauth_refresh_failure_reason = '', refresh_lease_expires_at = NULL, \
               updated_at = {NOW} \
             WHERE provider_id = ?1 AND user_id = ?2 AND oauth_refresh_token = ?9"
        ))
        .bind(provider_id)
        .bind(user_id.to_string())
        .bind(&access.value)
        .bind(&access.key_id)
        .bind(&refresh.value)
        .bind(&refresh.key_id)
        .bind(expiry_to_db(new.expiry))
        .bind(new.extra.as_ref().map(|v| v.to_string()))
        .bind(old_refresh)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    /// The compare-and-swap record of a permanent refresh failure.
    async fn cas_failure(
        &self,
        provider_id: &str,
        user_id: Uuid,
        old_refresh: &str,
        lease: Option<&Lease>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        // With a lease, the holder is done: release it in the same write so waiters
        // re-read at once. Without one, leave whatever lease is there alone.
        let done = sqlx::query(&format!(
            "UPDATE external_auth_links SET oauth_refresh_failure_reason = ?4, \
               refresh_lease_expires_at = CASE WHEN ?5 IS NULL \
                 THEN refresh_lease_expires_at ELSE NULL END, \
               updated_at = {NOW} \
             WHERE provider_id = ?1 AND user_id = ?2 AND oauth_refresh_token = ?3 \
               AND (?5 IS NULL OR refresh_lease_expires_at = ?5)"
        ))
        .bind(provider_id)
        .bind(user_id.to_string())
        .bind(old_refresh)
        .bind(reason)
        .bind(lease.map(|l| ts_to_db(l.expires_at)))
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    /// After a missed compare-and-swap: if the row still holds the same refresh
    /// token, only re-encrypted, returns the value it holds now.
    async fn reencrypted_same_token(
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
        let current = self.unseal(&row, REFRESH)?;
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
