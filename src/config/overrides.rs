//! Environment overrides of the config file: `DATABASE_URL` and
//! `TOKENPROXY_<SECTION>__<KEY>`, applied to the parsed TOML before it is typed, so
//! an overridden value is validated exactly like one written in the file — and an
//! error about it can name the variable that set it.

use super::{ConfigError, ENV_OVERRIDE_PREFIX};

/// Applies `DATABASE_URL` and `TOKENPROXY_<SECTION>__<KEY>` to the parsed file.
///
/// Only variables with a `__` are overrides, so `TOKENPROXY_KEY` (a key referenced as
/// `env:TOKENPROXY_KEY`) or `TOKENPROXY_CONFIG` are left alone. Further `__` reach into
/// nested tables (`TOKENPROXY_SERVER__TLS__CERT`). Values that parse as a TOML scalar
/// (numbers, booleans) take that type, anything else is a string;
/// `TOKENPROXY_ENCRYPTION__KEYS` is a comma-separated list.
pub fn apply_env_overrides(
    value: &mut toml::Table,
    env: &[(String, String)],
) -> Result<(), ConfigError> {
    override_table(value, env).map(drop)
}

/// Sections that `TOKENPROXY_<SECTION>__<KEY>` may override (`providers` is a list).
const OVERRIDE_SECTIONS: &[&str] = &[
    "server",
    "database",
    "encryption",
    "tokens",
    "callers",
    "logging",
    "forward",
    "coder",
    "admin",
];

/// Applies the overrides and returns, for each, the dotted key it set and the variable
/// that set it, so later errors about that key can name the variable too.
pub(super) fn override_table(
    value: &mut toml::Table,
    env: &[(String, String)],
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut origins = Vec::new();
    for (name, raw) in env {
        let (path, parsed) = if name == "DATABASE_URL" {
            if raw.is_empty() {
                continue;
            }
            (
                vec!["database".to_string(), "url".to_string()],
                toml::Value::String(raw.clone()),
            )
        } else {
            let Some(rest) = name.strip_prefix(ENV_OVERRIDE_PREFIX) else {
                continue;
            };
            if !rest.contains("__") {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if !OVERRIDE_SECTIONS.contains(&path[0].as_str()) || path.iter().any(String::is_empty) {
                return Err(ConfigError::new(
                    name.clone(),
                    format!(
                        "unknown override; expected {ENV_OVERRIDE_PREFIX}<SECTION>__<KEY> with SECTION one of {}",
                        OVERRIDE_SECTIONS.join(", ")
                    ),
                ));
            }
            let parsed = if path == ["encryption", "keys"] {
                toml::Value::Array(
                    raw.split(',')
                        .map(|s| toml::Value::String(s.trim().to_string()))
                        .collect(),
                )
            } else {
                parse_scalar(raw)
            };
            (path, parsed)
        };
        let (last, parents) = path.split_last().expect("at least two parts");
        let mut table = &mut *value;
        for (depth, part) in parents.iter().enumerate() {
            let entry = table
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(Default::default()));
            table = entry.as_table_mut().ok_or_else(|| {
                ConfigError::new(
                    parents[..=depth].join("."),
                    format!("must be a table to apply {name}"),
                )
            })?;
        }
        table.insert(last.clone(), parsed);
        origins.push((path.join("."), name.clone()));
    }
    Ok(origins)
}

/// A TOML scalar when `raw` is one (`true`, `42`, `0.5`), else the string itself.
fn parse_scalar(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !v.is_table() && !v.is_array())
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// Appends "(set by VAR)" when the offending key came from an environment override.
pub(super) fn blame_override(mut err: ConfigError, origins: &[(String, String)]) -> ConfigError {
    let hit = origins.iter().rev().find(|(path, _)| {
        err.key == *path
            || err
                .key
                .strip_prefix(path.as_str())
                .is_some_and(|rest| rest.starts_with(['.', '[']))
    });
    if let Some((_, var)) = hit {
        err.message = format!("{} (set by {var})", err.message);
    }
    err
}
