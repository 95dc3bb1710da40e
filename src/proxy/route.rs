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
                }
            }
        };
        route.hosts = r.hosts.clone();
        route.connect_to = r.connect_to.as_deref().map(Arc::from);
        route.allow_plain_http = r.allow_plain_http;
        route.client = (route.upstream_ca.clone(), route.connect_to.clone());
        Ok(route)
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

    /// The upstream URI for a request path (already checked by [`check_path`]) and
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

/// Refuses paths that could mean something else after normalisation: `.` and
/// `..` segments, percent-encoded `.`, `/` or `\` (any case), and backslashes.
/// The raw (still encoded) path is checked, so nothing is decoded twice.
pub fn check_path(path: &str) -> Result<(), ProxyError> {
    if !path.starts_with('/') {
        return Err(ProxyError::BadRequest("the path must start with '/'"));
    }
    if path.contains('\\') {
        return Err(ProxyError::BadRequest(
            "backslashes are not allowed in paths",
        ));
    }
    let bytes = path.as_bytes();
    for i in 0..bytes.len().saturating_sub(2) {
        if bytes[i] == b'%' {
            let pair = [
                bytes[i + 1].to_ascii_lowercase(),
                bytes[i + 2].to_ascii_lowercase(),
            ];
            if matches!(&pair, b"2e" | b"2f" | b"5c") {
                return Err(ProxyError::BadRequest(
                    "encoded '.', '/' or '\\' are not allowed in paths",
                ));
            }
        }
    }
    // A `;params` suffix does not make a dot segment safe: servlet containers
    // (Bitbucket Server, Jira) strip it and then resolve `..;` as `..`.
    let dot_segment = |seg: &str| {
        let name = seg.split(';').next().unwrap_or_default();
        name == "." || name == ".."
    };
    if path.split('/').any(dot_segment) {
        return Err(ProxyError::BadRequest(
            "'.' and '..' segments are not allowed",
        ));
    }
    Ok(())
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

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in [
            "/github/api/../admin",
            "/github/api/..",
            "/github/./api",
            "/github/api/%2e%2e/x",
            "/github/api/%2E%2E/x",
            "/github/api/.%2e/x",
            "/github/api%2fx",
            "/github/api%2F..",
            "/github/api/%5cx",
            "/github/api/%5Cx",
            "/github/api\\..\\x",
            "/github/api/..;/admin",
            "/github/api/..;jsessionid=1/x",
            "/github/api/.;/x",
            "github/api",
            "",
        ] {
            let err = check_path(bad).unwrap_err();
            assert_eq!(err.code(), "bad_request", "{bad}");
        }
    }

    #[test]
    fn ordinary_paths_pass() {
        for ok in [
            "/",
            "/github/api/user",
            "/github/git/org/repo.git/info/refs",
            "/a/..b/c..d/.e/f.",
            "/a//b",
            "/a/%20b/%41",
            "/a/%2",
            "/a/b;c/d..;e",
        ] {
            check_path(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }
}
