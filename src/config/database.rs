//! `[database]` and `[encryption]`: where links and proxy tokens live, and the keys
//! that encrypt stored tokens at rest.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use super::secrets::{secret_list, secret_plain};
use super::{duration_str, refuse_zero, ConfigError};

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

impl DatabaseConfig {
    /// Checks the pool's waits and the URL (never echoing it).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        refuse_zero(&[
            ("database.acquire_timeout", self.acquire_timeout),
            ("database.listen_check_interval", self.listen_check_interval),
        ])?;
        check_database_url(&self.url)
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

impl EncryptionConfig {
    /// Checks that every key decodes to 32 bytes.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (i, key) in self.keys.iter().enumerate() {
            decode_key(key).map_err(|m| ConfigError::new(format!("encryption.keys[{i}]"), m))?;
        }
        Ok(())
    }
}

/// A key as `[encryption] keys` holds it: standard base64 of 32 bytes.
pub(super) fn decode_key(key: &SecretString) -> Result<[u8; 32], String> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(key.expose_secret().trim())
        .map_err(|_| "is not valid base64".to_string())?;
    <[u8; 32]>::try_from(raw.as_slice())
        .map_err(|_| format!("must decode to 32 bytes, got {}", raw.len()))
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
