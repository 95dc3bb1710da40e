//! `[tokens]`: the token cache, refresh-ahead and the cross-replica refresh lease.

use std::time::Duration;

use serde::Deserialize;

use super::{duration_str, refuse_zero, ConfigError};

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

    /// Checks the bounds serde cannot check.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        refuse_zero(&[
            ("tokens.cache_max_age", self.cache_max_age),
            (
                "tokens.keepalive_refresh",
                self.keepalive_refresh.unwrap_or(Duration::MAX),
            ),
        ])?;
        if !(self.refresh_ahead_remaining > 0.0 && self.refresh_ahead_remaining < 1.0) {
            return Err(ConfigError::new(
                "tokens.refresh_ahead_remaining",
                "must be a fraction between 0 and 1",
            ));
        }
        if self.refresh_ahead_concurrency == 0 {
            return Err(ConfigError::new(
                "tokens.refresh_ahead_concurrency",
                "must be at least 1",
            ));
        }
        if self.cache_capacity == 0 {
            return Err(ConfigError::new(
                "tokens.cache_capacity",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The write reserve at the end of a lease must hold the first write after a
    /// provider's answer, which may wait `database.acquire_timeout` for a pooled
    /// connection: a write that could still be waiting when the lease runs out would
    /// let another replica claim the row and present the spent refresh token (later
    /// writes run under extensions of the lease).
    pub(super) fn check_write_reserve(&self, acquire: Duration) -> Result<(), ConfigError> {
        let reserve = self.write_reserve();
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
}
