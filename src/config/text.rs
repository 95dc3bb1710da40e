//! Checks on the config's raw string values, before they are typed.
//!
//! Header values written upstream are built from config strings (an injected
//! `basic_username`, a header name, a route's prefix in a rewritten
//! `Location`, hosts): a CR or LF in any of them could split a header. No key
//! has a use for control characters, so every string in the file (and in
//! environment overrides) is refused if it holds one — before the URL parser,
//! which would silently drop CR and LF, ever sees it.

use super::ConfigError;

/// Refuses the first string value holding a control character other than tab,
/// naming its dotted key (`providers[0].routes[1].prefix`); never the value.
pub(super) fn refuse_control_characters(table: &toml::Table) -> Result<(), ConfigError> {
    for (key, value) in table {
        check(value, key)?;
    }
    Ok(())
}

fn check(value: &toml::Value, at: &str) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.chars().any(|c| c.is_control() && c != '\t') => Err(
            ConfigError::new(at, "must not contain control characters (CR, LF, NUL, ...)"),
        ),
        toml::Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check(v, &format!("{at}[{i}]"))),
        toml::Value::Table(t) => t
            .iter()
            .try_for_each(|(k, v)| check(v, &format!("{at}.{k}"))),
        _ => Ok(()),
    }
}
