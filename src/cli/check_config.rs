//! `tokenproxy check-config`: validates the config exactly as `serve` would, without
//! binding anything or touching the database, so a deploy can fail fast.

use std::path::Path;

use crate::config::Config;

/// Prints `ok`, or fails (exit 64) with the one-line error naming the key.
pub fn run(path: &Path) -> anyhow::Result<()> {
    Config::load(path)?;
    println!("ok");
    Ok(())
}
