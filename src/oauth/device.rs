//! The device authorization grant (RFC 8628), for headless workspaces: ask the
//! provider for a user code, show it, and poll the token endpoint until the user
//! approved or denied it, or the code expired.
//!
//! The `oauth2` crate builds both requests and runs the poll loop (it honours
//! `interval`, adds 5 s on `slow_down`, keeps polling on `authorization_pending`
//! and backs off on transport errors); this module bounds every request, maps the
//! outcome to [`DeviceError`] and lets a shutdown stop the loop — only between
//! polls, never while a poll that may be answered with tokens is in flight.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use oauth2::basic::{BasicErrorResponse, BasicTokenType};
use oauth2::{
    AuthType, ClientSecret, DeviceAuthorizationUrl, DeviceCodeErrorResponseType, RequestTokenError,
    Scope, StandardDeviceAuthorizationResponse,
};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use super::{HttpClient, HttpError, OtherFields, ProviderClient, Refreshed};
use crate::config::{ClientAuth, ProviderConfig};

type TokenResp = oauth2::StandardTokenResponse<OtherFields, BasicTokenType>;

/// One provider's device flow.
pub struct DeviceFlow {
    client: ProviderClient,
    device_url: DeviceAuthorizationUrl,
    scopes: Vec<String>,
}

/// A started device authorization: what the user must see, and the device code
/// (a secret, kept inside) to poll with.
pub struct DeviceCode {
    /// The code the user types at `verification_uri`.
    pub user_code: String,
    /// Where the user goes.
    pub verification_uri: String,
    /// The same with the code filled in, when the provider offers it.
    pub verification_uri_complete: Option<String>,
    /// How long the codes are valid.
    pub expires_in: Duration,
    /// The provider's minimum time between polls.
    pub interval: Duration,
    details: StandardDeviceAuthorizationResponse,
}

impl std::fmt::Debug for DeviceCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCode")
            .field("user_code", &self.user_code)
            .field("verification_uri", &self.verification_uri)
            .field("device_code", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// Why a device flow ended without tokens. Messages carry no secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The user denied the request (`access_denied`).
    #[error("the user denied the authorization request (access_denied)")]
    Denied,
    /// The code expired before it was approved (`expired_token`).
    #[error("the code expired before it was approved (expired_token)")]
    Expired,
    /// The provider could not be reached or failed (try again later).
    #[error("the provider is unavailable: {0}")]
    Transient(String),
    /// The provider refused the request (another error code, or a bad answer).
    #[error("the provider refused the device flow: {0}")]
    Refused(String),
    /// Shutdown stopped the polling before the user approved.
    #[error("tokenproxy shut down before the code was approved")]
    Stopped,
}

impl DeviceError {
    /// A stable code for the audit trail: `access_denied`, `expired_token`,
    /// `provider_unavailable`, `provider_refused` or `shutdown`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Denied => "access_denied",
            Self::Expired => "expired_token",
            Self::Transient(_) => "provider_unavailable",
            Self::Refused(_) => "provider_refused",
            Self::Stopped => "shutdown",
        }
    }

    /// A short reason for status answers (`access_denied`, `expired_token`, …).
    pub fn reason(&self) -> String {
        match self {
            Self::Denied => "access_denied".into(),
            Self::Expired => "expired_token".into(),
            Self::Transient(m) => format!("provider_unavailable: {m}"),
            Self::Refused(m) => m.clone(),
            Self::Stopped => "shutdown".into(),
        }
    }
}

/// Longest one device-flow request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl DeviceFlow {
    /// The device flow of `cfg`; `Ok(None)` when it has no
    /// `device_authorization_url`.
    pub fn new(cfg: &ProviderConfig) -> Result<Option<Self>, String> {
        let Some(url) = &cfg.device_authorization_url else {
            return Ok(None);
        };
        Ok(Some(Self {
            client: ProviderClient::new(cfg)?,
            device_url: DeviceAuthorizationUrl::from_url(url.clone()),
            scopes: cfg.scopes.clone(),
        }))
    }

    /// Asks the provider for a device code and user code.
    pub async fn start(&self) -> Result<DeviceCode, DeviceError> {
        let c = &self.client;
        let client = self.oauth_client();
        let mut req = client.exchange_device_code();
        for s in &self.scopes {
            req = req.add_scope(Scope::new(s.clone()));
        }
        let http = Bounded(c.http.clone());
        let details: StandardDeviceAuthorizationResponse =
            req.request_async(&http).await.map_err(start_error)?;
        Ok(DeviceCode {
            user_code: details.user_code().secret().clone(),
            verification_uri: details.verification_uri().to_string(),
            verification_uri_complete: details
                .verification_uri_complete()
                .map(|u| u.secret().clone()),
            expires_in: details.expires_in(),
            interval: details.interval(),
            details,
        })
    }

    /// Polls until the user approved (the tokens), denied, or the code expired.
    /// When `stop` is cancelled, polling ends at the next wait between polls
    /// ([`DeviceError::Stopped`]); a poll already sent is always seen through, so
    /// tokens the provider issued are never dropped.
    pub async fn poll(
        &self,
        code: &DeviceCode,
        stop: &CancellationToken,
    ) -> Result<Refreshed, DeviceError> {
        let client = self.oauth_client();
        let http = Bounded(self.client.http.clone());
        let idle = Arc::new(tokio::sync::Notify::new());
        let sleep_idle = idle.clone();
        let stop = stop.clone();
        let sleep = move |d: Duration| {
            let stop = stop.clone();
            let idle = sleep_idle.clone();
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = stop.cancelled() => {
                        // Parked between polls: nothing is in flight, so the
                        // loop may end here.
                        idle.notify_one();
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
        let req = client.exchange_device_access_token(&code.details);
        let fut = req.request_async(&http, sleep, None);
        tokio::select! {
            r = fut => r.map(|t: TokenResp| self.client.accept(t)).map_err(poll_error),
            _ = idle.notified() => Err(DeviceError::Stopped),
        }
    }

    fn oauth_client(
        &self,
    ) -> oauth2::Client<
        BasicErrorResponse,
        TokenResp,
        oauth2::basic::BasicTokenIntrospectionResponse,
        oauth2::StandardRevocableToken,
        oauth2::basic::BasicRevocationErrorResponse,
        oauth2::EndpointNotSet,
        oauth2::EndpointSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointSet,
    > {
        let c = &self.client;
        let mut client = oauth2::Client::new(c.client_id.clone())
            .set_device_authorization_url(self.device_url.clone())
            .set_token_uri(c.token_url.clone())
            .set_auth_type(match c.auth {
                ClientAuth::ClientSecretBasic => AuthType::BasicAuth,
                ClientAuth::ClientSecretPost => AuthType::RequestBody,
            });
        if let Some(s) = &c.client_secret {
            client = client.set_client_secret(ClientSecret::new(s.expose_secret().to_string()));
        }
        client
    }
}

fn start_error(e: RequestTokenError<HttpError, BasicErrorResponse>) -> DeviceError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            DeviceError::Refused(super::printable_code(r.error().as_ref()))
        }
        RequestTokenError::Request(e @ (HttpError::Redirect(_) | HttpError::Request(_))) => {
            DeviceError::Refused(e.to_string())
        }
        RequestTokenError::Request(e) => DeviceError::Transient(e.to_string()),
        RequestTokenError::Parse(e, _) => DeviceError::Refused(format!(
            "unparseable device authorization response at {}",
            e.path()
        )),
        RequestTokenError::Other(m) => DeviceError::Refused(m),
    }
}

fn poll_error(e: RequestTokenError<HttpError, oauth2::DeviceCodeErrorResponse>) -> DeviceError {
    match e {
        RequestTokenError::ServerResponse(r) => match r.error() {
            DeviceCodeErrorResponseType::AccessDenied => DeviceError::Denied,
            DeviceCodeErrorResponseType::ExpiredToken => DeviceError::Expired,
            other => DeviceError::Refused(super::printable_code(other.as_ref())),
        },
        RequestTokenError::Request(e) => DeviceError::Transient(e.to_string()),
        RequestTokenError::Parse(e, _) => {
            DeviceError::Refused(format!("unparseable token response at {}", e.path()))
        }
        RequestTokenError::Other(m) => DeviceError::Refused(m),
    }
}

/// The shared client with a deadline on every request (the poll loop itself
/// sets none).
struct Bounded(HttpClient);

impl<'c> oauth2::AsyncHttpClient<'c> for Bounded {
    type Error = HttpError;
    type Future =
        Pin<Box<dyn Future<Output = Result<oauth2::HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(async move {
            tokio::time::timeout(REQUEST_TIMEOUT, self.0.send(request))
                .await
                .unwrap_or_else(|_| Err(HttpError::Interrupted("no answer in time".into())))
        })
    }
}
