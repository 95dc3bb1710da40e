//! The SQL steps of the shared refresh writes and key rotation
//! ([`crate::store::rotation`]), which decides when to retry them.
//!
//! As in the Postgres backend, both refresh writes compare the token columns
//! with the values exactly as they were read. Each write is one `UPDATE`,
//! atomic under SQLite's writer lock.

use uuid::Uuid;

use super::{expiry_to_db, map_err, rotate, ts_to_db, SqliteLinkRow, SqliteStore, NOW};
use crate::crypto::{Keyring, Sealed};
use crate::store::codec::{LinkRow, LINK_COLUMNS};
use crate::store::rotation::RowSql;
use crate::store::{Fence, Lease, StoreError, TokenSet};

#[async_trait::async_trait]
impl RowSql for SqliteStore {
    fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    async fn fetch_row(
        &self,
        provider_id: &str,
        user_id: Uuid,
    ) -> Result<Option<LinkRow>, StoreError> {
        let row = sqlx::query_as::<_, SqliteLinkRow>(&format!(
            "SELECT {LINK_COLUMNS} FROM external_auth_links \
             WHERE provider_id = ?1 AND user_id = ?2"
        ))
        .bind(provider_id)
        .bind(user_id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(row.map(|r| r.0))
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
        let (access, refresh) = self.seal_pair(provider_id, user_id, new)?;
        let done = sqlx::query(&format!(
            "UPDATE external_auth_links SET \
               oauth_access_token = ?3, oauth_access_token_key_id = ?4, \
               oauth_refresh_token = ?5, oauth_refresh_token_key_id = ?6, \
               oauth_expiry = ?7, oauth_extra = ?8, \
               oauth_refresh_failure_reason = '', refresh_lease_expires_at = NULL, \
               updated_at = {NOW} \
             WHERE provider_id = ?1 AND user_id = ?2 AND oauth_refresh_token = ?9 \
               AND (?10 IS NULL OR oauth_access_token = ?10)"
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
        .bind(old_access)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn cas_failure(
        &self,
        provider_id: &str,
        user_id: Uuid,
        read: &Fence,
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
               AND oauth_access_token = ?6 \
               AND (?5 IS NULL OR refresh_lease_expires_at = ?5)"
        ))
        .bind(provider_id)
        .bind(user_id.to_string())
        .bind(&read.refresh.0)
        .bind(reason)
        .bind(lease.map(|l| ts_to_db(l.expires_at)))
        .bind(&read.access.0)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }
}
