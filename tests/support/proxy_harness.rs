//! Runs the real proxy in-process on loopback for the proxy integration tests,
//! with a small HTTP client, a raw-socket client for requests no well-behaved
//! client would send, and a scripted token lookup for tests that do not need a
//! real identity provider.
//!
//! Included by the `tests/proxy*.rs` files with `#[path]` so the shared
//! `support` module stays as it is for everyone else.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretString};
use tokenproxy::config::Config;
use tokenproxy::proxy::{self, Deps, TokenLookup};
use tokenproxy::store::{LinkStore, NewProxyToken};
use tokenproxy::telemetry::Metrics;
use tokenproxy::tokens::{AccessToken, TokenError, TokenSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Parses a test config (no environment overrides).
pub fn config(toml: &str) -> Config {
    Config::from_toml_with_env(toml, &[]).expect("test config is valid")
}

/// A running proxy.
pub struct Harness {
    /// The proxy listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// The token source's background work, when started by [`Harness::start_source`].
    background: Option<(CancellationToken, JoinHandle<()>)>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.background {
            stop.cancel();
        }
    }
}

impl Harness {
    /// Starts the proxy with `config` over `store` and `tokens`.
    pub async fn start(
        config: Config,
        store: Arc<dyn LinkStore>,
        tokens: Arc<dyn TokenLookup>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        Self::start_on(config, store, tokens, addr, move |admin, deps, stop| {
            tokio::spawn(tokenproxy::app::run(listener, admin, deps, stop))
        })
        .await
    }

    /// [`Harness::start`] over the real token source, with its background work
    /// (the change feed keeping the cache coherent, and refresh-ahead when
    /// `tokens.refresh_ahead` is on) running as `tokenproxy serve` runs it: started
    /// before the listener, stopped after the drain.
    pub async fn start_source(
        config: Config,
        store: Arc<dyn LinkStore>,
        source: Arc<TokenSource>,
    ) -> Self {
        let stop = CancellationToken::new();
        let background = source.spawn_background(stop.clone());
        let mut h = Self::start(config, store, source).await;
        h.background = Some((stop, background));
        h
    }

    /// [`Harness::start`] with the proxy on `workers` worker threads, as
    /// `tokenproxy serve` runs it.
    pub async fn start_workers(
        config: Config,
        store: Arc<dyn LinkStore>,
        tokens: Arc<dyn TokenLookup>,
        workers: usize,
    ) -> Self {
        let any = "127.0.0.1:0".parse().unwrap();
        let listeners = proxy::workers::bind(any, workers).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        Self::start_on(config, store, tokens, addr, move |admin, deps, stop| {
            tokio::spawn(tokenproxy::app::run_workers(listeners, admin, deps, stop))
        })
        .await
    }

    async fn start_on(
        config: Config,
        store: Arc<dyn LinkStore>,
        tokens: Arc<dyn TokenLookup>,
        addr: SocketAddr,
        run: impl FnOnce(
            TcpListener,
            Deps,
            std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        ) -> JoinHandle<anyhow::Result<()>>,
    ) -> Self {
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let metrics = Metrics::new();
        let deps = Deps {
            config: Arc::new(config),
            store,
            tokens,
            metrics: metrics.clone(),
        };
        let (tx, rx) = oneshot::channel::<()>();
        let task = run(
            admin,
            deps,
            Box::pin(async move {
                let _ = rx.await;
            }),
        );
        Self {
            addr,
            admin: admin_addr,
            metrics,
            stop: Some(tx),
            task: Some(task),
            background: None,
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Begins graceful shutdown and returns the server task to await.
    pub fn begin_shutdown(&mut self) -> JoinHandle<anyhow::Result<()>> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap()
    }

    /// Shuts down and waits for the drain to finish.
    pub async fn shutdown(mut self) {
        self.begin_shutdown().await.unwrap().unwrap();
        if let Some((stop, background)) = self.background.take() {
            stop.cancel();
            background.await.unwrap();
        }
    }
}

/// Creates a proxy token for `user`, limited to `providers` (empty = all).
pub async fn create_token(store: &dyn LinkStore, user: Uuid, providers: &[&str]) -> (Uuid, String) {
    let (token, hash) = proxy::caller::generate_token();
    let info = store
        .create_proxy_token(&NewProxyToken {
            user_id: user,
            name: "test".into(),
            hash,
            providers: providers.iter().map(|p| p.to_string()).collect(),
            expires_at: None,
        })
        .await
        .unwrap();
    (info.id, token.expose_secret().to_string())
}

/// A response as the test client saw it.
#[derive(Debug)]
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `tokenproxy-error` header, if any.
    pub fn error_code(&self) -> Option<&str> {
        self.headers
            .get("tokenproxy-error")
            .map(|v| v.to_str().unwrap())
    }

    /// Asserts this is tokenproxy's own error response with `status` and `code`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {:?}", self.body);
        assert_eq!(self.error_code(), Some(code));
        assert_eq!(self.headers["content-type"], "application/json");
        let json = self.json();
        assert_eq!(json["error"]["code"], code);
        assert!(json["error"]["message"].is_string());
        assert!(json["error"].get("provider").is_some());
    }
}

/// Sends one request with a fresh HTTP/1.1 client.
pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    try_send(method, url, headers, body)
        .await
        .expect("proxy answers")
}

/// Like [`send`], but a failed exchange (connection cut, body cut short) is an
/// `Err` naming it, so a test can expect exactly that and nothing else.
pub async fn try_send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Answer, String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(body.into())).unwrap())
        .await
        .map_err(|e| format!("request failed: {e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body failed: {e:?}"))?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// GET with headers.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Answer {
    send(Method::GET, url, headers, Bytes::new()).await
}

/// `Authorization: Bearer <token>` header pair.
pub fn bearer(token: &str) -> (String, String) {
    ("authorization".into(), format!("Bearer {token}"))
}

/// Writes raw bytes to `addr` and returns everything read until the server closes
/// (send `Connection: close`).
pub async fn raw(addr: SocketAddr, request: &str) -> String {
    raw_bytes(addr, request.as_bytes()).await
}

/// How long a raw exchange may take before the test fails: a server that never
/// answers or never closes must fail the test, not hang it.
pub const RAW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends raw bytes (which need not be UTF-8) and reads until the server closes,
/// failing after [`RAW_TIMEOUT`].
pub async fn raw_bytes(addr: SocketAddr, request: &[u8]) -> String {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    tokio::time::timeout(RAW_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("no complete answer within {RAW_TIMEOUT:?} from {addr}"))
}

/// The status code of a raw HTTP/1.1 response.
pub fn raw_status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

/// A scripted token lookup: fixed answers per (provider, user), and a refresh
/// that issues `<old>-r<n>` while counting every call.
#[derive(Default)]
pub struct FakeTokens {
    answers: Mutex<HashMap<(String, Uuid), Result<AccessToken, TokenError>>>,
    /// Calls to `get`.
    pub gets: AtomicUsize,
    /// Calls to `refresh_rejected`.
    pub refreshes: AtomicUsize,
}

impl FakeTokens {
    /// An empty lookup (every key is `link_missing`).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Serves `token` for (provider, user).
    pub fn set(&self, provider: &str, user: Uuid, token: &str) {
        self.answers.lock().insert(
            (provider.into(), user),
            Ok(AccessToken::new(
                SecretString::from(token.to_string()),
                None,
            )),
        );
    }

    /// Fails (provider, user) with `err`.
    pub fn fail(&self, provider: &str, user: Uuid, err: TokenError) {
        self.answers
            .lock()
            .insert((provider.into(), user), Err(err));
    }

    /// How many refreshes were asked for.
    pub fn refresh_count(&self) -> usize {
        self.refreshes.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl TokenLookup for FakeTokens {
    async fn get(&self, provider: &str, user: Uuid) -> Result<AccessToken, TokenError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.answers
            .lock()
            .get(&(provider.to_string(), user))
            .cloned()
            .unwrap_or(Err(TokenError::LinkMissing))
    }

    async fn refresh_rejected(
        &self,
        provider: &str,
        user: Uuid,
        rejected: &AccessToken,
    ) -> Result<AccessToken, TokenError> {
        let n = self.refreshes.fetch_add(1, Ordering::SeqCst) + 1;
        let fresh = AccessToken::new(
            SecretString::from(format!("{}-r{n}", rejected.expose_secret())),
            None,
        );
        self.answers
            .lock()
            .insert((provider.into(), user), Ok(fresh.clone()));
        Ok(fresh)
    }
}

/// The URL of the database `pool` belongs to (one copy, in `support::db`).
#[allow(unused_imports)]
pub use crate::support::db::db_url;

/// A free loopback port, bound then released (one copy, in `support::net`; only
/// for children that cannot bind port 0 and say where they listen).
#[allow(unused_imports)]
pub use crate::support::net::free_port;

/// The real `tokenproxy serve` binary, running as a child process.
pub struct Spawned {
    /// The child.
    pub child: std::process::Child,
    /// The proxy listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// Holds the config file.
    _dir: tempfile::TempDir,
}

impl Spawned {
    /// Writes `[server]` listeners on port 0 plus `[database] url` for `db` in
    /// front of `rest` and runs `tokenproxy serve`, returning once its
    /// `listening` log line names the bound addresses (see `support::child`).
    pub async fn start(db: &str, rest: &str) -> Self {
        use crate::support::child;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tokenproxy.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"30s\"\n\n[database]\nurl = \"{db}\"\n\n{rest}"
            ),
        )
        .unwrap();
        let base = std::env::var("SPAWNED_LOG").unwrap_or_else(|_| "warn".into());
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
            .env_clear()
            .env("RUST_LOG", child::log_filter(&base))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let listening = child::watch_stderr(child.stderr.take().unwrap());
        match child::wait_listening(listening).await {
            Ok((addr, admin)) => Self {
                child,
                addr,
                admin,
                _dir: dir,
            },
            Err(why) => {
                let _ = child.kill();
                panic!(
                    "tokenproxy serve did not start: {why}; exit: {:?}",
                    child.wait()
                );
            }
        }
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A line of the child's `/proc/PID/status` (in KiB), e.g. `VmRSS` or `VmHWM`.
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"))
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
