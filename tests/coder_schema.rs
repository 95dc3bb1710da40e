//! Coder mode owns nothing in Coder's schema: `migrate` puts tokenproxy's
//! tables in schema `tokenproxy` and leaves `pg_dump --schema-only` of Coder's
//! schema byte-identical; `dbcrypt_keys` is read, never written; start-up
//! refuses what coderd would refuse. Also measures the cost of one poll for
//! coderd's writes.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use secrecy::{SecretBox, SecretString};
use sqlx::PgPool;
use tokenproxy::config::EncryptionFormat;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::coder_store::{CoderOptions, CoderStore};
use tokenproxy::store::{LinkStore, NewProxyToken, TokenSet};
use uuid::Uuid;

const CODER_SCHEMA: &str = include_str!("fixtures/coder_schema.sql");
const KEY_ID: &str = "6d28cf8";
const KEY_TEST: &str = "oKGio6SlpqeoqaqrhXcYSDf2nFoNsjj8nsDkMo2nEys6";

fn key() -> [u8; 32] {
    std::array::from_fn(|i| i as u8)
}

fn keyring(keys: &[[u8; 32]]) -> Keyring {
    Keyring::new(
        keys.iter().map(|k| SecretBox::new(Box::new(*k))).collect(),
        EncryptionFormat::Coder,
    )
}

async fn coder_db(pool: &PgPool) {
    sqlx::raw_sql(CODER_SCHEMA).execute(pool).await.unwrap();
    sqlx::query("INSERT INTO dbcrypt_keys (number, active_key_digest, test) VALUES (1, $1, $2)")
        .bind(KEY_ID)
        .bind(KEY_TEST)
        .execute(pool)
        .await
        .unwrap();
}

fn store(pool: &PgPool, keys: &[[u8; 32]]) -> CoderStore {
    CoderStore::from_connect_options(
        pool.connect_options().as_ref().clone(),
        keyring(keys),
        CoderOptions::default(),
    )
}

/// The newest pg_dump installed (scripts/test installs the server's).
fn pg_dump() -> String {
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed under /usr/lib/postgresql")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin/pg_dump"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().expect("pg_dump").display().to_string()
}

/// `pg_dump --schema-only` of Coder's schema (`public`). Recent pg_dump
/// releases write a random `\restrict` key into every dump; a fixed one keeps
/// two dumps of one schema byte-identical.
fn dump_coder_schema(pool: &PgPool) -> String {
    let bin = pg_dump();
    let help = Command::new(&bin).arg("--help").output().unwrap();
    let mut cmd = Command::new(&bin);
    if String::from_utf8_lossy(&help.stdout).contains("--restrict-key") {
        cmd.arg("--restrict-key=tokenproxytest");
    }
    let out = cmd
        .args(["--schema-only", "--schema=public", "--no-owner", "--dbname"])
        .arg(harness::db_url(pool))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn tokens(access: &str, refresh: &str) -> TokenSet {
    TokenSet {
        access_token: SecretString::from(access.to_string()),
        refresh_token: SecretString::from(refresh.to_string()),
        expiry: None,
        extra: None,
    }
}

#[sqlx::test(migrations = false)]
async fn migrate_leaves_coders_schema_byte_identical(pool: PgPool) {
    coder_db(&pool).await;
    let before = dump_coder_schema(&pool);
    assert!(before.contains("acquire_external_auth_link_refresh_lease"));
    let store = store(&pool, &[key()]);
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    store.ready().await.unwrap();
    // Everything tokenproxy does in Coder mode, then the schema again.
    let user = Uuid::new_v4();
    store
        .put_link("github", user, &tokens("a", "r"))
        .await
        .unwrap();
    let info = store
        .create_proxy_token(&NewProxyToken {
            user_id: user,
            name: "t".into(),
            hash: [7; 32],
            providers: vec![],
            expires_at: None,
        })
        .await
        .unwrap();
    assert_eq!(
        store.find_proxy_token(&[7; 32]).await.unwrap().unwrap().id,
        info.id
    );
    let after = dump_coder_schema(&pool);
    let first_diff = before.lines().zip(after.lines()).find(|(a, b)| a != b);
    assert!(
        after == before,
        "Coder's schema changed; first difference: {first_diff:?}"
    );

    let ours: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'tokenproxy' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(ours, ["_sqlx_migrations", "proxy_tokens"]);
    let in_public: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' \
         AND table_name IN ('proxy_tokens', '_sqlx_migrations')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(in_public, 0);
}

#[sqlx::test(migrations = false)]
async fn dbcrypt_keys_is_read_never_written(pool: PgPool) {
    coder_db(&pool).await;
    let keys = || async {
        sqlx::query_as::<_, (i32, Option<String>, String)>(
            "SELECT number, active_key_digest, test FROM dbcrypt_keys ORDER BY number",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let before = keys().await;
    let ours = store(&pool, &[key()]);
    ours.migrate().await.unwrap();
    ours.check_coder_database().await.unwrap();
    let user = Uuid::new_v4();
    ours.put_link("github", user, &tokens("a", "r"))
        .await
        .unwrap();
    assert_eq!(keys().await, before);
    // A key coderd never registered: PgStore's native path would register it;
    // Coder mode refuses instead of inserting, and the write fails on Coder's
    // foreign key rather than adding a row.
    let stranger = store(&pool, &[[9; 32]]);
    let e = stranger
        .check_coder_database()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not in Coder's dbcrypt_keys"), "{e}");
    assert!(stranger
        .put_link("github", user, &tokens("b", "s"))
        .await
        .is_err());
    assert_eq!(keys().await, before, "dbcrypt_keys unchanged");
}

#[sqlx::test(migrations = false)]
async fn start_up_refuses_a_revoked_primary_or_rows_under_an_unknown_key(pool: PgPool) {
    coder_db(&pool).await;
    let ours = store(&pool, &[key()]);
    ours.check_coder_database().await.unwrap();
    // A row encrypted with a key coderd has and we do not.
    sqlx::query(
        "INSERT INTO dbcrypt_keys (number, active_key_digest, test) VALUES (2, 'abcdef0', 'x')",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO external_auth_links (provider_id, user_id, created_at, updated_at, \
         oauth_access_token, oauth_access_token_key_id, oauth_refresh_token, oauth_expiry) \
         VALUES ('gh', $1, now(), now(), 'x', 'abcdef0', '', now())",
    )
    .bind(Uuid::new_v4())
    .execute(&pool)
    .await
    .unwrap();
    let e = ours.check_coder_database().await.unwrap_err().to_string();
    assert!(e.contains("abcdef0") && !e.contains('\n'), "{e}");
    sqlx::query("DELETE FROM external_auth_links")
        .execute(&pool)
        .await
        .unwrap();
    // coderd revoked our primary key.
    sqlx::query(
        "UPDATE dbcrypt_keys SET revoked_key_digest = active_key_digest, \
         active_key_digest = NULL, revoked_at = now() WHERE number = 1",
    )
    .execute(&pool)
    .await
    .unwrap();
    let e = ours.check_coder_database().await.unwrap_err().to_string();
    assert!(e.contains("revoked"), "{e}");
    // No lease column: an older Coder.
    sqlx::query("ALTER TABLE external_auth_links DROP COLUMN refresh_lease_expires_at CASCADE")
        .execute(&pool)
        .await
        .unwrap();
    let e = ours.check_coder_database().await.unwrap_err().to_string();
    assert!(e.contains("refresh_lease_expires_at"), "{e}");
}

/// The cost of seeing coderd's writes: one poll of `updated_at` over N watched
/// links (batches of 500 through Coder's unique index). Prints the figures
/// README.md quotes; asserts only that every change is found.
#[sqlx::test(migrations = false)]
async fn poll_cost_for_watched_links(pool: PgPool) {
    coder_db(&pool).await;
    const N: usize = 10_000;
    sqlx::query(
        "INSERT INTO external_auth_links (provider_id, user_id, created_at, updated_at, \
         oauth_access_token, oauth_refresh_token, oauth_expiry) \
         SELECT 'github', gen_random_uuid(), now(), now(), 'a', 'r', now() FROM generate_series(1, $1)",
    )
    .bind(N as i32)
    .execute(&pool)
    .await
    .unwrap();
    let users: Vec<Uuid> = sqlx::query_scalar("SELECT user_id FROM external_auth_links")
        .fetch_all(&pool)
        .await
        .unwrap();
    let ours = store(&pool, &[key()]);
    for n in [1_000, N] {
        for u in &users[..n] {
            ours.get_link("github", *u).await.unwrap();
        }
        assert_eq!(ours.watched_links(), n);
        assert_eq!(ours.poll_changes_once().await.unwrap(), 0);
        let start = Instant::now();
        const POLLS: u32 = 5;
        for _ in 0..POLLS {
            ours.poll_changes_once().await.unwrap();
        }
        let per = start.elapsed() / POLLS;
        println!(
            "poll of {n} watched links: {per:?} per poll ({} statements)",
            n.div_ceil(500)
        );
        assert!(per < Duration::from_secs(60));
    }
    sqlx::query("UPDATE external_auth_links SET updated_at = now() WHERE user_id = ANY($1)")
        .bind(&users[..10])
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(ours.poll_changes_once().await.unwrap(), 10);
}
