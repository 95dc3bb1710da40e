//! Typed configuration: a TOML file plus environment overrides, validated before
//! anything binds a port.
//!
//! Loading happens in three steps so every error can name the key it is about:
//! parse the file into a TOML value, apply `DATABASE_URL` and `TOKENPROXY_<SECTION>__<KEY>`
//! overrides to that value, then deserialize it (with `serde_path_to_error`, which yields
//! the dotted path of the offending key) and validate the result. Secrets written as
//! `env:VAR` or `file:PATH` are resolved here and wrapped in [`SecretString`] at once.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

mod coder;
mod endpoint;
mod forward;
mod overrides;
mod secrets;
mod text;

pub use coder::CoderConfig;
pub use endpoint::{check_secret_endpoint, is_loopback};
pub use forward::{ForwardConfig, HostPattern, Unrouted};

pub use overrides::apply_env_overrides;
use overrides::{blame_override, override_table};
pub use secrets::resolve_secret;
use secrets::{secret_list, secret_map, secret_opt, secret_plain, SECRET_ENV};
use serde::Deserialize;
use url::Url;
use uuid::Uuid;

/// Environment variable naming the config file when `--config` is absent.
pub const CONFIG_ENV: &str = "TOKENPROXY_CONFIG";
/// Default config file name.
pub const DEFAULT_CONFIG_FILE: &str = "tokenproxy.toml";
/// Prefix of environment overrides: `TOKENPROXY_SERVER__LISTEN=...`.
pub const ENV_OVERRIDE_PREFIX: &str = "TOKENPROXY_";

/// Path prefix of everything tokenproxy serves itself on the proxy listener; no
/// route may use it.
pub const RESERVED_PREFIX: &str = "/_tokenproxy/";

/// A configuration error: one line that names the offending key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// Dotted path of the key, e.g. `providers[0].routes[1].upstream`.
    pub key: String,
    /// What is wrong with it (never contains a secret value).
    pub message: String,
}

impl ConfigError {
    /// Builds an error about `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole, validated configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners and their limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where links and proxy tokens live.
    #[serde(default)]
    pub database: DatabaseConfig,
    /// At-rest encryption of stored tokens.
    #[serde(default)]
    pub encryption: EncryptionConfig,
    /// Token cache and refresh behaviour.
    #[serde(default)]
    pub tokens: TokensConfig,
    /// How callers are identified.
    #[serde(default)]
    pub callers: CallersConfig,
    /// Log output.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Identity providers and their routes.
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
    /// Forward (`HTTPS_PROXY`) mode; off when absent.
    #[serde(default)]
    pub forward: Option<ForwardConfig>,
    /// Serving beside Coder (`[coder]`); off when absent.
    #[serde(default)]
    pub coder: Option<CoderConfig>,
    /// The admin listener's link API (`[admin]`).
    #[serde(default)]
    pub admin: AdminConfig,
}

/// `[admin]`: the operator link API on the admin listener.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token the link API (`/links…`) requires; unset = the link API is
    /// off (`/healthz`, `/readyz`, `/metrics` never need it).
    #[serde(deserialize_with = "secret_opt")]
    pub token: Option<SecretString>,
}

/// `[server]`: listeners and resource bounds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The proxy listener.
    pub listen: SocketAddr,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`).
    pub admin_listen: SocketAddr,
    /// Most simultaneous client connections on the proxy listener.
    pub max_connections: usize,
    /// Largest request head (request line + headers) accepted, in bytes.
    pub max_header_bytes: usize,
    /// Time a client has to send its request head.
    #[serde(with = "duration_str")]
    pub header_read_timeout: Duration,
    /// Time the upstream has to start answering.
    #[serde(with = "duration_str")]
    pub upstream_timeout: Duration,
    /// Time allowed to connect (TCP + TLS) to an upstream.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// How long in-flight requests may run after SIGTERM before the server closes.
    #[serde(with = "duration_str")]
    pub shutdown_grace: Duration,
    /// Add `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and `Via` upstream.
    pub forwarded_headers: bool,
    /// Optional TLS on the proxy listener.
    pub tls: Option<TlsConfig>,
    /// Longest a request or response body may deliver nothing before it is cut.
    #[serde(with = "duration_str")]
    pub body_idle_timeout: Duration,
    /// The URL browsers reach this proxy listener at: the base of the OAuth
    /// redirect URI and of login URLs (browser sign-in needs it).
    pub public_url: Option<Url>,
    /// Most simultaneous connections from one source IP (0 = no limit).
    pub max_connections_per_ip: usize,
    /// A connection with no request in flight this long is closed (HTTP/1
    /// keep-alive connections already close after `header_read_timeout`).
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    /// HTTP/2: ping a connection that has been silent this long.
    #[serde(with = "duration_str")]
    pub http2_keepalive_interval: Duration,
    /// HTTP/2: close a connection whose ping is not answered within this.
    #[serde(with = "duration_str")]
    pub http2_keepalive_timeout: Duration,
    /// HTTP/2: most concurrent streams (requests) per connection.
    pub http2_max_concurrent_streams: u32,
    /// Total bytes of request bodies held at once so a request rejected with
    /// 401 can be retried; beyond it requests are sent without retry.
    pub retry_buffer_budget: u64,
    /// This replica's name in the audit trail; `None` = the host name
    /// (`$HOSTNAME`, a Kubernetes pod's name).
    pub replica_id: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            forwarded_headers: false,
            tls: None,
            body_idle_timeout: Duration::from_secs(60),
            public_url: None,
            max_connections_per_ip: 1000,
            idle_timeout: Duration::from_secs(300),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            http2_max_concurrent_streams: 100,
            retry_buffer_budget: 64 * 1024 * 1024,
            replica_id: None,
        }
    }
}

/// `[server.tls]`: serve the proxy listener over TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `[database]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Connection URL (may hold a password, hence secret). `DATABASE_URL` overrides it.
    #[serde(deserialize_with = "secret_plain")]
    pub url: SecretString,
    /// Apply migrations when `serve` starts.
    pub migrate_on_start: bool,
    /// Pool size.
    pub max_connections: u32,
    /// How long to wait for a pooled connection before answering `store_unavailable`.
    #[serde(with = "duration_str")]
    pub acquire_timeout: Duration,
    /// How often the Postgres change feed checks that its LISTEN connection
    /// still hears; a missed check reconnects and resyncs every cache.
    #[serde(with = "duration_str")]
    pub listen_check_interval: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: SecretString::from("postgres://postgres@127.0.0.1:5432/tokenproxy"),
            migrate_on_start: true,
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            listen_check_interval: Duration::from_secs(5),
        }
    }
}

/// Which at-rest format new values are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EncryptionFormat {
    /// tokenproxy's own: AES-256-GCM bound to (provider, user, column), 16-hex key ids.
    #[default]
    Native,
    /// Coder's dbcrypt: AES-256-GCM, no associated data, 7-hex key ids.
    Coder,
}

/// `[encryption]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// Base64 32-byte keys (`env:`/`file:` allowed); the first encrypts, all decrypt.
    /// Decoded and length-checked during validation.
    #[serde(deserialize_with = "secret_list")]
    pub keys: Vec<SecretString>,
    /// Format of newly written values.
    pub format: EncryptionFormat,
}

/// `[tokens]`: the token source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokensConfig {
    /// A token counts as expired this long before its expiry.
    #[serde(with = "duration_str")]
    pub refresh_skew: Duration,
    /// Most links held in memory.
    pub cache_capacity: u64,
    /// Refresh links in use before they expire, in the background.
    pub refresh_ahead: bool,
    /// Links used within this window are refreshed ahead.
    #[serde(with = "duration_str")]
    pub refresh_ahead_used_within: Duration,
    /// Refresh ahead once this fraction of a token's lifetime remains.
    pub refresh_ahead_remaining: f64,
    /// Most background (refresh-ahead) refreshes running at once, per replica.
    pub refresh_ahead_concurrency: usize,
    /// How long one replica may hold the cross-replica refresh lease.
    #[serde(with = "duration_str")]
    pub lease_timeout: Duration,
    /// Longest a cached link is served without reading it again, so a change
    /// whose notification was lost still reaches the cache.
    #[serde(with = "duration_str")]
    pub cache_max_age: Duration,
    /// After an upstream 401 forced a refresh of a link, further 401s for that link
    /// pass through untouched for this long (whatever token version they carried).
    #[serde(with = "duration_str")]
    pub reject_cooldown: Duration,
    /// Refresh (through the flight and lease) every link whose last refresh is
    /// older than this, so refresh tokens that die unused stay alive; `None` = off.
    #[serde(with = "duration_str::option")]
    pub keepalive_refresh: Option<Duration>,
}

impl Default for TokensConfig {
    fn default() -> Self {
        Self {
            refresh_skew: Duration::from_secs(60),
            cache_capacity: 100_000,
            refresh_ahead: true,
            refresh_ahead_used_within: Duration::from_secs(600),
            refresh_ahead_remaining: 0.2,
            refresh_ahead_concurrency: 8,
            lease_timeout: Duration::from_secs(30),
            cache_max_age: Duration::from_secs(300),
            reject_cooldown: Duration::from_secs(30),
            keepalive_refresh: None,
        }
    }
}

impl TokensConfig {
    /// The end of a refresh lease kept for storing a rotated token: no provider
    /// call may still be running inside it.
    pub fn write_reserve(&self) -> Duration {
        (self.lease_timeout / 4).min(Duration::from_secs(5))
    }
}

/// The write reserve at the end of a lease must hold the first write after a
/// provider's answer, which may wait `database.acquire_timeout` for a pooled
/// connection: a write that could still be waiting when the lease runs out would
/// let another replica claim the row and present the spent refresh token (later
/// writes run under extensions of the lease).
fn check_write_reserve(cfg: &Config) -> Result<(), ConfigError> {
    let reserve = cfg.tokens.write_reserve();
    let acquire = cfg.database.acquire_timeout;
    if acquire > reserve {
        return Err(ConfigError::new(
            "database.acquire_timeout",
            format!(
                "({acquire:?}) must not exceed the write reserve of tokens.lease_timeout \
                 ({reserve:?}: a quarter of the lease, at most 5s), or a refreshed token's \
                 first write could outlast the lease; lower database.acquire_timeout or \
                 raise tokens.lease_timeout"
            ),
        ));
    }
    Ok(())
}

/// How callers are identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CallerMode {
    /// Callers present `tpx_` proxy tokens.
    #[default]
    Token,
    /// Every request is one fixed user (sidecar); loopback listeners only.
    Static,
    /// Callers are Coder workspace agents presenting their agent token; the
    /// request acts for the workspace owner (see `proxy::caller_coder`).
    #[serde(rename = "coder_agent")]
    CoderAgent,
}

/// `[callers]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallersConfig {
    /// `token`, `static` or `coder_agent`.
    pub mode: CallerMode,
    /// The user served in `static` mode.
    pub static_user: Option<Uuid>,
    /// How long a verified proxy token is trusted without asking the database;
    /// a revocation takes effect within this time.
    #[serde(with = "duration_str")]
    pub cache_ttl: Duration,
    /// A proxy token's `last_used_at` is written at most once per this interval.
    #[serde(with = "duration_str")]
    pub touch_interval: Duration,
    /// While the store is unreachable, a verified token keeps being served for
    /// at most this long after its `cache_ttl` ran out (0 = not at all).
    #[serde(with = "duration_str")]
    pub outage_grace: Duration,
    /// Most store lookups of not-yet-verified tokens at once (> 0).
    pub max_concurrent_lookups: usize,
    /// How long a lookup waits for one of those slots before answering 503.
    #[serde(with = "duration_str")]
    pub lookup_wait: Duration,
    /// Failed authentications (with a credential presented) allowed per source
    /// IP and per credential within `auth_failure_window`; beyond, 429 (0 = no limit).
    pub auth_failure_limit: u32,
    /// The window `auth_failure_limit` counts in.
    #[serde(with = "duration_str")]
    pub auth_failure_window: Duration,
}

impl Default for CallersConfig {
    fn default() -> Self {
        Self {
            mode: CallerMode::Token,
            static_user: None,
            cache_ttl: Duration::from_secs(10),
            touch_interval: Duration::from_secs(60),
            outage_grace: Duration::from_secs(3600),
            max_concurrent_lookups: 8,
            lookup_wait: Duration::from_secs(1),
            auth_failure_limit: 20,
            auth_failure_window: Duration::from_secs(60),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[logging]`. The filter itself comes from `RUST_LOG` (default `info`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// Where the audit trail (`tokenproxy::audit`, JSON lines) goes.
    pub audit: AuditDestination,
}

/// `[logging] audit`: `"stderr"`, `"off"` (the default) or a file path (appended to).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(try_from = "String")]
pub enum AuditDestination {
    /// No audit trail.
    #[default]
    Off,
    /// JSON lines on stderr, beside the other logs.
    Stderr,
    /// JSON lines appended to this file.
    File(std::path::PathBuf),
}

impl TryFrom<String> for AuditDestination {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "off" => Ok(Self::Off),
            "stderr" => Ok(Self::Stderr),
            "" => Err("must be \"stderr\", \"off\" or a file path".into()),
            path => Ok(Self::File(path.into())),
        }
    }
}

/// How the client authenticates itself at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic with client id and secret (RFC 6749 §2.3.1, the default).
    #[default]
    ClientSecretBasic,
    /// Client id and secret in the form body.
    ClientSecretPost,
}

/// `[[providers]]`: one identity provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Stable id, stored as `external_auth_links.provider_id`.
    pub id: String,
    /// OAuth2 client id.
    pub client_id: String,
    /// OAuth2 client secret (`env:`/`file:` allowed); public clients omit it.
    #[serde(default, deserialize_with = "secret_opt")]
    pub client_secret: Option<SecretString>,
    /// The token endpoint.
    pub token_url: Url,
    /// How the client authenticates at the token endpoint.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// Deadline for one exchange with the token endpoint.
    #[serde(default = "default_provider_timeout", with = "duration_str")]
    pub timeout: Duration,
    /// Extra form parameters sent with every refresh grant. Values may be
    /// `env:`/`file:` and are kept secret: some providers take a client assertion
    /// here.
    #[serde(default, deserialize_with = "secret_map")]
    pub extra_params: BTreeMap<String, SecretString>,
    /// Fields of a token response kept in `oauth_extra`.
    #[serde(default)]
    pub extra_fields: Vec<String>,
    /// Extra CA (PEM) trusted for the token endpoint.
    #[serde(default)]
    pub token_ca: Option<PathBuf>,
    /// Where requests for this provider go.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// A preset (`github`, `github-app`, `gitlab`, `bitbucket`, `gitea`, `microsoft`,
    /// `oidc`) that fills every key above not written explicitly.
    #[serde(default)]
    pub preset: Option<String>,
    /// Base of a self-hosted forge (GitHub Enterprise Server, GitLab, Gitea) for its preset.
    #[serde(default)]
    pub base_url: Option<Url>,
    /// `preset = "oidc"`: the issuer whose discovery document names the endpoints.
    #[serde(default)]
    pub issuer: Option<Url>,
    /// Scopes requested when a user links an account.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Authorization endpoint (browser sign-in).
    #[serde(default)]
    pub authorize_url: Option<Url>,
    /// RFC 8628 device-authorization endpoint.
    #[serde(default)]
    pub device_authorization_url: Option<Url>,
    /// RFC 7009 revocation endpoint.
    #[serde(default)]
    pub revocation_url: Option<Url>,
    /// JWKS of an OIDC provider, for `id_token` signatures (discovered for `oidc`).
    #[serde(default)]
    pub jwks_uri: Option<Url>,
    /// Set while an `oidc` provider's endpoints are still to be discovered
    /// (`oauth::presets::discover`); its `token_url` is a placeholder until then.
    #[serde(skip)]
    pub needs_discovery: bool,
}

fn default_provider_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `[[providers.routes]]`: one way into an upstream. A route has a `prefix`
/// (reverse mode), `hosts` (forward mode) or both.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Reverse mode: requests whose path starts with this prefix use this route.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Reverse mode: where they go; the prefix is replaced by the upstream's path.
    /// Required with `prefix`.
    #[serde(default)]
    pub upstream: Option<Url>,
    /// Forward mode: target hosts intercepted for this route; the request goes to
    /// `https://<host>` with its path unchanged.
    #[serde(default)]
    pub hosts: Vec<HostPattern>,
    /// Open the TCP connection to this `host:port` instead, keeping the route's
    /// host for SNI, certificate verification and `Host` (like curl's `--connect-to`).
    #[serde(default)]
    pub connect_to: Option<String>,
    /// Forward mode: also serve plain-HTTP absolute-form requests to these hosts
    /// (credentials then travel unencrypted).
    #[serde(default)]
    pub allow_plain_http: bool,
    /// How the credential is attached.
    #[serde(default)]
    pub inject: Inject,
    /// Extra CA (PEM) trusted for this upstream.
    #[serde(default)]
    pub upstream_ca: Option<PathBuf>,
    /// Reverse mode: pass the caller's `Cookie` header on. Off by default: a
    /// browser's cookies for tokenproxy's origin are not meant for the upstream.
    #[serde(default)]
    pub cookies: bool,
    /// Methods this route forwards (upper case); others get 405. Empty = any
    /// method but `TRACE`/`TRACK`, which are never forwarded.
    #[serde(default)]
    pub methods: Vec<String>,
}

/// How a credential is attached to the upstream request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Inject {
    /// `Authorization: Bearer <token>`.
    #[default]
    Bearer,
    /// `Authorization: Basic base64(<username>:<token>)`.
    BasicUsername(String),
    /// The raw token in the named header.
    Header(http::HeaderName),
}

impl<'de> Deserialize<'de> for Inject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Table(BTreeMap<String, String>),
        }
        use serde::de::Error;
        const EXPECTED: &str =
            r#"expected "bearer", { basic_username = "..." } or { header = "..." }"#;
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "bearer" => Ok(Inject::Bearer),
            Raw::Word(w) => Err(D::Error::custom(format!(
                "unknown inject `{w}`; {EXPECTED}"
            ))),
            Raw::Table(t) if t.len() == 1 => {
                let (k, v) = t.into_iter().next().expect("one entry");
                match k.as_str() {
                    "basic_username"
                        if !v.is_empty()
                            && !v.contains(':')
                            && !v.chars().any(char::is_control) =>
                    {
                        Ok(Inject::BasicUsername(v))
                    }
                    "basic_username" => Err(D::Error::custom(
                        "basic_username must be non-empty and contain no ':' or control characters",
                    )),
                    "header" => http::HeaderName::from_bytes(v.as_bytes())
                        .map(Inject::Header)
                        .map_err(|_| D::Error::custom(format!("invalid header name `{v}`"))),
                    _ => Err(D::Error::custom(format!(
                        "unknown inject `{k}`; {EXPECTED}"
                    ))),
                }
            }
            Raw::Table(_) => Err(D::Error::custom(EXPECTED)),
        }
    }
}

impl Config {
    /// Reads, overrides from the process environment, and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("config", format!("cannot read {}: {e}", path.display()))
        })?;
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::from_toml_with_env(&text, &env)
    }

    /// Parses `text`, applies overrides from `env`, and validates.
    ///
    /// `env` is also where `env:VAR` secrets are looked up, so tests need not touch
    /// the process environment.
    pub fn from_toml_with_env(text: &str, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut value: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let msg = e.message().trim().replace('\n', " ");
            let at = e
                .span()
                .map(|s| format!(" (line {})", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_default();
            ConfigError::new("config", format!("invalid TOML{at}: {msg}"))
        })?;
        let origins = override_table(&mut value, env)?;
        let host_regexes = coder::providers_from_env(&mut value, env)?;
        text::refuse_control_characters(&value).map_err(|e| blame_override(e, &origins))?;
        let pending = crate::oauth::presets::expand(&mut value)?;
        coder::restrict_hosts(&mut value, &host_regexes)?;
        let mut cfg: Config = SECRET_ENV
            .with(|cell| {
                *cell.borrow_mut() = Some(env.to_vec());
                let out = serde_path_to_error::deserialize(toml::Value::Table(value));
                *cell.borrow_mut() = None;
                out
            })
            .map_err(|e| {
                let key = e.path().to_string();
                let key = if key == "." {
                    "config".to_string()
                } else {
                    key
                };
                let message = e.into_inner().message().trim().replace('\n', " ");
                blame_override(ConfigError::new(key, message), &origins)
            })?;
        for i in pending {
            cfg.providers[i].needs_discovery = true;
        }
        cfg.validate().map_err(|e| blame_override(e, &origins))?;
        Ok(cfg)
    }

    /// Checks rules that span keys or values serde cannot check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.callers.mode == CallerMode::Static {
            if self.callers.static_user.is_none() {
                return Err(ConfigError::new(
                    "callers.static_user",
                    "required when callers.mode = \"static\"",
                ));
            }
            if !self.server.listen.ip().is_loopback() {
                return Err(ConfigError::new(
                    "server.listen",
                    "static caller mode serves one fixed user and may only listen on loopback",
                ));
            }
        }
        // Zero would not mean "no limit": every connection, request or pool
        // checkout would fail at once.
        for (key, d) in [
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.upstream_timeout", self.server.upstream_timeout),
            ("server.connect_timeout", self.server.connect_timeout),
            ("server.body_idle_timeout", self.server.body_idle_timeout),
            ("server.idle_timeout", self.server.idle_timeout),
            (
                "server.http2_keepalive_interval",
                self.server.http2_keepalive_interval,
            ),
            (
                "server.http2_keepalive_timeout",
                self.server.http2_keepalive_timeout,
            ),
            ("database.acquire_timeout", self.database.acquire_timeout),
            (
                "database.listen_check_interval",
                self.database.listen_check_interval,
            ),
            ("tokens.cache_max_age", self.tokens.cache_max_age),
            (
                "tokens.keepalive_refresh",
                self.tokens.keepalive_refresh.unwrap_or(Duration::MAX),
            ),
            (
                "callers.auth_failure_window",
                self.callers.auth_failure_window,
            ),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(key, "must be above zero"));
            }
        }
        if self.server.http2_max_concurrent_streams == 0 {
            return Err(ConfigError::new(
                "server.http2_max_concurrent_streams",
                "must be above zero",
            ));
        }
        if let Some(id) = &self.server.replica_id {
            let fits = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
            if !fits {
                return Err(ConfigError::new(
                    "server.replica_id",
                    "must be 1 to 64 characters of letters, digits, '-', '_', '.' or ':'",
                ));
            }
        }
        if self.callers.max_concurrent_lookups == 0 {
            return Err(ConfigError::new(
                "callers.max_concurrent_lookups",
                "must be above zero",
            ));
        }
        check_database_url(&self.database.url)?;
        if let Some(u) = &self.server.public_url {
            check_public_url(u).map_err(|m| ConfigError::new("server.public_url", m))?;
        }
        let t = &self.tokens;
        if !(t.refresh_ahead_remaining > 0.0 && t.refresh_ahead_remaining < 1.0) {
            return Err(ConfigError::new(
                "tokens.refresh_ahead_remaining",
                "must be a fraction between 0 and 1",
            ));
        }
        if t.refresh_ahead_concurrency == 0 {
            return Err(ConfigError::new(
                "tokens.refresh_ahead_concurrency",
                "must be at least 1",
            ));
        }
        if t.cache_capacity == 0 {
            return Err(ConfigError::new(
                "tokens.cache_capacity",
                "must be at least 1",
            ));
        }
        for (i, key) in self.encryption.keys.iter().enumerate() {
            decode_key(key).map_err(|m| ConfigError::new(format!("encryption.keys[{i}]"), m))?;
        }
        if let Some(coder) = &self.coder {
            coder.validate(self)?;
        }
        check_write_reserve(self)?;
        let mut ids = HashSet::new();
        let mut prefixes = HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            let at = |k: &str| format!("providers[{i}].{k}");
            if p.id.is_empty()
                || !p
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(ConfigError::new(
                    at("id"),
                    "must be non-empty and use only letters, digits, '-', '_' and '.'",
                ));
            }
            if !ids.insert(p.id.as_str()) {
                return Err(ConfigError::new(
                    at("id"),
                    format!("duplicate provider id `{}`", p.id),
                ));
            }
            check_http_url(&p.token_url).map_err(|m| ConfigError::new(at("token_url"), m))?;
            check_secret_endpoints(p).map_err(|(key, m)| ConfigError::new(at(key), m))?;
            if p.timeout.is_zero() || p.timeout >= self.tokens.lease_timeout {
                return Err(ConfigError::new(
                    at("timeout"),
                    "must be above zero and shorter than tokens.lease_timeout",
                ));
            }
            // The lease must cover the claim's answer and the re-read (each may
            // wait for a pooled connection) plus one provider attempt, and still
            // keep its write reserve; else no exchange could ever start.
            let room = self
                .tokens
                .lease_timeout
                .saturating_sub(self.tokens.write_reserve());
            if p.timeout + self.database.acquire_timeout * 2 > room {
                return Err(ConfigError::new(
                    at("timeout"),
                    format!(
                        "({:?}) plus twice database.acquire_timeout ({:?}, for the claim and \
                         the re-read) must fit in tokens.lease_timeout minus its write reserve \
                         ({room:?}); lower this or database.acquire_timeout, or raise \
                         tokens.lease_timeout",
                        p.timeout, self.database.acquire_timeout
                    ),
                ));
            }
            for (j, r) in p.routes.iter().enumerate() {
                let at = |k: &str| format!("providers[{i}].routes[{j}].{k}");
                if let Some(prefix) = &r.prefix {
                    if !prefix.starts_with('/')
                        || prefix.contains("..")
                        || prefix.contains('%')
                        || prefix.chars().any(|c| c.is_control() || c.is_whitespace())
                    {
                        return Err(ConfigError::new(
                            at("prefix"),
                            "must start with '/' and contain no '..', '%', spaces or control characters",
                        ));
                    }
                    if prefix.trim_end_matches('/') == RESERVED_PREFIX.trim_end_matches('/')
                        || prefix.starts_with(RESERVED_PREFIX)
                    {
                        return Err(ConfigError::new(
                            at("prefix"),
                            format!(
                                "`{RESERVED_PREFIX}` is reserved for tokenproxy's own endpoints"
                            ),
                        ));
                    }
                    let norm = prefix.trim_end_matches('/').to_string();
                    if !prefixes.insert(norm) {
                        return Err(ConfigError::new(
                            at("prefix"),
                            format!("duplicate route prefix `{prefix}`"),
                        ));
                    }
                }
                check_methods(&r.methods).map_err(|m| ConfigError::new(at("methods"), m))?;
                if let Some(upstream) = &r.upstream {
                    check_http_url(upstream).map_err(|m| ConfigError::new(at("upstream"), m))?;
                    if upstream.query().is_some() || upstream.fragment().is_some() {
                        return Err(ConfigError::new(
                            at("upstream"),
                            "must not have a query or fragment",
                        ));
                    }
                }
            }
        }
        forward::validate_routes(self)
    }

    /// The decoded 32-byte encryption keys, first (encrypting) key first.
    pub fn encryption_keys(&self) -> Vec<secrecy::SecretBox<[u8; 32]>> {
        if let Some(coder) = self.coder.as_ref().filter(|c| c.encryption_keys.is_some()) {
            return coder
                .key_list()
                .iter()
                .map(|k| secrecy::SecretBox::new(Box::new(decode_key(k).expect("validated"))))
                .collect();
        }
        self.encryption
            .keys
            .iter()
            .map(|k| secrecy::SecretBox::new(Box::new(decode_key(k).expect("validated"))))
            .collect()
    }

    /// The format new values are written in: Coder's dbcrypt whenever
    /// `coder.encryption_keys` supplies the keys.
    pub fn encryption_format(&self) -> EncryptionFormat {
        if self
            .coder
            .as_ref()
            .is_some_and(|c| c.encryption_keys.is_some())
        {
            EncryptionFormat::Coder
        } else {
            self.encryption.format
        }
    }

    /// The provider with this id.
    pub fn provider(&self, id: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.id == id)
    }
}

/// Resolves the config path: `--config`, then `$TOKENPROXY_CONFIG`, then `tokenproxy.toml`.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os(CONFIG_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONFIG_FILE),
    }
}

fn decode_key(key: &SecretString) -> Result<[u8; 32], String> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(key.expose_secret().trim())
        .map_err(|_| "is not valid base64".to_string())?;
    <[u8; 32]>::try_from(raw.as_slice())
        .map_err(|_| format!("must decode to 32 bytes, got {}", raw.len()))
}

/// A route's `methods`: request-method tokens in upper case, never one
/// tokenproxy refuses anyway.
fn check_methods(methods: &[String]) -> Result<(), String> {
    for m in methods {
        if http::Method::from_bytes(m.as_bytes()).is_err()
            || m.bytes().any(|b| b.is_ascii_lowercase())
        {
            return Err(format!(
                "`{}` is not an upper-case method name",
                m.escape_debug()
            ));
        }
        if matches!(m.as_str(), "TRACE" | "TRACK" | "CONNECT") {
            return Err(format!("{m} is never forwarded on a route"));
        }
    }
    Ok(())
}

fn check_http_url(u: &Url) -> Result<(), String> {
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!(
            "scheme must be http or https, got `{}`",
            u.scheme()
        ));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err("must have a host".into());
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("must not embed credentials".into());
    }
    Ok(())
}

/// The endpoints of `p` that receive a secret, each checked by
/// [`check_secret_endpoint`]; the error names the key. An `oidc` provider's
/// `token_url` is only a placeholder until discovery, which checks what it finds.
fn check_secret_endpoints(p: &ProviderConfig) -> Result<(), (&'static str, String)> {
    let [token, device, revocation] = endpoint::SECRET_ENDPOINT_KEYS;
    let urls = [
        (token, (!p.needs_discovery).then_some(&p.token_url)),
        (device, p.device_authorization_url.as_ref()),
        (revocation, p.revocation_url.as_ref()),
    ];
    for (key, url) in urls {
        if let Some(u) = url {
            check_http_url(u).map_err(|m| (key, m))?;
            check_secret_endpoint(u).map_err(|m| (key, m))?;
        }
    }
    Ok(())
}

/// `server.public_url`: an http(s) origin, optionally with a path prefix (a
/// reverse proxy in front), without credentials, query or fragment.
fn check_public_url(u: &Url) -> Result<(), String> {
    check_http_url(u)?;
    if u.query().is_some() || u.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    Ok(())
}

/// Checks the database URL without ever echoing it (it may hold a password).
fn check_database_url(url: &SecretString) -> Result<(), ConfigError> {
    let url = url.expose_secret();
    // `sqlite://PATH` (or `sqlite:PATH`) names a file, which is not a URL path:
    // `sqlite://./data/x.db` is relative, `sqlite:///var/x.db` absolute.
    if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        let file = path.split('?').next().unwrap_or_default();
        if file.is_empty() {
            return Err(ConfigError::new(
                "database.url",
                "sqlite:// must name a file, e.g. sqlite://./data/tokenproxy.db",
            ));
        }
        return Ok(());
    }
    let parsed = Url::parse(url)
        .map_err(|e| ConfigError::new("database.url", format!("is not a valid URL ({e})")))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(ConfigError::new(
            "database.url",
            "scheme must be postgres://, postgresql:// or sqlite://",
        ));
    }
    Ok(())
}

/// Serde adapter for durations written like `"60s"`, `"10m"`, `"1h 30m"`.
pub mod duration_str {
    use serde::Deserialize;
    use std::time::Duration;

    /// Parses a humantime duration string.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration `{s}`: {e}")))
    }

    /// The same for an optional key (absent = `None`).
    pub mod option {
        use std::time::Duration;

        /// Parses a humantime duration string.
        pub fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}
