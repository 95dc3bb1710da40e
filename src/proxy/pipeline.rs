//! The life of one reverse-mode request, as named phases:
//! identify caller → route → authorize → token → inject → forward → respond.
//!
//! Each phase is a method on [`Pipeline`] with one job, so forward (CONNECT) mode
//! reuses them with a different identity and routing phase, chosen by the
//! [`Entry`] the request came through. [`Pipeline::handle_entry`] strings them
//! together and writes the one log line and the metrics of the request.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::{BodyEnd, IdleBody, Reserved, RetryBudget};
use super::caller::{Caller, CallerIdentity};
use super::error::ProxyError;
use super::headers::{self, Forwarded, ERROR_HEADER};
use super::inject::inject_credential;
use super::route::{Route, Router};
use super::server::ConnInfo;
use super::tunnel::{Entry, ForwardMode, Tunnel};
use super::upstream::Upstreams;
use super::{ProxyBody, TokenLookup};
use crate::telemetry::{Metrics, ProviderLabels};
use crate::tokens::{AccessToken, TokenError};

/// Request bodies up to this size are buffered so a request rejected with 401
/// can be retried once with a refreshed token; larger bodies stream.
pub const RETRY_BODY_LIMIT: u64 = 64 * 1024;

/// Everything the request phases need, shared by all connections.
pub struct Pipeline {
    /// Routes, longest prefix first.
    pub router: Router,
    /// Caller identification.
    pub callers: CallerIdentity,
    /// Access tokens.
    pub tokens: Arc<dyn TokenLookup>,
    /// Upstream clients.
    pub upstreams: Upstreams,
    /// Counters and histograms.
    pub metrics: Arc<Metrics>,
    /// Add `X-Forwarded-*` and `Via`.
    pub forwarded_headers: bool,
    /// Time a client has to send a small (buffered) request body: without it a
    /// client that declares a body and never sends it holds its slot forever.
    pub body_timeout: std::time::Duration,
    /// Longest a streamed body (either direction) may deliver nothing.
    pub body_idle_timeout: std::time::Duration,
    /// Memory for replayable request bodies, shared by all requests.
    pub retry_budget: Arc<RetryBudget>,
    /// Failed authentications per source and per credential.
    pub auth_failures: super::abuse::AuthFailures,
    /// Forward mode (CONNECT, absolute-form), when `[forward]` is configured.
    pub forward: Option<ForwardMode>,
    /// tokenproxy's own endpoints under `/_tokenproxy/`.
    pub endpoints: super::endpoints::Endpoints,
    /// Coder mode: where users link again (`<coder.access_url>/external-auth/`).
    pub coder_login_base: Option<String>,
}

/// What the log line and metrics record about a request as it moves along.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) route: Option<Arc<Route>>,
    pub(super) user: Option<uuid::Uuid>,
    /// `none` (never got that far), `served`, `refreshed_after_401` (retried),
    /// `refreshed_no_retry` (body streamed), `refresh_failed`, `rejected_not_token`
    /// (a 401 a refresh cannot fix, passed through), or the error code
    /// the token source answered.
    pub(super) token: &'static str,
    upstream: Option<std::time::Duration>,
    attempts: u8,
}

impl Outcome {
    /// Nothing happened yet.
    pub(super) fn new() -> Self {
        Self {
            token: "none",
            ..Default::default()
        }
    }
}

/// A request body as it will be sent: replayable when small (holding its share
/// of the retry budget while it is kept), streamed otherwise.
enum OutBody {
    Replayable(Bytes, Option<Reserved>),
    Stream(Incoming),
}

/// The upstream request minus its credential, kept so it can be sent twice.
struct Prepared {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// The worker whose upstream clients send it.
    worker: usize,
}

impl Pipeline {
    /// Serves one request that arrived on the listener and records it.
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<ProxyBody> {
        let entry = if self.forward.is_some() && is_absolute_form(&req) {
            Entry::Absolute
        } else {
            Entry::Reverse
        };
        self.handle_entry(req, conn, &entry).await
    }

    /// Serves one request that arrived through `entry` and records it.
    pub async fn handle_entry(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        entry: &Entry,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let method = req.method().clone();
        let mut outcome = Outcome::new();
        let resp = match self.run_phases(req, conn, entry, &mut outcome).await {
            Ok(resp) => resp,
            Err(e) => {
                if outcome.token == "none" && matches!(e, ProxyError::Token(_)) {
                    outcome.token = e.code();
                }
                let mut resp = self.error_response(&e, &outcome);
                if e == ProxyError::Token(TokenError::IdpUnavailable) {
                    self.add_retry_after(&mut resp, &outcome);
                }
                resp
            }
        };
        self.log_and_count(&method, &resp, &outcome, start.elapsed());
        resp
    }

    /// The answer for `e`; in Coder mode a user who must link again is sent to
    /// Coder's page for the provider.
    pub(super) fn error_response(&self, e: &ProxyError, outcome: &Outcome) -> Response<ProxyBody> {
        let provider = outcome.route.as_ref().map(|r| &*r.provider);
        // A dead or missing link: offer the caller a way to relink — Coder's own
        // external-auth page beside Coder, else tokenproxy's browser sign-in.
        let login = match (e, provider) {
            (ProxyError::Token(TokenError::LinkMissing | TokenError::ReauthRequired), Some(p)) => {
                match (&self.coder_login_base, outcome.user) {
                    (Some(base), _) => Some(format!("{base}{p}")),
                    (None, Some(u)) => self.endpoints.login_url(p, u),
                    (None, None) => None,
                }
            }
            _ => None,
        };
        e.to_response_with_login(provider, login.as_deref())
    }

    /// `Retry-After` on an `idp_unavailable` answer while the provider is backing off.
    fn add_retry_after(&self, resp: &mut Response<ProxyBody>, outcome: &Outcome) {
        let (Some(route), Some(user)) = (&outcome.route, outcome.user) else {
            return;
        };
        if let Some(wait) = self.tokens.retry_after(&route.provider, user) {
            // Whole seconds (RFC 9110 §10.2.3), rounded up so a retry is not early.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
    }

    async fn run_phases(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        entry: &Entry,
        outcome: &mut Outcome,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        check_request_framing(&req)?;
        let (caller, route, uri) = self.enter(&req, conn, entry, outcome).await?;
        outcome.route = Some(route.clone());
        route.check_method(req.method())?;
        authorize(&caller, &route)?;
        let token = self
            .token_or_prewarm(&route, &caller, &uri, conn.worker)
            .await?;
        outcome.token = "served";
        let host = match entry {
            Entry::Reverse => route.host.clone(),
            // Forward mode: the host the client asked for (wildcard routes serve many).
            Entry::Absolute | Entry::Tunnel(_) => uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .ok_or(ProxyError::BadRequest("invalid request target"))?,
        };
        let (parts, body) = req.into_parts();
        // Reverse mode: the caller's cookies belong to tokenproxy's origin, not
        // the upstream's, unless the route says otherwise.
        let cookies = !matches!(entry, Entry::Reverse) || route.cookies;
        let prepared = self.upstream_request(parts, host, uri, conn, cookies);
        let body = read_body(body, self.body_timeout, &self.retry_budget).await?;
        // Reverse mode: the caller only knows our prefix, so redirects to the
        // upstream must come back through it.
        let redirects = matches!(entry, Entry::Reverse).then_some(&*route);
        self.forward(&route, &caller, prepared, body, token, outcome)
            .await
            .map(|resp| respond(resp, redirects, self.body_idle_timeout))
    }

    /// Phases by entry: who is calling, which route, and the upstream URI.
    async fn enter(
        &self,
        req: &Request<Incoming>,
        conn: ConnInfo,
        entry: &Entry,
        outcome: &mut Outcome,
    ) -> Result<(Caller, Arc<Route>, Uri), ProxyError> {
        Ok(match entry {
            Entry::Reverse => {
                let caller = self.identify_caller(req.headers(), conn, false).await?;
                outcome.user = Some(caller.user_id);
                let (route, uri) = self.route(req)?;
                (caller, route, uri)
            }
            Entry::Absolute => {
                let caller = self.identify_caller(req.headers(), conn, true).await?;
                outcome.user = Some(caller.user_id);
                let (route, uri) = self.route_absolute(req)?;
                (caller, route, uri)
            }
            Entry::Tunnel(tunnel) => {
                outcome.route = Some(tunnel.route.clone());
                let caller = self
                    .identify_caller(&tunnel.credentials, conn, true)
                    .await?;
                outcome.user = Some(caller.user_id);
                let uri = route_tunneled(req, tunnel)?;
                (caller, tunnel.route.clone(), uri)
            }
        })
    }

    /// Phase: who is calling (`proxy`: forward mode, `Proxy-Authorization`
    /// only). A source over `callers.auth_failure_limit` is answered 429 before
    /// any lookup; a failure with a credential presented counts against it.
    pub(super) async fn identify_caller(
        &self,
        headers: &HeaderMap,
        conn: ConnInfo,
        proxy: bool,
    ) -> Result<Caller, ProxyError> {
        let ip = conn.remote.ip();
        self.auth_failures.check(ip)?;
        let identified = if proxy {
            self.callers.identify_proxy_from(headers, Some(ip)).await
        } else {
            self.callers.identify_from(headers, Some(ip)).await
        };
        identified.map_err(|e| self.auth_failures.failed(ip, headers, e))
    }

    /// Phase: which route, and the upstream URI it becomes. Only the path and query
    /// of the request are looked at — never `Host` or an absolute-form authority.
    fn route(&self, req: &Request<Incoming>) -> Result<(Arc<Route>, Uri), ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::BadRequest(
                "CONNECT is not supported on this listener",
            ));
        }
        let (route, uri) = self.router.resolve(req.uri().path(), req.uri().query())?;
        Ok((route.clone(), uri))
    }

    /// Phase (forward mode, absolute-form): the route of the target host, and the
    /// target itself as the upstream URI. Plain `http` targets are refused unless
    /// the route allows them: credentials travel only over TLS by default.
    fn route_absolute(&self, req: &Request<Incoming>) -> Result<(Arc<Route>, Uri), ProxyError> {
        let uri = req.uri();
        let default_port = match uri.scheme_str() {
            Some("https") => 443,
            Some("http") => 80,
            _ => return Err(ProxyError::BadRequest("unsupported scheme")),
        };
        let authority = uri
            .authority()
            .ok_or(ProxyError::BadRequest("the target needs a host"))?;
        let port = authority.port_u16().unwrap_or(default_port);
        let route = self
            .router
            .find_host(authority.host(), port, default_port)
            .ok_or(ProxyError::HostNotAllowed)?;
        if default_port == 80 && !route.allow_plain_http {
            return Err(ProxyError::BadRequest(
                "credentials are only sent over https: use an https:// URL",
            ));
        }
        let target = upstream_authority(authority.host(), port, default_port)?;
        let uri = forward_uri(uri.scheme_str().unwrap_or("https"), target, req.uri())?;
        Ok((route.clone(), uri))
    }

    /// Phase: an access token for the caller at the route's provider.
    async fn token(&self, route: &Route, caller: &Caller) -> Result<AccessToken, ProxyError> {
        Ok(self.tokens.get(&route.provider, caller.user_id).await?)
    }

    /// The token phase, opening the upstream connection meanwhile when the token
    /// is not at hand (a refresh or a store read): the handshake then overlaps the
    /// wait. A cache hit is ready at the first poll and starts nothing.
    async fn token_or_prewarm(
        &self,
        route: &Route,
        caller: &Caller,
        uri: &Uri,
        worker: usize,
    ) -> Result<AccessToken, ProxyError> {
        // A cache hit: no boxed future, no poll.
        if let Some(token) = self.tokens.get_cached(&route.provider, caller.user_id) {
            return Ok(token);
        }
        let mut lookup = std::pin::pin!(self.token(route, caller));
        if let std::task::Poll::Ready(done) = futures_util::poll!(lookup.as_mut()) {
            return done;
        }
        self.upstreams.prewarm(worker, route.client_key(), uri);
        lookup.await
    }

    /// Phase: the outgoing request head, without the credential. Hop-by-hop and
    /// caller credential headers go, `Host` becomes the upstream's.
    fn upstream_request(
        &self,
        parts: http::request::Parts,
        host: HeaderValue,
        uri: Uri,
        conn: ConnInfo,
        cookies: bool,
    ) -> Prepared {
        let mut headers = parts.headers;
        if cookies {
            headers::join_cookies(&mut headers);
        } else {
            headers.remove(header::COOKIE);
        }
        let caller_host = headers.remove(header::HOST).or_else(|| {
            // HTTP/2 callers send the authority in the URI, not in Host.
            parts
                .uri
                .authority()
                .and_then(|a| header::HeaderValue::from_str(a.as_str()).ok())
        });
        headers::remove_hop_by_hop(&mut headers);
        super::caller::remove_caller_credentials(&mut headers);
        if self.forwarded_headers {
            headers::add_forwarded(
                &mut headers,
                &Forwarded {
                    client_ip: conn.remote.ip(),
                    proto: if conn.tls { "https" } else { "http" },
                    host: caller_host.as_ref(),
                    version: parts.version,
                },
            );
        } else {
            // Off means the upstream sees no forwarding claims at all: ones the
            // client wrote would be believed as if tokenproxy had written them.
            headers::remove_forwarding(&mut headers);
        }
        headers.insert(header::HOST, host);
        Prepared {
            method: parts.method,
            uri,
            headers,
            worker: conn.worker,
        }
    }

    /// Phase: send upstream. On a 401 that may be the token's fault, have the token
    /// source replace it (at most once per link per `tokens.reject_cooldown`) so
    /// later requests get a good one, and retry once when the body could be
    /// replayed; otherwise the 401 stands.
    async fn forward(
        &self,
        route: &Route,
        caller: &Caller,
        prepared: Prepared,
        body: OutBody,
        token: AccessToken,
        outcome: &mut Outcome,
    ) -> Result<Response<Incoming>, ProxyError> {
        // The reservation lives until the retry (if any) is done.
        let (replay, _reserved, body) = match body {
            OutBody::Replayable(bytes, reserved) => (
                Some(bytes.clone()),
                reserved,
                OutBody::Replayable(bytes, None),
            ),
            stream @ OutBody::Stream(_) => (None, None, stream),
        };
        let (body, body_end) = to_proxy_body(body, self.body_idle_timeout);
        let first = self
            .send(route, &prepared, body, body_end, &token, outcome)
            .await?;
        if first.status() != StatusCode::UNAUTHORIZED {
            return Ok(first);
        }
        self.metrics
            .upstream_rejections
            .get_or_create(&ProviderLabels {
                provider: route.provider.to_string(),
            })
            .inc();
        if !super::rejection::blames_token(first.headers()) {
            // A new token would get the same answer (2FA wanted, scope missing).
            outcome.token = "rejected_not_token";
            return Ok(first);
        }
        let fresh = match self
            .tokens
            .refresh_rejected(&route.provider, caller.user_id, &token)
            .await
        {
            Ok(fresh) if !fresh.same_version(&token) => fresh,
            // Nothing newer to try: the upstream's answer stands.
            Ok(_) => return Ok(first),
            // The user must act (log in, link): say so rather than relay the 401.
            Err(e @ (TokenError::ReauthRequired | TokenError::LinkMissing)) => {
                outcome.token = "refresh_failed";
                return Err(e.into());
            }
            Err(_) => {
                outcome.token = "refresh_failed";
                return Ok(first);
            }
        };
        let Some(replay) = replay else {
            outcome.token = "refreshed_no_retry";
            return Ok(first);
        };
        drop(first);
        outcome.token = "refreshed_after_401";
        let (body, _) = to_proxy_body(OutBody::Replayable(replay, None), self.body_idle_timeout);
        self.send(route, &prepared, body, None, &fresh, outcome)
            .await
    }

    /// One upstream attempt: attach the credential, send, time it.
    async fn send(
        &self,
        route: &Route,
        prepared: &Prepared,
        body: ProxyBody,
        body_end: Option<tokio::sync::oneshot::Receiver<BodyEnd>>,
        token: &AccessToken,
        outcome: &mut Outcome,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut headers = prepared.headers.clone();
        inject_credential(&mut headers, &route.inject, token)?;
        let mut req = Request::new(body);
        *req.method_mut() = prepared.method.clone();
        *req.uri_mut() = prepared.uri.clone();
        // The client picks HTTP/2 or HTTP/1.1 by ALPN; asking for 1.1 lets it.
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        let started = Instant::now();
        outcome.attempts += 1;
        let result = self
            .upstreams
            .send(prepared.worker, route.client_key(), req, body_end)
            .await;
        let took = started.elapsed();
        outcome.upstream = Some(outcome.upstream.unwrap_or_default() + took);
        self.metrics.upstream_duration.observe(took.as_secs_f64());
        result
    }

    pub(super) fn log_and_count(
        &self,
        method: &Method,
        resp: &Response<ProxyBody>,
        outcome: &Outcome,
        took: std::time::Duration,
    ) {
        let status = resp.status().as_u16();
        // Borrowed: the counter memo keys on these very `Arc`s, and a clone
        // would write their shared reference counts on every request.
        let (provider, route) = match &outcome.route {
            Some(r) => (&r.provider, &r.label),
            None => (&*NO_LABEL, &*NO_LABEL),
        };
        let error = resp
            .headers()
            .get(&ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        tracing::info!(
            target: "tokenproxy::access",
            method = %method,
            route = &**route,
            provider = &**provider,
            user = outcome.user.map(|u| u.to_string()).unwrap_or_default(),
            status,
            error,
            duration_ms = took.as_secs_f64() * 1000.0,
            upstream_ms = outcome.upstream.map(|d| d.as_secs_f64() * 1000.0),
            attempts = outcome.attempts,
            token = outcome.token,
            "request"
        );
        self.metrics.count_request(provider, route, status);
        self.metrics.request_duration.observe(took.as_secs_f64());
    }
}

/// The empty label value (no route matched), shared.
static NO_LABEL: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

/// Whether an HTTP/1 request uses absolute-form (`GET http://host/path`), the
/// form clients use towards a forward proxy. HTTP/2 requests always carry an
/// authority, so they never count: forward mode is HTTP/1 towards the proxy.
fn is_absolute_form(req: &Request<Incoming>) -> bool {
    matches!(
        req.version(),
        Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11
    ) && req.uri().scheme().is_some()
        && req.method() != Method::CONNECT
}

/// Phase (forward mode, inside a tunnel): the request's path and query, sent to
/// the tunnel's host. Whatever host the inner request names is ignored: the
/// CONNECT decided the route and the peer's certificate was minted for it.
fn route_tunneled(req: &Request<Incoming>, tunnel: &Tunnel) -> Result<Uri, ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT inside a tunnel"));
    }
    forward_uri("https", tunnel.authority.clone(), req.uri())
}

/// `host[:port]` for the upstream, the port written only when not the default.
/// Built from the host alone, so userinfo in a target never travels on.
pub fn upstream_authority(
    host: &str,
    port: u16,
    default_port: u16,
) -> Result<Authority, ProxyError> {
    let text = if port == default_port {
        host.to_ascii_lowercase()
    } else {
        format!("{}:{port}", host.to_ascii_lowercase())
    };
    text.parse()
        .map_err(|_| ProxyError::BadRequest("invalid target host"))
}

/// The upstream URI of a forward-mode request: the client's path and query,
/// unchanged, at `scheme://authority`.
pub fn forward_uri(scheme: &str, authority: Authority, target: &Uri) -> Result<Uri, ProxyError> {
    let pq = target
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if !pq.path().starts_with('/') {
        return Err(ProxyError::BadRequest("the path must start with '/'"));
    }
    Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(|_| ProxyError::BadRequest("invalid request target"))
}

/// Refuses requests whose method or framing cannot be forwarded faithfully:
/// `TRACE`/`TRACK` (an upstream that reflects the request would hand the
/// injected credential to the caller), and a `Transfer-Encoding` other than
/// plain `chunked` (hyper removes the codings; `gzip` would silently be lost).
fn check_request_framing(req: &Request<Incoming>) -> Result<(), ProxyError> {
    if req.method() == Method::TRACE || req.method().as_str().eq_ignore_ascii_case("TRACK") {
        return Err(ProxyError::MethodNotAllowed);
    }
    let other_coding = req
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|coding| !coding.trim_ascii().eq_ignore_ascii_case(b"chunked"));
    if other_coding {
        return Err(ProxyError::BadRequest(
            "only the chunked transfer coding is supported",
        ));
    }
    Ok(())
}

/// Phase: may this caller use the route's provider?
pub(super) fn authorize(caller: &Caller, route: &Route) -> Result<(), ProxyError> {
    if caller.may_use(&route.provider) {
        Ok(())
    } else {
        Err(ProxyError::Forbidden)
    }
}

/// Buffers the request body when it is empty, or declared small enough to
/// replay and within what is left of the retry budget (within `timeout`: a body
/// of at most [`RETRY_BODY_LIMIT`] gets the time a request head gets, so a
/// client trickling it cannot hold the buffer longer); otherwise leaves it
/// streaming (a stalled stream is bounded by `server.body_idle_timeout` instead).
async fn read_body(
    body: Incoming,
    timeout: std::time::Duration,
    budget: &Arc<RetryBudget>,
) -> Result<OutBody, ProxyError> {
    if body.is_end_stream() {
        return Ok(OutBody::Replayable(Bytes::new(), None));
    }
    let reserved = body
        .size_hint()
        .exact()
        .filter(|len| *len <= RETRY_BODY_LIMIT)
        .and_then(|len| budget.reserve(len));
    match reserved {
        Some(reserved) => {
            let limit = usize::try_from(RETRY_BODY_LIMIT).unwrap_or(usize::MAX);
            let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect())
                .await
                .map_err(|_| ProxyError::BadRequest("the request body did not arrive in time"))?
                .map_err(|_| ProxyError::BadRequest("the request body could not be read"))?;
            Ok(OutBody::Replayable(collected.to_bytes(), Some(reserved)))
        }
        None => Ok(OutBody::Stream(body)),
    }
}

/// The body to send, and for a streamed one, how it will end (its upstream
/// deadline starts then). A buffered body is complete already.
fn to_proxy_body(
    body: OutBody,
    idle: std::time::Duration,
) -> (ProxyBody, Option<tokio::sync::oneshot::Receiver<BodyEnd>>) {
    match body {
        OutBody::Replayable(bytes, _) if bytes.is_empty() => (
            Empty::new().map_err(|never| match never {}).boxed_unsync(),
            None,
        ),
        OutBody::Replayable(bytes, _) => (
            Full::new(bytes)
                .map_err(|never| match never {})
                .boxed_unsync(),
            None,
        ),
        OutBody::Stream(incoming) => {
            let (body, end) = IdleBody::with_end(incoming, idle);
            (body.boxed_unsync(), Some(end))
        }
    }
}

/// Phase: the upstream's response for the caller. Hop-by-hop headers go, and so
/// does any `tokenproxy-error` the upstream tried to set: that header means
/// tokenproxy itself answered. With `redirects` (reverse mode), a `Location` on
/// the upstream is rewritten to the route's prefix.
fn respond(
    resp: Response<Incoming>,
    redirects: Option<&Route>,
    idle: std::time::Duration,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    parts.headers.remove(&ERROR_HEADER);
    if let Some(route) = redirects {
        let rewritten = parts
            .headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| route.caller_location(l))
            .and_then(|l| HeaderValue::from_str(&l).ok());
        if let Some(location) = rewritten {
            parts.headers.insert(header::LOCATION, location);
        }
    }
    // A response body that stops moving is cut after `idle`, like a request's.
    Response::from_parts(parts, IdleBody::new(body, idle).boxed_unsync())
}
