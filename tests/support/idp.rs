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
//! - Faults can be queued ([`Fault`]): 500, 429 with `Retry-After`, a hang. A
//!   standing fault ([`Idp::set_standing_fault`]) applies to every request until
//!   cleared (an outage). Latency can be added to every answer.
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

#[path = "idp_authorize.rs"]
mod authorize;
pub use authorize::IdTokenFault;

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
    /// Process the grant (rotating the refresh token), then wait this long
    /// before answering: the old refresh token is spent while the answer is
    /// still on its way.
    ProcessThenDelay(Duration),
    /// HTTP 503 with this `Retry-After` value verbatim (seconds or an HTTP-date);
    /// nothing is processed.
    Unavailable {
        /// The header's value.
        retry_after: String,
    },
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
    /// Members of its discovery document replaced by these values (an endpoint
    /// named elsewhere, e.g. on a plain-http host).
    pub discovery_overrides: Vec<(&'static str, String)>,
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
            discovery_overrides: Vec::new(),
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
    /// Applied to every request no queued fault claims, until cleared.
    standing: Option<Fault>,
    /// When each refresh token was issued (to tell which exchange a crash cut).
    issued_at: HashMap<String, tokio::time::Instant>,
    /// The query string of the grant that issued each refresh token (a caller tag).
    issued_by: HashMap<String, String>,
    /// Every presentation of an already used refresh token.
    reuses: Vec<Reuse>,
    attempt_times: Vec<tokio::time::Instant>,
    latency: Duration,
    /// Faults applied to every request presenting one user's refresh token.
    user_faults: HashMap<Uuid, Fault>,
    auth_methods: Vec<&'static str>,
    extra_params: Vec<Vec<(String, String)>>,
    authorize: authorize::AuthState,
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
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

/// Counts one token request as in flight while it lives.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(s: &'a Shared) -> Self {
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(s)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
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
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
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

    /// Applies `fault` to every token request that no queued fault claims, until
    /// called with `None` (an outage rather than one bad answer).
    pub fn set_standing_fault(&self, fault: Option<Fault>) {
        self.shared.state.lock().standing = fault;
    }

    /// The query string of the token URL whose grant issued this refresh token
    /// (`None` for a seeded one): a tag telling which client exchanged it.
    pub fn issued_by(&self, refresh_token: &str) -> Option<String> {
        self.shared
            .state
            .lock()
            .issued_by
            .get(refresh_token)
            .cloned()
    }

    /// Every presentation of an already used refresh token, in order.
    pub fn reuses(&self) -> Vec<Reuse> {
        self.shared.state.lock().reuses.clone()
    }

    /// When this refresh token was issued (by a grant or [`Idp::seed`]).
    pub fn issued_at(&self, refresh_token: &str) -> Option<tokio::time::Instant> {
        self.shared
            .state
            .lock()
            .issued_at
            .get(refresh_token)
            .copied()
    }

    /// Applies `f` to every token request presenting `user`'s refresh token (after
    /// the queued faults), until [`Idp::heal_user`]: one link's IdP trouble.
    pub fn fail_user(&self, user: Uuid, f: Fault) {
        self.shared.state.lock().user_faults.insert(user, f);
    }

    /// Ends [`Idp::fail_user`] for `user`.
    pub fn heal_user(&self, user: Uuid) {
        self.shared.state.lock().user_faults.remove(&user);
    }

    /// Most token requests ever in flight at once.
    pub fn max_in_flight(&self) -> u64 {
        self.shared.max_in_flight.load(Ordering::SeqCst)
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

    /// The account the login page offers (else a fresh one per page).
    pub fn set_login_account(&self, account: Uuid) {
        self.shared.state.lock().authorize.account = Some(account);
    }

    /// Makes the next id_tokens wrong in one way (`None` heals).
    pub fn set_id_token_fault(&self, fault: Option<IdTokenFault>) {
        self.shared.state.lock().authorize.fault = fault;
    }

    /// Login pages shown.
    pub fn login_pages(&self) -> u64 {
        self.shared.state.lock().authorize.pages
    }

    /// `authorization_code` grants received (answered or refused).
    pub fn code_grants(&self) -> u64 {
        self.shared.state.lock().authorize.code_grants
    }

    /// The account an access token was issued to.
    pub fn account_of(&self, access_token: &str) -> Option<Uuid> {
        self.shared
            .state
            .lock()
            .access
            .get(access_token)
            .map(|(u, _, _)| *u)
    }

    /// Submits the login page of `authorize_url` (the provider URL the proxy
    /// redirected to) as `account` would, approving or denying, and returns
    /// where the IdP redirects the browser (the proxy's callback).
    pub async fn submit_login(&self, authorize_url: &str, account: Uuid, approve: bool) -> String {
        let u = url::Url::parse(authorize_url).unwrap();
        let mut form: Vec<(String, String)> = u.query_pairs().into_owned().collect();
        form.push(("account".into(), account.to_string()));
        form.push((
            "decision".into(),
            if approve { "approve" } else { "deny" }.into(),
        ));
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&form)
            .finish();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let req = Request::post(format!("http://{}/oauth/authorize", self.addr))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FOUND, "the IdP redirects back");
        resp.headers()["location"].to_str().unwrap().to_string()
    }
}

/// One presentation of an already used refresh token (a double spend).
#[derive(Debug, Clone)]
pub struct Reuse {
    /// Whose token it was.
    pub user: Uuid,
    /// The refresh token presented again.
    pub refresh_token: String,
    /// The query string of the token URL it was presented to (the caller's tag).
    pub by: String,
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
    st.issued_at
        .insert(refresh.clone(), tokio::time::Instant::now());
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

/// The answer a fault gives instead of processing the request, if any.
async fn apply_fault(
    fault: Option<Fault>,
    drop_connection: &mut bool,
) -> Option<Response<Full<Bytes>>> {
    match fault? {
        Fault::ServerError => Some(json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({}),
        )),
        Fault::TooManyRequests { retry_after_secs } => {
            let mut r = json(StatusCode::TOO_MANY_REQUESTS, serde_json::json!({}));
            r.headers_mut()
                .insert("retry-after", retry_after_secs.to_string().parse().unwrap());
            Some(r)
        }
        Fault::Unavailable { retry_after } => {
            let mut r = json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({}));
            r.headers_mut()
                .insert("retry-after", retry_after.parse().unwrap());
            Some(r)
        }
        Fault::Hang(d) => {
            tokio::time::sleep(d).await;
            Some(json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({})))
        }
        Fault::ProcessThenDrop => {
            *drop_connection = true;
            None
        }
        // Applied once the grant is processed (see `answer`).
        Fault::ProcessThenDelay(_) => None,
    }
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
    // The login page and JWKS are not token requests: not counted, no faults.
    if authorize::is_authorize(&req) {
        return authorize::answer(s, req).await;
    }
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
        let mut doc = serde_json::json!({
                "issuer": issuer,
                "authorization_endpoint": format!("{base}/oauth/authorize"),
                "token_endpoint": format!("{base}/oauth/token"),
                "device_authorization_endpoint": format!("{base}/oauth/device"),
                // RFC 8414 §2 / RFC 7009: where real providers (Google, Entra,
                // Keycloak, GitLab) name their revocation endpoint.
                "revocation_endpoint": format!("{base}/oauth/revoke"),
                "jwks_uri": format!("{base}/oauth/jwks"),
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "grant_types_supported": [
                    "authorization_code",
                    "refresh_token",
                    "urn:ietf:params:oauth:grant-type:device_code"
                ],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        });
        for (k, v) in &s.opts.discovery_overrides {
            doc[*k] = v.clone().into();
        }
        return json(StatusCode::OK, doc);
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
    let _in_flight = InFlight::enter(s);
    let (fault, latency) = {
        let mut st = s.state.lock();
        st.attempt_times.push(tokio::time::Instant::now());
        let fault = st.faults.pop_front().or_else(|| st.standing.clone());
        (fault, st.latency)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let delay_answer = match fault {
        Some(Fault::ProcessThenDelay(d)) => Some(d),
        _ => None,
    };
    if let Some(r) = apply_fault(fault, drop_connection).await {
        return r;
    }
    let basic = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let issuer = s.opts.discovery_issuer.clone().unwrap_or_else(|| {
        let host = parts.headers.get("host").and_then(|v| v.to_str().ok());
        let scheme = if s.opts.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", host.unwrap_or_default())
    });
    if parts.method != hyper::Method::POST || parts.uri.path() != "/oauth/token" {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found"}),
        );
    }
    let tag = parts.uri.query().unwrap_or_default().to_string();
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
    if form.get("grant_type").map(String::as_str) == Some("authorization_code") {
        return authorize::exchange_code(s, &form, &issuer);
    }
    if form.get("grant_type").map(String::as_str) != Some("refresh_token") {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "unsupported_grant_type"}),
        );
    }
    let presented = form.get("refresh_token").cloned().unwrap_or_default();
    let now = s.opts.clock.now();
    let user_fault = {
        let st = s.state.lock();
        st.refresh
            .get(&presented)
            .and_then(|(u, _)| st.user_faults.get(u).cloned())
    };
    if let Some(r) = apply_fault(user_fault, drop_connection).await {
        return r;
    }
    let resp = grant(s, presented, now, tag);
    if let Some(d) = delay_answer.filter(|_| resp.status() == StatusCode::OK) {
        tokio::time::sleep(d).await;
    }
    resp
}

/// Processes a refresh grant for `presented` (client already authenticated).
fn grant(s: &Shared, presented: String, now: DateTime<Utc>, tag: String) -> Response<Full<Bytes>> {
    let mut st = s.state.lock();
    *st.per_token.entry(presented.clone()).or_default() += 1;
    let user = match st.refresh.get(&presented).copied() {
        Some((user, RefreshState::Current)) => user,
        other => {
            if let Some((user, RefreshState::Used)) = other {
                s.reused.fetch_add(1, Ordering::SeqCst);
                let reuse = Reuse {
                    user,
                    refresh_token: presented.clone(),
                    by: tag.clone(),
                };
                st.reuses.push(reuse);
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
        st.issued_by.insert(refresh.clone(), tag);
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
