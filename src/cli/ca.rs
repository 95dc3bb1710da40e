//! `tokenproxy ca init`: creates the CA that forward mode signs leaf certificates
//! with. Clients trust its certificate; its key never leaves the proxy's host.
//!
//! Needs no config file, so the CA can exist before the config that names it.
//! Existing files are never overwritten: replacing a CA silently would break every
//! client that trusts the old one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use secrecy::ExposeSecret;

use crate::proxy::ca::generate_ca;

/// File name of the CA certificate in `--out`.
pub const CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in `--out`.
pub const KEY_FILE: &str = "ca-key.pem";

/// `ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a CA certificate (ca.pem) and private key (ca-key.pem, mode 0600).
    Init(InitArgs),
}

/// `ca init` arguments.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to write ca.pem and ca-key.pem into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Common name of the CA certificate.
    #[arg(long, default_value = "tokenproxy CA")]
    pub name: String,
    /// How long the CA certificate is valid.
    #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
    pub valid_for: Duration,
}

/// Runs a `ca` subcommand.
pub fn run(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init(args) => init(&args),
    }
}

fn init(args: &InitArgs) -> anyhow::Result<()> {
    let cert_path = args.out.join(CERT_FILE);
    let key_path = args.out.join(KEY_FILE);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(super::usage(format!(
                "{} already exists; remove it first or choose another --out",
                p.display()
            )));
        }
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| super::usage(format!("--out {}: {e}", args.out.display())))?;
    let (cert, key) = generate_ca(&args.name, args.valid_for)?;
    write_new(&key_path, key.expose_secret().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.as_bytes(), 0o644)?;
    println!("wrote {} and {}", cert_path.display(), key_path.display());
    println!(
        "config:\n[forward]\nca_cert = \"{}\"\nca_key = \"{}\"",
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}

/// Creates `path` (failing if it exists) with `mode` from the start, so the key is
/// never readable by others, not even briefly.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| super::usage(format!("{}: {e}", path.display())))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}
