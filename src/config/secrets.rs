//! Secret indirection: a config value written `env:VAR` or `file:PATH` is resolved
//! while the config is deserialized and wrapped in [`SecretString`] at once, so no
//! plain copy outlives parsing. Errors name the variable or path, never the value.

use secrecy::SecretString;
use serde::Deserialize;

thread_local! {
    /// The environment `env:VAR` secrets resolve against while a config is being
    /// deserialized (serde gives field deserializers no other context).
    pub(super) static SECRET_ENV: std::cell::RefCell<Option<Vec<(String, String)>>> =
        const { std::cell::RefCell::new(None) };
}

fn lookup_env(var: &str) -> Option<String> {
    SECRET_ENV
        .with(|cell| {
            cell.borrow()
                .as_ref()
                .map(|env| env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone()))
        })
        .unwrap_or_else(|| std::env::var(var).ok())
}

/// Resolves a secret reference: `env:VAR`, `file:PATH`, or the literal value.
///
/// `env:` looks in the environment given to `Config::from_toml_with_env` while it
/// parses, else in the process environment. An empty variable counts as unset.
pub fn resolve_secret(raw: &str) -> Result<SecretString, String> {
    if let Some(var) = raw.strip_prefix("env:") {
        match lookup_env(var) {
            Some(v) if !v.is_empty() => Ok(SecretString::from(v)),
            _ => Err(format!("environment variable {var} is not set")),
        }
    } else if let Some(path) = raw.strip_prefix("file:") {
        std::fs::read_to_string(path)
            .map(|s| SecretString::from(s.trim_end_matches(['\n', '\r']).to_string()))
            .map_err(|e| format!("cannot read {path}: {}", e.kind()))
    } else {
        Ok(SecretString::from(raw.to_string()))
    }
}

pub(super) fn secret_plain<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<SecretString, D::Error> {
    let raw = String::deserialize(d)?;
    resolve_secret(&raw).map_err(serde::de::Error::custom)
}

pub(super) fn secret_opt<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SecretString>, D::Error> {
    secret_plain(d).map(Some)
}

pub(super) fn secret_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<SecretString>, D::Error> {
    /// One list entry, resolved on its own so an error names its index.
    struct Entry(SecretString);
    impl<'de> Deserialize<'de> for Entry {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            secret_plain(d).map(Entry)
        }
    }
    Ok(Vec::<Entry>::deserialize(d)?
        .into_iter()
        .map(|e| e.0)
        .collect())
}

pub(super) fn secret_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, SecretString>, D::Error> {
    /// One map value, resolved on its own so an error names its key.
    struct Value(SecretString);
    impl<'de> Deserialize<'de> for Value {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            secret_plain(d).map(Value)
        }
    }
    Ok(std::collections::BTreeMap::<String, Value>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect())
}
