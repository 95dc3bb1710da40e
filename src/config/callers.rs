//! `[callers]`: how a caller is identified, and the bounds on verifying its proxy token.

use std::time::Duration;

use serde::Deserialize;
use uuid::Uuid;

use super::{duration_str, refuse_zero, ConfigError, ServerConfig};

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

impl CallersConfig {
    /// Checks the section; `static` mode also constrains where `server` listens.
    pub(super) fn validate(&self, server: &ServerConfig) -> Result<(), ConfigError> {
        if self.mode == CallerMode::Static {
            if self.static_user.is_none() {
                return Err(ConfigError::new(
                    "callers.static_user",
                    "required when callers.mode = \"static\"",
                ));
            }
            if !server.listen.ip().is_loopback() {
                return Err(ConfigError::new(
                    "server.listen",
                    "static caller mode serves one fixed user and may only listen on loopback",
                ));
            }
        }
        refuse_zero(&[("callers.auth_failure_window", self.auth_failure_window)])?;
        if self.max_concurrent_lookups == 0 {
            return Err(ConfigError::new(
                "callers.max_concurrent_lookups",
                "must be above zero",
            ));
        }
        Ok(())
    }
}
