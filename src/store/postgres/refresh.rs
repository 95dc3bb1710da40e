//! The SQL steps of the shared refresh writes and key rotation
//! ([`crate::store::rotation`]), which decides when to retry them.
//!
//! Both refresh writes compare the token columns with the values exactly as
//! they were read, and announce what they change in the same statement.

use uuid::Uuid;

use super::{announced, expiry_to_db, map_err, rotate, PgStore};
use crate::crypto::{Keyring, Sealed};
use crate::store::codec::{LinkRow, LINK_COLUMNS};
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
        let (access, refresh) = self.seal_pair(provider_id, user_id, new)?;
        let sql = announced(
            "UPDATE external_auth_links SET \
               oauth_access_token = $3, oauth_access_token_key_id = $4, \
               oauth_refresh_token = $5, oauth_refresh_token_key_id = $6, \
               oauth_expiry = $7, oauth_extra = $8, \
               oauth_refresh_failure_reason = '', refresh_lease_expires_at = NULL, \
               updated_at = now() \
             WHERE provider_id = $1 AND user_id = $2 AND oauth_refresh_token = $9 \
               AND ($11::text IS NULL OR oauth_access_token = $11) \
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
            .bind(old_access)
            .fetch_all(&self.pool)
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
        // With a lease, the holder is done: release it in the same write so waiters
        // re-read at once. Without one, leave whatever lease is there alone.
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
        let rows: Vec<String> = sqlx::query_scalar(&sql)
            .bind(provider_id)
            .bind(user_id)
            .bind(&read.refresh.0)
            .bind(reason)
            .bind(lease.map(|l| l.expires_at))
            .bind(CHANGE_CHANNEL)
            .bind(&read.access.0)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(!rows.is_empty())
    }
}
