//! The built `tokenproxy` binary, end to end against a fresh database per test
//! (`#[sqlx::test]`): migrate, token create/list/revoke, link put/list/delete, and
//! the exit codes and one-line messages of the failure cases.
//!
//! The binary runs with a cleared environment, so the test's own `DATABASE_URL` or
//! `TOKENPROXY_*` variables never leak into it; each test passes what it needs.

#[path = "support/child.rs"]
#[allow(dead_code)] // cli.rs only reads the `listening` line, not the harness's watchers
mod child;
#[path = "support/db.rs"]
mod db;
#[path = "cli_harness/mod.rs"]
mod harness;

use db::db_url;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use harness::*;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// A config file and the database URL it should talk to.
struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    db_url: String,
}

/// Writes a config with an encryption key from `env:` and one provider.
fn setup(db_url: String, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenproxy.toml");
    let text = format!(
        r#"
[database]
# Deliberately wrong: DATABASE_URL (set by `run`) must override it.
url = "postgres://nobody@127.0.0.1:1/nothing"
acquire_timeout = "3s"

[encryption]
keys = ["env:TP_TEST_KEY"]

[[providers]]
id = "github"
client_id = "Iv1.test"
client_secret = "env:TP_TEST_CLIENT_SECRET"
token_url = "https://github.com/login/oauth/access_token"
extra_fields = ["scope"]

  [[providers.routes]]
  prefix = "/github/api"
  upstream = "https://api.github.com"
{extra}"#
    );
    std::fs::write(&config, text).unwrap();
    Setup {
        _dir: dir,
        config,
        db_url,
    }
}

/// Runs the binary with `args`, `stdin`, and a clean environment.
fn run(s: &Setup, args: &[&str], stdin: &str) -> Output {
    run_env(&s.config, args, stdin, &[("DATABASE_URL", &s.db_url)])
}

fn run_env(config: &Path, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    let base = [
        ("TP_TEST_KEY", KEY),
        ("TP_TEST_CLIENT_SECRET", "client-secret-value"),
    ];
    let env: Vec<_> = base.iter().chain(env).copied().collect();
    run_bin(config, None, args, stdin, &env)
}

/// Asserts exit `code` and a single `tokenproxy: …` line on stderr containing `needle`.
#[track_caller]
fn assert_fails(o: &Output, code: i32, needle: &str) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("tokenproxy: "), "{err}");
    assert!(lines[0].contains(needle), "`{needle}` expected in: {err}");
    err
}

fn assert_no_secret(text: &str, token: &str) {
    for secret in [ACCESS, REFRESH, token, KEY, "client-secret-value"] {
        assert!(!text.contains(secret), "output reveals a secret:\n{text}");
    }
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn end_to_end(pool: PgPool) {
    let s = setup(db_url(&pool), "");

    // Migrations apply, and apply again as a no-op.
    for _ in 0..2 {
        let o = run(&s, &["migrate"], "");
        assert_ok(&o);
    }
    assert_eq!(count(&pool, "external_auth_links").await, 0);

    // token create: the token is the last line; only its SHA-256 is stored.
    let out = assert_ok(&run(&s, &token_create_args("ci"), ""));
    let (token, id) = created_token(&out);
    assert_eq!(out.matches(&token).count(), 1, "printed once: {out}");
    let hash: Vec<u8> = sqlx::query_scalar("SELECT hash FROM proxy_tokens")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(hash, Sha256::digest(token.as_bytes()).to_vec());
    let dump: String =
        sqlx::query_scalar("SELECT string_agg(row_to_json(t)::text, '') FROM proxy_tokens t")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!dump.contains(&token[4..]), "token stored in clear: {dump}");

    // link put: an RFC 6749 token response on stdin; encrypted at rest, extra fields kept.
    let response = format!(
        r#"{{"access_token":"{ACCESS}","refresh_token":"{REFRESH}","token_type":"bearer","expires_in":28800,"scope":"repo","other":"dropped"}}"#
    );
    let o = run(
        &s,
        &["link", "put", "--provider", "github", "--user", USER],
        &response,
    );
    assert_ok(&o);
    assert_no_secret(&stdout(&o), &token);
    let row: (String, String, Option<String>, Option<serde_json::Value>, bool) = sqlx::query_as(
        "SELECT oauth_access_token, oauth_refresh_token, oauth_access_token_key_id, oauth_extra, \
         oauth_expiry > now() FROM external_auth_links WHERE provider_id = 'github' AND user_id = $1::uuid",
    )
    .bind(USER)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        !row.0.contains(ACCESS) && !row.1.contains(REFRESH),
        "stored in clear"
    );
    assert!(row.2.is_some(), "access token should be encrypted");
    assert_eq!(row.3, Some(serde_json::json!({"scope": "repo"})));
    assert!(row.4, "expiry is in the future");

    // Listings never show token values.
    for args in [
        &["link", "list"][..],
        &["link", "list", "--json"],
        &["link", "list", "--user", USER],
        &["token", "list"],
        &["token", "list", "--json", "--user", USER],
    ] {
        let o = run(&s, args, "");
        assert_ok(&o);
        let (out, err) = (stdout(&o), stderr(&o));
        assert_no_secret(&out, &token);
        assert_no_secret(&err, &token);
        assert!(out.contains(USER), "{args:?}: {out}");
    }
    let links: serde_json::Value =
        serde_json::from_str(&stdout(&run(&s, &["link", "list", "--json"], ""))).unwrap();
    assert_eq!(links[0]["provider_id"], "github");
    assert_eq!(links[0]["has_refresh_token"], true);

    // token revoke: once, then it is already revoked.
    assert_ok(&run(&s, &["token", "revoke", &id], ""));
    let revoked: bool =
        sqlx::query_scalar("SELECT revoked_at IS NOT NULL FROM proxy_tokens WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(revoked);
    assert_fails(&run(&s, &["token", "revoke", &id], ""), 1, &id);
    assert!(stdout(&run(&s, &["token", "list"], "")).contains("revoked"));

    // link delete.
    assert_ok(&run(
        &s,
        &["link", "delete", "--provider", "github", "--user", USER],
        "",
    ));
    assert_eq!(count(&pool, "external_auth_links").await, 0);
    assert_fails(
        &run(
            &s,
            &["link", "delete", "--provider", "github", "--user", USER],
            "",
        ),
        1,
        "no link",
    );
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn unknown_provider_exits_64_and_writes_nothing(pool: PgPool) {
    let s = setup(db_url(&pool), "");
    let response = format!(r#"{{"access_token":"{ACCESS}"}}"#);
    let o = run(
        &s,
        &["link", "put", "--provider", "gitlab", "--user", USER],
        &response,
    );
    assert_fails(&o, 64, "unknown provider `gitlab`");
    let o = run(
        &s,
        &["token", "create", "--user", USER, "--provider", "gitlab"],
        "",
    );
    assert_fails(&o, 64, "unknown provider `gitlab`");
    assert_eq!(count(&pool, "external_auth_links").await, 0);
    assert_eq!(count(&pool, "proxy_tokens").await, 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn malformed_stdin_exits_65_and_writes_nothing(pool: PgPool) {
    let s = setup(db_url(&pool), "");
    let cases = [
        (format!(r#"{{"access_token":"{ACCESS}""#), "invalid JSON"),
        (String::new(), "invalid JSON"),
        (
            format!(r#"{{"refresh_token":"{REFRESH}"}}"#),
            "`access_token` is missing",
        ),
        (
            format!(r#"{{"access_token":"{ACCESS}","expires_in":"soon"}}"#),
            "`expires_in`",
        ),
        (format!(r#"["{ACCESS}"]"#), "expected a JSON object"),
    ];
    for (input, needle) in cases {
        let o = run(
            &s,
            &["link", "put", "--provider", "github", "--user", USER],
            &input,
        );
        let err = assert_fails(&o, 65, needle);
        assert_no_secret(&err, "tpx_none");
    }
    assert_eq!(count(&pool, "external_auth_links").await, 0);
}

#[test]
fn bad_config_exits_64_naming_the_key() {
    let s = setup(
        "postgres://unused@127.0.0.1:1/x".into(),
        "  upstream_tls = true\n",
    );
    for args in [
        &["check-config"][..],
        &["link", "list"],
        &["migrate"],
        &["serve"],
    ] {
        let o = run(&s, args, "");
        assert_fails(&o, 64, "providers[0].routes[0].upstream_tls: unknown field");
        assert!(stdout(&o).is_empty());
    }
}

#[test]
fn unset_secret_names_the_key_without_printing_secrets() {
    let s = setup("postgres://unused@127.0.0.1:1/x".into(), "");
    let o = run_env(
        &s.config,
        &["check-config"],
        "",
        &[("TP_TEST_CLIENT_SECRET", "")],
    );
    let err = assert_fails(
        &o,
        64,
        "providers[0].client_secret: environment variable TP_TEST_CLIENT_SECRET is not set",
    );
    assert_no_secret(&err, "tpx_none");
}

#[test]
fn check_config_prints_ok_for_every_example() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for name in ["shared.toml", "sidecar.toml"] {
        let o = run_env(
            &dir.join(name),
            &["check-config"],
            "",
            &[
                ("TOKENPROXY_KEY", KEY),
                ("GITHUB_CLIENT_SECRET", "x"),
                ("GITLAB_CLIENT_SECRET", "y"),
            ],
        );
        assert_ok(&o);
        assert_eq!(stdout(&o), "ok\n", "{name}");
    }
}

#[test]
fn usage_errors_exit_64() {
    let s = setup("postgres://unused@127.0.0.1:1/x".into(), "");
    let o = run(
        &s,
        &[
            "link",
            "put",
            "--provider",
            "github",
            "--user",
            "not-a-uuid",
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let o = run(&s, &["frobnicate"], "");
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let o = run(&s, &["--help"], "");
    assert_ok(&o);
}

#[test]
fn unreachable_database_exits_69() {
    let s = setup("postgres://postgres@127.0.0.1:1/nothing".into(), "");
    for args in [&["link", "list"][..], &["migrate"], &["token", "list"]] {
        let o = run_env(
            &s.config,
            args,
            "",
            &[
                ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nothing"),
                ("TOKENPROXY_DATABASE__ACQUIRE_TIMEOUT", "200ms"),
            ],
        );
        assert_fails(&o, 69, "database unavailable");
    }
}

/// `serve` (admin listener only until the proxy lands): migrates on start, warns once
/// that tokens are stored in plain text, answers `healthcheck`, and exits 0 on SIGTERM.
#[sqlx::test(migrations = false)]
async fn serve_answers_healthcheck_and_stops_on_sigterm(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenproxy.toml");
    std::fs::write(
        &config,
        format!(
            // Both listeners on port 0: the default 127.0.0.1:8080 (or a port picked
            // and released beforehand) may be taken on a shared runner. The bound
            // admin address is read from serve's own `listening` line.
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[database]\nurl = \"{}\"\n",
            db_url(&pool)
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .env_clear()
        .env("RUST_LOG", child::log_filter("warn"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Keep every stderr line (the assertions below read them) and send the
    // admin address of the `listening` line: an event, not a retry loop.
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = {
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut all = String::new();
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some((_, admin)) = child::listening_addrs(&line) {
                    let _ = tx.send(admin);
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        })
    };
    let admin = rx.recv_timeout(child::START_TIMEOUT);
    let healthy = admin.as_ref().ok().map(|admin| {
        let o = run_env(
            &config,
            &["healthcheck", "--addr", &admin.to_string()],
            "",
            &[],
        );
        (o.status.success(), stdout(&o))
    });
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    let err = reader.join().unwrap();
    let admin = admin.unwrap_or_else(|e| panic!("no `listening` line ({e}); serve said: {err}"));
    assert_eq!(
        healthy,
        Some((true, "ok\n".to_string())),
        "healthcheck on {admin}; serve said: {err}"
    );
    assert!(status.success(), "serve exit {:?}: {err}", status.code());
    assert_eq!(err.matches("plain text").count(), 1, "{err}");
    assert_eq!(count(&pool, "proxy_tokens").await, 0, "migrated on start");

    // Nothing listens any more: the check fails with a one-line reason.
    let o = run_env(
        &config,
        &["healthcheck", "--addr", &admin.to_string()],
        "",
        &[],
    );
    assert_fails(&o, 1, "cannot connect");
}

/// `keys rotate` re-encrypts with the first key; afterwards the old key can go.
#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn keys_rotate_moves_links_to_the_first_key(pool: PgPool) {
    use secrecy::{ExposeSecret, SecretBox};
    use tokenproxy::config::EncryptionFormat;
    use tokenproxy::crypto::{native_key_id, Keyring};
    use tokenproxy::store::LinkStore;

    const NEW_KEY: &str = "IiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiI=";
    let s = setup(db_url(&pool), "");
    let response = format!(r#"{{"access_token":"{ACCESS}","refresh_token":"{REFRESH}"}}"#);
    assert_ok(&run(
        &s,
        &["link", "put", "--provider", "github", "--user", USER],
        &response,
    ));

    let both = format!("{NEW_KEY},{KEY}");
    let o = run_env(
        &s.config,
        &["keys", "rotate"],
        "",
        &[
            ("DATABASE_URL", &s.db_url),
            ("TOKENPROXY_ENCRYPTION__KEYS", &both),
        ],
    );
    assert_ok(&o);
    assert!(stdout(&o).contains("rotated 1"), "{}", stdout(&o));

    let key_ids: (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT oauth_access_token_key_id, oauth_refresh_token_key_id FROM external_auth_links",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let new_id = native_key_id(&[0x22; 32]);
    assert_eq!(key_ids, (Some(new_id.clone()), Some(new_id)));

    // Only the new key is needed now.
    let store = tokenproxy::store::postgres::PgStore::from_pool(
        pool.clone(),
        Keyring::new(
            vec![SecretBox::new(Box::new([0x22; 32]))],
            EncryptionFormat::Native,
        ),
    );
    let user = USER.parse().unwrap();
    let link = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(link.access_token.expose_secret(), ACCESS);
    assert_eq!(link.refresh_token.expose_secret(), REFRESH);
}
