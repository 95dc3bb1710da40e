//! Provider presets: what tokenproxy knows about each forge so a `[[providers]]`
//! entry can say `preset = "github"` instead of spelling out endpoints, scopes,
//! routes and the git username.
//!
//! A preset is applied to the raw TOML of one provider, before it is deserialized:
//! it only fills keys the operator did not write, so everything a preset sets can be
//! overridden, and a provider without `preset` is untouched. `oidc` has no fixed
//! endpoints: [`discover`] fetches them from the issuer's
//! `/.well-known/openid-configuration` when the proxy starts, and refuses an
//! unreachable or inconsistent document. The facts here come from the forges' own
//! documentation; README.md ("Provider presets") says which were verified where.

use std::time::Duration;

use url::Url;

use crate::config::{check_secret_endpoint, Config, ConfigError};

/// One forge's defaults.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    /// The `preset = "..."` name.
    pub name: &'static str,
    /// One line for `tokenproxy providers`.
    pub about: &'static str,
    /// `base_url` when none is configured; `None` = `base_url` (or `issuer`) is required.
    pub default_base: Option<&'static str>,
    /// Authorization endpoint, relative to the base.
    pub authorize: Option<&'static str>,
    /// Token endpoint, relative to the base.
    pub token: Option<&'static str>,
    /// RFC 8628 device-authorization endpoint, relative to the base.
    pub device: Option<&'static str>,
    /// Revocation: RFC 7009 endpoint relative to the base, or GitHub's grant API.
    pub revocation: Option<&'static str>,
    /// Scopes requested when `scopes` is not configured.
    pub scopes: &'static [&'static str],
    /// REST API upstream for the default `/<id>/api` route: relative to the base
    /// when it starts with '/', else absolute (and used only for the default base).
    pub api: Option<&'static str>,
    /// API upstream used with a configured (self-hosted) `base_url`.
    pub api_self_hosted: Option<&'static str>,
    /// Username for Basic credentials on the default `/<id>/git` route; `None` = no git route.
    pub git_user: Option<&'static str>,
    /// How the client authenticates at the token endpoint.
    pub client_auth: &'static str,
    /// Token-response fields kept in `oauth_extra`.
    pub extra_fields: &'static [&'static str],
    /// Whether a self-hosted `base_url` is accepted.
    pub self_hosted: bool,
}

/// Every preset, in the order `tokenproxy providers` prints them.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "github",
        about: "GitHub OAuth App (github.com or Enterprise Server via base_url)",
        default_base: Some("https://github.com"),
        authorize: Some("/login/oauth/authorize"),
        token: Some("/login/oauth/access_token"),
        device: Some("/login/device/code"),
        revocation: Some("github-grant-api"),
        scopes: &["repo", "read:user"],
        api: Some("https://api.github.com"),
        api_self_hosted: Some("/api/v3"),
        git_user: Some("x-access-token"),
        client_auth: "client_secret_post",
        extra_fields: &["scope", "refresh_token_expires_in"],
        self_hosted: true,
    },
    Preset {
        name: "github-app",
        about: "GitHub App user tokens (expiring, with refresh_token_expires_in)",
        default_base: Some("https://github.com"),
        authorize: Some("/login/oauth/authorize"),
        token: Some("/login/oauth/access_token"),
        device: Some("/login/device/code"),
        revocation: Some("github-grant-api"),
        // A GitHub App's permissions are set on the app, not requested as scopes.
        scopes: &[],
        api: Some("https://api.github.com"),
        api_self_hosted: Some("/api/v3"),
        git_user: Some("x-access-token"),
        client_auth: "client_secret_post",
        extra_fields: &["refresh_token_expires_in"],
        self_hosted: true,
    },
    Preset {
        name: "gitlab",
        about: "GitLab.com or self-managed via base_url (device flow from GitLab 17.1)",
        default_base: Some("https://gitlab.com"),
        authorize: Some("/oauth/authorize"),
        token: Some("/oauth/token"),
        device: Some("/oauth/authorize_device"),
        revocation: Some("/oauth/revoke"),
        scopes: &["api", "read_user", "write_repository"],
        api: Some("/api/v4"),
        api_self_hosted: Some("/api/v4"),
        git_user: Some("oauth2"),
        client_auth: "client_secret_post",
        extra_fields: &["scope"],
        self_hosted: true,
    },
    Preset {
        name: "bitbucket",
        about: "Bitbucket Cloud (scopes are set on the OAuth consumer; no device flow)",
        default_base: Some("https://bitbucket.org"),
        authorize: Some("/site/oauth2/authorize"),
        token: Some("/site/oauth2/access_token"),
        device: None,
        revocation: None,
        scopes: &[],
        api: Some("https://api.bitbucket.org/2.0"),
        api_self_hosted: None,
        git_user: Some("x-token-auth"),
        client_auth: "client_secret_basic",
        extra_fields: &["scopes"],
        self_hosted: false,
    },
    Preset {
        name: "gitea",
        about: "Gitea or Forgejo (base_url required; no device flow)",
        default_base: None,
        authorize: Some("/login/oauth/authorize"),
        token: Some("/login/oauth/access_token"),
        device: None,
        revocation: None,
        scopes: &["read:user", "write:repository"],
        api: Some("/api/v1"),
        api_self_hosted: Some("/api/v1"),
        // Gitea accepts any username with a token as the password.
        git_user: Some("oauth2"),
        client_auth: "client_secret_post",
        extra_fields: &[],
        self_hosted: true,
    },
    Preset {
        name: "microsoft",
        about: "Microsoft Entra ID v2.0 (base_url names the tenant; Graph API route)",
        default_base: Some("https://login.microsoftonline.com/common"),
        authorize: Some("/oauth2/v2.0/authorize"),
        token: Some("/oauth2/v2.0/token"),
        device: Some("/oauth2/v2.0/devicecode"),
        revocation: None,
        scopes: &[
            "openid",
            "offline_access",
            "https://graph.microsoft.com/User.Read",
        ],
        api: Some("https://graph.microsoft.com"),
        api_self_hosted: Some("https://graph.microsoft.com"),
        git_user: None,
        client_auth: "client_secret_post",
        extra_fields: &["scope"],
        self_hosted: true,
    },
    Preset {
        name: "oidc",
        about: "any OpenID Connect provider: endpoints from issuer's discovery document",
        default_base: None,
        authorize: None,
        token: None,
        device: None,
        revocation: None,
        scopes: &["openid", "offline_access"],
        api: None,
        api_self_hosted: None,
        git_user: None,
        client_auth: "client_secret_basic",
        extra_fields: &[],
        self_hosted: true,
    },
];

/// The preset with this name.
pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// How a provider's token endpoint deviates from RFC 6749 when refusing a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quirks {
    /// Standard error codes only.
    #[default]
    None,
    /// Gitea/Forgejo answer a reused refresh token with 400 `unauthorized_client`
    /// and the description "token was already used": a dead link, not a wrong client.
    Gitea,
}

impl Quirks {
    /// The quirks of the named preset.
    pub fn of(preset: Option<&str>) -> Self {
        match preset {
            Some("gitea") => Quirks::Gitea,
            _ => Quirks::None,
        }
    }

    /// Whether an error answer means "this refresh token is dead" although its code
    /// alone would say otherwise. The description is only searched, never repeated
    /// (it may echo the request).
    pub fn is_dead_grant(self, code: &str, description: Option<&str>) -> bool {
        match self {
            Quirks::None => false,
            Quirks::Gitea => {
                code == "unauthorized_client"
                    && description.is_some_and(|d| d.to_ascii_lowercase().contains("already used"))
            }
        }
    }
}

fn join(base: &Url, rel: &str) -> Result<Url, String> {
    let text = format!("{}{}", base.as_str().trim_end_matches('/'), rel);
    Url::parse(&text).map_err(|e| format!("`{text}` is not a URL ({e})"))
}

fn url_value(u: Url) -> toml::Value {
    toml::Value::String(u.to_string())
}

fn set_default(t: &mut toml::Table, key: &str, v: impl FnOnce() -> Option<toml::Value>) {
    if !t.contains_key(key) {
        if let Some(v) = v() {
            t.insert(key.to_string(), v);
        }
    }
}

/// Applies each provider's preset to the raw config, filling only keys that are
/// absent. Returns the indexes of `oidc` providers whose endpoints must still be
/// discovered (see [`discover`]).
pub fn expand(root: &mut toml::Table) -> Result<Vec<usize>, ConfigError> {
    let forward_on = root.contains_key("forward");
    let Some(toml::Value::Array(providers)) = root.get_mut("providers") else {
        return Ok(Vec::new());
    };
    let mut pending = Vec::new();
    for (i, p) in providers.iter_mut().enumerate() {
        let Some(t) = p.as_table_mut() else { continue };
        let at = |k: &str| format!("providers[{i}].{k}");
        let Some(name) = t.get("preset") else {
            continue;
        };
        let Some(name) = name.as_str() else {
            return Err(ConfigError::new(at("preset"), "must be a string"));
        };
        let preset = find(name).ok_or_else(|| {
            let known: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
            ConfigError::new(
                at("preset"),
                format!("unknown preset `{name}` (known: {})", known.join(", ")),
            )
        })?;
        let id = t
            .get("id")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let read_url = |t: &toml::Table, key: &str| -> Result<Option<Url>, ConfigError> {
            match t.get(key) {
                None => Ok(None),
                Some(v) => {
                    let s = v
                        .as_str()
                        .ok_or_else(|| ConfigError::new(at(key), "must be a URL string"))?;
                    let u = Url::parse(s)
                        .map_err(|e| ConfigError::new(at(key), format!("invalid URL ({e})")))?;
                    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                        return Err(ConfigError::new(at(key), "must be an http(s) URL"));
                    }
                    Ok(Some(u))
                }
            }
        };
        let configured_base = read_url(t, "base_url")?;
        if preset.name == "oidc" {
            if read_url(t, "issuer")?.is_none() {
                return Err(ConfigError::new(
                    at("issuer"),
                    "required with preset = \"oidc\" (endpoints are discovered from it)",
                ));
            }
            if !t.contains_key("token_url") {
                // Parses as a URL; `ProviderClient::new` refuses to use it until
                // discovery has replaced it.
                let issuer = t.get("issuer").cloned().expect("checked above");
                t.insert("token_url".into(), issuer);
                pending.push(i);
            }
        } else if t.contains_key("issuer") {
            return Err(ConfigError::new(
                at("issuer"),
                "only applies to preset = \"oidc\"",
            ));
        }
        if configured_base.is_some() && !preset.self_hosted {
            return Err(ConfigError::new(
                at("base_url"),
                format!("preset `{}` has no self-hosted variant", preset.name),
            ));
        }
        let base = match (&configured_base, preset.default_base) {
            (Some(b), _) => Some(b.clone()),
            (None, Some(d)) => Some(Url::parse(d).expect("preset base is a URL")),
            (None, None) if preset.name == "oidc" => None,
            (None, None) => {
                return Err(ConfigError::new(
                    at("base_url"),
                    format!("required with preset = \"{}\"", preset.name),
                ))
            }
        };
        let Some(base) = base else {
            set_default(t, "scopes", || Some(str_array(preset.scopes)));
            set_default(t, "client_auth", || {
                Some(toml::Value::String(preset.client_auth.into()))
            });
            continue;
        };
        let endpoint = |rel: Option<&str>| -> Result<Option<toml::Value>, ConfigError> {
            rel.map(|r| join(&base, r).map(url_value))
                .transpose()
                .map_err(|m| ConfigError::new(at("base_url"), m))
        };
        let token = endpoint(preset.token)?;
        let authorize = endpoint(preset.authorize)?;
        let device = endpoint(preset.device)?;
        let revocation = match preset.revocation {
            // GitHub revokes with `DELETE <api>/applications/{client_id}/grant`;
            // the marker is resolved where the API base is known.
            Some("github-grant-api") => None,
            other => endpoint(other)?,
        };
        set_default(t, "token_url", || token);
        set_default(t, "authorize_url", || authorize);
        set_default(t, "device_authorization_url", || device);
        set_default(t, "revocation_url", || revocation);
        set_default(t, "scopes", || Some(str_array(preset.scopes)));
        set_default(t, "client_auth", || {
            Some(toml::Value::String(preset.client_auth.into()))
        });
        if !preset.extra_fields.is_empty() {
            set_default(t, "extra_fields", || Some(str_array(preset.extra_fields)));
        }
        if !t.contains_key("routes") {
            let api = match (
                configured_base.is_some(),
                preset.api,
                preset.api_self_hosted,
            ) {
                (false, Some(a), _) | (true, _, Some(a)) if a.starts_with('/') => {
                    Some(join(&base, a).map_err(|m| ConfigError::new(at("base_url"), m))?)
                }
                (false, Some(a), _) | (true, _, Some(a)) => {
                    Some(Url::parse(a).expect("preset API is a URL"))
                }
                _ => None,
            };
            let mut routes = toml::value::Array::new();
            if let Some(api) = api {
                routes.push(route(&id, "api", &api, None, forward_on));
            }
            if let Some(user) = preset.git_user {
                routes.push(route(&id, "git", &base, Some(user), forward_on));
            }
            t.insert("routes".into(), toml::Value::Array(routes));
        }
    }
    Ok(pending)
}

fn str_array(items: &[&str]) -> toml::Value {
    toml::Value::Array(
        items
            .iter()
            .map(|s| toml::Value::String((*s).into()))
            .collect(),
    )
}

fn route(
    id: &str,
    kind: &str,
    upstream: &Url,
    git_user: Option<&str>,
    forward: bool,
) -> toml::Value {
    let mut r = toml::Table::new();
    r.insert(
        "prefix".into(),
        toml::Value::String(format!("/{id}/{kind}")),
    );
    r.insert("upstream".into(), url_value(upstream.clone()));
    if let Some(user) = git_user {
        let mut inject = toml::Table::new();
        inject.insert("basic_username".into(), toml::Value::String(user.into()));
        r.insert("inject".into(), toml::Value::Table(inject));
    }
    // Forward mode intercepts the upstream's own host; path-prefixed upstreams
    // (GHES's /api/v3) are served through the host of the git route instead.
    if forward && upstream.path() == "/" {
        if let Some(host) = upstream.host_str() {
            r.insert(
                "hosts".into(),
                toml::Value::Array(vec![toml::Value::String(host.into())]),
            );
        }
    }
    toml::Value::Table(r)
}

/// The subset of an OpenID Provider Metadata document tokenproxy uses.
#[derive(Debug, serde::Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: Option<Url>,
    token_endpoint: Option<Url>,
    device_authorization_endpoint: Option<Url>,
    revocation_endpoint: Option<Url>,
    jwks_uri: Option<Url>,
}

/// Fetches the discovery document of every `oidc` provider still waiting for its
/// endpoints and fills them in (keys configured explicitly are kept). Refuses an
/// unreachable document, one without a token endpoint, or one whose `issuer` is not
/// the configured issuer (OIDC Discovery §4.3).
pub async fn discover(cfg: &mut Config) -> Result<(), ConfigError> {
    for (i, p) in cfg.providers.iter_mut().enumerate() {
        if !p.needs_discovery {
            continue;
        }
        let key = format!("providers[{i}].issuer");
        let issuer = p.issuer.clone().expect("oidc providers have an issuer");
        let doc_url = join(&issuer, "/.well-known/openid-configuration")
            .map_err(|m| ConfigError::new(&key, m))?;
        let http =
            super::HttpClient::new(p.token_ca.as_deref()).map_err(|m| ConfigError::new(&key, m))?;
        let req = http::Request::get(doc_url.as_str())
            .header(http::header::ACCEPT, "application/json")
            .body(Vec::new())
            .map_err(|e| ConfigError::new(&key, e.to_string()))?;
        let resp = tokio::time::timeout(p.timeout.min(Duration::from_secs(10)), http.send(req))
            .await
            .map_err(|_| ConfigError::new(&key, format!("{doc_url}: no answer in time")))?
            .map_err(|e| ConfigError::new(&key, format!("{doc_url}: {e}")))?;
        if !resp.status().is_success() {
            return Err(ConfigError::new(
                &key,
                format!("{doc_url} answered HTTP {}", resp.status().as_u16()),
            ));
        }
        let doc: Discovery = serde_json::from_slice(resp.body()).map_err(|e| {
            ConfigError::new(&key, format!("{doc_url}: not a discovery document ({e})"))
        })?;
        if doc.issuer.trim_end_matches('/') != issuer.as_str().trim_end_matches('/') {
            return Err(ConfigError::new(
                &key,
                format!(
                    "discovery document names issuer `{}`, not the configured `{issuer}`",
                    doc.issuer
                ),
            ));
        }
        let token = doc
            .token_endpoint
            .ok_or_else(|| ConfigError::new(&key, format!("{doc_url}: no token_endpoint")))?;
        // The token endpoint gets the client secret on every refresh: without a
        // usable one there is no provider at all.
        check_secret_endpoint(&token).map_err(|m| {
            ConfigError::new(&key, format!("{doc_url}: token_endpoint `{token}`: {m}"))
        })?;
        p.token_url = token;
        p.authorize_url = p.authorize_url.take().or(doc.authorization_endpoint);
        // Device login and revocation are optional: a plain-http one is left out
        // (that feature is off) rather than sent secrets in clear text.
        let id = p.id.clone();
        let optional = |what: &str, u: Option<Url>| {
            u.filter(|u| match check_secret_endpoint(u) {
                Ok(()) => true,
                Err(m) => {
                    tracing::warn!(provider = %id, endpoint = %u, "discovery document's {what} dropped: {m}");
                    false
                }
            })
        };
        let device = optional(
            "device_authorization_endpoint",
            doc.device_authorization_endpoint,
        );
        let revocation = optional("revocation_endpoint", doc.revocation_endpoint);
        p.device_authorization_url = p.device_authorization_url.take().or(device);
        p.revocation_url = p.revocation_url.take().or(revocation);
        p.jwks_uri = p.jwks_uri.take().or(doc.jwks_uri);
        p.needs_discovery = false;
    }
    cfg.validate()
}

/// The text `tokenproxy providers` prints: each preset and what it sets.
pub fn describe() -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for p in PRESETS {
        let base = p.default_base.unwrap_or(if p.name == "oidc" {
            "<issuer>"
        } else {
            "<base_url>"
        });
        let _ = writeln!(out, "{}: {}", p.name, p.about);
        let show = |rel: Option<&str>| match rel {
            Some("github-grant-api") => "DELETE <api>/applications/{client_id}/grant".to_string(),
            Some(r) => format!("{}{r}", base.trim_end_matches('/')),
            None if p.name == "oidc" => "from discovery".to_string(),
            None => "-".to_string(),
        };
        let _ = writeln!(out, "  authorize_url            {}", show(p.authorize));
        let _ = writeln!(out, "  token_url                {}", show(p.token));
        let _ = writeln!(out, "  device_authorization_url {}", show(p.device));
        let _ = writeln!(out, "  revocation               {}", show(p.revocation));
        let _ = writeln!(
            out,
            "  scopes                   {}",
            if p.scopes.is_empty() {
                "-".to_string()
            } else {
                p.scopes.join(" ")
            }
        );
        let _ = writeln!(out, "  client_auth              {}", p.client_auth);
        let api = p.api.map(|a| {
            if a.starts_with('/') {
                format!("{}{a}", base.trim_end_matches('/'))
            } else {
                a.to_string()
            }
        });
        let _ = writeln!(
            out,
            "  route /<id>/api          {}",
            api.unwrap_or_else(|| "-".into())
        );
        let _ = writeln!(
            out,
            "  route /<id>/git          {}",
            p.git_user
                .map(|u| format!("{base} (basic_username = \"{u}\")"))
                .unwrap_or_else(|| "-".into())
        );
        if !p.extra_fields.is_empty() {
            let _ = writeln!(
                out,
                "  extra_fields             {}",
                p.extra_fields.join(" ")
            );
        }
        if p.name == "gitea" {
            let _ = writeln!(out, "  quirk                    400 unauthorized_client \"token was already used\" = dead link");
        }
        if p.name.starts_with("github") {
            let _ = writeln!(
                out,
                "  quirk                    HTTP 200 error=bad_refresh_token = dead link"
            );
        }
        if p.name == "microsoft" {
            let _ = writeln!(out, "  quirk                    invalid_grant (AADSTS…) / interaction_required = dead link");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(text: &str) -> Result<(toml::Table, Vec<usize>), ConfigError> {
        let mut t: toml::Table = text.parse().unwrap();
        let pending = expand(&mut t)?;
        Ok((t, pending))
    }

    fn provider(t: &toml::Table) -> &toml::Table {
        t["providers"].as_array().unwrap()[0].as_table().unwrap()
    }

    #[test]
    fn github_fills_endpoints_scopes_and_routes() {
        let (t, pending) =
            expand_str("[[providers]]\nid = \"gh\"\npreset = \"github\"\nclient_id = \"x\"\n")
                .unwrap();
        assert!(pending.is_empty());
        let p = provider(&t);
        assert_eq!(
            p["token_url"].as_str(),
            Some("https://github.com/login/oauth/access_token")
        );
        assert_eq!(
            p["device_authorization_url"].as_str(),
            Some("https://github.com/login/device/code")
        );
        let routes = p["routes"].as_array().unwrap();
        assert_eq!(routes[0]["prefix"].as_str(), Some("/gh/api"));
        assert_eq!(
            routes[0]["upstream"].as_str(),
            Some("https://api.github.com/")
        );
        assert_eq!(routes[1]["prefix"].as_str(), Some("/gh/git"));
        assert_eq!(
            routes[1]["inject"]["basic_username"].as_str(),
            Some("x-access-token")
        );
    }

    #[test]
    fn self_hosted_base_moves_every_endpoint_and_the_api() {
        let (t, _) = expand_str(
            "[[providers]]\nid = \"ghe\"\npreset = \"github\"\nclient_id = \"x\"\nbase_url = \"https://ghe.example.com\"\n",
        )
        .unwrap();
        let p = provider(&t);
        assert_eq!(
            p["authorize_url"].as_str(),
            Some("https://ghe.example.com/login/oauth/authorize")
        );
        let routes = p["routes"].as_array().unwrap();
        assert_eq!(
            routes[0]["upstream"].as_str(),
            Some("https://ghe.example.com/api/v3")
        );
    }

    #[test]
    fn explicit_keys_win_over_the_preset() {
        let (t, _) = expand_str(
            "[[providers]]\nid = \"gl\"\npreset = \"gitlab\"\nclient_id = \"x\"\ntoken_url = \"https://t.example/tok\"\nscopes = [\"read_api\"]\nroutes = []\n",
        )
        .unwrap();
        let p = provider(&t);
        assert_eq!(p["token_url"].as_str(), Some("https://t.example/tok"));
        assert_eq!(p["scopes"].as_array().unwrap().len(), 1);
        assert!(p["routes"].as_array().unwrap().is_empty());
        assert_eq!(
            p["revocation_url"].as_str(),
            Some("https://gitlab.com/oauth/revoke")
        );
    }

    #[test]
    fn forward_mode_adds_hosts() {
        let (t, _) = expand_str(
            "[forward]\n[[providers]]\nid = \"gl\"\npreset = \"gitlab\"\nclient_id = \"x\"\n",
        )
        .unwrap();
        let routes = provider(&t)["routes"].as_array().unwrap().clone();
        // The API lives under /api/v4 of the git host: only the git route claims it.
        assert!(routes[0].get("hosts").is_none());
        assert_eq!(routes[1]["hosts"][0].as_str(), Some("gitlab.com"));
    }

    #[test]
    fn refusals_name_the_key() {
        let e = expand_str("[[providers]]\nid = \"g\"\npreset = \"gitea\"\nclient_id = \"x\"\n")
            .unwrap_err();
        assert_eq!(e.key, "providers[0].base_url");
        let e = expand_str("[[providers]]\nid = \"g\"\npreset = \"nope\"\nclient_id = \"x\"\n")
            .unwrap_err();
        assert_eq!(e.key, "providers[0].preset");
        assert!(e.message.contains("github-app"), "{}", e.message);
        let e = expand_str("[[providers]]\nid = \"o\"\npreset = \"oidc\"\nclient_id = \"x\"\n")
            .unwrap_err();
        assert_eq!(e.key, "providers[0].issuer");
        let e = expand_str(
            "[[providers]]\nid = \"b\"\npreset = \"bitbucket\"\nclient_id = \"x\"\nbase_url = \"https://bb.example\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "providers[0].base_url");
    }

    #[test]
    fn oidc_waits_for_discovery() {
        let (t, pending) = expand_str(
            "[[providers]]\nid = \"o\"\npreset = \"oidc\"\nclient_id = \"x\"\nissuer = \"https://id.example\"\n",
        )
        .unwrap();
        assert_eq!(pending, vec![0]);
        assert!(provider(&t).get("routes").is_none());
    }

    #[test]
    fn gitea_reused_token_is_a_dead_grant_only_for_gitea() {
        let d = Some("token was already used");
        assert!(Quirks::Gitea.is_dead_grant("unauthorized_client", d));
        assert!(!Quirks::Gitea.is_dead_grant("unauthorized_client", Some("client is not allowed")));
        assert!(!Quirks::None.is_dead_grant("unauthorized_client", d));
    }
}
