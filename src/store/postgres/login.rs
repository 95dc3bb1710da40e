//! Pending sign-in statements (see [`crate::store::login`]).

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use super::map_err;
use crate::store::login::{BeginLogin, LoginState, SpentTicket};
use uuid::Uuid;

use crate::crypto::Keyring;
use crate::store::StoreError;

pub(super) async fn begin(
    pool: &PgPool,
    keyring: &Keyring,
    state: &LoginState,
    ticket: Option<&SpentTicket>,
) -> Result<BeginLogin, StoreError> {
    let mut tx = pool.begin().await.map_err(map_err)?;
    let now = Utc::now().timestamp();
    for table in ["oauth_states", "oauth_login_tickets"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE expires_at < $1"))
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
    }
    if let Some(t) = ticket {
        let spent = sqlx::query(
            "INSERT INTO oauth_login_tickets (ticket_id, expires_at) VALUES ($1, $2) \
             ON CONFLICT (ticket_id) DO NOTHING",
        )
        .bind(&t.id)
        .bind(t.expires_at.timestamp())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if spent.rows_affected() == 0 {
            return Ok(BeginLogin::TicketAlreadyUsed);
        }
    }
    sqlx::query(
        "INSERT INTO oauth_states (state_hash, provider_id, user_id, browser_hash, \
         pkce_verifier, nonce, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&state.state_hash)
    .bind(&state.provider_id)
    .bind(state.user_id)
    .bind(&state.browser_hash)
    .bind(crate::store::login::seal_verifier(keyring, state)?)
    .bind(&state.nonce)
    .bind(state.expires_at.timestamp())
    .execute(&mut *tx)
    .await
    .map_err(map_err)?;
    tx.commit().await.map_err(map_err)?;
    Ok(BeginLogin::Started)
}

pub(super) async fn take(
    pool: &PgPool,
    keyring: &Keyring,
    state_hash: &str,
) -> Result<Option<LoginState>, StoreError> {
    let row = sqlx::query(
        "DELETE FROM oauth_states WHERE state_hash = $1 RETURNING provider_id, user_id, \
         browser_hash, pkce_verifier, nonce, expires_at",
    )
    .bind(state_hash)
    .fetch_optional(pool)
    .await
    .map_err(map_err)?;
    let Some(row) = row else { return Ok(None) };
    let decode = |e: sqlx::Error| StoreError::Other(e.to_string());
    let expires: i64 = row.try_get("expires_at").map_err(decode)?;
    let provider_id: String = row.try_get("provider_id").map_err(decode)?;
    let user_id: Uuid = row.try_get("user_id").map_err(decode)?;
    let sealed: String = row.try_get("pkce_verifier").map_err(decode)?;
    let pkce_verifier = crate::store::login::open_verifier(keyring, &provider_id, user_id, &sealed);
    Ok(Some(LoginState {
        state_hash: state_hash.to_string(),
        provider_id,
        user_id,
        browser_hash: row.try_get("browser_hash").map_err(decode)?,
        pkce_verifier,
        nonce: row.try_get("nonce").map_err(decode)?,
        expires_at: DateTime::from_timestamp(expires, 0).unwrap_or_default(),
    }))
}

#[async_trait::async_trait]
impl crate::store::login::LoginStore for super::PgStore {
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
