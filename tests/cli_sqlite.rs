//! Every CLI command against SQLite, with the quick-start config exactly as
//! shipped (`config/quickstart.toml`): the binary runs in an empty temporary
//! directory, so `./data/tokenproxy.db` is created there on first use.
//!
//! The binary runs with a cleared environment; each test passes what it needs.

#[path = "cli_harness/mod.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::process::Output;

use harness::*;
use sha2::{Digest, Sha256};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::SqlitePool;

const NEW_KEY: &str = "ERERERERERERERERERERERERERERERERERERERERERE=";
const CLIENT_SECRET: &str = "client-secret-value";

fn quickstart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/quickstart.toml")
}

/// Runs the binary in `cwd` with the quick-start config, `args` and `stdin`.
fn run(cwd: &Path, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    let base = [
        ("TOKENPROXY_KEY", KEY),
        ("GITHUB_CLIENT_SECRET", CLIENT_SECRET),
    ];
    let env: Vec<_> = base.iter().chain(env).copied().collect();
    run_bin(&quickstart(), Some(cwd), args, stdin, &env)
}

#[track_caller]
fn assert_no_secret(text: &str, token: &str) {
    for secret in [ACCESS, REFRESH, token, KEY, NEW_KEY, CLIENT_SECRET] {
        assert!(!text.contains(secret), "output reveals a secret:\n{text}");
    }
}

async fn open_file(path: &Path) -> SqlitePool {
    SqlitePool::connect_with(SqliteConnectOptions::new().filename(path))
        .await
        .unwrap()
}

#[test]
fn check_config_accepts_the_quickstart() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(dir.path(), &["check-config"], "", &[]);
    assert_eq!(assert_ok(&o), "ok\n");
    // Checking creates nothing.
    assert!(!dir.path().join("data").exists());
}

#[test]
fn check_config_refuses_an_unknown_database_scheme_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = "mysql://root:hunter2@127.0.0.1/x";
    let o = run(dir.path(), &["check-config"], "", &[("DATABASE_URL", url)]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("database.url"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[tokio::test]
async fn every_command_works_on_a_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let file = cwd.join("data").join("tokenproxy.db");

    // Migrations create ./data and the file, and apply again as a no-op.
    for _ in 0..2 {
        assert_ok(&run(cwd, &["migrate"], "", &[]));
    }
    assert!(file.is_file(), "{} was created", file.display());
    let db = open_file(&file).await;

    // token create: the token is the last line; only its SHA-256 is stored.
    let out = assert_ok(&run(cwd, &token_create_args("laptop"), "", &[]));
    let (token, id) = created_token(&out);
    let hash: Vec<u8> = sqlx::query_scalar("SELECT hash FROM proxy_tokens")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(hash, Sha256::digest(token.as_bytes()).to_vec());

    // link put: encrypted at rest, the chosen extra fields kept.
    let response = format!(
        r#"{{"access_token":"{ACCESS}","refresh_token":"{REFRESH}","token_type":"bearer","expires_in":28800}}"#
    );
    let o = run(
        cwd,
        &["link", "put", "--provider", "github", "--user", USER],
        &response,
        &[],
    );
    assert_no_secret(&assert_ok(&o), &token);
    let (access, refresh, key_id): (String, String, Option<String>) = sqlx::query_as(
        "SELECT oauth_access_token, oauth_refresh_token, oauth_access_token_key_id \
         FROM external_auth_links WHERE provider_id = 'github' AND user_id = ?1",
    )
    .bind(USER)
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(!access.contains(ACCESS) && !refresh.contains(REFRESH));
    assert!(key_id.is_some(), "encrypted");

    // Listings show the rows and never a token value.
    for args in [
        &["link", "list"][..],
        &["link", "list", "--json", "--user", USER],
        &["token", "list"],
        &["token", "list", "--json"],
    ] {
        let o = run(cwd, args, "", &[]);
        let out = assert_ok(&o);
        assert_no_secret(&out, &token);
        assert_no_secret(&stderr(&o), &token);
        assert!(out.contains(USER), "{args:?}: {out}");
    }
    let links: serde_json::Value =
        serde_json::from_str(&assert_ok(&run(cwd, &["link", "list", "--json"], "", &[]))).unwrap();
    assert_eq!(links[0]["provider_id"], "github");
    assert_eq!(links[0]["has_refresh_token"], true);
    assert_eq!(links[0]["encrypted"], true);

    // keys rotate: a new first key re-encrypts the link; the old one may then go.
    let both = format!("{NEW_KEY},{KEY}");
    let rotate_env = [("TOKENPROXY_ENCRYPTION__KEYS", both.as_str())];
    let out = assert_ok(&run(cwd, &["keys", "rotate"], "", &rotate_env));
    assert!(out.starts_with("rotated 1, unchanged 0, raced 0"), "{out}");
    let new_only = [("TOKENPROXY_ENCRYPTION__KEYS", NEW_KEY)];
    let out = assert_ok(&run(cwd, &["link", "list", "--json"], "", &new_only));
    assert!(out.contains("\"has_refresh_token\": true"), "{out}");
    // `link list` never decrypts: prove the old key may go by reading both tokens
    // back with the new key alone.
    {
        use secrecy::{ExposeSecret, SecretBox};
        use tokenproxy::config::EncryptionFormat;
        use tokenproxy::crypto::{native_key_id, Keyring};
        use tokenproxy::store::LinkStore;
        let new_id = native_key_id(&[0x11; 32]);
        let key_ids: (Option<String>, Option<String>) = sqlx::query_as(
            "SELECT oauth_access_token_key_id, oauth_refresh_token_key_id FROM external_auth_links",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(key_ids, (Some(new_id.clone()), Some(new_id)));
        let store = tokenproxy::store::sqlite::SqliteStore::from_pool(
            db.clone(),
            Keyring::new(
                vec![SecretBox::new(Box::new([0x11; 32]))],
                EncryptionFormat::Native,
            ),
        );
        let link = store
            .get_link("github", USER.parse().unwrap())
            .await
            .expect("decrypts with the new key alone")
            .expect("link exists");
        assert_eq!(link.access_token.expose_secret(), ACCESS);
        assert_eq!(link.refresh_token.expose_secret(), REFRESH);
    }

    // token revoke: once; a second time there is nothing to revoke.
    assert_ok(&run(cwd, &["token", "revoke", &id], "", &[]));
    let revoked: bool =
        sqlx::query_scalar("SELECT revoked_at IS NOT NULL FROM proxy_tokens WHERE id = ?1")
            .bind(&id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(revoked);
    let again = run(cwd, &["token", "revoke", &id], "", &[]);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert!(assert_ok(&run(cwd, &["token", "list"], "", &[])).contains("revoked"));

    // link delete.
    let delete = ["link", "delete", "--provider", "github", "--user", USER];
    assert_ok(&run(cwd, &delete, "", &new_only));
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM external_auth_links")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n, 0);
    let again = run(cwd, &delete, "", &new_only);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
}
