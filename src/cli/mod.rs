//! Command-line interface: one file per subcommand.
//!
//! `main.rs` parses [`Cli`] and calls [`run`], which loads the config, runs the
//! subcommand and turns its outcome into an exit status. Errors print as one line on
//! stderr (`tokenproxy: <reason>`) and map onto sysexits codes so scripts can tell
//! a mistake of theirs (64, 65) from a database that is down (69). `anyhow` is used
//! here and nowhere below: library modules return typed errors.

mod ca;
mod check_config;
mod healthcheck;
mod keys;
mod link;
mod link_login;
mod migrate;
mod serve;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, ConfigError};
use crate::store::{LinkStore, StoreError};

/// Exit status for a bad config, bad arguments or an unknown provider (`EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// Exit status for malformed input on stdin (`EX_DATAERR`).
pub const EXIT_DATA: u8 = 65;
/// Exit status when the database cannot be reached (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// tokenproxy: attaches users' OAuth2 provider credentials to their requests.
#[derive(Debug, Parser)]
#[command(name = "tokenproxy", version, about, propagate_version = true)]
pub struct Cli {
    /// Config file [default: $TOKENPROXY_CONFIG, then tokenproxy.toml].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and its admin listener.
    Serve,
    /// Apply database migrations (idempotent).
    Migrate,
    /// Validate the config; print `ok` or the offending key.
    CheckConfig,
    /// Manage users' OAuth2 links.
    #[command(subcommand)]
    Link(link::LinkCommand),
    /// Manage proxy tokens (caller credentials).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Manage at-rest encryption keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Exit 0 when the admin listener's /healthz answers 200 (for container health checks).
    Healthcheck(healthcheck::HealthcheckArgs),
    /// Manage the CA that forward mode mints leaf certificates with.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Print the provider presets and what each sets.
    Providers,
}

/// A failure with a chosen exit status; its message is the one line printed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// Exit status.
    pub code: u8,
    /// One-line reason (never a secret).
    pub message: String,
}

/// A usage error (exit 64): bad argument, unknown provider.
pub(crate) fn usage(message: impl Into<String>) -> anyhow::Error {
    Failure {
        code: EXIT_USAGE,
        message: message.into(),
    }
    .into()
}

/// A data error (exit 65): malformed input.
pub(crate) fn data(message: impl Into<String>) -> anyhow::Error {
    Failure {
        code: EXIT_DATA,
        message: message.into(),
    }
    .into()
}

/// Runs a parsed command line and returns the process exit status.
pub fn run(cli: Cli) -> ExitCode {
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(dispatch(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let line = format!("{err:#}").replace(['\n', '\r'], " ");
            eprintln!("tokenproxy: {line}");
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The exit status an error maps to.
fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.code;
        }
        if cause.downcast_ref::<ConfigError>().is_some() {
            return EXIT_USAGE;
        }
        if let Some(StoreError::Unavailable(_)) = cause.downcast_ref::<StoreError>() {
            return EXIT_UNAVAILABLE;
        }
    }
    1
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let path = config::resolve_path(cli.config.as_deref());
    match cli.command {
        Command::CheckConfig => check_config::run(&path),
        Command::Healthcheck(args) => healthcheck::run(&path, args).await,
        Command::Ca(c) => ca::run(c),
        Command::Providers => {
            print!("{}", crate::oauth::presets::describe());
            Ok(())
        }
        command => {
            let cfg = Config::load(&path)?;
            // Their changes belong in the audit trail; their stderr stays theirs
            // (no ordinary log, so the guard holds no writer thread).
            let _audit = matches!(command, Command::Link(_) | Command::Token(_))
                .then(|| crate::telemetry::init_logging(&cfg.logging, false))
                .transpose()?;
            match command {
                Command::Serve => serve::run(cfg).await,
                Command::Migrate => migrate::run(&cfg).await,
                Command::Link(c) => link::run(&cfg, c).await,
                Command::Token(c) => token::run(&cfg, c).await,
                Command::Keys(c) => keys::run(&cfg, c).await,
                Command::CheckConfig
                | Command::Healthcheck(_)
                | Command::Ca(_)
                | Command::Providers => {
                    unreachable!("handled above")
                }
            }
        }
    }
}

/// Opens the store the config names (Postgres or SQLite, by the URL's scheme).
/// The pool connects lazily, so an unreachable database shows up as
/// [`StoreError::Unavailable`] on first use.
pub(crate) fn open_store(cfg: &Config) -> anyhow::Result<std::sync::Arc<dyn LinkStore>> {
    Ok(crate::store::open_config(cfg)?)
}

/// Checks a provider id against the config (exit 64 when unknown).
pub(crate) fn known_provider<'a>(
    cfg: &'a Config,
    id: &str,
) -> anyhow::Result<&'a config::ProviderConfig> {
    cfg.provider(id).ok_or_else(|| {
        let known: Vec<&str> = cfg.providers.iter().map(|p| p.id.as_str()).collect();
        usage(format!(
            "unknown provider `{id}` (configured: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    })
}

/// Formats an optional time for tables.
pub(crate) fn show_time(t: Option<chrono::DateTime<chrono::Utc>>, none: &str) -> String {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| none.to_string())
}
