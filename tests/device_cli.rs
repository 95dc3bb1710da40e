//! The built binary's `link login` (device flow), `link status` and `link delete`
//! (revoking at the provider; `--keep-grant`) against the test IdP over HTTPS,
//! checked in the database and in the IdP's tally.

#[path = "cli_harness/mod.rs"]
mod harness;
mod support;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use harness::{run_bin, stderr, stdout, BIN};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use support::db::db_url;
use support::idp::{Idp, IdpOptions};
use support::upstream::TestCa;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::LinkStore;
use uuid::Uuid;

struct Setup {
    _dir: tempfile::TempDir,
    _ca: TestCa,
    config: PathBuf,
    db_url: String,
    idp: Idp,
    store: PgStore,
}

async fn setup(pool: PgPool) -> Setup {
    let ca = TestCa::new();
    let idp = Idp::start(IdpOptions {
        tls: Some(ca.acceptor()),
        ..IdpOptions::default()
    })
    .await;
    let base = idp.base_url();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenproxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[providers]]
id = "gl"
client_id = "test-client"
client_secret = "test-secret"
token_url = "{base}/oauth/token"
device_authorization_url = "{base}/oauth/device"
revocation_url = "{base}/oauth/revoke"
token_ca = "{ca}"
timeout = "2s"

[[providers]]
id = "plain"
client_id = "test-client"
token_url = "{base}/oauth/token"
"#,
            ca = ca.ca.display()
        ),
    )
    .unwrap();
    Setup {
        _dir: dir,
        _ca: ca,
        config,
        db_url: db_url(&pool),
        idp,
        store: PgStore::from_pool(pool, Keyring::plaintext()),
    }
}

impl Setup {
    /// Runs a command that talks to the IdP off the runtime the IdP serves on.
    async fn run(&self, args: &[&str]) -> Output {
        let config = self.config.clone();
        let db = self.db_url.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_bin(&config, None, &args, "", &[("DATABASE_URL", &db)])
        })
        .await
        .unwrap()
    }

    /// Starts `link login`, plays the user with `act` once the code is issued,
    /// and returns the finished process's output (bounded: 30 s).
    async fn login(&self, user: Uuid, act: impl FnOnce(&Idp, &str)) -> Output {
        let child = tokio::process::Command::new(BIN)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env("DATABASE_URL", &self.db_url)
            .arg("--config")
            .arg(&self.config)
            .args([
                "link",
                "login",
                "--provider",
                "gl",
                "--user",
                &user.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut code = None;
        for _ in 0..300 {
            code = self.idp.last_user_code();
            if code.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        act(
            &self.idp,
            &code.expect("link login asked for a device code"),
        );
        tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("link login finishes")
            .unwrap()
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn link_login_prints_the_code_and_stores_the_approved_link(pool: PgPool) {
    let s = setup(pool).await;
    let user = Uuid::new_v4();
    let out = s
        .login(user, |idp, code| idp.device_approve(code, user))
        .await;
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    let code = s.idp.last_user_code().unwrap();
    assert!(text.contains(&code), "{text}");
    assert!(text.contains("/device"), "{text}");
    assert!(text.contains(&format!("user_code={code}")), "{text}");
    assert!(text.contains(&format!("linked gl/{user}")), "{text}");
    let row = s.store.get_link("gl", user).await.unwrap().unwrap();
    assert!(s
        .idp
        .is_valid_access_token(row.access_token.expose_secret()));
    assert!(!text.contains(row.access_token.expose_secret()));
    assert_eq!(s.idp.device_too_fast(), 0);

    // link status shows it, without token values.
    let status = s
        .run(&["link", "status", "--user", &user.to_string(), "--json"])
        .await;
    let json: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(json[0]["provider"], "gl");
    assert_eq!(json[0]["linked"], true);
    assert!(json[0]["access_expiry"].is_string());
    assert!(json[0]["last_refresh"].is_string());
    assert!(!stdout(&status).contains(row.refresh_token.expose_secret()));
    let table = s
        .run(&[
            "link",
            "status",
            "--provider",
            "plain",
            "--user",
            &user.to_string(),
        ])
        .await;
    assert!(stdout(&table).contains("plain"), "{}", stdout(&table));
    assert!(stdout(&table).contains("no"), "{}", stdout(&table));
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_denied_link_login_exits_1_and_stores_nothing(pool: PgPool) {
    let s = setup(pool).await;
    let user = Uuid::new_v4();
    let out = s.login(user, |idp, code| idp.device_deny(code)).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("access_denied") && err.contains("nothing was stored"),
        "{err}"
    );
    assert!(s.store.get_link("gl", user).await.unwrap().is_none());

    let out = s
        .run(&[
            "link",
            "login",
            "--provider",
            "plain",
            "--user",
            &user.to_string(),
        ])
        .await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("no device flow"), "{}", stderr(&out));
    assert_eq!(s.idp.device_authorizations(), 1);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn link_delete_revokes_unless_keep_grant(pool: PgPool) {
    let s = setup(pool).await;
    let user = Uuid::new_v4();
    let u = user.to_string();
    let t = s.idp.seed(user);
    s.store.put_link("gl", user, &t).await.unwrap();
    let out = s
        .run(&["link", "delete", "--provider", "gl", "--user", &u])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("revoked"), "{}", stdout(&out));
    assert_eq!(s.idp.revocations(), 1);
    assert_eq!(s.idp.current_refresh_token(user), None);
    assert!(s.store.get_link("gl", user).await.unwrap().is_none());

    let t = s.idp.seed(user);
    s.store.put_link("gl", user, &t).await.unwrap();
    let out = s
        .run(&[
            "link",
            "delete",
            "--provider",
            "gl",
            "--user",
            &u,
            "--keep-grant",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(s.idp.revocations(), 1);
    assert!(s.idp.is_valid_access_token(t.access_token.expose_secret()));
    assert!(s.store.get_link("gl", user).await.unwrap().is_none());

    // A failed revocation is reported on stderr; the link is deleted anyway.
    s.store
        .put_link("gl", user, &s.idp.seed(user))
        .await
        .unwrap();
    s.idp.set_revocation_failing(true);
    let out = s
        .run(&["link", "delete", "--provider", "gl", "--user", &u])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("revoking the grant at gl failed"),
        "{}",
        stderr(&out)
    );
    assert!(s.store.get_link("gl", user).await.unwrap().is_none());
}
