//! Pending sign-in statements (see [`crate::store::login`]).

use chrono::Utc;
use sqlx::{Row, SqlitePool};

use super::map_err;

use crate::crypto::Keyring;
use crate::store::login::{self, BeginLogin, LoginState, SpentTicket};
use crate::store::StoreError;

pub(super) async fn begin(
    pool: &SqlitePool,
    keyring: &Keyring,
    state: &LoginState,
    ticket: Option<&SpentTicket>,
) -> Result<BeginLogin, StoreError> {
    let mut tx = pool.begin().await.map_err(map_err)?;
    let now = Utc::now().timestamp();
    for table in login::PRUNED_TABLES {
        sqlx::query(&login::prune_sql(table))
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
    }
    if let Some(t) = ticket {
        let spent = sqlx::query(login::SPEND_TICKET_SQL)
            .bind(&t.id)
            .bind(t.expires_at.timestamp())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if spent.rows_affected() == 0 {
            return Ok(BeginLogin::TicketAlreadyUsed);
        }
    }
    sqlx::query(login::INSERT_STATE_SQL)
        .bind(&state.state_hash)
        .bind(&state.provider_id)
        .bind(state.user_id.to_string())
        .bind(&state.browser_hash)
        .bind(login::seal_verifier(keyring, state)?)
        .bind(&state.nonce)
        .bind(state.expires_at.timestamp())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
    tx.commit().await.map_err(map_err)?;
    Ok(BeginLogin::Started)
}

pub(super) async fn take(
    pool: &SqlitePool,
    keyring: &Keyring,
    state_hash: &str,
) -> Result<Option<LoginState>, StoreError> {
    let row = sqlx::query(login::TAKE_STATE_SQL)
        .bind(state_hash)
        .fetch_optional(pool)
        .await
        .map_err(map_err)?;
    let Some(row) = row else { return Ok(None) };
    let decode = |e: sqlx::Error| StoreError::Other(e.to_string());
    let taken = login::TakenRow {
        provider_id: row.try_get("provider_id").map_err(decode)?,
        user_id: row
            .try_get::<String, _>("user_id")
            .map_err(decode)?
            .parse()
            .map_err(|_| StoreError::Other("oauth_states.user_id is not a UUID".into()))?,
        browser_hash: row.try_get("browser_hash").map_err(decode)?,
        sealed_verifier: row.try_get("pkce_verifier").map_err(decode)?,
        nonce: row.try_get("nonce").map_err(decode)?,
        expires_at: row.try_get("expires_at").map_err(decode)?,
    };
    Ok(Some(taken.into_state(keyring, state_hash)))
}

#[async_trait::async_trait]
impl crate::store::login::LoginStore for super::SqliteStore {
    async fn begin_login(
        &self,
        state: &LoginState,
        ticket: Option<&SpentTicket>,
    ) -> Result<BeginLogin, StoreError> {
        begin(&self.pool, &self.keyring, state, ticket).await
    }

    async fn take_login_state(&self, state_hash: &str) -> Result<Option<LoginState>, StoreError> {
        take(&self.pool, &self.keyring, state_hash).await
    }
}
