//! Forward-mode configuration: the `[forward]` section (the CA that mints leaf
//! certificates, what to do with unrouted hosts) and the host patterns routes are
//! matched by.
//!
//! Kept apart from the rest of the config because its rules (host syntax, which
//! keys make sense together) only matter to forward mode, and because host patterns
//! are parsed once here so the proxy only ever matches already-valid ones.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::{Config, ConfigError};

/// `[forward]`: forward (`HTTPS_PROXY`) mode on the proxy listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// PEM certificate of the CA that signs minted leaf certificates.
    pub ca_cert: PathBuf,
    /// PEM private key of that CA (keep it mode 0600).
    pub ca_key: PathBuf,
    /// What a CONNECT to a host no route names gets.
    #[serde(default)]
    pub unrouted: Unrouted,
    /// New leaf certificates one caller may have minted per `leaf_mint_window`
    /// (a wildcard route names unboundedly many hosts); beyond, 429 (0 = no limit).
    #[serde(default = "default_leaf_mint_limit")]
    pub leaf_mint_limit: u32,
    /// The window `leaf_mint_limit` counts in.
    #[serde(default = "default_leaf_mint_window", with = "super::duration_str")]
    pub leaf_mint_window: std::time::Duration,
}

fn default_leaf_mint_limit() -> u32 {
    100
}

fn default_leaf_mint_window() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

/// Policy for hosts no route names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Unrouted {
    /// Answer 403 `host_not_allowed`.
    #[default]
    Deny,
    /// Relay the CONNECT tunnel's bytes blindly, without interception or credentials.
    Tunnel,
}

/// A route's host pattern: `api.github.com`, `*.example.com`, optionally `:port`.
///
/// Without a port the pattern matches the scheme's default port only (443 for
/// CONNECT and `https`, 80 for plain `http`). `*.example.com` matches every
/// subdomain of `example.com` at any depth, but not `example.com` itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// `true` for `*.` patterns.
    pub wildcard: bool,
    /// The host (lowercase, without `*.` or trailing dot).
    pub host: String,
    /// The port, when one was written.
    pub port: Option<u16>,
}

impl HostPattern {
    /// Parses a pattern; the message says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid host `{text}`: {why}");
        if text.contains("://") || text.contains('/') {
            return Err(bad("write a host name, without scheme or path"));
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => {
                let port: u16 = p.parse().map_err(|_| bad("port must be 1-65535"))?;
                if port == 0 {
                    return Err(bad("port must be 1-65535"));
                }
                (h, Some(port))
            }
            Some(_) => return Err(bad("IPv6 literals are not supported")),
            None => (text, None),
        };
        let (wildcard, host) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host),
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() || host.len() > 253 {
            return Err(bad("empty or too long"));
        }
        for label in host.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(bad(
                    "labels use letters, digits and '-'; only a leading `*.` wildcard is allowed",
                ));
            }
        }
        Ok(Self {
            wildcard,
            host,
            port,
        })
    }

    /// How well `host:port` matches: `None` for no match, otherwise a rank where
    /// higher is more specific (exact names beat wildcards, longer suffixes beat
    /// shorter ones). `host` must already be lowercase without a trailing dot.
    pub fn rank(&self, host: &str, port: u16, default_port: u16) -> Option<usize> {
        if self.port.unwrap_or(default_port) != port {
            return None;
        }
        if !self.wildcard {
            return (host == self.host).then_some(usize::MAX);
        }
        let prefix = host.strip_suffix(self.host.as_str())?;
        (prefix.len() > 1 && prefix.ends_with('.')).then_some(self.host.len())
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Checks the forward-mode keys of every route and their fit with `[forward]`.
pub(super) fn validate_routes(cfg: &Config) -> Result<(), ConfigError> {
    if cfg
        .forward
        .as_ref()
        .is_some_and(|f| f.leaf_mint_window.is_zero())
    {
        return Err(ConfigError::new(
            "forward.leaf_mint_window",
            "must be above zero",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, p) in cfg.providers.iter().enumerate() {
        for (j, r) in p.routes.iter().enumerate() {
            let at = |k: &str| format!("providers[{i}].routes[{j}].{k}");
            if r.prefix.is_none() && r.hosts.is_empty() {
                return Err(ConfigError::new(
                    at("prefix"),
                    "a route needs `prefix` (reverse mode), `hosts` (forward mode) or both",
                ));
            }
            if r.prefix.is_some() && r.upstream.is_none() {
                return Err(ConfigError::new(at("upstream"), "required with `prefix`"));
            }
            if r.prefix.is_none() && r.upstream.is_some() {
                return Err(ConfigError::new(
                    at("upstream"),
                    "only used with `prefix`; forward mode goes to the host the client asked for",
                ));
            }
            if !r.hosts.is_empty() && cfg.forward.is_none() {
                return Err(ConfigError::new(
                    at("hosts"),
                    "needs a [forward] section (ca_cert, ca_key)",
                ));
            }
            if r.allow_plain_http && r.hosts.is_empty() {
                return Err(ConfigError::new(
                    at("allow_plain_http"),
                    "only applies to routes with `hosts`",
                ));
            }
            for (k, h) in r.hosts.iter().enumerate() {
                if !seen.insert(h.to_string()) {
                    return Err(ConfigError::new(
                        at(&format!("hosts[{k}]")),
                        format!("host `{h}` is already routed"),
                    ));
                }
            }
            if let Some(c) = &r.connect_to {
                check_connect_to(c).map_err(|m| ConfigError::new(at("connect_to"), m))?;
            }
        }
    }
    Ok(())
}

/// `connect_to` is `host:port` (an IP address or a name resolved when connecting).
fn check_connect_to(text: &str) -> Result<(), String> {
    let authority: http::uri::Authority = text
        .parse()
        .map_err(|_| format!("`{text}` is not host:port"))?;
    match authority.port_u16() {
        Some(p) if p > 0 && !authority.host().is_empty() && !text.contains('@') => Ok(()),
        _ => Err(format!("`{text}` is not host:port")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse() {
        let p = HostPattern::parse("API.GitHub.com.").unwrap();
        assert_eq!(
            (p.wildcard, p.host.as_str(), p.port),
            (false, "api.github.com", None)
        );
        let p = HostPattern::parse("*.example.com:8443").unwrap();
        assert_eq!(
            (p.wildcard, p.host.as_str(), p.port),
            (true, "example.com", Some(8443))
        );
        assert_eq!(p.to_string(), "*.example.com:8443");
        for bad in [
            "",
            "*",
            "*.",
            "a.*.com",
            "https://x.com",
            "x.com/path",
            "x.com:0",
            "x.com:99999",
            "-x.com",
            "x..com",
            "[::1]:443",
            "x_y.com",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching_ranks_exact_over_wildcards() {
        let exact = HostPattern::parse("api.example.com").unwrap();
        let wild = HostPattern::parse("*.example.com").unwrap();
        let deep = HostPattern::parse("*.api.example.com").unwrap();
        assert_eq!(exact.rank("api.example.com", 443, 443), Some(usize::MAX));
        assert_eq!(exact.rank("api.example.com", 8443, 443), None);
        assert_eq!(exact.rank("api.example.com", 80, 80), Some(usize::MAX));
        assert!(wild.rank("api.example.com", 443, 443).is_some());
        assert!(wild.rank("a.b.example.com", 443, 443).is_some());
        assert_eq!(wild.rank("example.com", 443, 443), None);
        assert_eq!(wild.rank("badexample.com", 443, 443), None);
        assert!(
            deep.rank("x.api.example.com", 443, 443) > wild.rank("x.api.example.com", 443, 443)
        );
        let ported = HostPattern::parse("git.example.com:8443").unwrap();
        assert!(ported.rank("git.example.com", 8443, 443).is_some());
        assert_eq!(ported.rank("git.example.com", 443, 443), None);
    }

    #[test]
    fn connect_to_needs_host_and_port() {
        assert!(check_connect_to("127.0.0.1:8443").is_ok());
        assert!(check_connect_to("gw.internal:443").is_ok());
        for bad in ["127.0.0.1", "x:0", ":443", "u@x:1", "http://x:1"] {
            assert!(check_connect_to(bad).is_err(), "{bad}");
        }
    }
}
