//! Shared harness of the CLI tests (Postgres and SQLite): the built binary run
//! with a cleared environment, so the test's own `DATABASE_URL` or
//! `TOKENPROXY_*` variables never leak into it, and the checks of its output.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_tokenproxy");
pub const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
pub const USER: &str = "6f9619ff-8b86-d011-b42d-00cf4fc964ff";
/// Distinctive token values, searched for in every output.
pub const ACCESS: &str = "gho_ACCESSsecretVALUE123";
pub const REFRESH: &str = "ghr_REFRESHsecretVALUE456";

/// Runs the binary with `--config config`, `args` and `stdin`, in `cwd` if
/// given, with only `PATH`, `RUST_LOG=warn` and `env` (in order) set.
pub fn run_bin(
    config: &Path,
    cwd: Option<&Path>,
    args: &[&str],
    stdin: &str,
    env: &[(&str, &str)],
) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run tokenproxy");
    let mut pipe = child.stdin.take().unwrap();
    // The command may exit before reading stdin (e.g. unknown provider); ignore EPIPE.
    let _ = pipe.write_all(stdin.as_bytes());
    drop(pipe);
    child.wait_with_output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn assert_ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// The `token create` arguments for [`USER`] on `github`, named `name`.
pub fn token_create_args(name: &str) -> [&str; 10] {
    [
        "token",
        "create",
        "--user",
        USER,
        "--provider",
        "github",
        "--name",
        name,
        "--ttl",
        "30d",
    ]
}

/// The output of `token create`: the token (its last line) and its id.
#[track_caller]
pub fn created_token(out: &str) -> (String, String) {
    let token = out.lines().last().unwrap().to_string();
    assert!(token.starts_with("tpx_") && token.len() > 40, "{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("id line")
        .to_string();
    (token, id)
}
