//! What tokenproxy serves itself on the proxy listener, under the reserved prefix
//! `/_tokenproxy/` (no route may use it; config validation refuses one that does).
//!
//! The listener's handler sends every path under the prefix here in one early
//! branch, so none of this sits on the request pipeline's hot path. Today it serves
//! `GET /_tokenproxy/links`: the caller's own links, identified by its proxy
//! token, without any token value (with a `login_url` where relinking is
//! needed), browser sign-in under `oauth/` ([`super::login`]) and the device flow
//! (`/_tokenproxy/device/{provider}`, see `proxy::device`).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::caller::CallerIdentity;
use super::error::ProxyError;
use super::ProxyBody;
use crate::config::RESERVED_PREFIX;
use crate::store::LinkStore;

/// The endpoints under `/_tokenproxy/` and what they need.
pub struct Endpoints {
    store: Arc<dyn LinkStore>,
    /// Configured provider ids, in config order.
    providers: Vec<String>,
    /// Browser sign-in (`oauth/...`), when `server.public_url` is set.
    login: Option<super::login::Login>,
    /// Device-flow logins (`/_tokenproxy/device/{provider}`).
    device: Option<Arc<crate::links::device::DeviceLogins>>,
    /// Coder mode: Coder's re-link pages (`<coder.access_url>/external-auth/`).
    coder_login_base: Option<String>,
}

/// Whether `path` belongs to tokenproxy's own endpoints rather than a route.
pub fn is_reserved(path: &str) -> bool {
    path.starts_with(RESERVED_PREFIX) || path == RESERVED_PREFIX.trim_end_matches('/')
}

impl Endpoints {
    /// Endpoints over `store` for the configured `providers`.
    pub fn new(store: Arc<dyn LinkStore>, providers: Vec<String>) -> Self {
        Self {
            store,
            providers,
            login: None,
            device: None,
            coder_login_base: None,
        }
    }

    /// Adds browser sign-in (`/_tokenproxy/oauth/{provider}/login|callback`).
    pub fn with_login(mut self, login: Option<super::login::Login>) -> Self {
        self.login = login;
        self
    }

    /// A short-lived, single-use URL that starts a browser sign-in of `user` at
    /// `provider` (for `link_missing` / `reauth_required`); `None` without one.
    pub fn login_url(&self, provider: &str, user: uuid::Uuid) -> Option<String> {
        self.login
            .as_ref()?
            .login_url(provider, user, super::login::ERROR_LOGIN_TTL)
    }

    /// In Coder mode, sends users who must link again to Coder's external-auth
    /// page (`base` + provider id), as the pipeline's errors do.
    pub fn with_coder_login_base(mut self, base: Option<String>) -> Self {
        self.coder_login_base = base;
        self
    }

    /// Where `user` links `provider` again: Coder's page beside Coder, else
    /// tokenproxy's own sign-in ([`Self::login_url`]).
    fn relink_url(&self, provider: &str, user: uuid::Uuid) -> Option<String> {
        match &self.coder_login_base {
            Some(base) => Some(format!("{base}{provider}")),
            None => self.login_url(provider, user),
        }
    }

    /// Serves `/_tokenproxy/device/{provider}` with these device logins.
    pub fn with_device(mut self, device: Arc<crate::links::device::DeviceLogins>) -> Self {
        self.device = Some(device);
        self
    }

    /// Answers one request under the reserved prefix.
    pub async fn handle<B>(
        &self,
        req: &Request<B>,
        callers: &CallerIdentity,
    ) -> Response<ProxyBody> {
        match self.answer(req, callers).await {
            Ok(resp) => resp,
            Err(e) => e.to_response(None),
        }
    }

    async fn answer<B>(
        &self,
        req: &Request<B>,
        callers: &CallerIdentity,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let rest = req
            .uri()
            .path()
            .strip_prefix(RESERVED_PREFIX)
            .unwrap_or_default();
        if let Some((provider, action)) =
            rest.strip_prefix("oauth/").and_then(|r| r.split_once('/'))
        {
            return match &self.login {
                Some(login) => Ok(login.handle(req, callers, provider, action).await),
                None => Err(ProxyError::NoRoute),
            };
        }
        match rest {
            "links" => {
                if req.method() != Method::GET && req.method() != Method::HEAD {
                    return Err(ProxyError::BadRequest("only GET is served here"));
                }
                let caller = callers.identify(req.headers()).await?;
                let links = self
                    .store
                    .list_links(Some(caller.user_id))
                    .await
                    .map_err(|_| ProxyError::StoreUnavailable)?;
                let entries: Vec<serde_json::Value> = self
                    .providers
                    .iter()
                    .filter(|p| caller.may_use(p))
                    .map(|p| match links.iter().find(|l| &l.provider_id == p) {
                        Some(l) => serde_json::json!({
                            "provider": p,
                            "linked": true,
                            "linked_at": l.created_at,
                            "updated_at": l.updated_at,
                            "access_expiry": l.expiry,
                            "has_refresh_token": l.has_refresh_token,
                            "failure_reason": (!l.refresh_failure_reason.is_empty())
                                .then_some(&l.refresh_failure_reason),
                            "relink_needed": !l.refresh_failure_reason.is_empty(),
                            "login_url": (!l.refresh_failure_reason.is_empty())
                                .then(|| self.relink_url(p, caller.user_id))
                                .flatten(),
                        }),
                        None => serde_json::json!({
                            "provider": p,
                            "linked": false,
                            "relink_needed": true,
                            "login_url": self.relink_url(p, caller.user_id),
                        }),
                    })
                    .collect();
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"user": caller.user_id, "links": entries}),
                ))
            }
            _ => match (rest.strip_prefix("device/"), &self.device) {
                (Some(p), Some(device)) if self.providers.iter().any(|id| id == p) => {
                    super::device::handle(device, req, callers, p).await
                }
                _ => Err(ProxyError::NoRoute),
            },
        }
    }
}

/// A JSON answer that is never cached.
pub(super) fn json(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_paths() {
        assert!(is_reserved("/_tokenproxy/links"));
        assert!(is_reserved("/_tokenproxy"));
        assert!(!is_reserved("/_tokenproxyx/links"));
        assert!(!is_reserved("/github/api/_tokenproxy/links"));
    }
}
