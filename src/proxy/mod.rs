//! The proxy: listener → caller identity → route → token → inject → forward →
//! respond.
//!
//! Each phase lives in its own module, named after it, so anyone can find where a
//! thing happens: [`server`] (listener, limits, graceful shutdown), [`caller`]
//! (who is calling), [`route`] (where the request goes, path safety), [`inject`]
//! (attaching the credential), [`headers`] (hop-by-hop and forwarding headers),
//! [`upstream`] (the pooled upstream client), [`error`] (the one mapping from
//! failures to responses) and [`pipeline`] (the phases in order). Forward mode
//! (`HTTPS_PROXY`) adds [`connect`] (CONNECT tunnels, interception) and [`ca`]
//! (the CA minting leaf certificates); it is served on the same listener, which
//! recognises CONNECT and absolute-form requests when `[forward]` is configured;
//! [`tunnel`] holds what forward mode carries into the pipeline. The listeners,
//! the admin endpoints and the token source are wired together above this
//! module, in `crate::app`.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use uuid::Uuid;

use crate::config::Config;
use crate::store::LinkStore;
use crate::telemetry::Metrics;
use crate::tokens::{AccessToken, TokenError, TokenSource};

pub mod abuse;
pub mod body;
pub mod ca;
pub mod caller;
pub mod caller_coder;
pub mod connect;
mod device;
pub mod endpoints;
pub mod error;
pub mod h1pool;
pub mod headers;
pub mod inject;
pub mod login;
pub mod login_page;
pub mod pipeline;
pub mod prewarm;
pub mod rejection;
pub mod reporting;
pub mod route;
pub mod server;
pub mod slots;
pub mod tick;
pub mod tunnel;
pub mod upstream;
pub mod workers;

pub use error::ProxyError;
pub use pipeline::Pipeline;

/// Error type of bodies tokenproxy sends (either direction).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request or response body: the caller's or upstream's stream, or our own bytes.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// What the token phase needs from the token source. [`TokenSource`] is the real
/// one; tests may substitute their own.
#[async_trait::async_trait]
pub trait TokenLookup: Send + Sync + 'static {
    /// A usable access token for `user` at `provider`.
    async fn get(&self, provider: &str, user: Uuid) -> Result<AccessToken, TokenError>;
    /// The token when it is at hand (a cache hit), without a future; `None`
    /// means "call [`TokenLookup::get`]", never "no token".
    fn get_cached(&self, _provider: &str, _user: Uuid) -> Option<AccessToken> {
        None
    }
    /// A replacement for a token the upstream rejected (see
    /// [`TokenSource::refresh_rejected`]).
    async fn refresh_rejected(
        &self,
        provider: &str,
        user: Uuid,
        rejected: &AccessToken,
    ) -> Result<AccessToken, TokenError>;
    /// How long a caller answered `idp_unavailable` should wait (`Retry-After`).
    fn retry_after(&self, _provider: &str, _user: Uuid) -> Option<std::time::Duration> {
        None
    }
    /// Refreshes now through the flight (the admin API) and says whether this
    /// call exchanged; doubles without a flight answer [`TokenLookup::get`].
    async fn refresh_now(
        &self,
        provider: &str,
        user: Uuid,
    ) -> Result<(AccessToken, bool), TokenError> {
        self.get(provider, user).await.map(|t| (t, false))
    }
    /// This process just wrote `user`'s link at `provider` (a sign-in): forget
    /// what was cached or remembered for it. Doubles may ignore it.
    async fn link_changed(&self, _provider: &str, _user: Uuid) {}
    /// Where background link work (device-flow polls) runs and the token that
    /// stops it at shutdown; `None` = a private tracker, never stopped.
    fn shutdown_handles(
        &self,
    ) -> Option<(
        tokio_util::task::TaskTracker,
        tokio_util::sync::CancellationToken,
    )> {
        None
    }
}

#[async_trait::async_trait]
impl TokenLookup for TokenSource {
    async fn get(&self, provider: &str, user: Uuid) -> Result<AccessToken, TokenError> {
        TokenSource::get(self, provider, user).await
    }
    fn get_cached(&self, provider: &str, user: Uuid) -> Option<AccessToken> {
        TokenSource::get_cached(self, provider, user)
    }
    async fn refresh_rejected(
        &self,
        provider: &str,
        user: Uuid,
        rejected: &AccessToken,
    ) -> Result<AccessToken, TokenError> {
        TokenSource::refresh_rejected(self, provider, user, rejected).await
    }
    fn retry_after(&self, provider: &str, user: Uuid) -> Option<std::time::Duration> {
        TokenSource::retry_after(self, provider, user)
    }
    async fn refresh_now(
        &self,
        provider: &str,
        user: Uuid,
    ) -> Result<(AccessToken, bool), TokenError> {
        TokenSource::refresh_now(self, provider, user).await
    }
    async fn link_changed(&self, provider: &str, user: Uuid) {
        TokenSource::link_changed(self, provider, user).await;
    }
    fn shutdown_handles(
        &self,
    ) -> Option<(
        tokio_util::task::TaskTracker,
        tokio_util::sync::CancellationToken,
    )> {
        Some(TokenSource::shutdown_handles(self))
    }
}

/// What the proxy serves with (`crate::app::run` takes it).
#[derive(Clone)]
pub struct Deps {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Links and proxy tokens.
    pub store: Arc<dyn LinkStore>,
    /// Access tokens.
    pub tokens: Arc<dyn TokenLookup>,
    /// Metrics, served on the admin listener.
    pub metrics: Arc<Metrics>,
}

impl Pipeline {
    /// Prepares routes, caller identification and upstream clients from `deps`.
    pub fn new(deps: &Deps) -> anyhow::Result<Self> {
        Self::with_workers(deps, 1)
    }

    /// [`Pipeline::new`] with one set of upstream clients per worker thread.
    pub fn with_workers(deps: &Deps, workers: usize) -> anyhow::Result<Self> {
        let config = &deps.config;
        let router = route::Router::from_config(config)
            .map_err(|m| anyhow::anyhow!("providers.routes: {m}"))?;
        let upstreams = upstream::Upstreams::new(
            &config.server,
            router.routes().iter().map(|r| r.client_key().clone()),
            workers,
        )?;
        Ok(Self {
            router,
            callers: caller::CallerIdentity::new(&config.callers, deps.store.clone())
                .with_proxy_tokens_beside_agents(
                    config.coder.as_ref().is_some_and(|c| c.proxy_tokens),
                )
                .with_audit(deps.metrics.clone()),
            endpoints: endpoints::Endpoints::new(
                deps.store.clone(),
                config.providers.iter().map(|p| p.id.clone()).collect(),
            )
            .with_login(
                login::Login::from_config(config, deps.store.clone())?
                    .map(|l| l.with_tokens(deps.tokens.clone())),
            )
            .with_device(device_logins(deps))
            .with_coder_login_base(config.coder.as_ref().and_then(|c| c.login_url(""))),
            coder_login_base: config.coder.as_ref().and_then(|c| c.login_url("")),
            tokens: deps.tokens.clone(),
            upstreams,
            metrics: deps.metrics.clone(),
            forwarded_headers: config.server.forwarded_headers,
            body_timeout: config.server.header_read_timeout,
            body_idle_timeout: config.server.body_idle_timeout,
            retry_budget: body::RetryBudget::new(config.server.retry_buffer_budget),
            auth_failures: abuse::AuthFailures::new(
                config.callers.auth_failure_limit,
                config.callers.auth_failure_window,
            ),
            forward: config
                .forward
                .as_ref()
                .map(|f| tunnel::ForwardMode::new(f, &config.server, &deps.metrics))
                .transpose()?,
        })
    }
}

/// The device-flow logins, polling on the token source's tracker so a drain
/// waits for them.
fn device_logins(deps: &Deps) -> Arc<crate::links::device::DeviceLogins> {
    let (tasks, stop) = deps.tokens.shutdown_handles().unwrap_or_default();
    let tokens = deps.tokens.clone();
    Arc::new(
        crate::links::device::DeviceLogins::new(
            deps.store.clone(),
            &deps.config.providers,
            tasks,
            stop,
        )
        .with_on_linked(Arc::new(move |provider, user| {
            let tokens = tokens.clone();
            Box::pin(async move { tokens.link_changed(&provider, user).await })
        })),
    )
}

impl server::Handler for Pipeline {
    async fn call(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: server::ConnInfo,
    ) -> Response<ProxyBody> {
        // CONNECT over HTTP/2 (RFC 8441) is not supported: the pipeline refuses it
        // with 400 rather than opening a tunnel inside a stream.
        if req.method() == http::Method::CONNECT
            && self.forward.is_some()
            && req.version() != http::Version::HTTP_2
        {
            return connect::handle(self, req, conn).await;
        }
        // tokenproxy's own endpoints: one branch, off the pipeline's phases.
        if endpoints::is_reserved(req.uri().path()) {
            // The same failed-auth limit as the proxied paths: these endpoints
            // verify caller tokens too, so they must not be a free oracle.
            let ip = conn.remote.ip();
            if let Err(e) = self.auth_failures.check(ip) {
                return e.to_response(None);
            }
            let resp = self.endpoints.handle(&req, &self.callers).await;
            if resp.status() == http::StatusCode::UNAUTHORIZED {
                let err = self
                    .auth_failures
                    .failed(ip, req.headers(), ProxyError::Unauthenticated);
                if !matches!(err, ProxyError::Unauthenticated) {
                    return err.to_response(None);
                }
            }
            return resp;
        }
        self.handle(req, conn).await
    }
}
