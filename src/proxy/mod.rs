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
//! recognises CONNECT and absolute-form requests when `[forward]` is configured.
//! [`run`] takes
//! already-bound listeners so tests serve on port 0; [`serve`] is what
//! `tokenproxy serve` calls.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::config::{CallerMode, Config};
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

/// What [`run`] serves with.
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
                .map(|f| connect::ForwardMode::new(f, &config.server, &deps.metrics))
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
        remote: SocketAddr,
        tls: bool,
    ) -> Response<ProxyBody> {
        let conn = pipeline::ConnInfo { remote, tls };
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
            let ip = remote.ip();
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

/// The admin API's "refresh now", through the token lookup's flight.
struct AdminRefresh(Arc<dyn TokenLookup>);

#[async_trait::async_trait]
impl crate::admin::links::Refresh for AdminRefresh {
    async fn refresh_now(&self, provider: &str, user: Uuid) -> Result<bool, TokenError> {
        self.0
            .refresh_now(provider, user)
            .await
            .map(|(_, exchanged)| exchanged)
    }
}

/// The admin endpoints as a listener handler.
struct AdminHandler(crate::admin::AdminState);

impl server::Handler for AdminHandler {
    async fn call(
        self: Arc<Self>,
        req: Request<Incoming>,
        _remote: SocketAddr,
        _tls: bool,
    ) -> Response<ProxyBody> {
        use http_body_util::BodyExt;
        crate::admin::handle(&req, &self.0)
            .await
            .map(|b| b.map_err(|never| match never {}).boxed_unsync())
    }
}

/// Serves the proxy on `listener` and the admin endpoints on `admin` until
/// `shutdown` completes, then drains in-flight requests for
/// `server.shutdown_grace` and returns. Everything runs on the current runtime.
pub async fn run(
    listener: TcpListener,
    admin: TcpListener,
    deps: Deps,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_on(ProxyListener::Here(listener), admin, deps, shutdown)
        .await
        .map(drop)
}

/// [`run`], serving the proxy on one worker thread per listener (from
/// [`workers::bind`]) as `tokenproxy serve` does.
pub async fn run_workers(
    listeners: Vec<std::net::TcpListener>,
    admin: TcpListener,
    deps: Deps,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let workers = run_on(ProxyListener::Workers(listeners), admin, deps, shutdown).await?;
    if let Some(workers) = workers {
        workers.release().await;
    }
    Ok(())
}

/// Where the proxy listener is served.
enum ProxyListener {
    /// On the current runtime.
    Here(TcpListener),
    /// One worker thread per socket (see [`workers`]).
    Workers(Vec<std::net::TcpListener>),
}

/// [`run`], on worker threads when asked; returns the workers, drained, to be
/// released once nothing of the main runtime needs their runtimes any more.
async fn run_on(
    proxy: ProxyListener,
    admin: TcpListener,
    deps: Deps,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Option<workers::Workers>> {
    let config = deps.config.clone();
    let (addr, worker_count) = match &proxy {
        ProxyListener::Here(l) => (l.local_addr()?, 1),
        ProxyListener::Workers(ls) => (
            ls.first().context("no proxy listener")?.local_addr()?,
            ls.len(),
        ),
    };
    if config.callers.mode == CallerMode::Static && !addr.ip().is_loopback() {
        anyhow::bail!("static caller mode may only listen on loopback, not {addr}");
    }
    let pipeline = Arc::new(Pipeline::with_workers(&deps, worker_count)?);
    let tls = config
        .server
        .tls
        .as_ref()
        .map(server::tls_acceptor)
        .transpose()?;
    let signal = server::ShutdownSignal::from_future(shutdown);
    let limits = server::Limits::from_config(&config.server);
    let admin_addr = admin.local_addr()?;
    let admin_handler = Arc::new(AdminHandler(crate::admin::AdminState {
        store: deps.store.clone(),
        metrics: deps.metrics.clone(),
        links: crate::admin::links::LinkApi::new(
            &config,
            Arc::new(AdminRefresh(deps.tokens.clone())),
        ),
    }));
    let admin_limits = server::Limits {
        name: "admin",
        max_connections: 64,
        ..limits.clone()
    };
    let admin_task = tokio::spawn(server::serve(
        admin,
        admin_handler,
        admin_limits,
        None,
        None,
        signal.clone(),
    ));
    tracing::info!(%addr, admin = %admin_addr, tls = tls.is_some(), workers = worker_count, "listening");
    let workers = match proxy {
        ProxyListener::Here(listener) => {
            let metrics = Some(deps.metrics.clone());
            server::serve(listener, pipeline, limits, tls, metrics, signal).await;
            None
        }
        ProxyListener::Workers(listeners) => {
            let shared = workers::Shared {
                handler: pipeline,
                permits: server::connection_slots(&limits),
                limits,
                tls,
                metrics: deps.metrics.clone(),
                shutdown: signal,
            };
            let mut workers = workers::spawn(listeners, &shared).context("starting workers")?;
            drop(shared);
            workers.drained().await;
            Some(workers)
        }
    };
    admin_task.await.context("admin listener task")?;
    tracing::info!("stopped");
    Ok(workers)
}

/// `tokenproxy serve`: opens the store (applying migrations when
/// `database.migrate_on_start`), starts the token source and its background
/// work, binds both listeners, and serves until SIGTERM or SIGINT, then drains.
/// Tracing must already be initialised; `config` must be validated.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    use crate::tokens::SystemClock;

    // Postgres or SQLite, by the scheme of database.url.
    let store_dyn: Arc<dyn LinkStore> = crate::store::open_config(&config)?;
    if config.database.migrate_on_start {
        store_dyn.migrate().await.context("applying migrations")?;
    }
    if config.coder.is_some() {
        store_dyn
            .check_coder_database()
            .await
            .context("refusing the Coder database")?;
    }
    let metrics = match &config.server.replica_id {
        Some(id) => Metrics::for_replica(id),
        None => Metrics::new(),
    };
    // Every store call from here on is timed (store_query_duration_seconds).
    let observed = metrics.clone();
    let store_dyn: Arc<dyn LinkStore> = Arc::new(crate::store::timed::Timed::new(
        store_dyn,
        Arc::new(move |op, took| observed.store_query(op, took)),
    ));
    let tokens = TokenSource::new(
        store_dyn.clone(),
        &config.providers,
        &config.tokens,
        metrics.clone(),
        Arc::new(SystemClock),
    )?;
    let listeners = workers::bind(config.server.listen, workers::count())
        .with_context(|| format!("server.listen: cannot bind {}", config.server.listen))?;
    let admin = TcpListener::bind(config.server.admin_listen)
        .await
        .with_context(|| {
            format!(
                "server.admin_listen: cannot bind {}",
                config.server.admin_listen
            )
        })?;
    let background_stop = tokio_util::sync::CancellationToken::new();
    let background = tokens.spawn_background(background_stop.clone());
    let reports = tokio::spawn(reporting::run(
        store_dyn.clone(),
        metrics.clone(),
        background_stop.clone(),
    ));
    let lease_timeout = config.tokens.lease_timeout;
    let deps = Deps {
        config: Arc::new(config),
        store: store_dyn,
        tokens: tokens.clone(),
        metrics,
    };
    let signals = Signals::install();
    let (first, second) = signals.split();
    tokio::pin!(second);
    let result = tokio::select! {
        r = run_on(ProxyListener::Workers(listeners), admin, deps, first) => r,
        // An operator who signals again does not want to wait out the drain.
        () = &mut second => Err(anyhow::anyhow!(
            "second shutdown signal: stopped without waiting for in-flight requests"
        )),
    };
    background_stop.cancel();
    let _ = background.await;
    // Writes the authentication failures of the last, partial window.
    let _ = reports.await;
    if result.is_ok() {
        // Requests are drained; token exchanges they (or refresh-ahead) started may
        // still be between the provider's answer and the write. Wait for them —
        // at most a lease, after which another replica may take over anyway —
        // before any runtime is dropped.
        tokio::select! {
            _ = tokens.drain(lease_timeout) => {}
            () = &mut second => {
                tracing::warn!("second shutdown signal: not waiting for token exchanges");
            }
        }
    }
    if let Ok(Some(workers)) = result {
        workers.release().await;
        return Ok(());
    }
    result.map(drop)
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    Signals::install().next().await;
}

/// SIGTERM and SIGINT listeners, installed once so a second signal is not lost
/// while the first one is being handled.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Completes on the next SIGTERM or SIGINT.
    async fn next(&mut self) {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = recv(&mut self.term) => {}
            () = recv(&mut self.int) => {}
        }
    }

    /// Two futures: the first completes on the first signal (begin draining), the
    /// second on the one after it (stop now).
    fn split(
        mut self,
    ) -> (
        impl Future<Output = ()> + Send + 'static,
        impl Future<Output = ()> + Send + 'static,
    ) {
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        let (second_tx, second_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            self.next().await;
            tracing::info!("shutdown signal received; draining (signal again to stop now)");
            let _ = first_tx.send(());
            self.next().await;
            tracing::warn!("second shutdown signal received; stopping now");
            let _ = second_tx.send(());
        });
        let first = async move {
            let _ = first_rx.await;
        };
        let second = async move {
            // A dropped sender (no signal support) never fires.
            if second_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        (first, second)
    }
}
