//! `tokenproxy link put|list|delete|login|status`: manage users' OAuth2 links,
//! e.g. to seed a link from a token response obtained elsewhere, to link an
//! account with the device flow (`login`, in `link_login`), or to remove one
//! (revoking its grant at the provider unless `--keep-grant`).
//!
//! `link put` reads an RFC 6749 §5.1 token response on stdin. Parsing is a pure
//! function ([`parse_token_response`]) so its rules are unit-tested; its errors name
//! the field but never echo a value, because the values are credentials.

use std::io::Read;

use anyhow::Context;
use chrono::{DateTime, Duration, Utc};
use clap::Subcommand;
use secrecy::SecretString;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::config::{Config, ProviderConfig};
use crate::store::{LinkSummary, TokenSet};
use crate::telemetry::audit::{self, Actor};

/// The most stdin `link put` reads; token responses are a few KiB at most.
const MAX_INPUT: u64 = 1024 * 1024;

/// `link` subcommands.
#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Store a link from a token response (JSON) read on stdin.
    Put {
        /// Provider id from the config.
        #[arg(long)]
        provider: String,
        /// User id (UUID).
        #[arg(long)]
        user: Uuid,
    },
    /// List links without their token values.
    List {
        /// Only this user's links.
        #[arg(long)]
        user: Option<Uuid>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a signed, single-use URL on `server.public_url` that starts a
    /// browser sign-in linking the user's account at the provider.
    LoginUrl {
        /// Provider id.
        #[arg(long)]
        provider: String,
        /// User id (UUID).
        #[arg(long)]
        user: Uuid,
        /// How long the URL works (at most 24h).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Delete a link, revoking its grant at the provider first.
    Delete {
        /// Provider id.
        #[arg(long)]
        provider: String,
        /// User id (UUID).
        #[arg(long)]
        user: Uuid,
        /// Do not revoke the grant at the provider.
        #[arg(long)]
        keep_grant: bool,
    },
    /// Link an account with the device flow (RFC 8628): prints a URL and a code.
    Login {
        /// Provider id.
        #[arg(long)]
        provider: String,
        /// User id (UUID).
        #[arg(long)]
        user: Uuid,
    },
    /// Show links: expiries, last refresh, failure reason (never token values).
    Status {
        /// Only this provider.
        #[arg(long)]
        provider: Option<String>,
        /// Only this user.
        #[arg(long)]
        user: Option<Uuid>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `link` subcommand.
pub async fn run(cfg: &Config, command: LinkCommand) -> anyhow::Result<()> {
    match command {
        LinkCommand::Put { provider, user } => {
            let provider_cfg = super::known_provider(cfg, &provider)?;
            let mut input = String::new();
            std::io::stdin()
                .take(MAX_INPUT)
                .read_to_string(&mut input)
                .map_err(|e| super::data(format!("cannot read stdin: {}", e.kind())))?;
            let tokens = parse_token_response(&input, provider_cfg, Utc::now())
                .map_err(|m| super::data(format!("token response on stdin: {m}")))?;
            let store = super::open_store(cfg)?;
            let replaced = store
                .list_links(Some(user))
                .await
                .context("reading the user's links")?
                .iter()
                .any(|l| l.provider_id == provider);
            store
                .put_link(&provider, user, &tokens)
                .await
                .context("storing the link")?;
            use crate::telemetry::audit::LinkChange;
            let change = if replaced {
                LinkChange::Replaced
            } else {
                LinkChange::Created
            };
            audit::link_changed(Actor::Cli, change, &provider, user);
            println!(
                "stored link {provider}/{user} (expires {})",
                super::show_time(tokens.expiry, "never")
            );
            Ok(())
        }
        LinkCommand::List { user, json } => {
            let store = super::open_store(cfg)?;
            let links = store.list_links(user).await.context("listing links")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&links)?);
            } else {
                print!("{}", table(&links));
            }
            Ok(())
        }
        LinkCommand::LoginUrl {
            provider,
            user,
            ttl,
        } => {
            println!("{}", login_url(cfg, &provider, user, ttl)?);
            Ok(())
        }
        LinkCommand::Delete {
            provider,
            user,
            keep_grant,
        } => {
            let store = super::open_store(cfg)?;
            let Some(provider_cfg) = cfg.provider(&provider) else {
                // A provider removed from the config: nothing to revoke with.
                if !store
                    .delete_link(&provider, user)
                    .await
                    .context("deleting the link")?
                {
                    anyhow::bail!("no link {provider}/{user}");
                }
                audit::link_deleted(Actor::Cli, &provider, user, "unsupported", None);
                println!(
                    "deleted link {provider}/{user} (provider not configured: grant not revoked)"
                );
                return Ok(());
            };
            let revocation =
                crate::links::unlink(store.as_ref(), provider_cfg, user, keep_grant, Actor::Cli)
                    .await
                    .context("deleting the link")?
                    .ok_or_else(|| anyhow::anyhow!("no link {provider}/{user}"))?;
            match &revocation {
                crate::links::Revocation::Failed(m) => {
                    eprintln!("tokenproxy: revoking the grant at {provider} failed: {m}");
                }
                r => println!("grant at {provider}: {}", r.as_str()),
            }
            println!("deleted link {provider}/{user}");
            Ok(())
        }
        LinkCommand::Login { provider, user } => {
            super::link_login::login(cfg, &provider, user).await
        }
        LinkCommand::Status {
            provider,
            user,
            json,
        } => super::link_login::status(cfg, provider, user, json).await,
    }
}

/// `link login-url`: a ticket signed with the key derived from the encryption
/// keyring (see [`crate::oauth::ticket`]); nothing is written until it is used.
fn login_url(
    cfg: &Config,
    provider: &str,
    user: Uuid,
    ttl: std::time::Duration,
) -> anyhow::Result<String> {
    let p = super::known_provider(cfg, provider)?;
    let public = cfg.server.public_url.as_ref().ok_or_else(|| {
        super::usage("server.public_url: required for browser sign-in (login URLs are on it)")
    })?;
    if p.authorize_url.is_none() && !p.needs_discovery {
        return Err(super::usage(format!(
            "providers[{provider}].authorize_url: this provider has no browser sign-in"
        )));
    }
    if ttl.is_zero() || ttl > crate::oauth::ticket::MAX_TTL {
        return Err(super::usage("--ttl: must be above zero and at most 24h"));
    }
    let keys =
        crate::oauth::ticket::TicketKeys::derive(&cfg.encryption_keys()).ok_or_else(|| {
            super::usage(
                "encryption.keys: required to sign login URLs (the key is derived from it)",
            )
        })?;
    let expires = Utc::now() + Duration::from_std(ttl).expect("at most 24h");
    Ok(format!(
        "{}?ticket={}",
        crate::oauth::authorize::login_path_url(public, provider),
        keys.issue(provider, user, expires)
    ))
}

/// Parses a token response into what `put_link` stores.
///
/// `access_token` is required; `refresh_token` is optional. The expiry is an
/// absolute `expiry` or `expires_at` (RFC 3339, or Unix seconds) when present —
/// it stays true however long ago the response was saved — else `now + expires_in`,
/// else none ("never expires"). Fields the provider lists in `extra_fields` are
/// kept for `oauth_extra`.
pub fn parse_token_response(
    input: &str,
    provider: &ProviderConfig,
    now: DateTime<Utc>,
) -> Result<TokenSet, String> {
    // Parse to a Value first: serde_json's syntax errors give a position, never content.
    let value: Value =
        serde_json::from_str(input.trim()).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("expected a JSON object".into());
    };
    if let Some(code) = obj.get("error").and_then(Value::as_str) {
        let code: String = code
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(64)
            .collect();
        return Err(format!("is an error response (`{code}`), not a token"));
    }
    let access = match obj.get("access_token") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err("`access_token` must be a non-empty string".into()),
        None => return Err("`access_token` is missing".into()),
    };
    let refresh = match obj.get("refresh_token") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("`refresh_token` must be a string".into()),
    };
    let expiry = parse_expiry(&obj, now)?;
    let extra: Map<String, Value> = provider
        .extra_fields
        .iter()
        .filter_map(|f| obj.get(f).map(|v| (f.clone(), v.clone())))
        .collect();
    Ok(TokenSet {
        access_token: SecretString::from(access),
        refresh_token: SecretString::from(refresh),
        expiry,
        extra: (!extra.is_empty()).then_some(Value::Object(extra)),
    })
}

fn parse_expiry(
    obj: &Map<String, Value>,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, String> {
    for field in ["expiry", "expires_at"] {
        match obj.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                return DateTime::parse_from_rfc3339(s)
                    .map(|t| Some(t.with_timezone(&Utc)))
                    .map_err(|_| format!("`{field}` must be an RFC 3339 time"));
            }
            Some(Value::Number(n)) => {
                return n
                    .as_i64()
                    .and_then(|s| DateTime::from_timestamp(s, 0))
                    .map(Some)
                    .ok_or_else(|| format!("`{field}` must be Unix seconds or an RFC 3339 time"));
            }
            Some(_) => return Err(format!("`{field}` must be an RFC 3339 time")),
        }
    }
    let secs = match obj.get("expires_in") {
        None | Some(Value::Null) => return Ok(None),
        // Some providers send it as a string; RFC 6749 says a number.
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(Value::Number(n)) => n.as_f64(),
        Some(_) => None,
    };
    match secs {
        Some(s) if s.is_finite() && (0.0..=1e10).contains(&s) => {
            Ok(Some(now + Duration::milliseconds((s * 1000.0) as i64)))
        }
        _ => Err("`expires_in` must be a non-negative number of seconds".into()),
    }
}

/// Renders links as an aligned table (no token values exist in a summary).
fn table(links: &[LinkSummary]) -> String {
    let mut rows = vec![[
        "PROVIDER".to_string(),
        "USER".into(),
        "EXPIRY".into(),
        "REFRESH".into(),
        "ENCRYPTED".into(),
        "UPDATED".into(),
        "FAILURE".into(),
    ]];
    for l in links {
        rows.push([
            l.provider_id.clone(),
            l.user_id.to_string(),
            super::show_time(l.expiry, "never"),
            yes_no(l.has_refresh_token),
            yes_no(l.encrypted),
            super::show_time(Some(l.updated_at), ""),
            if l.refresh_failure_reason.is_empty() {
                "-".into()
            } else {
                l.refresh_failure_reason.replace(['\n', '\r'], " ")
            },
        ]);
    }
    render(&rows)
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// Left-aligns columns separated by two spaces.
pub(crate) fn render<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn provider(extra: &[&str]) -> ProviderConfig {
        let text = format!(
            "[[providers]]\nid = \"gh\"\nclient_id = \"c\"\ntoken_url = \"https://idp/token\"\nextra_fields = {extra:?}\n"
        );
        Config::from_toml_with_env(&text, &[])
            .unwrap()
            .providers
            .remove(0)
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn full_response_with_expires_in_and_extra() {
        let t = parse_token_response(
            r#"{"access_token":"at","refresh_token":"rt","token_type":"bearer","expires_in":3600,"scope":"repo","other":1}"#,
            &provider(&["scope"]),
            now(),
        )
        .unwrap();
        assert_eq!(t.access_token.expose_secret(), "at");
        assert_eq!(t.refresh_token.expose_secret(), "rt");
        assert_eq!(t.expiry, Some(now() + Duration::hours(1)));
        assert_eq!(t.extra, Some(serde_json::json!({"scope": "repo"})));
    }

    #[test]
    fn access_token_only_never_expires() {
        let t = parse_token_response(r#"{"access_token":"at"}"#, &provider(&[]), now()).unwrap();
        assert_eq!(t.refresh_token.expose_secret(), "");
        assert_eq!(t.expiry, None);
        assert_eq!(t.extra, None);
    }

    #[test]
    fn absolute_expiry_wins_over_expires_in() {
        for field in ["expiry", "expires_at"] {
            let json = format!(
                r#"{{"access_token":"at","expires_in":10,"{field}":"2026-02-01T00:00:00+01:00"}}"#
            );
            let t = parse_token_response(&json, &provider(&[]), now()).unwrap();
            assert_eq!(
                t.expiry.unwrap().to_rfc3339(),
                "2026-01-31T23:00:00+00:00",
                "{field}"
            );
        }
    }

    #[test]
    fn expires_in_as_string_and_unix_expires_at() {
        let t = parse_token_response(
            r#"{"access_token":"a","expires_in":"60"}"#,
            &provider(&[]),
            now(),
        )
        .unwrap();
        assert_eq!(t.expiry, Some(now() + Duration::seconds(60)));
        let t = parse_token_response(
            r#"{"access_token":"a","expires_at":1767225600}"#,
            &provider(&[]),
            now(),
        )
        .unwrap();
        assert_eq!(t.expiry, Some(now()));
    }

    #[test]
    fn rejections_name_the_field_and_never_the_value() {
        let p = provider(&[]);
        let cases = [
            ("{not json", "invalid JSON"),
            ("[1]", "expected a JSON object"),
            (
                r#"{"refresh_token":"SECRETVALUE"}"#,
                "`access_token` is missing",
            ),
            (r#"{"access_token":""}"#, "`access_token`"),
            (
                r#"{"access_token":"SECRETVALUE","refresh_token":5}"#,
                "`refresh_token`",
            ),
            (
                r#"{"access_token":"SECRETVALUE","expires_in":-5}"#,
                "`expires_in`",
            ),
            (
                r#"{"access_token":"SECRETVALUE","expiry":"SECRETVALUE"}"#,
                "`expiry`",
            ),
            (r#"{"error":"invalid_grant"}"#, "invalid_grant"),
        ];
        for (input, want) in cases {
            let err = parse_token_response(input, &p, now()).unwrap_err();
            assert!(err.contains(want), "{input}: {err}");
            assert!(!err.contains("SECRETVALUE"), "{input}: {err}");
        }
    }
}
