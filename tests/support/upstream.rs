//! Test upstreams that verify the injected credential, and a git smart-HTTP
//! server (`git http-backend` behind CGI) that demands it.
//!
//! Both are real hyper servers on 127.0.0.1:0 that record every request they see,
//! so a test can assert what reached them (and what did not: a canary upstream
//! that must record zero requests).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Where the upstream expects the credential.
#[derive(Clone, Debug)]
pub enum CredentialForm {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// `Authorization: Basic base64(<user>:<token>)`.
    Basic(String),
    /// The raw token in this header.
    Header(String),
    /// Accept anything (a canary that only records).
    Anything,
}

/// Decides whether a presented token is currently valid.
pub type TokenCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// A fixed set of valid tokens.
pub fn tokens(valid: &[&str]) -> TokenCheck {
    let valid: Vec<String> = valid.iter().map(|s| s.to_string()).collect();
    Arc::new(move |t| valid.iter().any(|v| v == t))
}

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Method.
    pub method: http::Method,
    /// Path and query, as received.
    pub target: String,
    /// Every header, as received.
    pub headers: HeaderMap,
    /// Body bytes received.
    pub body_len: u64,
    /// The token the credential carried, if it parsed.
    pub token: Option<String>,
    /// The status answered.
    pub status: u16,
    /// HTTP version the request arrived with.
    pub version: http::Version,
}

struct State {
    form: CredentialForm,
    check: Mutex<TokenCheck>,
    recorded: Mutex<Vec<Recorded>>,
    /// `/slow` requests wait for this.
    release: Notify,
    /// Counts `/slow` requests that have arrived.
    slow_arrived: watch::Sender<usize>,
}

/// A recording upstream. Paths: anything → 200 JSON echo when the credential is
/// valid, 401 otherwise; `/always401` → 401 always; `/slow` → waits for
/// [`TestUpstream::release_slow`] before answering.
pub struct TestUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<State>,
    _stop: watch::Sender<()>,
}

impl TestUpstream {
    /// Starts an upstream checking `form` against `check`.
    pub async fn start(form: CredentialForm, check: TokenCheck) -> Self {
        Self::start_with(form, check, None).await
    }

    /// Like [`start`](Self::start), serving HTTPS (h2 or HTTP/1.1 by ALPN).
    pub async fn start_tls(form: CredentialForm, check: TokenCheck, tls: TlsAcceptor) -> Self {
        Self::start_with(form, check, Some(tls)).await
    }

    async fn start_with(form: CredentialForm, check: TokenCheck, tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            form,
            check: Mutex::new(check),
            recorded: Mutex::new(Vec::new()),
            release: Notify::new(),
            slow_arrived: watch::channel(0).0,
        });
        let stop = serve_with(listener, tls, {
            let state = state.clone();
            move |req| {
                let state = state.clone();
                async move { handle(state, req).await }
            }
        });
        Self {
            addr,
            state,
            _stop: stop,
        }
    }

    /// A canary: accepts and records everything.
    pub async fn canary() -> Self {
        Self::start(CredentialForm::Anything, Arc::new(|_| true)).await
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the validity check.
    pub fn set_check(&self, check: TokenCheck) {
        *self.state.check.lock() = check;
    }

    /// Everything received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.recorded.lock().clone()
    }

    /// How many requests arrived.
    pub fn count(&self) -> usize {
        self.state.recorded.lock().len()
    }

    /// Lets every waiting (and the next) `/slow` request answer.
    pub fn release_slow(&self) {
        self.state.release.notify_waiters();
        self.state.release.notify_one();
    }

    /// Waits until `n` `/slow` requests have arrived.
    /// Fails the test after 10 s rather than hanging it.
    pub async fn slow_arrived(&self, n: usize) {
        let mut rx = self.state.slow_arrived.subscribe();
        let wait = async { rx.wait_for(|v| *v >= n).await.is_ok() };
        let arrived = tokio::time::timeout(std::time::Duration::from_secs(10), wait).await;
        match arrived {
            Ok(true) => {}
            Ok(false) => panic!("the upstream stopped before {n} /slow requests arrived"),
            Err(_) => panic!("{n} /slow requests did not arrive within 10 s"),
        }
    }
}

/// Serves `handler` on `listener` (HTTP/1.1 and h2c) until the returned sender drops.
pub fn serve<F, Fut>(listener: TcpListener, handler: F) -> watch::Sender<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    serve_with(listener, None, handler)
}

/// Like [`serve`], optionally over TLS.
pub fn serve_with<F, Fut>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: F,
) -> watch::Sender<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let (tx, mut rx) = watch::channel(());
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                _ = rx.changed() => return,
            };
            let handler = handler.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    tx
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp
}

/// The token a request carries in `form`, if any.
pub fn presented_token(form: &CredentialForm, headers: &HeaderMap) -> Option<String> {
    let auth = || headers.get("authorization")?.to_str().ok();
    match form {
        CredentialForm::Bearer => auth()?.strip_prefix("Bearer ").map(str::to_string),
        CredentialForm::Basic(user) => {
            let encoded = auth()?.strip_prefix("Basic ")?;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()?;
            let raw = String::from_utf8(raw).ok()?;
            let (u, p) = raw.split_once(':')?;
            (u == user).then(|| p.to_string())
        }
        CredentialForm::Header(name) => headers
            .get(name.as_str())?
            .to_str()
            .ok()
            .map(str::to_string),
        CredentialForm::Anything => auth().map(str::to_string),
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    // Count the body as it streams; never hold it.
    let mut body_len = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_len += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    let token = presented_token(&state.form, &parts.headers);
    let valid = match &state.form {
        CredentialForm::Anything => true,
        _ => token.as_deref().is_some_and(|t| (state.check.lock())(t)),
    };
    let path = parts.uri.path().to_string();
    let status = if path.ends_with("/always401") || !valid {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    state.recorded.lock().push(Recorded {
        method: parts.method.clone(),
        target: target.clone(),
        headers: parts.headers.clone(),
        body_len,
        token,
        status: status.as_u16(),
        version: parts.version,
    });
    if path.ends_with("/slow") {
        let released = state.release.notified();
        state.slow_arrived.send_modify(|n| *n += 1);
        released.await;
    }
    let echo = serde_json::json!({
        "method": parts.method.as_str(),
        "target": target,
        "body_len": body_len,
    });
    let mut resp = full(status, echo.to_string());
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    // Hop-by-hop headers an upstream might send; the proxy must strip them.
    resp.headers_mut()
        .insert("connection", "x-upstream-hop".parse().unwrap());
    resp.headers_mut()
        .insert("x-upstream-hop", "1".parse().unwrap());
    // A forged tokenproxy error header: the proxy must strip it too.
    resp.headers_mut()
        .insert("tokenproxy-error", "forged".parse().unwrap());
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            "www-authenticate",
            "Bearer realm=\"upstream\"".parse().unwrap(),
        );
    }
    resp
}

/// A git smart-HTTP server: runs `git http-backend` (CGI) per request with
/// `GIT_PROJECT_ROOT`, streaming the request body to its stdin and its stdout back,
/// and answers 401 unless the request carries Basic `<user>:<valid token>`.
pub struct GitServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The directory holding the repositories.
    pub root: PathBuf,
    recorded: Arc<Mutex<Vec<(String, u16)>>>,
    _stop: watch::Sender<()>,
}

impl GitServer {
    /// Serves the repositories under `root`, demanding Basic credentials.
    pub async fn start(root: PathBuf, user: &str, check: TokenCheck) -> Self {
        Self::start_with(root, user, check, None).await
    }

    /// Like [`start`](Self::start), serving HTTPS.
    pub async fn start_tls(root: PathBuf, user: &str, check: TokenCheck, tls: TlsAcceptor) -> Self {
        Self::start_with(root, user, check, Some(tls)).await
    }

    async fn start_with(
        root: PathBuf,
        user: &str,
        check: TokenCheck,
        tls: Option<TlsAcceptor>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let form = CredentialForm::Basic(user.to_string());
        let stop = serve_with(listener, tls, {
            let root = root.clone();
            let recorded = recorded.clone();
            move |req| {
                let (root, recorded, form, check) =
                    (root.clone(), recorded.clone(), form.clone(), check.clone());
                async move {
                    let target = req.uri().to_string();
                    let token = presented_token(&form, req.headers());
                    let resp = if token.as_deref().is_some_and(|t| check(t)) {
                        cgi(&root, req).await
                    } else {
                        let mut r = full(StatusCode::UNAUTHORIZED, "credentials required\n");
                        r.headers_mut()
                            .insert("www-authenticate", "Basic realm=\"git\"".parse().unwrap());
                        r
                    };
                    recorded.lock().push((target, resp.status().as_u16()));
                    resp
                }
            }
        });
        Self {
            addr,
            root,
            recorded,
            _stop: stop,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// (target, status) of every request.
    pub fn requests(&self) -> Vec<(String, u16)> {
        self.recorded.lock().clone()
    }
}

/// Runs one CGI request through `git http-backend`.
async fn cgi(root: &std::path::Path, req: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let mut env: HashMap<&str, String> = HashMap::new();
    env.insert("GIT_PROJECT_ROOT", root.display().to_string());
    env.insert("GIT_HTTP_EXPORT_ALL", "1".into());
    env.insert("GATEWAY_INTERFACE", "CGI/1.1".into());
    env.insert("REQUEST_METHOD", parts.method.to_string());
    env.insert("PATH_INFO", parts.uri.path().to_string());
    env.insert("QUERY_STRING", parts.uri.query().unwrap_or("").to_string());
    env.insert("CONTENT_TYPE", header("content-type"));
    env.insert("CONTENT_LENGTH", header("content-length"));
    env.insert("HTTP_CONTENT_ENCODING", header("content-encoding"));
    env.insert("HTTP_GIT_PROTOCOL", header("git-protocol"));
    env.insert("REMOTE_USER", "git-user".into());
    env.insert("REMOTE_ADDR", "127.0.0.1".into());
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().filter(|(_, v)| !v.is_empty()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("git http-backend");
    let mut stdin = child.stdin.take().unwrap();
    tokio::spawn(async move {
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                if stdin.write_all(data).await.is_err() {
                    return;
                }
            }
        }
        let _ = stdin.shutdown().await;
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut resp = Response::new(());
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).await.unwrap_or(0) == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next().unwrap_or("200");
            *resp.status_mut() = StatusCode::from_bytes(code.as_bytes()).unwrap();
        } else if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            resp.headers_mut().append(n, v);
        }
    }
    let stream = futures_util::stream::unfold((stdout, child), |(mut out, child)| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match out.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((
                    Ok::<_, BoxError>(Frame::data(Bytes::from(buf))),
                    (out, child),
                ))
            }
        }
    });
    let (parts, ()) = resp.into_parts();
    Response::from_parts(parts, StreamBody::new(stream).boxed_unsync())
}

/// A private CA and a server certificate it signed for `127.0.0.1` and
/// `localhost`, written as PEM files into a temporary directory.
pub struct TestCa {
    /// Holds the files.
    pub dir: tempfile::TempDir,
    /// The CA certificate (what `upstream_ca` names).
    pub ca: PathBuf,
    /// The server certificate.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

impl TestCa {
    /// Generates the CA and the server certificate.
    pub fn new() -> Self {
        Self::for_names(&["127.0.0.1", "localhost"])
    }

    /// Generates the CA and a server certificate for `names`.
    pub fn for_names(names: &[&str]) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct subjects: OpenSSL clients (curl) take a leaf whose subject
        // equals its issuer's for a self-signed certificate.
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &ca).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        Self {
            ca: write("ca.pem", ca.pem()),
            cert: write("cert.pem", cert.pem()),
            key: write("key.pem", key.serialize_pem()),
            dir,
        }
    }

    /// A TLS acceptor serving the certificate, offering h2 and HTTP/1.1.
    pub fn acceptor(&self) -> TlsAcceptor {
        let certs = rustls_pemfile::certs(&mut std::fs::read(&self.cert).unwrap().as_slice())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut std::fs::read(&self.key).unwrap().as_slice())
            .unwrap()
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(config))
    }

    /// A rustls client config trusting only this CA.
    pub fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut std::fs::read(&self.ca).unwrap().as_slice()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }
}
