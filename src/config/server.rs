//! `[server]` and `[admin]`: the listeners, their limits and TLS, and the admin link API's token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use super::secrets::secret_opt;
use super::{check_http_url, duration_str, refuse_zero, ConfigError};

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

impl ServerConfig {
    /// Checks the limits and names serde cannot check.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        refuse_zero(&[
            ("server.header_read_timeout", self.header_read_timeout),
            ("server.upstream_timeout", self.upstream_timeout),
            ("server.connect_timeout", self.connect_timeout),
            ("server.body_idle_timeout", self.body_idle_timeout),
            ("server.idle_timeout", self.idle_timeout),
            (
                "server.http2_keepalive_interval",
                self.http2_keepalive_interval,
            ),
            (
                "server.http2_keepalive_timeout",
                self.http2_keepalive_timeout,
            ),
        ])?;
        if self.http2_max_concurrent_streams == 0 {
            return Err(ConfigError::new(
                "server.http2_max_concurrent_streams",
                "must be above zero",
            ));
        }
        if let Some(id) = &self.replica_id {
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
        if let Some(u) = &self.public_url {
            check_public_url(u).map_err(|m| ConfigError::new("server.public_url", m))?;
        }
        Ok(())
    }
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
