//! `tokenproxy token create|list|revoke`: proxy tokens, the credentials callers
//! present in `token` mode.
//!
//! A token is `tpx_`, 43 random base62 characters and their CRC-32 in 6 base62
//! characters (see `proxy::caller::generate_token`; tokens of the first format,
//! 32 random bytes in unpadded base64url, stay valid). Only its SHA-256 is stored; `create` prints the token once, on its own last line, so
//! scripts can take it with `tail -n 1`. Nothing else ever prints it.

use anyhow::Context;
use chrono::Utc;
use clap::Subcommand;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use crate::config::Config;
use crate::store::{NewProxyToken, ProxyTokenInfo};

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a proxy token for a user; prints it once, on the last line.
    Create {
        /// User the token acts for (UUID).
        #[arg(long)]
        user: Uuid,
        /// Limit the token to this provider (repeatable; default: all providers).
        #[arg(long = "provider", value_name = "ID")]
        providers: Vec<String>,
        /// Human label.
        #[arg(long, default_value = "")]
        name: String,
        /// Lifetime, e.g. `30d`, `12h` (default: no expiry).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<std::time::Duration>,
    },
    /// List proxy tokens (never their values).
    List {
        /// Only this user's tokens.
        #[arg(long)]
        user: Option<Uuid>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a proxy token by id.
    Revoke {
        /// Token id (from `token create` or `token list`).
        id: Uuid,
    },
}

fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("invalid duration `{s}`: {e}"))?;
    if d.is_zero() {
        return Err("must be above zero".into());
    }
    Ok(d)
}

/// Generates a new proxy token and the SHA-256 that is stored for it. The one
/// generator lives with the parser that checks its checksum.
pub fn generate() -> (SecretString, [u8; 32]) {
    crate::proxy::caller::generate_token()
}

/// Runs a `token` subcommand.
pub async fn run(cfg: &Config, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            user,
            providers,
            name,
            ttl,
        } => {
            for p in &providers {
                super::known_provider(cfg, p)?;
            }
            let expires_at = match ttl {
                None => None,
                Some(d) => Some(
                    chrono::Duration::from_std(d)
                        .ok()
                        .and_then(|d| Utc::now().checked_add_signed(d))
                        .ok_or_else(|| super::usage("--ttl is too long"))?,
                ),
            };
            let (token, hash) = generate();
            let store = super::open_store(cfg)?;
            let info = store
                .create_proxy_token(&NewProxyToken {
                    user_id: user,
                    name,
                    hash,
                    providers,
                    expires_at,
                })
                .await
                .context("storing the token")?;
            use crate::telemetry::audit::{self, Actor};
            audit::proxy_token_created(Actor::Cli, info.id, info.user_id);
            println!("id: {}", info.id);
            println!("user: {}", info.user_id);
            println!("providers: {}", providers_label(&info.providers));
            println!("expires: {}", super::show_time(info.expires_at, "never"));
            println!("{}", token.expose_secret());
            Ok(())
        }
        TokenCommand::List { user, json } => {
            let store = super::open_store(cfg)?;
            let tokens = store
                .list_proxy_tokens(user)
                .await
                .context("listing tokens")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
            } else {
                print!("{}", table(&tokens));
            }
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            let store = super::open_store(cfg)?;
            if store
                .revoke_proxy_token(id)
                .await
                .context("revoking the token")?
            {
                use crate::telemetry::audit::{self, Actor};
                audit::proxy_token_revoked(Actor::Cli, id);
                println!("revoked {id}");
                Ok(())
            } else {
                anyhow::bail!("no unrevoked token with id {id}")
            }
        }
    }
}

fn providers_label(p: &[String]) -> String {
    if p.is_empty() {
        "all".into()
    } else {
        p.join(",")
    }
}

fn table(tokens: &[ProxyTokenInfo]) -> String {
    let now = Utc::now();
    let mut rows = vec![[
        "ID".to_string(),
        "USER".into(),
        "NAME".into(),
        "PROVIDERS".into(),
        "CREATED".into(),
        "EXPIRES".into(),
        "LAST USED".into(),
        "STATUS".into(),
    ]];
    for t in tokens {
        let status = if t.revoked_at.is_some() {
            "revoked"
        } else if t.expires_at.is_some_and(|e| e <= now) {
            "expired"
        } else {
            "active"
        };
        rows.push([
            t.id.to_string(),
            t.user_id.to_string(),
            if t.name.is_empty() {
                "-".into()
            } else {
                t.name.clone()
            },
            providers_label(&t.providers),
            super::show_time(Some(t.created_at), ""),
            super::show_time(t.expires_at, "never"),
            super::show_time(t.last_used_at, "never"),
            status.into(),
        ]);
    }
    super::link::render(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::caller::TOKEN_PREFIX;
    use sha2::{Digest, Sha256};

    #[test]
    fn tokens_are_prefixed_unique_and_hashed() {
        let (a, ha) = generate();
        let (b, hb) = generate();
        let a = a.expose_secret();
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), crate::proxy::caller::CHECKSUMMED_LEN);
        assert!(crate::proxy::caller::is_well_formed(a));
        assert_ne!(a, b.expose_secret());
        assert_ne!(ha, hb);
        let want: [u8; 32] = Sha256::digest(a.as_bytes()).into();
        assert_eq!(ha, want);
    }

    #[test]
    fn ttl_parses_days() {
        assert_eq!(parse_ttl("30d").unwrap().as_secs(), 30 * 86400);
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("soon").is_err());
    }
}
