//! The `[coder]` section: serving beside a Coder deployment, on Coder's database.
//!
//! Besides its own keys, it can build `[[providers]]` from the variables coderd
//! itself is configured with (`CODER_EXTERNAL_AUTH_<n>_*`), so one environment
//! configures both. That happens on the raw TOML, before presets are expanded:
//! each Coder provider becomes a provider with the matching preset, whose
//! routes and git username (GitHub `x-access-token`, GitLab `oauth2`,
//! Bitbucket `x-token-auth`) the preset supplies. A provider's `REGEX` then
//! narrows the forward-mode hosts its routes claim ([`restrict_hosts`]).

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use super::secrets::secret_opt;
use super::{check_http_url, decode_key, duration_str, Config, ConfigError};

/// `[coder]`: tokenproxy serves beside a Coder deployment, on Coder's database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoderConfig {
    /// Coder's database (`CODER_PG_CONNECTION_URL`); `database.url` when absent.
    #[serde(deserialize_with = "secret_opt")]
    pub database_url: Option<SecretString>,
    /// Coder's `CODER_ACCESS_URL`; re-link pages are `<access_url>/external-auth/<id>`.
    pub access_url: Option<Url>,
    /// Coder's `CODER_EXTERNAL_TOKEN_ENCRYPTION_KEYS`: comma-separated standard
    /// base64 32-byte keys, the first encrypts (Coder's dbcrypt format). Typically
    /// `"env:CODER_EXTERNAL_TOKEN_ENCRYPTION_KEYS"`.
    #[serde(deserialize_with = "secret_opt")]
    pub encryption_keys: Option<SecretString>,
    /// Build providers and routes from coderd's `CODER_EXTERNAL_AUTH_<n>_*` variables.
    pub external_auth_from_env: bool,
    /// Add a NOTIFY trigger to Coder's `external_auth_links` (a change to Coder's
    /// schema, so opt-in) instead of polling for coderd's writes.
    pub install_trigger: bool,
    /// How often the `updated_at` of links in use is polled for coderd's writes.
    #[serde(with = "duration_str")]
    pub poll_interval: Duration,
    /// A link unused for this long stops being polled (and leaves the caches).
    #[serde(with = "duration_str")]
    pub watch_idle: Duration,
    /// With `callers.mode = "coder_agent"`, also accept `tpx_` proxy tokens.
    pub proxy_tokens: bool,
}

impl Default for CoderConfig {
    fn default() -> Self {
        Self {
            database_url: None,
            access_url: None,
            encryption_keys: None,
            external_auth_from_env: false,
            install_trigger: false,
            poll_interval: Duration::from_secs(1),
            watch_idle: Duration::from_secs(600),
            proxy_tokens: false,
        }
    }
}

/// The longest `poll_interval`: coderd's updates must reach every cache within 2 s.
const MAX_POLL: Duration = Duration::from_secs(2);

impl CoderConfig {
    /// The keys of `encryption_keys`, in order; each entry as `[encryption] keys` holds them.
    pub(super) fn key_list(&self) -> Vec<SecretString> {
        self.encryption_keys
            .as_ref()
            .map(|k| {
                k.expose_secret()
                    .split(',')
                    .map(|s| SecretString::from(s.trim().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Coder's re-link page for `provider_id`, when `access_url` is set.
    pub fn login_url(&self, provider_id: &str) -> Option<String> {
        let base = self.access_url.as_ref()?;
        Some(format!(
            "{}/external-auth/{provider_id}",
            base.as_str().trim_end_matches('/')
        ))
    }

    /// Checks the section against the rest of `cfg`.
    pub(super) fn validate(&self, cfg: &Config) -> Result<(), ConfigError> {
        if let Some(u) = &self.access_url {
            check_http_url(u).map_err(|m| ConfigError::new("coder.access_url", m))?;
        }
        if let Some(url) = &self.database_url {
            let s = url.expose_secret();
            if !(s.starts_with("postgres://") || s.starts_with("postgresql://")) {
                return Err(ConfigError::new(
                    "coder.database_url",
                    "must be a postgres:// or postgresql:// URL (Coder runs on Postgres)",
                ));
            }
        }
        if self.poll_interval.is_zero() || self.poll_interval > MAX_POLL {
            return Err(ConfigError::new(
                "coder.poll_interval",
                "must be more than 0 and at most 2s (coderd's writes must reach caches within 2 s)",
            ));
        }
        if self.watch_idle < self.poll_interval {
            return Err(ConfigError::new(
                "coder.watch_idle",
                "must be at least coder.poll_interval",
            ));
        }
        if self.encryption_keys.is_some() {
            if !cfg.encryption.keys.is_empty() {
                return Err(ConfigError::new(
                    "coder.encryption_keys",
                    "set either coder.encryption_keys or encryption.keys, not both",
                ));
            }
            for (i, key) in self.key_list().iter().enumerate() {
                decode_key(key).map_err(|m| {
                    ConfigError::new("coder.encryption_keys", format!("key {}: {m}", i + 1))
                })?;
            }
        }
        Ok(())
    }
}

/// Coder's provider types and the preset (and default host) each maps to.
const TYPES: &[(&str, &str, &str)] = &[
    ("github", "github", "github.com"),
    ("gitlab", "gitlab", "gitlab.com"),
    ("bitbucket-cloud", "bitbucket", "bitbucket.org"),
    ("bitbucket", "bitbucket", "bitbucket.org"),
    ("gitea", "gitea", ""),
];

/// With `coder.external_auth_from_env = true` in `table`, appends one
/// `[[providers]]` per `CODER_EXTERNAL_AUTH_<n>_ID` in `env` (n = 0, 1, … as
/// coderd numbers them). A provider the file already defines (same id) is kept
/// as written. The client secret stays an `env:` reference, so it is resolved
/// like any other secret and never copied.
///
/// Returns the `REGEX` of each provider it added, for [`restrict_hosts`] once
/// the presets have made their routes.
pub(super) fn providers_from_env(
    table: &mut toml::Table,
    env: &[(String, String)],
) -> Result<Vec<HostRegex>, ConfigError> {
    let on = table
        .get("coder")
        .and_then(|c| c.get("external_auth_from_env"))
        .and_then(toml::Value::as_bool)
        .unwrap_or(false);
    if !on {
        return Ok(Vec::new());
    }
    let get = |n: usize, k: &str| {
        let name = format!("CODER_EXTERNAL_AUTH_{n}_{k}");
        env.iter()
            .find(|(key, v)| *key == name && !v.is_empty())
            .map(|(_, v)| v.clone())
    };
    let mut built = Vec::new();
    let mut regexes = Vec::new();
    for n in 0.. {
        let Some(id) = get(n, "ID") else { break };
        let regex = host_regex(n, &id, &get)?;
        built.push((provider_from_env(n, id, &get)?, regex));
    }
    let providers = table
        .entry("providers")
        .or_insert_with(|| toml::Value::Array(Vec::new()));
    let Some(list) = providers.as_array_mut() else {
        return Err(ConfigError::new("providers", "must be an array of tables"));
    };
    for (p, regex) in built {
        let id = p.get("id").cloned();
        if !list.iter().any(|q| q.get("id") == id.as_ref()) {
            list.push(toml::Value::Table(p));
            regexes.extend(regex);
        }
    }
    Ok(regexes)
}

/// A provider's `CODER_EXTERNAL_AUTH_<n>_REGEX`, compiled.
pub(super) struct HostRegex {
    /// The provider it belongs to.
    id: String,
    /// The variable it came from, for errors.
    var: String,
    regex: regex::Regex,
}

/// Compiles `REGEX` (coderd compiles it with Go's RE2 `regexp`, whose syntax the
/// `regex` crate shares) and checks `VALIDATE_URL`, which tokenproxy does not
/// call but refuses when coderd could not use it either.
fn host_regex(
    n: usize,
    id: &str,
    get: &dyn Fn(usize, &str) -> Option<String>,
) -> Result<Option<HostRegex>, ConfigError> {
    let var = |k: &str| format!("CODER_EXTERNAL_AUTH_{n}_{k}");
    if let Some(u) = get(n, "VALIDATE_URL") {
        Url::parse(&u)
            .map_err(|e| e.to_string())
            .and_then(|u| check_http_url(&u))
            .map_err(|m| ConfigError::new(var("VALIDATE_URL"), format!("not a usable URL: {m}")))?;
    }
    let Some(text) = get(n, "REGEX") else {
        return Ok(None);
    };
    let regex = regex::Regex::new(&text).map_err(|e| {
        // The crate's message draws the pattern over several lines; keep its
        // last line, the reason.
        let reason = e.to_string();
        let reason = reason.lines().last().unwrap_or_default().trim().to_string();
        ConfigError::new(var("REGEX"), format!("does not compile: {reason}"))
    })?;
    Ok(Some(HostRegex {
        id: id.to_owned(),
        var: var("REGEX"),
        regex,
    }))
}

/// Applies each `REGEX` to its provider's forward-mode routes, after the presets
/// made them. coderd matches the regex against a git remote URL to pick the
/// provider serving it; tokenproxy picks a route by the target host before any
/// path is seen, so a host stays claimed by the provider only when the regex
/// matches `https://<host>` or `https://<host>/`. A route left without hosts
/// keeps its reverse-mode prefix. A regex that keeps none of the provider's
/// forward hosts is refused: the provider would silently serve nothing.
pub(super) fn restrict_hosts(
    table: &mut toml::Table,
    regexes: &[HostRegex],
) -> Result<(), ConfigError> {
    let Some(list) = table.get_mut("providers").and_then(|p| p.as_array_mut()) else {
        return Ok(());
    };
    for rx in regexes {
        let Some(routes) = list
            .iter_mut()
            .find(|p| p.get("id").and_then(toml::Value::as_str) == Some(rx.id.as_str()))
            .and_then(|p| p.get_mut("routes"))
            .and_then(|r| r.as_array_mut())
        else {
            continue;
        };
        let (mut before, mut kept) = (Vec::new(), 0);
        for route in routes.iter_mut().filter_map(|r| r.as_table_mut()) {
            let Some(hosts) = route.get_mut("hosts").and_then(|h| h.as_array_mut()) else {
                continue;
            };
            hosts.retain(|h| {
                let Some(host) = h.as_str() else { return true };
                before.push(host.to_owned());
                let hit = [format!("https://{host}"), format!("https://{host}/")]
                    .iter()
                    .any(|u| rx.regex.is_match(u));
                kept += usize::from(hit);
                hit
            });
            if hosts.is_empty() {
                route.remove("hosts");
            }
        }
        if !before.is_empty() && kept == 0 {
            return Err(ConfigError::new(
                rx.var.clone(),
                format!(
                    "matches none of provider `{}`'s forward-mode hosts ({}); tokenproxy \
                     routes by host, so the regex must match https://<host>/",
                    rx.id,
                    before.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// One provider from `CODER_EXTERNAL_AUTH_<n>_*`.
fn provider_from_env(
    n: usize,
    id: String,
    get: &dyn Fn(usize, &str) -> Option<String>,
) -> Result<toml::Table, ConfigError> {
    let var = |k: &str| format!("CODER_EXTERNAL_AUTH_{n}_{k}");
    let s = |v: String| toml::Value::String(v);
    let mut p = toml::Table::new();
    p.insert("id".into(), s(id));
    let client_id = get(n, "CLIENT_ID")
        .ok_or_else(|| ConfigError::new(var("CLIENT_ID"), "must be set for tokenproxy"))?;
    p.insert("client_id".into(), s(client_id));
    if get(n, "CLIENT_SECRET").is_some() {
        p.insert(
            "client_secret".into(),
            s(format!("env:{}", var("CLIENT_SECRET"))),
        );
    }
    let kind = get(n, "TYPE").unwrap_or_default().to_ascii_lowercase();
    let preset = TYPES.iter().find(|(t, _, _)| *t == kind);
    let token_url = get(n, "TOKEN_URL");
    match preset {
        Some((_, name, host)) => {
            p.insert("preset".into(), s((*name).into()));
            // A self-hosted forge: its base is where coderd sends users to sign in.
            let auth = get(n, "AUTH_URL").or_else(|| token_url.clone());
            if let Some(u) = auth.as_deref().and_then(|u| Url::parse(u).ok()) {
                if u.host_str().is_some_and(|h| h != *host) {
                    p.insert("base_url".into(), s(u.origin().ascii_serialization()));
                }
            }
        }
        None if token_url.is_none() => {
            return Err(ConfigError::new(
                var("TYPE"),
                format!(
                    "type `{kind}` has no tokenproxy preset; set {} too",
                    var("TOKEN_URL")
                ),
            ))
        }
        None => {}
    }
    if let Some(u) = token_url {
        p.insert("token_url".into(), s(u));
    }
    if let Some(u) = get(n, "AUTH_URL") {
        p.insert("authorize_url".into(), s(u));
    }
    if let Some(scopes) = get(n, "SCOPES") {
        let list = scopes
            .split([' ', ','])
            .filter(|x| !x.is_empty())
            .map(|x| s(x.into()))
            .collect();
        p.insert("scopes".into(), toml::Value::Array(list));
    }
    Ok(p)
}
