//! `tokenproxy keys rotate`: re-encrypts every stored token with the first configured
//! key, so an old key can then be removed from `encryption.keys`.

use anyhow::Context;
use clap::Subcommand;

use crate::config::Config;

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Re-encrypt every link with the first key in `encryption.keys`.
    Rotate,
}

/// Runs a `keys` subcommand.
pub async fn run(cfg: &Config, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Rotate => {
            if cfg.encryption.keys.is_empty() {
                return Err(super::usage(
                    "encryption.keys: no keys configured; nothing to rotate to",
                ));
            }
            let store = super::open_store(cfg)?;
            let report = store.rotate_keys().await.context("rotating keys")?;
            println!(
                "rotated {}, unchanged {}, raced {}",
                report.rotated, report.unchanged, report.raced
            );
            if report.raced > 0 {
                println!("some links changed while rotating; run `tokenproxy keys rotate` again");
            }
            Ok(())
        }
    }
}
