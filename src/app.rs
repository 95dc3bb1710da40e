//! The application: `tokenproxy serve` from a validated config to the listeners
//! and back. [`serve`] opens the store (migrating when asked), builds the token
//! source and its background work, binds the proxy's worker sockets and the
//! admin listener, and hands them to `run_on`; on SIGTERM/SIGINT the listeners
//! drain, background work stops and in-flight token exchanges get a lease to
//! finish. [`run`] and [`run_workers`] take already-bound listeners, so tests
//! serve the real thing on port 0.
//!
//! This is the one module that knows every part: the proxy (`proxy`), the admin
//! endpoints (`admin`), the token source (`tokens`) and the store (`store`) are
//! wired together here and nowhere below.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::config::{CallerMode, Config};
use crate::proxy::server::{self, ConnInfo};
use crate::proxy::{reporting, workers, Deps, Pipeline, ProxyBody, TokenLookup};
use crate::store::LinkStore;
use crate::telemetry::Metrics;
use crate::tokens::{TokenError, TokenSource};

/// The target of the lifecycle lines (`listening`, `stopped`, signals): the
/// README documents `tokenproxy::proxy`, and log filters rely on it.
const LOG_TARGET: &str = "tokenproxy::proxy";

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
    async fn call(self: Arc<Self>, req: Request<Incoming>, _conn: ConnInfo) -> Response<ProxyBody> {
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
    tracing::info!(target: LOG_TARGET, %addr, admin = %admin_addr, tls = tls.is_some(), workers = worker_count, "listening");
    let workers = match proxy {
        ProxyListener::Here(listener) => {
            let metrics = Some(deps.metrics.clone());
            server::serve(listener, pipeline, limits, tls, metrics, signal).await;
            None
        }
        ProxyListener::Workers(listeners) => {
            let shared = server::Shared {
                handler: pipeline,
                permits: server::connection_slots(&limits),
                limits,
                tls,
                metrics: Some(deps.metrics.clone()),
                shutdown: signal,
            };
            let mut workers = workers::spawn(listeners, &shared).context("starting workers")?;
            drop(shared);
            workers.drained().await;
            Some(workers)
        }
    };
    admin_task.await.context("admin listener task")?;
    tracing::info!(target: LOG_TARGET, "stopped");
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
                tracing::warn!(target: LOG_TARGET, "second shutdown signal: not waiting for token exchanges");
            }
        }
    }
    if let Ok(Some(workers)) = result {
        workers.release().await;
        return Ok(());
    }
    result.map(drop)
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
            tracing::info!(target: LOG_TARGET, "shutdown signal received; draining (signal again to stop now)");
            let _ = first_tx.send(());
            self.next().await;
            tracing::warn!(target: LOG_TARGET, "second shutdown signal received; stopping now");
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
