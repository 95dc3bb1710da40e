//! Typed configuration: a TOML file plus environment overrides, validated before
//! anything binds a port.
//!
//! Loading happens in three steps so every error can name the key it is about:
//! parse the file into a TOML value, apply `DATABASE_URL` and `TOKENPROXY_<SECTION>__<KEY>`
//! overrides to that value, then deserialize it (with `serde_path_to_error`, which yields
//! the dotted path of the offending key) and validate the result. Secrets written as
//! `env:VAR` or `file:PATH` are resolved here and wrapped in
//! [`SecretString`](secrecy::SecretString) at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

mod callers;
mod coder;
mod database;
mod endpoint;
mod forward;
mod logging;
mod overrides;
mod providers;
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
use providers::{check_http_url, validate_providers};
pub use providers::{ClientAuth, Inject, ProviderConfig, RouteConfig};
pub use server::{AdminConfig, ServerConfig, TlsConfig};
pub use tokens::TokensConfig;

pub use overrides::apply_env_overrides;
use overrides::{blame_override, override_table};
pub use secrets::resolve_secret;
use secrets::SECRET_ENV;
use serde::Deserialize;

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
        validate_providers(&self.providers, &self.tokens, self.database.acquire_timeout)?;
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
