//! Routing phase: which route a request belongs to, whether the path is safe to
//! forward, and the exact upstream URI it becomes.
//!
//! The destination of a reverse-mode request is decided here and only here, from
//! the configured routes: the request's `Host` header and any absolute-form target
//! are ignored, so a caller cannot steer tokenproxy (and the credential it attaches)
//! at another host. Paths that an upstream or an intermediate might normalise
//! differently from us (`..`, encoded dots/slashes, backslashes) are refused rather
//! than rewritten.
//!
//! In forward mode the target host picks the route ([`Router::find_host`]) and is
//! also where the request goes: only hosts a route names ever get a credential, and
//! the path passes unchanged because it is the client's, not a prefix of ours.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::HostPattern;

use http::header::HeaderValue;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;

use super::error::ProxyError;
use crate::config::{Config, Inject};

/// One configured route, prepared for the request path or target host.
#[derive(Debug)]
pub struct Route {
    /// Provider whose links serve this route.
    pub provider: Arc<str>,
    /// The prefix as configured (or the hosts, for forward-only routes), for logs
    /// and metric labels.
    pub label: Arc<str>,
    /// The prefix without its trailing `/` (empty for a `/` catch-all); `None`
    /// for a forward-only route.
    prefix: Option<String>,
    scheme: Scheme,
    authority: Authority,
    /// Upstream path without its trailing `/`.
    base_path: String,
    /// `Host` to send upstream in reverse mode.
    pub host: HeaderValue,
    /// How the credential is attached.
    pub inject: Inject,
    /// Extra CA trusted for this upstream.
    pub upstream_ca: Option<PathBuf>,
    /// Forward mode: the target hosts this route intercepts.
    pub hosts: Vec<HostPattern>,
    /// Where TCP connections for this route go instead of the upstream's host.
    pub connect_to: Option<Arc<str>>,
    /// Forward mode: plain-HTTP absolute-form requests are served too.
    pub allow_plain_http: bool,
    /// The pooled client for this route (computed once, used per request).
    client: ClientKey,
    /// Reverse mode: the caller's `Cookie` header is passed on.
    pub cookies: bool,
    /// The methods the route forwards and their `Allow` value; `None` = any.
    methods: Option<(Arc<[http::Method]>, HeaderValue)>,
}

/// Which pooled client a route's requests use: its extra CA and `connect_to`.
pub type ClientKey = (Option<PathBuf>, Option<Arc<str>>);

impl Route {
    /// Prepares a reverse-mode route; `upstream` was validated by the config
    /// (http/https, host).
    pub fn new(
        provider: &str,
        prefix: &str,
        upstream: &url::Url,
        inject: Inject,
        upstream_ca: Option<PathBuf>,
    ) -> Result<Self, String> {
        let authority_text = match upstream.port() {
            Some(port) => format!("{}:{port}", upstream.host_str().unwrap_or_default()),
            None => upstream.host_str().unwrap_or_default().to_string(),
        };
        let authority: Authority = authority_text
            .parse()
            .map_err(|_| format!("invalid upstream authority `{authority_text}`"))?;
        let scheme = match upstream.scheme() {
            "https" => Scheme::HTTPS,
            "http" => Scheme::HTTP,
            other => return Err(format!("unsupported upstream scheme `{other}`")),
        };
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| format!("invalid upstream host `{authority}`"))?;
        Ok(Self {
            provider: provider.into(),
            label: prefix.into(),
            prefix: Some(prefix.trim_end_matches('/').to_string()),
            scheme,
            authority,
            base_path: upstream.path().trim_end_matches('/').to_string(),
            host,
            inject,
            client: (upstream_ca.clone(), None),
            upstream_ca,
            hosts: Vec::new(),
            connect_to: None,
            allow_plain_http: false,
            cookies: false,
            methods: None,
        })
    }

    /// Prepares a route from its config: reverse mode when it has a prefix,
    /// forward mode when it has hosts.
    pub fn from_config(provider: &str, r: &crate::config::RouteConfig) -> Result<Self, String> {
        let mut route = match (&r.prefix, &r.upstream) {
            (Some(prefix), Some(upstream)) => Self::new(
                provider,
                prefix,
                upstream,
                r.inject.clone(),
                r.upstream_ca.clone(),
            )?,
            _ => {
                let label = r
                    .hosts
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                Self {
                    provider: provider.into(),
                    label: label.into(),
                    prefix: None,
                    scheme: Scheme::HTTPS,
                    authority: Authority::from_static("invalid"),
                    base_path: String::new(),
                    host: HeaderValue::from_static("invalid"),
                    inject: r.inject.clone(),
                    upstream_ca: r.upstream_ca.clone(),
                    hosts: Vec::new(),
                    connect_to: None,
                    allow_plain_http: false,
                    client: (None, None),
                    cookies: false,
                    methods: None,
                }
            }
        };
        route.hosts = r.hosts.clone();
        route.connect_to = r.connect_to.as_deref().map(Arc::from);
        route.allow_plain_http = r.allow_plain_http;
        route.cookies = r.cookies;
        route.methods = allowed_methods(&r.methods);
        route.client = (route.upstream_ca.clone(), route.connect_to.clone());
        Ok(route)
    }

    /// Whether the route forwards `method`; 405 with `Allow` otherwise.
    pub fn check_method(&self, method: &http::Method) -> Result<(), ProxyError> {
        match &self.methods {
            Some((allowed, allow)) if !allowed.contains(method) => {
                Err(ProxyError::MethodNotAllowedHere(allow.clone()))
            }
            _ => Ok(()),
        }
    }

    /// The pooled client this route's requests use.
    pub fn client_key(&self) -> &ClientKey {
        &self.client
    }

    /// The part of `path` after this route's prefix, if the prefix matches on a
    /// segment boundary (`/a/b` matches `/a/b` and `/a/b/c`, not `/a/bc`).
    fn strip<'p>(&self, path: &'p str) -> Option<&'p str> {
        let rest = path.strip_prefix(self.prefix.as_deref()?)?;
        (rest.is_empty() || rest.starts_with('/')).then_some(rest)
    }

    /// How well this route's hosts match `host:port` (see [`HostPattern::rank`]).
    fn host_rank(&self, host: &str, port: u16, default_port: u16) -> Option<usize> {
        self.hosts
            .iter()
            .filter_map(|p| p.rank(host, port, default_port))
            .max()
    }

    /// The upstream URI for a request path (already checked by [`Router::resolve`]) and
    /// its raw query, which is passed on unchanged.
    pub fn upstream_uri(&self, path: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
        let rest = self.strip(path).ok_or(ProxyError::NoRoute)?;
        let mut target = String::with_capacity(self.base_path.len() + rest.len() + 64);
        target.push_str(&self.base_path);
        target.push_str(rest);
        if target.is_empty() {
            target.push('/');
        }
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        let pq = PathAndQuery::try_from(target)
            .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::BadRequest("invalid request target"))
    }
}

impl Route {
    /// Reverse mode: a `Location` the upstream sent, as the caller must see it. A
    /// redirect to the upstream itself (absolute, or a path under the route's
    /// upstream path) is rewritten to go through this route's prefix, so the
    /// caller (git following a renamed repository, say) comes back through
    /// tokenproxy instead of going to the provider without a credential. Other
    /// locations are left alone (`None`).
    pub fn caller_location(&self, location: &str) -> Option<String> {
        let prefix = self.prefix.as_deref()?;
        let origin = format!("{}://{}", self.scheme, self.authority);
        let path = if location.starts_with('/') && !location.starts_with("//") {
            location
        } else {
            let head = location.get(..origin.len())?;
            let rest = &location[origin.len()..];
            if !head.eq_ignore_ascii_case(&origin)
                || !(rest.is_empty() || rest.starts_with(['/', '?', '#']))
            {
                return None;
            }
            rest
        };
        let rest = path.strip_prefix(self.base_path.as_str())?;
        if !(rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
            return None;
        }
        let mut out = format!("{prefix}{rest}");
        if !out.starts_with('/') {
            out.insert(0, '/');
        }
        Some(out)
    }
}

/// All routes, longest prefix first.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Arc<Route>>,
}

impl Router {
    /// Builds the routes of every provider in `config`.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let mut routes = Vec::new();
        for p in &config.providers {
            for r in &p.routes {
                routes.push(Route::from_config(&p.id, r)?);
            }
        }
        Ok(Self::new(routes))
    }

    /// Orders `routes` so the longest prefix is tried first.
    pub fn new(routes: Vec<Route>) -> Self {
        let mut routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.as_ref().map_or(0, String::len)));
        Self { routes }
    }

    /// Forward mode: the route for a target `host:port` (`host` as the client
    /// wrote it; compared lowercase, without a trailing dot), the most specific
    /// pattern winning. `default_port` is the scheme's (443 or 80).
    pub fn find_host(&self, host: &str, port: u16, default_port: u16) -> Option<&Arc<Route>> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.routes
            .iter()
            .filter_map(|r| Some((r.host_rank(&host, port, default_port)?, r)))
            .max_by_key(|(rank, _)| *rank)
            .map(|(_, r)| r)
    }

    /// Every route.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The route for a request path: the longest matching prefix.
    pub fn find(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.strip(path).is_some())
    }
}

/// How many rounds of percent-decoding [`Router::resolve`] follows a path
/// through. A path still changing after that many is refused: no client needs
/// it, and the bound is what lets the checks speak for every later decoding.
pub const MAX_DECODE_ROUNDS: usize = 8;

impl Router {
    /// Reverse mode, the one place a request path becomes a route and an upstream
    /// URI (a pure function of the routes, the path and the query).
    ///
    /// The path is decoded again and again (up to [`MAX_DECODE_ROUNDS`], until it
    /// stops changing), because an upstream or a second proxy may decode it any
    /// number of times. At every level it must not hold a `.`/`..` segment (also
    /// with `;params`, which servlet containers strip), a backslash, a NUL or
    /// overlong UTF-8 (`%c0%ae`, read as `.` by lenient decoders), and it must
    /// still pick the same route, so an encoded `/` never moves the prefix
    /// boundary. What passes is forwarded byte for byte: `%2F` inside a segment
    /// (GitLab's project and file paths) and the query are not touched.
    pub fn resolve(
        &self,
        path: &str,
        query: Option<&str>,
    ) -> Result<(&Arc<Route>, Uri), ProxyError> {
        if !path.starts_with('/') {
            return Err(ProxyError::BadRequest("the path must start with '/'"));
        }
        let mut level = path.as_bytes().to_vec();
        // The raw path's route (or none); every decoded level must agree with it.
        let mut first: Option<Option<&Arc<Route>>> = None;
        for _ in 0..=MAX_DECODE_ROUNDS {
            check_level(&level)?;
            // Decoded bytes that are not UTF-8 cannot match a (textual) prefix
            // differently, so a lossy view is enough here.
            let found = self.find(&String::from_utf8_lossy(&level));
            let raw = *first.get_or_insert(found);
            let same = match (raw, found) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            if !same {
                return Err(ProxyError::BadRequest(
                    "an encoded '/' changes which route the path belongs to",
                ));
            }
            let next = percent_decode_once(&level);
            if next == level {
                let route = raw.ok_or(ProxyError::NoRoute)?;
                return Ok((route, route.upstream_uri(path, query)?));
            }
            level = next;
        }
        Err(ProxyError::BadRequest(
            "the path is percent-encoded too many times",
        ))
    }
}

/// The rules one decoding level of a path must keep (see [`Router::resolve`]).
/// The route's method allow-list and its `Allow` value (`HEAD` comes with
/// `GET`, as RFC 9110 §9.3.2 has it); `None` when the list is empty.
fn allowed_methods(methods: &[String]) -> Option<(Arc<[http::Method]>, HeaderValue)> {
    let mut allowed: Vec<http::Method> = methods
        .iter()
        .filter_map(|m| http::Method::from_bytes(m.as_bytes()).ok())
        .collect();
    if allowed.is_empty() {
        return None;
    }
    if allowed.contains(&http::Method::GET) && !allowed.contains(&http::Method::HEAD) {
        allowed.push(http::Method::HEAD);
    }
    let text = allowed
        .iter()
        .map(http::Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let allow = HeaderValue::from_str(&text).ok()?;
    Some((allowed.into(), allow))
}

fn check_level(path: &[u8]) -> Result<(), ProxyError> {
    if path.contains(&b'\\') {
        return Err(ProxyError::BadRequest(
            "backslashes are not allowed in paths",
        ));
    }
    if path.contains(&0) {
        return Err(ProxyError::BadRequest("NUL is not allowed in paths"));
    }
    if has_overlong_utf8(path) {
        return Err(ProxyError::BadRequest(
            "overlong UTF-8 is not allowed in paths",
        ));
    }
    // A `;params` suffix does not make a dot segment safe: servlet containers
    // (Bitbucket Server, Jira) strip it and then resolve `..;` as `..`.
    let dot_segment = |seg: &[u8]| {
        let name = seg.split(|b| *b == b';').next().unwrap_or_default();
        name == b"." || name == b".."
    };
    if path.split(|b| *b == b'/').any(dot_segment) {
        return Err(ProxyError::BadRequest(
            "'.' and '..' segments are not allowed, encoded or not",
        ));
    }
    Ok(())
}

/// Whether `bytes` hold the start of an overlong UTF-8 sequence (RFC 3629 §3
/// forbids them): `C0`/`C1`, `E0 80..9F`, `F0 80..8F`. Lenient decoders turn
/// `C0 AE` into `.` and `C0 AF` into `/`.
fn has_overlong_utf8(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(i, b)| {
        let next = bytes.get(i + 1).copied().unwrap_or(0);
        matches!(b, 0xC0 | 0xC1)
            || (*b == 0xE0 && (0x80..=0x9F).contains(&next))
            || (*b == 0xF0 && (0x80..=0x8F).contains(&next))
    })
}

/// One round of percent-decoding, as lenient as the decoders we guard against:
/// `%HH` in either case, and IIS's `%uHHHH` when it names an ASCII byte. A `%`
/// not followed by hex digits stays as it is.
pub fn percent_decode_once(input: &[u8]) -> Vec<u8> {
    let hex = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            if let (Some(h), Some(l)) = (
                input.get(i + 1).copied().and_then(hex),
                input.get(i + 2).copied().and_then(hex),
            ) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
            if matches!(input.get(i + 1), Some(b'u' | b'U')) {
                let digits = input.get(i + 2..i + 6).unwrap_or_default();
                let value = digits
                    .iter()
                    .try_fold(0u32, |acc, b| Some(acc * 16 + u32::from(hex(*b)?)));
                if let (4, Some(v)) = (digits.len(), value) {
                    if let Ok(byte) = u8::try_from(v) {
                        if byte.is_ascii() {
                            out.push(byte);
                            i += 6;
                            continue;
                        }
                    }
                }
            }
        }
        out.push(input[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, upstream: &str) -> Route {
        Route::new(
            "p",
            prefix,
            &upstream.parse().unwrap(),
            Inject::Bearer,
            None,
        )
        .unwrap()
    }

    fn router() -> Router {
        Router::new(vec![
            route("/github", "https://github.com"),
            route("/github/api", "https://api.github.com"),
            route("/gitlab/", "https://gitlab.example/api/v4/"),
        ])
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let r = router();
        assert_eq!(&*r.find("/github/api/user").unwrap().label, "/github/api");
        assert_eq!(&*r.find("/github/api").unwrap().label, "/github/api");
        assert_eq!(&*r.find("/github/apix").unwrap().label, "/github");
        assert_eq!(&*r.find("/github/x").unwrap().label, "/github");
        assert!(r.find("/githubx").is_none());
        assert!(r.find("/").is_none());
        assert_eq!(&*r.find("/gitlab").unwrap().label, "/gitlab/");
    }

    #[test]
    fn catch_all_route_matches_everything() {
        let r = Router::new(vec![route("/", "http://127.0.0.1:1")]);
        assert!(r.find("/").is_some());
        assert!(r.find("/anything/else").is_some());
    }

    #[test]
    fn upstream_uri_replaces_the_prefix_and_keeps_the_query() {
        let r = router();
        let uri = |p: &str, q| r.find(p).unwrap().upstream_uri(p, q).unwrap().to_string();
        assert_eq!(
            uri("/github/api/user", Some("a=1&b=%2F")),
            "https://api.github.com/user?a=1&b=%2F"
        );
        assert_eq!(uri("/github/api", None), "https://api.github.com/");
        assert_eq!(uri("/github/api/", None), "https://api.github.com/");
        assert_eq!(
            uri("/gitlab/projects/1", None),
            "https://gitlab.example/api/v4/projects/1"
        );
        assert_eq!(uri("/gitlab", None), "https://gitlab.example/api/v4");
    }

    #[test]
    fn upstream_redirects_come_back_through_the_prefix() {
        let r = route("/gh/git", "https://github.com");
        let loc = |l: &str| r.caller_location(l);
        assert_eq!(
            loc("https://github.com/org/new.git/info/refs?service=git-upload-pack").as_deref(),
            Some("/gh/git/org/new.git/info/refs?service=git-upload-pack")
        );
        assert_eq!(loc("HTTPS://GitHub.com").as_deref(), Some("/gh/git"));
        assert_eq!(loc("/login").as_deref(), Some("/gh/git/login"));
        assert_eq!(loc("https://codeload.github.com/x"), None);
        assert_eq!(loc("https://github.com.evil/x"), None);
        assert_eq!(loc("http://github.com/x"), None);
        assert_eq!(loc("//github.com/x"), None);
        assert_eq!(loc("relative/path"), None);
        let r = route("/gl", "https://gitlab.example/api/v4/");
        assert_eq!(
            r.caller_location("https://gitlab.example/api/v4/projects/2")
                .as_deref(),
            Some("/gl/projects/2")
        );
        assert_eq!(
            r.caller_location("/api/v4?page=2").as_deref(),
            Some("/gl?page=2")
        );
        assert_eq!(r.caller_location("/users/sign_in"), None);
        assert_eq!(r.caller_location("/api/v4x"), None);
        let r = route("/", "http://127.0.0.1:8081");
        assert_eq!(
            r.caller_location("http://127.0.0.1:8081/a").as_deref(),
            Some("/a")
        );
        assert_eq!(
            r.caller_location("http://127.0.0.1:8081").as_deref(),
            Some("/")
        );
    }

    #[test]
    fn host_comes_from_the_upstream_with_non_default_port() {
        assert_eq!(route("/a", "https://h.example").host, "h.example");
        assert_eq!(
            route("/a", "http://127.0.0.1:8081/x").host,
            "127.0.0.1:8081"
        );
        assert_eq!(route("/a", "https://h.example:443").host, "h.example");
        assert_eq!(route("/a", "http://[::1]:9/").host, "[::1]:9");
    }

    fn host_route(hosts: &[&str]) -> Route {
        let cfg = crate::config::RouteConfig {
            prefix: None,
            upstream: None,
            hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect(),
            connect_to: None,
            allow_plain_http: false,
            inject: Inject::Bearer,
            upstream_ca: None,
            cookies: false,
            methods: Vec::new(),
        };
        Route::from_config("p", &cfg).unwrap()
    }

    #[test]
    fn hosts_route_forward_mode_only() {
        let r = Router::new(vec![
            route("/github", "https://github.com"),
            host_route(&["api.example.com"]),
            host_route(&["*.example.com", "other.test:8443"]),
        ]);
        assert_eq!(
            &*r.find_host("API.example.com.", 443, 443).unwrap().label,
            "api.example.com"
        );
        assert_eq!(
            &*r.find_host("x.example.com", 443, 443).unwrap().label,
            "*.example.com,other.test:8443"
        );
        assert!(r.find_host("other.test", 443, 443).is_none());
        assert!(r.find_host("other.test", 8443, 443).is_some());
        assert!(r.find_host("github.com", 443, 443).is_none());
        // Forward-only routes never match a path.
        assert!(r.find("/").is_none());
        assert_eq!(&*r.find("/github/x").unwrap().label, "/github");
    }

    /// Routes for the path tables: a catch-all beside nested prefixes, so an
    /// encoded `/` that moves the prefix boundary changes the route.
    fn path_router() -> Router {
        Router::new(vec![
            route("/", "http://catch.all"),
            route("/github", "https://github.com"),
            route("/github/api", "https://api.github.com/v3"),
            route("/gitlab", "https://gitlab.example/api/v4"),
        ])
    }

    #[test]
    fn unsafe_paths_are_refused() {
        let r = path_router();
        for bad in [
            // RFC 3986 §5.2.4's dot segments, plain.
            "/github/api/../admin",
            "/github/api/..",
            "/github/./api",
            "/github/api/./x",
            "/github/api/x/.",
            "/..",
            "/.",
            // Percent-encoded, any case, partly encoded.
            "/github/api/%2e%2e/x",
            "/github/api/%2E%2E/x",
            "/github/api/%2e%2E/x",
            "/github/api/.%2e/x",
            "/github/api/%2e./x",
            "/github/api/%2e/x",
            "/github/api/..%2fx",
            "/github/api/..%2Fx",
            "/github/api/x%2f..%2fy",
            // Double (and deeper) encoding.
            "/github/api/%252e%252e/%252e%252e/outside",
            "/github/api/%252E%252E/x",
            "/github/api/%25252e%25252e/x",
            "/github/api/x%252f..%252fy",
            "/github/api/%%32%65%%32%65/x",
            "/github/api/%u002e%u002e/x",
            "/github/api/%U002E%U002E/x",
            // Overlong UTF-8 for '.' and '/', once or twice encoded.
            "/github/api/%c0%ae%c0%ae/x",
            "/github/api/%C0%AE%C0%AE/x",
            "/github/api/x%c0%afy",
            "/github/api/%25c0%25ae%25c0%25ae/x",
            "/github/api/%e0%80%ae",
            "/github/api/%f0%80%80%ae",
            // Matrix parameters that servlet containers strip.
            "/github/api/..;/admin",
            "/github/api/..;jsessionid=1/x",
            "/github/api/.;/x",
            "/github/api/%2e%2e;/x",
            "/github/api/..%3b/x",
            // Backslashes and NUL, raw or encoded.
            "/github/api\\..\\x",
            "/github/api/x\\y",
            "/github/api/%5cx",
            "/github/api/%5Cx",
            "/github/api/%255cx",
            "/github/api/x%00y",
            "/github/api/x%2500y",
            // An encoded '/' before the prefix ends moves the request to another
            // route once decoded.
            "/github%2fapi/user",
            "/github%2Fapi/user",
            "/github/api%2Fx",
            "/github%252fapi/user",
            "/gitlab%2f",
            // Not origin-form.
            "github/api",
            "",
            "*",
        ] {
            let err = r.resolve(bad, None).unwrap_err();
            assert_eq!(err.code(), "bad_request", "{bad}");
        }
    }

    #[test]
    fn too_many_encoding_rounds_are_refused() {
        let encoded =
            |times: usize| (0..times).fold("/github/%41".to_string(), |p, _| p.replace('%', "%25"));
        let r = path_router();
        assert!(r.resolve(&encoded(MAX_DECODE_ROUNDS - 1), None).is_ok());
        let err = r.resolve(&encoded(MAX_DECODE_ROUNDS), None).unwrap_err();
        assert_eq!(err.code(), "bad_request");
    }

    #[test]
    fn ordinary_paths_are_forwarded_byte_for_byte() {
        let r = path_router();
        for (path, query, upstream) in [
            ("/", None, "http://catch.all/"),
            ("/github/api/user", None, "https://api.github.com/v3/user"),
            (
                "/github/git/org/repo.git/info/refs",
                Some("service=git-upload-pack"),
                "https://github.com/git/org/repo.git/info/refs?service=git-upload-pack",
            ),
            (
                "/gitlab/projects/group%2Fproject/repository/files/app%2Fmodels%2Fkey.rb/raw",
                Some("ref=main"),
                "https://gitlab.example/api/v4/projects/group%2Fproject/repository/files/app%2Fmodels%2Fkey.rb/raw?ref=main",
            ),
            (
                "/gitlab/projects/group%2fsub%2Fproject",
                Some("a=%2e%2e%2F&b=..%5c"),
                "https://gitlab.example/api/v4/projects/group%2fsub%2Fproject?a=%2e%2e%2F&b=..%5c",
            ),
            ("/github/a/..b/c..d/.e/f.", None, "https://github.com/a/..b/c..d/.e/f."),
            ("/github/a//b", None, "https://github.com/a//b"),
            ("/github/%20b/%41", None, "https://github.com/%20b/%41"),
            ("/github/%2", None, "https://github.com/%2"),
            ("/github/%zz/%", None, "https://github.com/%zz/%"),
            ("/github/b;c/d..;e", None, "https://github.com/b;c/d..;e"),
            ("/github/%e2%82%ac", None, "https://github.com/%e2%82%ac"),
            ("/github/%2e%2e%2e", None, "https://github.com/%2e%2e%2e"),
            // The catch-all keeps an encoded '/' in a first segment no other
            // route claims.
            ("/other%2Fthing", None, "http://catch.all/other%2Fthing"),
        ] {
            let (_, uri) = r
                .resolve(path, query)
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(uri.to_string(), upstream, "{path}");
        }
    }

    #[test]
    fn unknown_prefix_is_no_route() {
        let r = Router::new(vec![route("/github", "https://github.com")]);
        assert_eq!(r.resolve("/gitlab/x", None).unwrap_err().code(), "no_route");
        assert_eq!(
            r.resolve("/gitlab/%2e", None).unwrap_err().code(),
            "bad_request"
        );
        // No route for the raw path, but one once decoded: the encoded '/' is the
        // prefix boundary, refused rather than "not found".
        let r = Router::new(vec![route("/github/api", "https://api.github.com")]);
        for path in ["/github%2fapi/x", "/github%252Fapi"] {
            assert_eq!(r.resolve(path, None).unwrap_err().code(), "bad_request");
        }
    }

    /// What the most lenient server behind us could make of a path after
    /// `rounds` decodings: `\\` as `/`, overlong `C0 AE`/`C0 AF` as `.`/`/`,
    /// `;params` stripped, then RFC 3986 §5.2.4's remove_dot_segments.
    fn lenient_normalise(path: &str, rounds: usize) -> String {
        let mut bytes = path.as_bytes().to_vec();
        for _ in 0..rounds {
            bytes = percent_decode_once(&bytes);
        }
        let mut lenient = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match (bytes[i], bytes.get(i + 1)) {
                (0xC0, Some(0xAE)) => lenient.push(b'.'),
                (0xC0, Some(0xAF)) => lenient.push(b'/'),
                (b, _) => {
                    lenient.push(b);
                    i += 1;
                    continue;
                }
            }
            i += 2;
        }
        let bytes = lenient;
        let text = String::from_utf8_lossy(&bytes).replace('\\', "/");
        let mut out: Vec<&str> = Vec::new();
        for seg in text.split('/').skip(1) {
            match seg.split(';').next().unwrap_or_default() {
                "." => {}
                ".." => {
                    out.pop();
                }
                _ => out.push(seg),
            }
        }
        format!("/{}", out.join("/"))
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(
            std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
        ))]

        /// For any path the router accepts, every decoding of the forwarded path,
        /// normalised the most lenient way, stays under the route's upstream path.
        #[test]
        fn accepted_paths_stay_under_their_route(
            start in proptest::sample::select(vec!["", "/github", "/github/api", "/gitlab", "/gitlab/x"]),
            pieces in proptest::collection::vec(proptest::sample::select(vec![
                "/", ".", "..", "%2e", "%2E", "%25", "%2f", "%2F", "%5c", "%00", ";",
                "%3b", "%c0", "%ae", "%af", "%u002e", "2e", "2f", "%", "a", "github",
                "api", "gitlab", "\\", "%252e", "%252f",
            ]), 0..14)
        ) {
            let path = format!("{start}/{}", pieces.concat());
            let r = path_router();
            if let Ok((route, uri)) = r.resolve(&path, Some("q=%2e%2e")) {
                proptest::prop_assert_eq!(uri.query(), Some("q=%2e%2e"));
                let forwarded = uri.path();
                for rounds in 0..=MAX_DECODE_ROUNDS + 2 {
                    let seen = lenient_normalise(forwarded, rounds);
                    let base = &route.base_path;
                    let rest = seen.strip_prefix(base.as_str());
                    proptest::prop_assert!(
                        rest.is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
                        "{path} -> {forwarded} -> {seen} (after {rounds} decodings) is outside {base}"
                    );
                }
            }
        }
    }
}
