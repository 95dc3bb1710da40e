//! The operator link API on the admin listener, behind `[admin] token`:
//!
//! - `GET /links[?user=UUID][&provider=ID]` — stored links;
//! - `GET /links/{provider}/{user}` — one link (`linked: false` when none);
//! - `POST /links/{provider}/{user}/refresh` — refresh now, through the token
//!   source's flight (concurrent calls share one exchange);
//! - `DELETE /links/{provider}/{user}[?keep_grant=true]` — revoke at the provider,
//!   then delete.
//!
//! Every answer is JSON and none carries a token value. Without the right
//! `Authorization: Bearer <token>` the answer is 401; the token is compared in
//! constant time (as SHA-256 digests, so its length does not leak either).
//! Without `[admin] token` configured the API is off (404).

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::error;
use crate::config::{Config, ProviderConfig};
use crate::links::{self, LinkStatus};
use crate::store::LinkStore;
use crate::tokens::TokenError;

/// "Refresh now" as the API needs it: `true` when this call's flight exchanged.
#[async_trait::async_trait]
pub trait Refresh: Send + Sync + 'static {
    /// Refreshes the link through the flight.
    async fn refresh_now(&self, provider: &str, user: Uuid) -> Result<bool, TokenError>;
}

/// The link API's configuration and collaborators.
pub struct LinkApi {
    token: Option<[u8; 32]>,
    providers: Vec<ProviderConfig>,
    refresh: Arc<dyn Refresh>,
}

impl LinkApi {
    /// The API for `cfg` (off without `[admin] token`).
    pub fn new(cfg: &Config, refresh: Arc<dyn Refresh>) -> Arc<Self> {
        Arc::new(Self {
            token: cfg.admin.token.as_ref().map(digest),
            providers: cfg.providers.clone(),
            refresh,
        })
    }
}

fn digest(s: &SecretString) -> [u8; 32] {
    Sha256::digest(s.expose_secret().as_bytes()).into()
}

/// Whether `path` belongs to the link API.
pub fn is_link_path(path: &str) -> bool {
    path == "/links" || path.starts_with("/links/")
}

type Answer = Response<Full<Bytes>>;

fn json(status: StatusCode, body: &serde_json::Value) -> Answer {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}

/// Answers one link API request.
pub async fn handle<B>(req: &Request<B>, api: &LinkApi, store: &dyn LinkStore) -> Answer {
    let Some(expected) = &api.token else {
        return error(
            StatusCode::NOT_FOUND,
            "no_route",
            "the link API is off: set [admin] token to use it",
        );
    };
    if !authorized(req, expected) {
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "the link API needs Authorization: Bearer <[admin] token>",
        );
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"tokenproxy-admin\""),
        );
        return resp;
    }
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let segments: Vec<&str> = req
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .collect();
    let now = chrono::Utc::now();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["links"]) => {
            let user = match param("user").map(Uuid::parse_str).transpose() {
                Ok(u) => u,
                Err(_) => return bad_request("user must be a UUID"),
            };
            match links::statuses(store, user, param("provider"), now).await {
                Ok(list) => json(StatusCode::OK, &serde_json::json!({ "links": list })),
                Err(_) => store_unavailable(),
            }
        }
        (m, ["links", provider, user, rest @ ..]) => {
            let Some(p) = api.providers.iter().find(|p| p.id == *provider) else {
                return error(StatusCode::NOT_FOUND, "no_route", "unknown provider");
            };
            let Ok(user) = Uuid::parse_str(user) else {
                return bad_request("user must be a UUID");
            };
            match (m, rest) {
                (&Method::GET, []) => match links::status(store, &p.id, user, now).await {
                    Ok(s) => json(StatusCode::OK, &serde_json::to_value(s).unwrap_or_default()),
                    Err(_) => store_unavailable(),
                },
                (&Method::POST, ["refresh"]) => refresh(api, store, &p.id, user).await,
                (&Method::DELETE, []) => delete(store, p, user, param("keep_grant")).await,
                _ => bad_request("unknown method or path under /links"),
            }
        }
        _ => bad_request("unknown method or path under /links"),
    }
}

fn authorized<B>(req: &Request<B>, expected: &[u8; 32]) -> bool {
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| -> [u8; 32] { Sha256::digest(t.trim().as_bytes()).into() });
    presented.is_some_and(|p| crate::crypto::same_bytes(&p, expected))
}

fn bad_request(message: &str) -> Answer {
    error(StatusCode::BAD_REQUEST, "bad_request", message)
}

fn store_unavailable() -> Answer {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the link store is unavailable",
    )
}

async fn refresh(api: &LinkApi, store: &dyn LinkStore, provider: &str, user: Uuid) -> Answer {
    let exchanged = match api.refresh.refresh_now(provider, user).await {
        Ok(e) => e,
        Err(e) => {
            let (status, code) = match e {
                TokenError::LinkMissing => (StatusCode::FORBIDDEN, "link_missing"),
                TokenError::ReauthRequired => (StatusCode::FORBIDDEN, "reauth_required"),
                TokenError::IdpUnavailable => (StatusCode::BAD_GATEWAY, "idp_unavailable"),
                TokenError::StoreUnavailable => {
                    (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
                }
            };
            return error(status, code, &e.to_string());
        }
    };
    let link = links::status(store, provider, user, chrono::Utc::now())
        .await
        .unwrap_or_else(|_| LinkStatus::missing(provider, user));
    json(
        StatusCode::OK,
        &serde_json::json!({ "refreshed": exchanged, "link": link }),
    )
}

async fn delete(
    store: &dyn LinkStore,
    provider: &ProviderConfig,
    user: Uuid,
    keep_grant: Option<&str>,
) -> Answer {
    let keep = matches!(keep_grant, Some("true" | "1" | "yes"));
    match links::unlink(
        store,
        provider,
        user,
        keep,
        crate::telemetry::audit::Actor::Api,
    )
    .await
    {
        Ok(Some(r)) => json(
            StatusCode::OK,
            &serde_json::json!({
                "deleted": true,
                "revocation": r.as_str(),
                "revocation_error": r.error(),
            }),
        ),
        Ok(None) => error(StatusCode::FORBIDDEN, "link_missing", "no such link"),
        Err(_) => store_unavailable(),
    }
}
