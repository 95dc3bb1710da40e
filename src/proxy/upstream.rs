//! The pooled upstream client: how a request reaches the route's upstream (not
//! "forward mode", the `HTTPS_PROXY` interception, which is `connect.rs`).
//!
//! One hyper-util pooled client per distinct trust configuration (the webpki
//! roots, plus each route's extra `upstream_ca`), speaking HTTP/2 when the upstream
//! offers it through ALPN and HTTP/1.1 otherwise. Connect and response-head
//! deadlines turn into the `upstream_unavailable` / `upstream_timeout` errors; the
//! response body itself streams for as long as it takes (a large git clone).
//!
//! HTTP/1.1 requests skip hyper-util's pool: each worker keeps its own idle
//! connections ([`super::h1pool`]); the hyper-util client is there for HTTP/2
//! upstreams.
//!
//! A route's `connect_to` gets a client of its own whose connector dials that
//! address whatever the URI says, while TLS (SNI and verification) and the pool
//! key still use the URI's host: the credential only goes to a peer proving it is
//! the route's host.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use tokio::sync::oneshot;

use super::body::BodyEnd;
use super::error::ProxyError;
use super::h1pool::{Failure, H1Pool, Sent};
use super::prewarm::Prewarm;
use super::route::ClientKey;
use super::ProxyBody;
use crate::config::ServerConfig;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The connector of every upstream client: pre-opened connections first.
pub type UpstreamConnector = Prewarm<HttpsConnector<ConnectTo>>;

/// The pooled client type used for every upstream.
pub type UpstreamClient = Client<UpstreamConnector, ProxyBody>;

/// One worker's way to one kind of upstream (trust and `connect_to`).
struct Clients {
    /// HTTP/2 upstreams (and the first request to one).
    http2: UpstreamClient,
    /// The connector, which pre-opens connections.
    connector: UpstreamConnector,
    /// HTTP/1.1 upstreams.
    http1: H1Pool,
}

type ClientSet = HashMap<ClientKey, Clients>;

/// The upstream clients, keyed by the extra CA they trust and `connect_to`: one
/// set per proxy worker thread, so a pooled connection's task runs on the thread
/// of the requests it serves and handing a request to it wakes no other thread.
pub struct Upstreams {
    per_worker: Vec<ClientSet>,
    response_timeout: Duration,
}

/// The TCP connector: dials the URI's host, or always `connect_to` when set.
#[derive(Clone)]
pub struct ConnectTo {
    http: HttpConnector,
    target: Option<Uri>,
}

impl tower_service::Service<Uri> for ConnectTo {
    type Response = <HttpConnector as tower_service::Service<Uri>>::Response;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dst = self.target.clone().unwrap_or(uri);
        Box::pin(self.http.call(dst))
    }
}

/// Why the upstream clients could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    /// An `upstream_ca` file could not be read or parsed.
    #[error("upstream_ca {path}: {message}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A `connect_to` is not `host:port`.
    #[error("connect_to `{0}` is not host:port")]
    ConnectTo(String),
    /// rustls refused the configuration.
    #[error("TLS client setup: {0}")]
    Tls(#[from] rustls::Error),
}

impl Upstreams {
    /// Builds, for each of `workers` worker threads (at least one), one client for
    /// the default roots and one per distinct (extra CA, `connect_to`) pair.
    pub fn new(
        server: &ServerConfig,
        keys: impl IntoIterator<Item = ClientKey>,
        workers: usize,
    ) -> Result<Self, ClientSetupError> {
        let keys: Vec<ClientKey> = keys.into_iter().collect();
        let per_worker = (0..workers.max(1))
            .map(|_| client_set(server, &keys))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            per_worker,
            response_timeout: server.upstream_timeout,
        })
    }

    /// Starts opening a connection for a request to `uri` that is about to wait
    /// (for its token), so the handshake overlaps the wait.
    pub fn prewarm(&self, worker: usize, key: &ClientKey, uri: &Uri) {
        if let Some(clients) = self.clients(worker).get(key) {
            clients.connector.prewarm(uri);
        }
    }

    /// Worker `worker`'s client set ([`super::server::ConnInfo::worker`]).
    fn clients(&self, worker: usize) -> &ClientSet {
        debug_assert!(
            worker < self.per_worker.len(),
            "worker {worker} has no clients"
        );
        // Never out of range when built with the worker count; a wrong index
        // still gets a working (if cross-thread) client rather than a panic.
        &self.per_worker[worker % self.per_worker.len()]
    }

    /// Sends `req` with worker `worker`'s client for `key` and waits for the
    /// response head.
    ///
    /// With `body_end` (a streamed request body), `upstream_timeout` starts when
    /// the body is complete: an upload may take as long as it keeps moving (its
    /// idle limit is the body's own). An upstream answering before the body ends
    /// is fine. A request that failed because the client's body did is the
    /// client's fault (400), not the upstream's.
    pub async fn send(
        &self,
        worker: usize,
        key: &ClientKey,
        req: Request<ProxyBody>,
        body_end: Option<oneshot::Receiver<BodyEnd>>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let clients = self
            .clients(worker)
            .get(key)
            .ok_or(ProxyError::UpstreamUnavailable)?;
        let mut request = std::pin::pin!(dispatch(clients, req));
        let mut failed = None;
        if let Some(mut end) = body_end {
            let early = tokio::select! {
                ended = &mut end => {
                    failed = ended.ok().filter(|e| *e != BodyEnd::Complete);
                    None
                }
                answered = &mut request => Some(answered),
            };
            if let Some(answered) = early {
                // The body is polled on the connection's task: its fate may have
                // been reported while the request was failing.
                failed = end.try_recv().ok().filter(|e| *e != BodyEnd::Complete);
                return answer(answered, failed);
            }
        }
        match tokio::time::timeout(self.response_timeout, request).await {
            Err(_elapsed) => Err(ProxyError::UpstreamTimeout),
            Ok(answered) => answer(answered, failed),
        }
    }
}

/// Sends on this worker's HTTP/1.1 connections, or with the HTTP/2 client when
/// the upstream chose HTTP/2.
async fn dispatch(
    clients: &Clients,
    req: Request<ProxyBody>,
) -> Result<Response<Incoming>, Failure> {
    match clients.http1.send(&clients.connector, req).await? {
        Sent::Response(resp) => Ok(resp),
        Sent::Http2(req) => clients.http2.request(req).await.map_err(|e| Failure {
            connect: e.is_connect(),
            error: Box::new(e),
        }),
    }
}

/// The upstream's answer, or the error for the side that failed.
fn answer(
    answered: Result<Response<Incoming>, Failure>,
    body_failed: Option<BodyEnd>,
) -> Result<Response<Incoming>, ProxyError> {
    match (answered, body_failed) {
        (Ok(resp), _) => Ok(resp),
        (Err(_), Some(BodyEnd::Idle)) => Err(ProxyError::BadRequest(
            "the request body stopped arriving (server.body_idle_timeout)",
        )),
        (Err(_), Some(_)) => Err(ProxyError::BadRequest(
            "the request body is malformed or was cut off",
        )),
        (Err(e), None) => {
            // hyper's errors describe the connection, never header values.
            tracing::debug!(error = %crate::telemetry::error_chain(&*e.error), connect = e.connect, "upstream request failed");
            Err(ProxyError::UpstreamUnavailable)
        }
    }
}

/// One client per distinct key, plus the default one.
fn client_set(server: &ServerConfig, keys: &[ClientKey]) -> Result<ClientSet, ClientSetupError> {
    let mut clients = HashMap::new();
    clients.insert((None, None), build_client(server, None, None)?);
    for key in keys {
        if let std::collections::hash_map::Entry::Vacant(slot) = clients.entry(key.clone()) {
            let (ca, to) = slot.key();
            let client = build_client(server, ca.as_deref(), to.as_deref())?;
            slot.insert(client);
        }
    }
    Ok(clients)
}

/// The TLS roots: webpki's, plus the certificates in `extra_ca`.
fn root_store(extra_ca: Option<&Path>) -> Result<rustls::RootCertStore, ClientSetupError> {
    crate::tls::roots(extra_ca).map_err(|message| ClientSetupError::Ca {
        path: extra_ca.unwrap_or(Path::new("")).to_path_buf(),
        message,
    })
}

fn build_client(
    server: &ServerConfig,
    extra_ca: Option<&Path>,
    connect_to: Option<&str>,
) -> Result<Clients, ClientSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(extra_ca)?)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(server.connect_timeout));
    let target = match connect_to {
        Some(to) => Some(
            format!("http://{to}")
                .parse::<Uri>()
                .map_err(|_| ClientSetupError::ConnectTo(to.to_string()))?,
        ),
        None => None,
    };
    let http = ConnectTo { http, target };
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let connector = Prewarm::new(https);
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector.clone());
    Ok(Clients {
        http2: client,
        connector,
        http1: H1Pool::new(POOL_IDLE_TIMEOUT),
    })
}
