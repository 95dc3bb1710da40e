//! A simulated coderd refresher, following Coder's protocol statement for
//! statement (coder/coder `coderd/externalauth/externalauth.go` `RefreshToken`
//! and `coderd/database/queries/externalauth.sql`, main late 2026):
//!
//! 1. `GetExternalAuthLink`; a token is expired 10 s before its expiry
//!    (oauth2's expiry delta), the zero time never expires;
//! 2. `AcquireExternalAuthLinkRefreshLease` = `SELECT * FROM
//!    acquire_external_auth_link_refresh_lease(provider, user, timeout_ms)`;
//!    `check_violation` on `external_auth_link_active_lease` → back off and
//!    try again; no row → the link is gone; a leased row whose token changed
//!    (or is fresh) is served without calling the provider;
//! 3. the refresh grant at the provider;
//! 4. `UpdateExternalAuthLink … WHERE … AND (refresh_lease_expires_at = $lease
//!    OR $lease IS NULL)`; on a permanent failure, first re-read (a winner's
//!    token is used), else store `oauth_refresh_token = ''` (encrypted when
//!    encryption is on) and the reason cut to 400 bytes, fenced the same way;
//! 5. `SetExternalAuthLinkRefreshLease` to NULL, fenced by the old lease.
//!
//! dbcrypt is Coder's format (AES-256-GCM, no associated data, 7-hex key ids),
//! done with tokenproxy's keyring in Coder format — the codec whose known-answer
//! vectors tests/coder.rs checks.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use tokenproxy::crypto::{Keyring, ValueContext};
use tokenproxy::tokens::Clock;
use uuid::Uuid;

/// What one `RefreshToken` call ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The stored token was still fresh (no claim made).
    Fresh(String),
    /// We exchanged the refresh token and stored the answer.
    Refreshed(String),
    /// The lease gave us a row someone else had refreshed.
    Adopted(String),
    /// The provider rejected the refresh token (or one was already recorded).
    Failed(String),
    /// The link is gone.
    Missing,
}

/// coderd's view of a link row, decrypted.
struct Row {
    access: String,
    refresh: String,
    expiry: DateTime<Utc>,
    reason: String,
    lease: Option<DateTime<Utc>>,
}

/// A coderd replica's refresher.
pub struct Coderd {
    pub pool: PgPool,
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub clock: Arc<dyn Clock>,
    pub keyring: Keyring,
    /// coderd's lease timeout.
    pub lease: Duration,
}

fn zero_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap()
}

fn ctx(column: &'static str) -> ValueContext<'static> {
    ValueContext {
        provider_id: "",
        user_id: Uuid::nil(),
        column,
    }
}

impl Coderd {
    fn seal(&self, plain: &str) -> (String, Option<String>) {
        let s = if plain.is_empty() {
            self.keyring.seal_empty_as_coder().unwrap()
        } else {
            self.keyring.seal(plain, ctx("x")).unwrap()
        };
        (s.value, s.key_id)
    }

    fn open(&self, value: &str, key_id: Option<&str>) -> String {
        self.keyring
            .open(value, key_id, ctx("x"))
            .unwrap()
            .expose_secret()
            .to_string()
    }

    fn fresh(&self, row: &Row) -> bool {
        row.expiry.year_is_zero() || row.expiry - chrono::Duration::seconds(10) > self.clock.now()
    }

    async fn get(&self, provider: &str, user: Uuid) -> Option<Row> {
        let row: Option<RawRow> = sqlx::query_as(&format!(
            "SELECT {RAW} FROM external_auth_links WHERE provider_id = $1 AND user_id = $2"
        ))
        .bind(provider)
        .bind(user)
        .fetch_optional(&self.pool)
        .await
        .unwrap();
        row.map(|r| self.decode(r))
    }

    fn decode(&self, r: RawRow) -> Row {
        Row {
            access: self.open(&r.0, r.1.as_deref()),
            refresh: self.open(&r.2, r.3.as_deref()),
            expiry: r.4,
            reason: r.5,
            lease: r.6,
        }
    }

    /// `InsertExternalAuthLink` (a user linking in coderd's UI).
    pub async fn insert(
        &self,
        provider: &str,
        user: Uuid,
        access: &str,
        refresh: &str,
        expiry: Option<DateTime<Utc>>,
    ) {
        let (a, ak) = self.seal(access);
        let (r, rk) = self.seal(refresh);
        sqlx::query(
            "INSERT INTO external_auth_links (provider_id, user_id, created_at, updated_at, \
             oauth_access_token, oauth_access_token_key_id, oauth_refresh_token, \
             oauth_refresh_token_key_id, oauth_expiry, oauth_extra) \
             VALUES ($1, $2, now(), now(), $3, $4, $5, $6, $7, NULL)",
        )
        .bind(provider)
        .bind(user)
        .bind(a)
        .bind(ak)
        .bind(r)
        .bind(rk)
        .bind(expiry.unwrap_or_else(zero_time))
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// A re-link: `UpdateExternalAuthLink` with no lease (coderd's callback).
    pub async fn relink(
        &self,
        provider: &str,
        user: Uuid,
        access: &str,
        refresh: &str,
        expiry: Option<DateTime<Utc>>,
    ) {
        assert!(
            self.update(provider, user, None, access, refresh, expiry, "")
                .await
        );
    }

    /// `DeleteExternalAuthLink`.
    pub async fn delete(&self, provider: &str, user: Uuid) {
        sqlx::query("DELETE FROM external_auth_links WHERE provider_id = $1 AND user_id = $2")
            .bind(provider)
            .bind(user)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    #[allow(clippy::too_many_arguments)]
    async fn update(
        &self,
        provider: &str,
        user: Uuid,
        lease: Option<DateTime<Utc>>,
        access: &str,
        refresh: &str,
        expiry: Option<DateTime<Utc>>,
        reason: &str,
    ) -> bool {
        let (a, ak) = self.seal(access);
        let (r, rk) = self.seal(refresh);
        let reason = &reason[..reason.len().min(400)];
        sqlx::query(
            "UPDATE external_auth_links SET updated_at = now(), oauth_access_token = $4, \
             oauth_access_token_key_id = $5, oauth_refresh_token = $6, \
             oauth_refresh_token_key_id = $7, oauth_expiry = $8, oauth_extra = NULL, \
             oauth_refresh_failure_reason = $9 \
             WHERE provider_id = $1 AND user_id = $2 \
               AND (refresh_lease_expires_at = $3 OR $3 IS NULL) RETURNING 1",
        )
        .bind(provider)
        .bind(user)
        .bind(lease)
        .bind(a)
        .bind(ak)
        .bind(r)
        .bind(rk)
        .bind(expiry.unwrap_or_else(zero_time))
        .bind(reason)
        .fetch_optional(&self.pool)
        .await
        .unwrap()
        .is_some()
    }

    async fn release(&self, provider: &str, user: Uuid, lease: DateTime<Utc>) {
        sqlx::query(
            "UPDATE external_auth_links SET refresh_lease_expires_at = NULL \
             WHERE provider_id = $1 AND user_id = $2 \
               AND (refresh_lease_expires_at = $3 OR $3 IS NULL)",
        )
        .bind(provider)
        .bind(user)
        .bind(lease)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// coderd's `RefreshToken` for one link.
    pub async fn refresh(&self, provider: &str, user: Uuid) -> Outcome {
        let mut backoff = Duration::from_millis(5);
        loop {
            let Some(row) = self.get(provider, user).await else {
                return Outcome::Missing;
            };
            if self.fresh(&row) {
                return Outcome::Fresh(row.access);
            }
            if row.refresh.is_empty() {
                return Outcome::Failed(row.reason);
            }
            let leased: Result<Option<RawRow>, sqlx::Error> = sqlx::query_as(&format!(
                "SELECT {RAW} FROM acquire_external_auth_link_refresh_lease($1, $2, $3)"
            ))
            .bind(provider)
            .bind(user)
            .bind(self.lease.as_millis() as i64)
            .fetch_optional(&self.pool)
            .await;
            let leased = match leased {
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some("23514")
                        && e.constraint() == Some("external_auth_link_active_lease") =>
                {
                    // coderd's RefreshLeaseInitialBackoff .. RefreshLeaseMaxBackoff.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                    continue;
                }
                Err(e) => panic!("lease: {e}"),
                Ok(None) => return Outcome::Missing,
                Ok(Some(r)) => self.decode(r),
            };
            let lease = leased.lease.expect("the claim set the lease");
            if leased.refresh != row.refresh || self.fresh(&leased) {
                self.release(provider, user, lease).await;
                if leased.refresh.is_empty() {
                    return Outcome::Failed(leased.reason);
                }
                return Outcome::Adopted(leased.access);
            }
            let out = match self.exchange(&leased.refresh).await {
                Ok((access, refresh, expires_in)) => {
                    let refresh = refresh.unwrap_or(leased.refresh.clone());
                    let expiry =
                        expires_in.map(|s| self.clock.now() + chrono::Duration::seconds(s));
                    assert!(
                        self.update(provider, user, Some(lease), &access, &refresh, expiry, "")
                            .await,
                        "coderd's lease-fenced write applies while it holds the lease"
                    );
                    Outcome::Refreshed(access)
                }
                Err(reason) => {
                    let now = self.get(provider, user).await;
                    match now {
                        Some(r) if r.refresh != leased.refresh => Outcome::Adopted(r.access),
                        None => Outcome::Missing,
                        Some(r) => {
                            self.update(
                                provider,
                                user,
                                Some(lease),
                                &r.access,
                                "",
                                Some(r.expiry),
                                &reason,
                            )
                            .await;
                            Outcome::Failed(reason)
                        }
                    }
                }
            };
            self.release(provider, user, lease).await;
            return out;
        }
    }

    /// The refresh grant (client_secret_post); `Err(reason)` on a rejection.
    async fn exchange(
        &self,
        refresh: &str,
    ) -> Result<(String, Option<String>, Option<i64>), String> {
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "refresh_token")
            .append_pair("refresh_token", refresh)
            .append_pair("client_id", &self.client_id)
            .append_pair("client_secret", &self.client_secret)
            .finish();
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let req = hyper::Request::post(&self.token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = client.request(req).await.expect("the IdP answers");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
            return Err(format!("oauth2: \"{err}\""));
        }
        Ok((
            v["access_token"].as_str().unwrap().to_string(),
            v.get("refresh_token")
                .and_then(|r| r.as_str())
                .map(str::to_string),
            v.get("expires_in").and_then(|e| e.as_i64()),
        ))
    }
}

/// The columns coderd's simulator reads.
const RAW: &str = "oauth_access_token, oauth_access_token_key_id, oauth_refresh_token, \
    oauth_refresh_token_key_id, oauth_expiry, oauth_refresh_failure_reason, refresh_lease_expires_at";

type RawRow = (
    String,
    Option<String>,
    String,
    Option<String>,
    DateTime<Utc>,
    String,
    Option<DateTime<Utc>>,
);

trait ZeroTime {
    fn year_is_zero(&self) -> bool;
}

impl ZeroTime for DateTime<Utc> {
    fn year_is_zero(&self) -> bool {
        use chrono::Datelike;
        self.year() <= 1
    }
}
