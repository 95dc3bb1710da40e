//! The listener: accepts connections within bounds and shuts down gracefully.
//!
//! Each accepted connection holds a slot (see [`super::slots`]): at most
//! `max_connections` are served at once and `max_connections_per_ip` from one
//! source address; when every slot is taken, the connection idle longest is
//! closed to make room, and with none idle the accept loop waits holding at most
//! one accepted connection. Request heads are bounded in size and in the time a
//! client has to send them, and the first request of a connection (whatever the
//! protocol) must start within that time too. HTTP/2 connections are pinged
//! while silent, limited in concurrent streams, and closed when no request has
//! been in flight for `idle_timeout`. On shutdown the listener is closed at once
//! (new connections are refused), every connection is told to finish its
//! in-flight requests, and after the grace period whatever is left is cut off.
//!
//! A CONNECT request carries a [`ConnContext`] so the tunnel it opens keeps the
//! connection's slot and hears the shutdown signal after hyper lets go of the
//! socket.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::slots::{self, Listing, Slot, Slots};
use super::ProxyBody;
use crate::config::{ServerConfig, TlsConfig};
use crate::telemetry::Metrics;

/// Smallest read buffer hyper accepts.
const MIN_BUF: usize = 8192;

/// Limits applied to one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Which listener, for logs.
    pub name: &'static str,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Time allowed for a request head (and the TLS handshake).
    pub header_read_timeout: Duration,
    /// Time in-flight requests get after shutdown starts.
    pub shutdown_grace: Duration,
    /// Most simultaneous connections from one source IP (0 = no limit).
    pub max_connections_per_ip: usize,
    /// A connection with no request in flight this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2: ping a connection that has been silent this long.
    pub http2_keepalive_interval: Duration,
    /// HTTP/2: close a connection whose ping is unanswered this long.
    pub http2_keepalive_timeout: Duration,
    /// HTTP/2: most concurrent streams per connection.
    pub http2_max_concurrent_streams: u32,
}

impl Limits {
    /// The proxy listener's limits from `[server]`.
    pub fn from_config(server: &ServerConfig) -> Self {
        Self {
            name: "proxy",
            max_connections: server.max_connections.max(1),
            max_header_bytes: server.max_header_bytes,
            header_read_timeout: server.header_read_timeout,
            shutdown_grace: server.shutdown_grace,
            max_connections_per_ip: server.max_connections_per_ip,
            idle_timeout: server.idle_timeout,
            http2_keepalive_interval: server.http2_keepalive_interval,
            http2_keepalive_timeout: server.http2_keepalive_timeout,
            http2_max_concurrent_streams: server.http2_max_concurrent_streams,
        }
    }
}

/// Holds one connection's place in the limit (and the open-connections gauge)
/// for as long as the connection or a tunnel made from it lives.
struct ConnSlot {
    _slot: Slot,
    _open: Option<OpenGuard>,
}

/// What a CONNECT tunnel inherits from the connection it was opened on; found
/// in the CONNECT request's extensions.
#[derive(Clone)]
pub struct ConnContext {
    _slot: Arc<ConnSlot>,
    /// The listener's shutdown signal.
    pub shutdown: ShutdownSignal,
    /// Time in-flight requests get after shutdown starts.
    pub grace: Duration,
}

/// A shutdown signal many tasks can wait on.
#[derive(Clone)]
pub struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    /// A signal fired when `fut` completes (or its sender is dropped).
    pub fn from_future(fut: impl Future<Output = ()> + Send + 'static) -> Self {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            fut.await;
            let _ = tx.send(true);
        });
        Self(rx)
    }

    /// Resolves once shutdown has begun.
    pub async fn fired(&mut self) {
        // An error means the sender is gone, which also means shut down.
        let _ = self.0.wait_for(|v| *v).await;
    }
}

/// The request handler a listener serves.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn call(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<ProxyBody>> + Send;
}

/// What a connection knows about its caller, and which worker serves it.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The caller's address.
    pub remote: SocketAddr,
    /// Whether the caller connected over TLS.
    pub tls: bool,
    /// The worker thread the connection was accepted on (0 off the workers): it
    /// picks that worker's upstream clients, so pooled connections stay on the
    /// thread of the requests they serve.
    pub worker: usize,
}

/// What every listener of one port serves with (one listener per worker).
pub struct Shared<H> {
    /// The request handler.
    pub handler: Arc<H>,
    /// The listener's limits.
    pub limits: Limits,
    /// The connection slots, shared by all listeners of the port.
    pub permits: Arc<Slots>,
    /// TLS for callers, when configured.
    pub tls: Option<TlsAcceptor>,
    /// Counters (open connections); `None` for the admin listener.
    pub metrics: Option<Arc<Metrics>>,
    /// Fires when shutdown begins.
    pub shutdown: ShutdownSignal,
}

impl<H> Clone for Shared<H> {
    fn clone(&self) -> Self {
        Self {
            handler: self.handler.clone(),
            limits: self.limits.clone(),
            permits: self.permits.clone(),
            tls: self.tls.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

/// Builds the TLS acceptor for `[server.tls]`, offering HTTP/2 and HTTP/1.1.
pub fn tls_acceptor(tls: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    use anyhow::Context;
    let certs: Vec<_> = rustls_pemfile::certs(
        &mut std::fs::read(&tls.cert)
            .with_context(|| format!("server.tls.cert {}", tls.cert.display()))?
            .as_slice(),
    )
    .collect::<Result<_, _>>()
    .context("server.tls.cert: invalid PEM")?;
    let key = rustls_pemfile::private_key(
        &mut std::fs::read(&tls.key)
            .with_context(|| format!("server.tls.key {}", tls.key.display()))?
            .as_slice(),
    )
    .context("server.tls.key: invalid PEM")?
    .context("server.tls.key: no private key found")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("server.tls: certificate and key do not fit")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `listener` until `shutdown` fires, then drains for the grace period.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    metrics: Option<Arc<Metrics>>,
    shutdown: ShutdownSignal,
) {
    let shared = Shared {
        handler,
        permits: connection_slots(&limits),
        limits,
        tls,
        metrics,
        shutdown,
    };
    serve_shared(listener, shared, 0).await;
}

/// The connection slots of `limits`, to share between listeners that serve the
/// same port (see [`serve_shared`]).
pub fn connection_slots(limits: &Limits) -> Arc<Slots> {
    Slots::new(limits.max_connections, limits.max_connections_per_ip)
}

/// [`serve`] as worker `worker`, taking connection slots from `shared.permits`,
/// which the other listeners of the same port (one per worker thread) share.
pub async fn serve_shared<H: Handler>(listener: TcpListener, shared: Shared<H>, worker: usize) {
    let Shared {
        handler,
        limits,
        permits: slots,
        tls,
        metrics,
        mut shutdown,
    } = shared;
    let builder = Arc::new(http_builder(&limits));
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        while tasks.try_join_next().is_some() {}
        let (stream, remote) = tokio::select! {
            biased;
            _ = shutdown.fired() => break,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(5);
        // Accept first, then wait for a slot: with several listeners sharing the
        // slots (one per worker), a listener waiting for a slot before accepting
        // could take the freed slot while the waiting connection sits in another
        // listener's backlog. This way a listener holds at most one connection
        // while the limit is reached, and every freed slot serves one.
        let acquired = tokio::select! {
            biased;
            _ = shutdown.fired() => break,
            r = slots.acquire(remote.ip()) => r,
        };
        let Ok((slot, listing)) = acquired else {
            // Closed unanswered: the protocol is not known yet, and the source
            // already holds its share of the listener.
            tracing::debug!(%remote, "source IP at server.max_connections_per_ip; closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let slot = Arc::new(ConnSlot {
            _slot: slot,
            _open: metrics.clone().map(OpenGuard::new),
        });
        let conn = Connection {
            builder: builder.clone(),
            handler: handler.clone(),
            tls: tls.clone(),
            header_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            worker,
            listing,
            context: ConnContext {
                _slot: slot,
                shutdown: shutdown.clone(),
                grace: limits.shutdown_grace,
            },
        };
        tasks.spawn(conn.run(stream, remote));
    }
    // Stop accepting: from here on, connecting gets "connection refused".
    drop(listener);
    tracing::info!(
        listener = limits.name,
        connections = slots.taken(),
        "stopped accepting; draining"
    );
    // Every connection task hears the shutdown and drains its own connection.
    // CONNECT tunnels outlive hyper's view of their connection but hold its
    // slot: every slot back means every connection and tunnel is done.
    if tokio::time::timeout(limits.shutdown_grace, slots.all_returned())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = limits.name,
            "grace period over; closing remaining connections"
        );
    }
    tasks.shutdown().await;
}

/// The HTTP/1.1 + HTTP/2 connection builder with the listener's limits.
pub(super) fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_BUF));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .keep_alive_interval(limits.http2_keepalive_interval)
        .keep_alive_timeout(limits.http2_keepalive_timeout);
    builder
}

/// One accepted connection.
struct Connection<H> {
    builder: Arc<auto::Builder<TokioExecutor>>,
    handler: Arc<H>,
    tls: Option<TlsAcceptor>,
    header_timeout: Duration,
    idle_timeout: Duration,
    worker: usize,
    listing: Listing,
    context: ConnContext,
}

/// Why a connection task stopped serving before the client was done.
enum Closing {
    Shutdown,
    Evicted,
    Idle,
}

impl<H: Handler> Connection<H> {
    async fn run(mut self, stream: TcpStream, remote: SocketAddr) {
        // Before a request has started, a shutdown simply drops the connection.
        let mut shutdown = self.context.shutdown.clone();
        let evict = self.listing.evict.clone();
        match self.tls.take() {
            Some(acceptor) => {
                let handshake = tokio::time::timeout(self.header_timeout, acceptor.accept(stream));
                let stream = tokio::select! {
                    _ = shutdown.fired() => return,
                    () = evict.cancelled() => return,
                    r = handshake => match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    },
                };
                self.serve(TokioIo::new(stream), remote, true).await;
            }
            None => {
                // Until the first byte the auto builder's version sniffing has no
                // deadline of its own; give it the header timeout.
                let mut probe = [0u8; 1];
                let first_byte = tokio::time::timeout(self.header_timeout, stream.peek(&mut probe));
                tokio::select! {
                    _ = shutdown.fired() => return,
                    () = evict.cancelled() => return,
                    r = first_byte => match r {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => return,
                    },
                }
                self.serve(TokioIo::new(stream), remote, false).await;
            }
        }
    }

    /// Serves HTTP/1.1 or HTTP/2 on `io` until the connection ends or drains.
    async fn serve<I>(self, io: I, remote: SocketAddr, is_tls: bool)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let info = ConnInfo {
            remote,
            tls: is_tls,
            worker: self.worker,
        };
        let handler = self.handler;
        let context = self.context;
        let mut signal = context.shutdown.clone();
        let activity = self.listing.activity.clone();
        let got_request = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = got_request.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            seen.store(true, std::sync::atomic::Ordering::Relaxed);
            // In flight until the response body is done: a streaming response is
            // not idle.
            let in_flight = activity.start_request();
            let handler = handler.clone();
            if req.method() == http::Method::CONNECT {
                req.extensions_mut().insert(context.clone());
            }
            async move {
                let resp = handler.call(req, info).await;
                Ok::<_, Infallible>(resp.map(|b| InFlightBody::wrap(b, in_flight)))
            }
        });
        let conn = self
            .builder
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        tokio::pin!(conn);
        // hyper's header_read_timeout covers HTTP/1 heads only: a client that
        // sends one byte of the h2 preface, or the preface and nothing else, would
        // hold its slot forever without authenticating. The first request must
        // start within the header timeout, whatever the protocol.
        let header_timeout = self.header_timeout;
        let first_request = async {
            tokio::time::sleep(header_timeout).await;
            if got_request.load(std::sync::atomic::Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
        };
        let evict = self.listing.evict.clone();
        let idle = slots::idle_for(self.listing.activity.clone(), self.idle_timeout);
        let closing = tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%remote, error = %e, "connection ended with an error");
                }
                return;
            }
            () = first_request => {
                tracing::debug!(%remote, "no request within header_read_timeout; closing");
                return;
            }
            () = signal.fired() => Closing::Shutdown,
            () = evict.cancelled() => Closing::Evicted,
            () = idle => Closing::Idle,
        };
        // HTTP/1: close once the response in progress (if any) is sent; HTTP/2:
        // GOAWAY, let open streams finish; before the protocol is known: stop.
        conn.as_mut().graceful_shutdown();
        match closing {
            // The listener's grace period cuts off whatever is left.
            Closing::Shutdown => {
                let _ = conn.await;
            }
            Closing::Evicted | Closing::Idle => {
                let evicted = matches!(closing, Closing::Evicted);
                tracing::debug!(%remote, evicted, "closing an idle connection");
                // Nothing was in flight; a request that raced in gets as long
                // as a request head would.
                let _ = tokio::time::timeout(header_timeout, conn).await;
            }
        }
    }
}

/// A response body that counts its request as in flight until it is done.
struct InFlightBody {
    inner: ProxyBody,
    _in_flight: slots::InFlight,
}

impl InFlightBody {
    fn wrap(inner: ProxyBody, in_flight: slots::InFlight) -> ProxyBody {
        use http_body_util::BodyExt;
        Self {
            inner,
            _in_flight: in_flight,
        }
        .boxed_unsync()
    }
}

impl http_body::Body for InFlightBody {
    type Data = bytes::Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Counts an open connection for its lifetime.
struct OpenGuard(Arc<Metrics>);

impl OpenGuard {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.open_connections.inc();
        Self(metrics)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open_connections.dec();
    }
}
