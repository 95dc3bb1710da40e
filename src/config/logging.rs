//! `[logging]`: the log format and where the audit trail goes.

use serde::Deserialize;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[logging]`. The filter itself comes from `RUST_LOG` (default `info`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// Where the audit trail (`tokenproxy::audit`, JSON lines) goes.
    pub audit: AuditDestination,
}

/// `[logging] audit`: `"stderr"`, `"off"` (the default) or a file path (appended to).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(try_from = "String")]
pub enum AuditDestination {
    /// No audit trail.
    #[default]
    Off,
    /// JSON lines on stderr, beside the other logs.
    Stderr,
    /// JSON lines appended to this file.
    File(std::path::PathBuf),
}

impl TryFrom<String> for AuditDestination {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "off" => Ok(Self::Off),
            "stderr" => Ok(Self::Stderr),
            "" => Err("must be \"stderr\", \"off\" or a file path".into()),
            path => Ok(Self::File(path.into())),
        }
    }
}
