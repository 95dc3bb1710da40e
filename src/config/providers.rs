//! `[[providers]]` and their `[[providers.routes]]`: the identity providers, how a
//! credential is attached, and the checks that span providers (unique ids and
//! route prefixes, timeouts that fit the refresh lease).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use super::endpoint::{self, check_secret_endpoint};
use super::secrets::{secret_map, secret_opt};
use super::{duration_str, ConfigError, HostPattern, TokensConfig, RESERVED_PREFIX};

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

/// Checks every provider and its routes against the refresh lease of `tokens` and
/// the pool's `acquire_timeout`; ids and route prefixes must be unique across all.
pub(super) fn validate_providers(
    providers: &[ProviderConfig],
    tokens: &TokensConfig,
    acquire_timeout: Duration,
) -> Result<(), ConfigError> {
    let mut ids = HashSet::new();
    let mut prefixes = HashSet::new();
    for (i, p) in providers.iter().enumerate() {
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
        p.validate(i, tokens, acquire_timeout)?;
        for (j, r) in p.routes.iter().enumerate() {
            r.validate(i, j, &mut prefixes)?;
        }
    }
    Ok(())
}

impl ProviderConfig {
    /// Checks the endpoints and the timeout of provider `i`.
    fn validate(
        &self,
        i: usize,
        tokens: &TokensConfig,
        acquire_timeout: Duration,
    ) -> Result<(), ConfigError> {
        let at = |k: &str| format!("providers[{i}].{k}");
        check_http_url(&self.token_url).map_err(|m| ConfigError::new(at("token_url"), m))?;
        check_secret_endpoints(self).map_err(|(key, m)| ConfigError::new(at(key), m))?;
        if self.timeout.is_zero() || self.timeout >= tokens.lease_timeout {
            return Err(ConfigError::new(
                at("timeout"),
                "must be above zero and shorter than tokens.lease_timeout",
            ));
        }
        // The lease must cover the claim's answer and the re-read (each may
        // wait for a pooled connection) plus one provider attempt, and still
        // keep its write reserve; else no exchange could ever start.
        let room = tokens.lease_timeout.saturating_sub(tokens.write_reserve());
        if self.timeout + acquire_timeout * 2 > room {
            return Err(ConfigError::new(
                at("timeout"),
                format!(
                    "({:?}) plus twice database.acquire_timeout ({:?}, for the claim and \
                     the re-read) must fit in tokens.lease_timeout minus its write reserve \
                     ({room:?}); lower this or database.acquire_timeout, or raise \
                     tokens.lease_timeout",
                    self.timeout, acquire_timeout
                ),
            ));
        }
        Ok(())
    }
}

impl RouteConfig {
    /// Checks route `j` of provider `i`; `prefixes` holds the normalised prefixes
    /// of the routes checked before it.
    fn validate(
        &self,
        i: usize,
        j: usize,
        prefixes: &mut HashSet<String>,
    ) -> Result<(), ConfigError> {
        let at = |k: &str| format!("providers[{i}].routes[{j}].{k}");
        if let Some(prefix) = &self.prefix {
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
                    format!("`{RESERVED_PREFIX}` is reserved for tokenproxy's own endpoints"),
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
        check_methods(&self.methods).map_err(|m| ConfigError::new(at("methods"), m))?;
        if let Some(upstream) = &self.upstream {
            check_http_url(upstream).map_err(|m| ConfigError::new(at("upstream"), m))?;
            if upstream.query().is_some() || upstream.fragment().is_some() {
                return Err(ConfigError::new(
                    at("upstream"),
                    "must not have a query or fragment",
                ));
            }
        }
        Ok(())
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

/// An endpoint URL: http(s), with a host, without embedded credentials.
pub(super) fn check_http_url(u: &Url) -> Result<(), String> {
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
