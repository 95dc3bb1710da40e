//! Registration of the Coder-format key in `dbcrypt_keys`, the way Coder's
//! dbcrypt does it: Coder's foreign keys on the `*_key_id` columns require the
//! digest there, and Coder decrypts the `test` column to check it holds the key.

use uuid::Uuid;

use super::{map_err, PgStore};
use crate::crypto::{ValueContext, CODER_TEST_VALUE};
use crate::store::StoreError;

/// Adds `id` (the first key's Coder id) as the next active key unless present.
pub(super) async fn register_key(store: &PgStore, id: String) -> Result<(), StoreError> {
    let revoked: Option<i32> =
        sqlx::query_scalar("SELECT number FROM dbcrypt_keys WHERE revoked_key_digest = $1")
            .bind(&id)
            .fetch_optional(&store.pool)
            .await
            .map_err(map_err)?;
    if revoked.is_some() {
        return Err(StoreError::Other(format!(
            "encryption key {id} was revoked in dbcrypt_keys"
        )));
    }
    // Coder encrypts "coder" with the key; no associated data in its format.
    let ctx = ValueContext {
        provider_id: "",
        user_id: Uuid::nil(),
        column: "test",
    };
    let test = store
        .keyring
        .seal(CODER_TEST_VALUE, ctx)
        .map_err(|e| StoreError::Other(e.to_string()))?;
    // Serialize registrations so two replicas do not both take max+1.
    let mut tx = store.pool.begin().await.map_err(map_err)?;
    sqlx::query("LOCK TABLE dbcrypt_keys IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
    sqlx::query(
        "INSERT INTO dbcrypt_keys (number, active_key_digest, created_at, test) \
         SELECT COALESCE(MAX(number), 0) + 1, $1, now(), $2 FROM dbcrypt_keys \
         HAVING NOT EXISTS (SELECT 1 FROM dbcrypt_keys WHERE active_key_digest = $1)",
    )
    .bind(&id)
    .bind(&test.value)
    .execute(&mut *tx)
    .await
    .map_err(map_err)?;
    tx.commit().await.map_err(map_err)
}
