//! Forward-mode setup shared by tests/forward.rs and tests/recipes.rs: the
//! tokenproxy CA made by the real `tokenproxy ca init`, and the `[forward]`
//! section that names it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `tokenproxy ca init --out DIR` and returns the CA certificate's path
/// (the one clients trust).
pub fn ca_init(dir: &Path) -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .args(["ca", "init", "--out"])
        .arg(dir)
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("ca.pem")
}

/// The `[forward]` section for the CA that [`ca_init`] wrote to `ca_dir`; more
/// `[forward]` keys may follow it.
pub fn forward_section(ca_dir: &Path) -> String {
    format!(
        "[forward]\nca_cert = \"{}\"\nca_key = \"{}\"\n",
        ca_dir.join("ca.pem").display(),
        ca_dir.join("ca-key.pem").display()
    )
}
