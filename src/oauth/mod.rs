//! Talking to identity providers: the refresh-token grant and classification of
//! its errors into permanent (the refresh token is dead: the user must log in again)
//! and transient (try later; nothing about the link changes).
//!
//! The grant itself is built and parsed by the `oauth2` crate; [`http`] carries it
//! over our rustls client. This module adds what a proxy needs on top: a deadline
//! per provider, bounded retries with backoff (honouring `Retry-After`) inside a
//! caller-given budget, `extra_fields` kept for `oauth_extra`, and a careful line
//! between "this user's grant is dead" and "this proxy is misconfigured" — an
//! `invalid_client` must never mark every user's link as broken.

pub mod authorize;
pub mod device;
pub mod http;
mod id_token;
pub mod presets;
pub mod revoke;
pub mod ticket;

use std::collections::HashMap;
use std::time::Duration;

use oauth2::basic::{BasicErrorResponse, BasicErrorResponseType, BasicTokenType};
use oauth2::{
    AuthType, ClientId, ClientSecret, RefreshToken, RequestTokenError, StandardTokenResponse,
    TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::{ClientAuth, ProviderConfig};

pub use self::http::{HttpClient, HttpError};

/// Every field of a token response that `oauth2` does not model itself.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct OtherFields {
    /// Field name → value.
    #[serde(flatten)]
    pub fields: HashMap<String, serde_json::Value>,
}

/// Names only: the values may be credentials too (an OIDC `id_token`, a
/// provider's second token), and `oauth2`'s own `Debug` of a token response
/// prints this.
impl std::fmt::Debug for OtherFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&str> = self.fields.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("OtherFields")
            .field("fields", &names)
            .finish_non_exhaustive()
    }
}
impl oauth2::ExtraTokenFields for OtherFields {}

pub(crate) type TokenResp = StandardTokenResponse<OtherFields, BasicTokenType>;

/// A successful refresh. Secrets stay wrapped.
pub struct Refreshed {
    /// The new access token.
    pub access_token: SecretString,
    /// The new refresh token, when the provider rotated it (`None` = keep the old one).
    pub refresh_token: Option<SecretString>,
    /// `expires_in`; `None` = the token does not expire.
    pub expires_in: Option<Duration>,
    /// The configured `extra_fields` found in the response, for `oauth_extra`.
    pub extra: Option<serde_json::Value>,
}

impl std::fmt::Debug for Refreshed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refreshed")
            .field("access_token", &"[redacted]")
            .field("rotated", &self.refresh_token.is_some())
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// Why a refresh failed. Messages carry no secret.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RefreshError {
    /// The provider rejected this refresh token for good (`invalid_grant` and equivalents).
    #[error("refresh token rejected: {0}")]
    Rejected(String),
    /// Timeout, connection failure, 5xx or 429: try again later — not before
    /// `retry_after` when the provider said so (`Retry-After`).
    #[error("token endpoint unavailable: {reason}")]
    Transient {
        /// What failed (no secret).
        reason: String,
        /// The provider's `Retry-After` on its last answer, if any.
        retry_after: Option<Duration>,
    },
    /// The provider rejected the client or the request (e.g. `invalid_client`): a proxy
    /// configuration problem, not the user's; nothing is recorded on the link.
    #[error("token endpoint rejected the client or request: {0}")]
    Misconfigured(String),
}

impl RefreshError {
    /// A transient failure without a `Retry-After`.
    pub fn transient(reason: impl Into<String>) -> Self {
        Self::Transient {
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// How long the provider asked us to wait (`Retry-After`), if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether the provider rejected our client itself (wrong secret, client not
    /// allowed the grant): true for every user until the configuration changes.
    pub fn is_client_rejected(&self) -> bool {
        matches!(self, Self::Misconfigured(code) if code == "invalid_client" || code == "unauthorized_client")
    }
}

/// OAuth error codes meaning "this refresh token is dead" rather than "this client
/// is wrong". GitHub says `bad_refresh_token` (with HTTP 200). Microsoft Entra and
/// OIDC providers answer `interaction_required`, `login_required` or
/// `consent_required` when the refresh token cannot be used until the user signs
/// in again (MFA, conditional access, revoked consent): the user must act, and
/// asking the provider again on every request cannot help.
const PERMANENT_CODES: &[&str] = &[
    "invalid_grant",
    "bad_refresh_token",
    "interaction_required",
    "login_required",
    "consent_required",
];

/// Classifies an OAuth `error` code.
pub fn classify_error_code(code: &str) -> RefreshError {
    if PERMANENT_CODES.contains(&code) {
        RefreshError::Rejected(code.to_string())
    } else if code == "temporarily_unavailable" || code == "slow_down" {
        RefreshError::transient(code)
    } else {
        RefreshError::Misconfigured(code.to_string())
    }
}

/// Longest access-token lifetime believed; a provider claiming more gets this.
pub const MAX_EXPIRES_IN: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// One provider's token endpoint, ready to refresh.
pub struct ProviderClient {
    id: String,
    client_id: ClientId,
    client_secret: Option<SecretString>,
    token_url: TokenUrl,
    auth: ClientAuth,
    timeout: Duration,
    extra_params: Vec<(String, SecretString)>,
    extra_fields: Vec<String>,
    quirks: presets::Quirks,
    http: HttpClient,
}

/// How long to wait before retry `attempt` (1-based) when the provider gave no hint.
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100) * 2u32.saturating_pow(attempt.saturating_sub(1));
    let capped = base.min(Duration::from_secs(2));
    // Jitter: 50-100 % of the step, so replicas retrying together spread out.
    capped.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

impl ProviderClient {
    /// Builds the client for one configured provider.
    pub fn new(cfg: &ProviderConfig) -> Result<Self, String> {
        if cfg.needs_discovery {
            // The token URL is a placeholder until the issuer's document is read.
            return Err(format!(
                "provider {}: OIDC discovery has not run for its issuer",
                cfg.id
            ));
        }
        let http = HttpClient::new(cfg.token_ca.as_deref())
            .map_err(|e| format!("provider {}: {e}", cfg.id))?;
        Ok(Self {
            id: cfg.id.clone(),
            client_id: ClientId::new(cfg.client_id.clone()),
            client_secret: cfg.client_secret.clone(),
            token_url: TokenUrl::from_url(cfg.token_url.clone()),
            auth: cfg.client_auth,
            timeout: cfg.timeout,
            extra_params: cfg
                .extra_params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            extra_fields: cfg.extra_fields.clone(),
            quirks: presets::Quirks::of(cfg.preset.as_deref()),
            http,
        })
    }

    /// The provider id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The time one attempt is guaranteed (`providers[].timeout`): an exchange
    /// starts an attempt only while at least this much of its budget is left.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Refreshes, retrying transient failures with backoff while `budget` lasts.
    ///
    /// The budget is the one deadline of the whole exchange. Only answers that
    /// prove the grant was not processed are retried (connection refused, 5xx,
    /// 429), and a retry starts only when a full `providers[].timeout` of the
    /// budget is left for it. An attempt in flight is never abandoned before the
    /// budget ends, and never followed by another after a timeout: the provider
    /// may have processed it and rotated the refresh token, so giving up early
    /// loses the new one, and replaying the old one would be answered
    /// `invalid_grant` — which would wrongly look permanent.
    pub async fn refresh(
        &self,
        refresh_token: &SecretString,
        budget: Duration,
    ) -> Result<Refreshed, RefreshError> {
        let deadline = tokio::time::Instant::now() + budget;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .is_zero()
            {
                return Err(RefreshError::transient("refresh budget exhausted"));
            }
            let (err, hint) =
                match tokio::time::timeout_at(deadline, self.exchange_once(refresh_token)).await {
                    Err(_) => {
                        return Err(RefreshError::transient(format!(
                            "no answer within the refresh budget ({budget:?})"
                        )))
                    }
                    Ok(Ok(r)) => return Ok(r),
                    Ok(Err(Attempt::Done(e))) => return Err(e),
                    Ok(Err(Attempt::Retry(msg, hint))) => (msg, hint),
                };
            let wait = hint.unwrap_or_else(|| backoff(attempt));
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if attempt >= 4 || wait + self.timeout > left {
                // The hint outlives this exchange: the link's backoff honours it.
                return Err(RefreshError::Transient {
                    reason: err,
                    retry_after: hint,
                });
            }
            tracing::debug!(provider = %self.id, attempt, ?wait, error = %err, "retrying refresh");
            tokio::time::sleep(wait).await;
        }
    }

    async fn exchange_once(&self, refresh_token: &SecretString) -> Result<Refreshed, Attempt> {
        let mut client = oauth2::Client::<
            BasicErrorResponse,
            TokenResp,
            oauth2::basic::BasicTokenIntrospectionResponse,
            oauth2::StandardRevocableToken,
            oauth2::basic::BasicRevocationErrorResponse,
        >::new(self.client_id.clone())
        .set_token_uri(self.token_url.clone())
        .set_auth_type(match self.auth {
            ClientAuth::ClientSecretBasic => AuthType::BasicAuth,
            ClientAuth::ClientSecretPost => AuthType::RequestBody,
        });
        if let Some(s) = &self.client_secret {
            client = client.set_client_secret(ClientSecret::new(s.expose_secret().to_string()));
        }
        let rt = RefreshToken::new(refresh_token.expose_secret().to_string());
        let mut req = client.exchange_refresh_token(&rt);
        for (k, v) in &self.extra_params {
            req = req.add_extra_param(k.as_str(), v.expose_secret().to_string());
        }
        match req.request_async(&self.http).await {
            Ok(resp) => Ok(self.accept(resp)),
            Err(e) => Err(classify(e, self.quirks)),
        }
    }

    fn accept(&self, resp: TokenResp) -> Refreshed {
        accept(&self.extra_fields, resp)
    }
}

/// The token values of a successful answer, with the configured `extra_fields`
/// kept for `oauth_extra`.
pub(crate) fn accept(extra_fields: &[String], resp: TokenResp) -> Refreshed {
    // Look the configured fields up in the whole response (standard fields such
    // as `scope` included), never copying a token value into `oauth_extra`.
    let all = serde_json::to_value(&resp).unwrap_or_default();
    let extra: serde_json::Map<String, serde_json::Value> = extra_fields
        .iter()
        .filter(|k| !matches!(k.as_str(), "access_token" | "refresh_token"))
        .filter_map(|k| all.get(k).map(|v| (k.clone(), v.clone())))
        .collect();
    let mut extra = extra;
    // Relative to this answer, so useless once stored: keep the instant too.
    if let Some(secs) = extra
        .get("refresh_token_expires_in")
        .and_then(serde_json::Value::as_u64)
        .filter(|s| *s < MAX_EXPIRES_IN.as_secs())
    {
        let at = chrono::Utc::now() + chrono::Duration::seconds(secs as i64);
        extra.insert(
            "refresh_token_expires_at".into(),
            serde_json::Value::String(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        );
    }
    Refreshed {
        access_token: SecretString::from(resp.access_token().secret().to_string()),
        refresh_token: resp
            .refresh_token()
            .map(|r| r.secret())
            .filter(|r| !r.is_empty())
            .map(|r| SecretString::from(r.to_string())),
        // Capped so `now + expires_in` can never overflow a timestamp (which
        // would panic after the provider has already rotated the token).
        expires_in: resp
            .expires_in()
            .filter(|d| !d.is_zero())
            .map(|d| d.min(MAX_EXPIRES_IN)),
        extra: (!extra.is_empty()).then_some(serde_json::Value::Object(extra)),
    }
}

/// A provider's own error code as we may repeat it in logs and errors. Real codes
/// are snake_case words; anything else (a provider that echoes the request puts a
/// token there) is not repeated.
pub(crate) fn printable_code(code: &str) -> String {
    let plain = !code.is_empty()
        && code.len() <= 48
        && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    if plain {
        code.to_string()
    } else {
        "unrecognised error code".to_string()
    }
}

/// One attempt's failure: final, or worth retrying (with the provider's hint).
enum Attempt {
    Done(RefreshError),
    Retry(String, Option<Duration>),
}

fn classify(
    e: RequestTokenError<HttpError, BasicErrorResponse>,
    quirks: presets::Quirks,
) -> Attempt {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let raw = r.error().to_string();
            if quirks.is_dead_grant(&raw, r.error_description().map(String::as_str)) {
                return Attempt::Done(RefreshError::Rejected(format!(
                    "{raw}: refresh token already used"
                )));
            }
            let code = match r.error() {
                BasicErrorResponseType::InvalidGrant => "invalid_grant".to_string(),
                BasicErrorResponseType::InvalidClient => "invalid_client".to_string(),
                BasicErrorResponseType::InvalidRequest => "invalid_request".to_string(),
                BasicErrorResponseType::InvalidScope => "invalid_scope".to_string(),
                BasicErrorResponseType::UnauthorizedClient => "unauthorized_client".to_string(),
                BasicErrorResponseType::UnsupportedGrantType => {
                    "unsupported_grant_type".to_string()
                }
                BasicErrorResponseType::Extension(s) => printable_code(s),
            };
            match classify_error_code(&code) {
                RefreshError::Transient { reason, .. } => Attempt::Retry(reason, None),
                other => Attempt::Done(other),
            }
        }
        RequestTokenError::Request(HttpError::Status {
            status,
            retry_after,
        }) => Attempt::Retry(format!("HTTP {status}"), retry_after),
        RequestTokenError::Request(HttpError::Connect(m)) => Attempt::Retry(m, None),
        // The provider may have rotated the token already: replaying the old one
        // would earn an `invalid_grant` that looks permanent. Report, don't retry.
        RequestTokenError::Request(e @ (HttpError::Interrupted(_) | HttpError::Body(_))) => {
            Attempt::Done(RefreshError::transient(e.to_string()))
        }
        RequestTokenError::Request(e) => Attempt::Done(RefreshError::Misconfigured(e.to_string())),
        // Bodies may echo tokens: report only where parsing failed.
        RequestTokenError::Parse(e, _) => Attempt::Done(RefreshError::Misconfigured(format!(
            "unparseable token response at {}",
            e.path()
        ))),
        // Empty or non-JSON answers: the grant may have been processed; do not replay.
        RequestTokenError::Other(m) => Attempt::Done(RefreshError::transient(m)),
    }
}

// Keeps the refresh future `Send` (it runs inside spawned flights); a closure-based
// transport loses that to higher-ranked lifetime inference.
#[allow(dead_code)]
fn _assert_send(p: &'static ProviderClient, s: &'static SecretString) {
    fn is_send<T: Send>(_: T) {}
    is_send(p.refresh(s, Duration::from_secs(1)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_client_is_not_permanent_for_the_user() {
        assert!(matches!(
            classify_error_code("invalid_client"),
            RefreshError::Misconfigured(_)
        ));
        assert!(matches!(
            classify_error_code("unauthorized_client"),
            RefreshError::Misconfigured(_)
        ));
    }

    #[test]
    fn rejected_codes() {
        for c in ["invalid_grant", "bad_refresh_token"] {
            assert_eq!(classify_error_code(c), RefreshError::Rejected(c.into()));
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        // Jitter is random: sample each step many times and check both bounds, so a
        // zero (or uncapped, or flat) backoff fails.
        let ms = Duration::from_millis;
        for _ in 0..200 {
            for (attempt, step) in [(1, ms(100)), (2, ms(200)), (3, ms(400)), (10, ms(2000))] {
                let b = backoff(attempt);
                assert!(
                    b >= step / 2 && b <= step,
                    "backoff({attempt}) = {b:?}, want 50-100 % of {step:?}"
                );
            }
            assert!(backoff(40) <= ms(2000), "capped however many attempts");
        }
    }
}
