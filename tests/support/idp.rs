//! A test identity provider: a real HTTP token endpoint on 127.0.0.1 that behaves
//! like a strict production provider, and counts everything it is asked.
//!
//! - Refresh tokens are single-use and rotate: each successful refresh grant
//!   retires the presented refresh token and issues a new one. Presenting a retired,
//!   revoked or unknown one answers HTTP 400 `{"error":"invalid_grant"}` (or, with
//!   [`IdpOptions::github_style`], HTTP 200 `{"error":"bad_refresh_token"}`).
//! - Access tokens expire `expires_in` after issue, on the IdP's [`Clock`] (share a
//!   [`ManualClock`] with the token source to test expiry without sleeping).
//!   Replaced access tokens stay valid until they expire, as at GitHub; revoking a
//!   user's grant invalidates all of theirs.
//! - Client authentication is checked (HTTP Basic or form fields); a wrong client
//!   answers 401 `invalid_client`.
//! - Faults can be queued ([`Fault`]): 500, 429 with `Retry-After`, a hang. Latency
//!   can be added to every answer.
//! - [`Idp::seed`] issues a user's initial tokens (as a login would), ready for
//!   `LinkStore::put_link`; like a real provider, a new login retires the user's
//!   previous refresh token. [`Idp::is_valid_access_token`] lets test upstreams
//!   check injected credentials.
//! - Every refresh test checks the whole tally with [`Idp::assert_grants`]
//!   (attempts, successes, rejections, and reuse, which must be zero): successes
//!   alone cannot tell one refresh from one success plus many double spends.
//!
//! Usage:
//! ```ignore
//! let idp = Idp::start(IdpOptions::default()).await;
//! store.put_link("idp", user, &idp.seed(user)).await?;
//! let providers = vec![idp.provider("idp")];
//! // ... after the test: assert_eq!(idp.refreshes(), 1);
//! ```

#[path = "idp_device.rs"]
mod device;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use secrecy::SecretString;
use tokenproxy::config::ProviderConfig;
use tokenproxy::store::TokenSet;
use tokenproxy::tokens::{Clock, SystemClock};
use uuid::Uuid;

/// A clock tests move by hand; shared by the IdP and the token sources.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    /// Starts at the current wall-clock time (so database timestamps stay close).
    pub fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new(Utc::now())))
    }
    /// Moves time forward.
    pub fn advance(&self, d: Duration) {
        *self.0.lock() += chrono::Duration::from_std(d).unwrap();
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock()
    }
}

/// A misbehaviour applied to one upcoming token request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// HTTP 500 with an empty JSON body; nothing is processed.
    ServerError,
    /// HTTP 429 with `Retry-After: <secs>`; nothing is processed.
    TooManyRequests {
        /// Seconds in `Retry-After`.
        retry_after_secs: u64,
    },
    /// Wait this long, then answer 503; nothing is processed (a client with a
    /// shorter deadline sees a timeout).
    Hang(Duration),
    /// Process the grant (rotating the refresh token), then drop the connection
    /// without answering: the client cannot know whether it was processed.
    ProcessThenDrop,
}

/// How the IdP behaves.
pub struct IdpOptions {
    /// Expected client id.
    pub client_id: String,
    /// Expected client secret.
    pub client_secret: String,
    /// Lifetime of issued access tokens; `None` = they never expire (no `expires_in`).
    pub expires_in: Option<Duration>,
    /// Rotate refresh tokens (single-use). When false the same refresh token is
    /// kept and the response carries none.
    pub rotate: bool,
    /// GitHub's dialect: rejected refresh tokens get HTTP 200 `bad_refresh_token`.
    pub github_style: bool,
    /// Gitea/Forgejo's dialect: a reused refresh token gets 400
    /// `unauthorized_client` "token was already used".
    pub gitea_style: bool,
    /// Add `refresh_token_expires_in` (GitHub Apps) to every token response.
    pub refresh_token_expires_in: Option<u64>,
    /// The `issuer` its discovery document names; `None` = its own base URL.
    pub discovery_issuer: Option<String>,
    /// Time source for expiry.
    pub clock: Arc<dyn Clock>,
    /// Serve HTTPS with this acceptor (e.g. `TestCa::new().acceptor()`), else HTTP.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Default for IdpOptions {
    fn default() -> Self {
        Self {
            client_id: "test-client".into(),
            client_secret: "test-secret".into(),
            expires_in: Some(Duration::from_secs(3600)),
            rotate: true,
            github_style: false,
            gitea_style: false,
            refresh_token_expires_in: None,
            discovery_issuer: None,
            clock: Arc::new(SystemClock),
            tls: None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RefreshState {
    Current,
    Used,
    Revoked,
    /// Replaced by a later login of the same user.
    Superseded,
}

#[derive(Default)]
struct State {
    refresh: HashMap<String, (Uuid, RefreshState)>,
    access: HashMap<String, (Uuid, Option<DateTime<Utc>>, bool)>,
    current: HashMap<Uuid, String>,
    per_token: HashMap<String, u64>,
    faults: VecDeque<Fault>,
    attempt_times: Vec<tokio::time::Instant>,
    latency: Duration,
    auth_methods: Vec<&'static str>,
    extra_params: Vec<Vec<(String, String)>>,
    device: device::DeviceState,
}

struct Shared {
    opts: IdpOptions,
    state: Mutex<State>,
    attempts: AtomicU64,
    refreshes: AtomicU64,
    rejected: AtomicU64,
    reused: AtomicU64,
    seq: AtomicU64,
}

/// The running test identity provider. Stops when dropped.
pub struct Idp {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Idp {
    /// Starts the IdP on 127.0.0.1 with an ephemeral port.
    pub async fn start(opts: IdpOptions) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            opts,
            state: Mutex::new(State::default()),
            attempts: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            seq: AtomicU64::new(0),
        });
        let s = shared.clone();
        let tls = shared.opts.tls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move {
                            let (resp, drop_connection) = handle(&s, req).await;
                            if drop_connection {
                                // An error from the service makes hyper close the
                                // connection without a response.
                                return Err(std::io::Error::other("dropped by fault"));
                            }
                            Ok(resp)
                        }
                    });
                    let server = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = server.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                        None => {
                            let _ = server.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Self { addr, shared, task }
    }

    /// The IdP's base URL (its OIDC issuer).
    pub fn base_url(&self) -> String {
        self.token_url()
            .trim_end_matches("/oauth/token")
            .to_string()
    }

    /// The token endpoint URL.
    pub fn token_url(&self) -> String {
        let scheme = if self.shared.opts.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}/oauth/token", self.addr)
    }

    /// A provider config pointing at this IdP (client_secret_basic, 2 s deadline).
    pub fn provider(&self, id: &str) -> ProviderConfig {
        self.provider_with(id, "")
    }

    /// Like [`Idp::provider`], with extra TOML lines (e.g. `client_auth = "client_secret_post"`).
    pub fn provider_with(&self, id: &str, extra_toml: &str) -> ProviderConfig {
        let o = &self.shared.opts;
        let text = format!(
            "id = {id:?}\nclient_id = {:?}\nclient_secret = {:?}\ntoken_url = {:?}\ntimeout = \"2s\"\n{extra_toml}\n",
            o.client_id,
            o.client_secret,
            self.token_url()
        );
        toml::from_str(&text).expect("valid provider config")
    }

    /// Issues a user's initial tokens (as a login would); expiring after `expires_in`.
    pub fn seed(&self, user: Uuid) -> TokenSet {
        let exp = self
            .shared
            .opts
            .expires_in
            .map(|d| self.now() + chrono::Duration::from_std(d).unwrap());
        self.seed_with_expiry(user, exp)
    }

    /// Issues a user's initial tokens whose access token expires at `expiry`
    /// (in the past = already expired at the IdP too).
    pub fn seed_with_expiry(&self, user: Uuid, expiry: Option<DateTime<Utc>>) -> TokenSet {
        let mut st = self.shared.state.lock();
        // A new login replaces the user's grant, as at real providers: the refresh
        // token a stale row still holds must stop working.
        if let Some(old) = st.current.get(&user).cloned() {
            if let Some((_, state @ RefreshState::Current)) = st.refresh.get_mut(&old) {
                *state = RefreshState::Superseded;
            }
        }
        let (access, refresh) = issue(&self.shared, &mut st, user, expiry);
        TokenSet {
            access_token: SecretString::from(access),
            refresh_token: SecretString::from(refresh),
            expiry,
            extra: None,
        }
    }

    /// Revokes the user's grant: their refresh token answers `invalid_grant` and
    /// their access tokens stop working.
    pub fn revoke(&self, user: Uuid) {
        let mut st = self.shared.state.lock();
        for (_, (u, s)) in st.refresh.iter_mut() {
            if *u == user {
                *s = RefreshState::Revoked;
            }
        }
        for (_, (u, _, revoked)) in st.access.iter_mut() {
            if *u == user {
                *revoked = true;
            }
        }
        st.current.remove(&user);
    }

    /// Queues a fault for the next token request (faults apply in order).
    pub fn push_fault(&self, f: Fault) {
        self.shared.state.lock().faults.push_back(f);
    }

    /// Drops every queued fault (the provider heals).
    pub fn clear_faults(&self) {
        self.shared.state.lock().faults.clear();
    }

    /// Delay added before every answer.
    pub fn set_latency(&self, d: Duration) {
        self.shared.state.lock().latency = d;
    }

    /// Every token request received (faulted, rejected and successful).
    pub fn attempts(&self) -> u64 {
        self.shared.attempts.load(Ordering::SeqCst)
    }

    /// Successful refresh grants.
    pub fn refreshes(&self) -> u64 {
        self.shared.refreshes.load(Ordering::SeqCst)
    }

    /// Refresh grants answered `invalid_grant` (or `bad_refresh_token`).
    pub fn rejected(&self) -> u64 {
        self.shared.rejected.load(Ordering::SeqCst)
    }

    /// Rejected grants that presented an already used (rotated-away) refresh token:
    /// a double spend, which coordination must prevent.
    pub fn reused(&self) -> u64 {
        self.shared.reused.load(Ordering::SeqCst)
    }

    /// When each token request arrived (before latency or faults), in order.
    pub fn attempt_times(&self) -> Vec<tokio::time::Instant> {
        self.shared.state.lock().attempt_times.clone()
    }

    /// The IdP's whole tally of refresh grants, for one assertion.
    pub fn grants(&self) -> Grants {
        Grants {
            attempts: self.attempts(),
            successes: self.refreshes(),
            rejections: self.rejected(),
            reuse: self.reused(),
        }
    }

    /// Asserts the IdP saw exactly this many token requests, successful grants and
    /// rejected grants, and that no retired refresh token was presented again.
    #[track_caller]
    pub fn assert_grants(&self, attempts: u64, successes: u64, rejections: u64) {
        assert_eq!(
            self.grants(),
            Grants {
                attempts,
                successes,
                rejections,
                reuse: 0
            },
            "the IdP's tally of refresh grants"
        );
    }

    /// How many grants presented this refresh token.
    pub fn attempts_with(&self, refresh_token: &str) -> u64 {
        let st = self.shared.state.lock();
        st.per_token.get(refresh_token).copied().unwrap_or(0)
    }

    /// The user's one currently valid refresh token (None after revocation).
    pub fn current_refresh_token(&self, user: Uuid) -> Option<String> {
        self.shared.state.lock().current.get(&user).cloned()
    }

    /// Whether this access token was issued here, is not revoked and has not expired.
    pub fn is_valid_access_token(&self, token: &str) -> bool {
        let now = self.now();
        let st = self.shared.state.lock();
        matches!(st.access.get(token), Some((_, exp, false)) if exp.is_none_or(|e| e > now))
    }

    /// Why an access token is or is not valid, for assertion messages.
    pub fn describe_access_token(&self, token: &str) -> String {
        let now = self.now();
        let st = self.shared.state.lock();
        match st.access.get(token) {
            None => "unknown to the IdP".into(),
            Some((_, _, true)) => "revoked".into(),
            Some((_, Some(exp), _)) if *exp <= now => format!("expired at {exp} (now {now})"),
            Some((_, exp, _)) => format!("valid until {exp:?}"),
        }
    }

    /// Client authentication methods seen, in order (`"basic"` or `"post"`).
    pub fn auth_methods(&self) -> Vec<&'static str> {
        self.shared.state.lock().auth_methods.clone()
    }

    /// Form parameters of every request other than the standard ones.
    pub fn extra_params_seen(&self) -> Vec<Vec<(String, String)>> {
        self.shared.state.lock().extra_params.clone()
    }

    fn now(&self) -> DateTime<Utc> {
        self.shared.opts.clock.now()
    }
}

/// What the IdP saw, as compared by [`Idp::assert_grants`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grants {
    /// Every token request (faulted, rejected and successful).
    pub attempts: u64,
    /// Successful refresh grants.
    pub successes: u64,
    /// Grants answered `invalid_grant` (or `bad_refresh_token`).
    pub rejections: u64,
    /// Rejected grants presenting an already used refresh token (a double spend).
    pub reuse: u64,
}

fn issue(
    shared: &Shared,
    st: &mut State,
    user: Uuid,
    expiry: Option<DateTime<Utc>>,
) -> (String, String) {
    let n = shared.seq.fetch_add(1, Ordering::SeqCst);
    let access = format!("at_{n}_{:016x}", rand::random::<u64>());
    let refresh = format!("rt_{n}_{:016x}", rand::random::<u64>());
    st.access.insert(access.clone(), (user, expiry, false));
    st.refresh
        .insert(refresh.clone(), (user, RefreshState::Current));
    st.current.insert(user, refresh.clone());
    (access, refresh)
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Answers one request; `true` = drop the connection instead of answering.
async fn handle(s: &Shared, req: Request<hyper::body::Incoming>) -> (Response<Full<Bytes>>, bool) {
    let mut drop_connection = false;
    let resp = answer(s, req, &mut drop_connection).await;
    (resp, drop_connection)
}

async fn answer(
    s: &Shared,
    req: Request<hyper::body::Incoming>,
    drop_connection: &mut bool,
) -> Response<Full<Bytes>> {
    // Discovery is not a token request: not counted, no faults.
    if req.method() == hyper::Method::GET && req.uri().path() == "/.well-known/openid-configuration"
    {
        let host = req
            .headers()
            .get("host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let scheme = if s.opts.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let base = format!("{scheme}://{host}");
        let issuer = s.opts.discovery_issuer.clone().unwrap_or(base.clone());
        return json(
            StatusCode::OK,
            serde_json::json!({
                "issuer": issuer,
                "authorization_endpoint": format!("{base}/oauth/authorize"),
                "token_endpoint": format!("{base}/oauth/token"),
                "device_authorization_endpoint": format!("{base}/oauth/device"),
            }),
        );
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    // Device flow and revocation (idp_device.rs): not refresh grants.
    if device::serves(s, &parts, &body) {
        let latency = s.state.lock().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        return device::answer(s, &parts, &body).expect("served");
    }
    s.attempts.fetch_add(1, Ordering::SeqCst);
    let (fault, latency) = {
        let mut st = s.state.lock();
        st.attempt_times.push(tokio::time::Instant::now());
        (st.faults.pop_front(), st.latency)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match fault {
        Some(Fault::ServerError) => {
            return json(StatusCode::INTERNAL_SERVER_ERROR, serde_json::json!({}))
        }
        Some(Fault::TooManyRequests { retry_after_secs }) => {
            let mut r = json(StatusCode::TOO_MANY_REQUESTS, serde_json::json!({}));
            r.headers_mut()
                .insert("retry-after", retry_after_secs.to_string().parse().unwrap());
            return r;
        }
        Some(Fault::Hang(d)) => {
            tokio::time::sleep(d).await;
            return json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({}));
        }
        Some(Fault::ProcessThenDrop) => *drop_connection = true,
        None => {}
    }
    let basic = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    if parts.method != hyper::Method::POST || parts.uri.path() != "/oauth/token" {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found"}),
        );
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    // Client authentication: Basic (each part form-urlencoded, RFC 6749 §2.3.1) or body.
    let (method, id, secret) = match basic {
        Some(b) => {
            let (id, secret) = b.split_once(':').unwrap_or((&b, ""));
            let dec = |x: &str| {
                url::form_urlencoded::parse(format!("x={x}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            };
            ("basic", dec(id), dec(secret))
        }
        None => (
            "post",
            form.get("client_id").cloned().unwrap_or_default(),
            form.get("client_secret").cloned().unwrap_or_default(),
        ),
    };
    {
        let mut st = s.state.lock();
        st.auth_methods.push(method);
        st.extra_params.push(
            form.iter()
                .filter(|(k, _)| {
                    !["grant_type", "refresh_token", "client_id", "client_secret"]
                        .contains(&k.as_str())
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        );
    }
    if id != s.opts.client_id || secret != s.opts.client_secret {
        return json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "invalid_client"}),
        );
    }
    if form.get("grant_type").map(String::as_str) != Some("refresh_token") {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "unsupported_grant_type"}),
        );
    }
    let presented = form.get("refresh_token").cloned().unwrap_or_default();
    let now = s.opts.clock.now();
    let mut st = s.state.lock();
    *st.per_token.entry(presented.clone()).or_default() += 1;
    let user = match st.refresh.get(&presented) {
        Some((user, RefreshState::Current)) => *user,
        other => {
            if matches!(other, Some((_, RefreshState::Used))) {
                s.reused.fetch_add(1, Ordering::SeqCst);
            }
            s.rejected.fetch_add(1, Ordering::SeqCst);
            let reused = matches!(other, Some((_, RefreshState::Used)));
            return if s.opts.gitea_style && reused {
                json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "unauthorized_client",
                        "error_description": "token was already used"}),
                )
            } else if s.opts.github_style {
                json(
                    StatusCode::OK,
                    serde_json::json!({"error": "bad_refresh_token",
                        "error_description": "The refresh token passed is incorrect or expired."}),
                )
            } else {
                json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "invalid_grant"}),
                )
            };
        }
    };
    let expiry = s
        .opts
        .expires_in
        .map(|d| now + chrono::Duration::from_std(d).unwrap());
    let mut body = serde_json::json!({"token_type": "bearer", "scope": "repo"});
    if s.opts.rotate {
        st.refresh.get_mut(&presented).unwrap().1 = RefreshState::Used;
        let (access, refresh) = issue(s, &mut st, user, expiry);
        body["access_token"] = access.into();
        body["refresh_token"] = refresh.into();
    } else {
        let n = s.seq.fetch_add(1, Ordering::SeqCst);
        let access = format!("at_{n}_{:016x}", rand::random::<u64>());
        st.access.insert(access.clone(), (user, expiry, false));
        body["access_token"] = access.into();
    }
    if let Some(d) = s.opts.expires_in {
        body["expires_in"] = d.as_secs().into();
    }
    if let Some(r) = s.opts.refresh_token_expires_in {
        body["refresh_token_expires_in"] = r.into();
    }
    s.refreshes.fetch_add(1, Ordering::SeqCst);
    json(StatusCode::OK, body)
}
