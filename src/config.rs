//! Typed configuration: a TOML file plus environment overrides, validated before
//! anything binds a port.
//!
//! Loading happens in three steps so every error can name the key it is about:
//! parse the file into a TOML value, apply `DATABASE_URL` and `TOKENPROXY_<SECTION>__<KEY>`
//! overrides to that value, then deserialize it (with `serde_path_to_error`, which yields
//! the dotted path of the offending key) and validate the result. Secrets written as
//! `env:VAR` or `file:PATH` are resolved here and wrapped in [`SecretString`] at once.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

mod callers;
mod coder;
mod database;
mod endpoint;
mod forward;
mod logging;
mod overrides;
mod secrets;
mod server;
mod text;
mod tokens;

pub use callers::{CallerMode, CallersConfig};
pub use coder::CoderConfig;
use database::decode_key;
pub use database::{DatabaseConfig, EncryptionConfig, EncryptionFormat};
pub use endpoint::{check_secret_endpoint, is_loopback};
pub use forward::{ForwardConfig, HostPattern, Unrouted};
pub use logging::{AuditDestination, LogFormat, LoggingConfig};
pub use server::{AdminConfig, ServerConfig, TlsConfig};
pub use tokens::TokensConfig;

pub use overrides::apply_env_overrides;
use overrides::{blame_override, override_table};
pub use secrets::resolve_secret;
use secrets::{secret_map, secret_opt, SECRET_ENV};
use serde::Deserialize;
use url::Url;

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
        self.callers.validate(&self.server)?;
        self.server.validate()?;
        self.database.validate()?;
        self.tokens.validate()?;
        self.encryption.validate()?;
        if let Some(coder) = &self.coder {
            coder.validate(self)?;
        }
        self.tokens
            .check_write_reserve(self.database.acquire_timeout)?;
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

/// Refuses a zero among these `(key, duration)` pairs: zero would not mean "no
/// limit", every connection, request or pool checkout would fail at once.
fn refuse_zero(durations: &[(&str, Duration)]) -> Result<(), ConfigError> {
    for (key, d) in durations {
        if d.is_zero() {
            return Err(ConfigError::new(*key, "must be above zero"));
        }
    }
    Ok(())
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
