//! Acceptance tests of the link stores (issues 2 and 6).
//!
//! The backend-independent behaviours live once in `tests/conformance/` and are
//! instantiated below for Postgres (`postgres_conformance::*`, each test in its own
//! database from `#[sqlx::test]`) and for SQLite (`sqlite_conformance::*`, each
//! test in its own file). What follows the suite is backend-specific: Coder's
//! layout, the NOTIFY feed and `dbcrypt_keys` for Postgres; file creation, WAL,
//! the polling feed and URL dispatch for SQLite.

mod conformance;

use std::time::Duration;

use chrono::{TimeZone, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use tokenproxy::config::EncryptionFormat;
use tokenproxy::crypto::{Keyring, ValueContext};
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{ChangeEvent, LeaseClaim, LinkStore, StoreError};
use uuid::Uuid;

use conformance::suite::next_event;
use conformance::{keyring, tokens, KEY_A};

/// Instantiates each named suite function once per backend.
macro_rules! conformance_suite {
    ($($name:ident),* $(,)?) => {
        mod postgres_conformance {
            $(
                #[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
                async fn $name(pool: sqlx::PgPool) {
                    let backend = crate::conformance::backends::Pg(pool);
                    crate::conformance::suite::$name(&backend).await
                }
            )*
        }
        mod sqlite_conformance {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = crate::conformance::backends::Sqlite::migrated().await;
                    crate::conformance::suite::$name(&backend).await
                }
            )*
        }
    };
}

conformance_suite!(
    put_get_list_delete,
    encrypted_columns_never_hold_plaintext,
    unknown_key_is_a_decrypt_error,
    concurrent_refresh_writes_exactly_one_applies,
    failure_record_against_changed_token_applies_nothing,
    lease_claim_held_changed_and_expiry,
    concurrent_lease_claims_exactly_one_acquires,
    rotation_reencrypts_everything_and_keeps_failure_reasons,
    refresh_write_racing_rotation_is_never_lost,
    proxy_tokens_create_find_list_revoke_touch,
    change_feed_announces_every_applied_change,
    non_rotating_stale_writer_is_fenced,
    lease_extension_is_fenced_by_the_holder,
);

// Migrations start from an empty database, so they are instantiated by hand.

#[sqlx::test(migrations = false)]
async fn postgres_migrations_apply_twice(pool: PgPool) {
    conformance::suite::migrations_apply_twice(&conformance::backends::Pg(pool.clone())).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    let want = tokenproxy::store::postgres::MIGRATOR.iter().count();
    assert_eq!(n as usize, want);
}

#[tokio::test]
async fn sqlite_migrations_apply_twice() {
    let backend = conformance::backends::Sqlite::fresh().await;
    conformance::suite::migrations_apply_twice(&backend).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(backend.pool())
        .await
        .unwrap();
    let want = tokenproxy::store::sqlite::MIGRATOR.iter().count();
    assert_eq!(n as usize, want);
}

// ---- Postgres only ----

#[sqlx::test(migrations = false)]
async fn migrations_serve_beside_an_older_coder_schema(pool: PgPool) {
    // Coder's tables as an older Coder release left them: no failure reason, no
    // lease column, and a row already in place.
    for stmt in [
        "CREATE TABLE dbcrypt_keys (number integer NOT NULL PRIMARY KEY, \
         active_key_digest text UNIQUE, revoked_key_digest text UNIQUE, \
         created_at timestamptz DEFAULT CURRENT_TIMESTAMP, revoked_at timestamptz, \
         test text NOT NULL)",
        "CREATE TABLE external_auth_links (provider_id text NOT NULL, user_id uuid NOT NULL, \
         created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, \
         oauth_access_token text NOT NULL, oauth_refresh_token text NOT NULL, \
         oauth_expiry timestamptz NOT NULL, oauth_access_token_key_id text \
         REFERENCES dbcrypt_keys(active_key_digest), oauth_refresh_token_key_id text \
         REFERENCES dbcrypt_keys(active_key_digest), oauth_extra jsonb, \
         UNIQUE (provider_id, user_id))",
        "INSERT INTO external_auth_links VALUES ('github', \
         '6f9619ff-8b86-d011-b42d-00cf4fc964ff', now(), now(), 'at', 'rt', \
         '0001-01-01 00:00:00+00', NULL, NULL, NULL)",
    ] {
        sqlx::query(stmt).execute(&pool).await.unwrap();
    }
    // Coder's foreign keys stay: the Coder format registers its key first.
    let store = PgStore::from_pool(pool.clone(), keyring(EncryptionFormat::Coder, &[KEY_A]));
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    store.ready().await.unwrap();
    let user: Uuid = "6f9619ff-8b86-d011-b42d-00cf4fc964ff".parse().unwrap();
    let link = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(link.refresh_token.expose_secret(), "rt");
    assert_eq!(link.refresh_failure_reason, "");
    assert_eq!(link.lease_expires_at, None);
    assert!(matches!(
        store
            .claim_refresh_lease(
                "github",
                user,
                &link.refresh_token_stored,
                Duration::from_secs(5)
            )
            .await
            .unwrap(),
        LeaseClaim::Acquired(_)
    ));
    assert!(store
        .write_refreshed("github", user, &link.fence(), &tokens("a1", "r1"))
        .await
        .unwrap());
    let link = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(link.refresh_token.expose_secret(), "r1");
}

/// Inserts a row the way Coder does (raw SQL, Coder's columns only).
async fn insert_coder_row(
    pool: &PgPool,
    user: Uuid,
    access: (&str, Option<&str>),
    refresh: (&str, Option<&str>),
    expiry: &str,
) {
    sqlx::query(
        "INSERT INTO external_auth_links (provider_id, user_id, created_at, updated_at, \
         oauth_access_token, oauth_access_token_key_id, oauth_refresh_token, \
         oauth_refresh_token_key_id, oauth_expiry, oauth_extra) \
         VALUES ('github', $1, now(), now(), $2, $3, $4, $5, $6::timestamptz, NULL)",
    )
    .bind(user)
    .bind(access.0)
    .bind(access.1)
    .bind(refresh.0)
    .bind(refresh.1)
    .bind(expiry)
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn reads_rows_written_in_coders_layout(pool: PgPool) {
    // Plain text, Go's zero expiry ("never").
    let plain_user = Uuid::new_v4();
    insert_coder_row(
        &pool,
        plain_user,
        ("gho_plain", None),
        ("ghr_plain", None),
        "0001-01-01 00:00:00+00",
    )
    .await;
    // Encrypted the way Coder's dbcrypt does, independently of this crate: the
    // known-answer ciphertext from tests/crypto.rs (key 00..1f).
    let enc_user = Uuid::new_v4();
    let key_id = "6d28cf8";
    let ciphertext = "oKGio6SlpqeoqaqrgXATcjGucctPBOSwYgmz8wTDMnX8RAt1mZnq0n0Mc5kKaHWpQw==";
    insert_coder_row(
        &pool,
        enc_user,
        (ciphertext, Some(key_id)),
        ("", None),
        "2031-05-06 07:08:09.123456+00",
    )
    .await;

    let kat_key: [u8; 32] = std::array::from_fn(|i| i as u8);
    let store = PgStore::from_pool(pool, keyring(EncryptionFormat::Coder, &[kat_key]));
    let plain = store.get_link("github", plain_user).await.unwrap().unwrap();
    assert_eq!(plain.access_token.expose_secret(), "gho_plain");
    assert_eq!(plain.refresh_token.expose_secret(), "ghr_plain");
    assert_eq!(plain.expiry, None, "zero time means never");
    assert_eq!(plain.extra, None);
    assert_eq!(plain.refresh_failure_reason, "");
    assert_eq!(plain.lease_expires_at, None);

    let enc = store.get_link("github", enc_user).await.unwrap().unwrap();
    assert_eq!(enc.access_token.expose_secret(), "gho_test-access-token");
    assert_eq!(enc.refresh_token.expose_secret(), "");
    let want = Utc.with_ymd_and_hms(2031, 5, 6, 7, 8, 9).unwrap()
        + chrono::Duration::microseconds(123_456);
    assert_eq!(enc.expiry, Some(want));

    let listed = store.list_links(None).await.unwrap();
    assert_eq!(listed.len(), 2);
    let by_user = |u| listed.iter().find(|l| l.user_id == u).unwrap();
    assert!(!by_user(plain_user).encrypted && by_user(plain_user).has_refresh_token);
    assert!(by_user(enc_user).encrypted && !by_user(enc_user).has_refresh_token);
    assert_eq!(store.list_links(Some(enc_user)).await.unwrap().len(), 1);

    // A "never" expiry is written back as Coder's zero time.
    let mut never = tokens("a", "r");
    never.expiry = None;
    store.put_link("github", plain_user, &never).await.unwrap();
    let raw: String = sqlx::query_scalar(
        "SELECT to_char(oauth_expiry AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') \
         FROM external_auth_links WHERE user_id = $1",
    )
    .bind(plain_user)
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(raw, "0001-01-01 00:00:00");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn coder_format_registers_its_key_like_coder(pool: PgPool) {
    let kr = keyring(EncryptionFormat::Coder, &[KEY_A]);
    let id = kr.primary_key_id().unwrap().to_owned();
    let store = PgStore::from_pool(pool.clone(), kr);
    store
        .put_link("github", Uuid::new_v4(), &tokens("a", "r"))
        .await
        .unwrap();
    store
        .put_link("github", Uuid::new_v4(), &tokens("a", "r"))
        .await
        .unwrap();
    // A second replica does not register it twice.
    let other = PgStore::from_pool(pool.clone(), keyring(EncryptionFormat::Coder, &[KEY_A]));
    other.ensure_key_registered().await.unwrap();
    let rows: Vec<(i32, Option<String>, String)> =
        sqlx::query_as("SELECT number, active_key_digest, test FROM dbcrypt_keys")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, 1);
    assert_eq!(rows[0].1.as_deref(), Some(id.as_str()));
    // Coder checks a key by decrypting `test` to "coder".
    let ctx = ValueContext {
        provider_id: "",
        user_id: Uuid::nil(),
        column: "test",
    };
    let test = store.keyring().open(&rows[0].2, Some(&id), ctx).unwrap();
    assert_eq!(test.expose_secret(), "coder");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn change_feed_announces_writes_and_resyncs(pool: PgPool) {
    let store = PgStore::from_pool(pool.clone(), keyring(EncryptionFormat::Native, &[KEY_A]));
    let mut rx = store.watch_changes().await.unwrap();
    assert_eq!(next_event(&mut rx).await, ChangeEvent::Resync);
    let user = Uuid::new_v4();
    let ev = |p: &str| ChangeEvent::Link {
        provider_id: p.to_owned(),
        user_id: user,
    };

    store
        .put_link("github", user, &tokens("a0", "r0"))
        .await
        .unwrap();
    assert_eq!(next_event(&mut rx).await, ev("github"));
    let read = store.get_link("github", user).await.unwrap().unwrap();
    assert!(store
        .write_refreshed("github", user, &read.fence(), &tokens("a1", "r1"))
        .await
        .unwrap());
    assert_eq!(next_event(&mut rx).await, ev("github"));
    // A write that does not apply announces nothing: the next event is gitlab's.
    assert!(!store
        .write_refreshed("github", user, &read.fence(), &tokens("a2", "r2"))
        .await
        .unwrap());
    store
        .put_link("gitlab", user, &tokens("a0", "r0"))
        .await
        .unwrap();
    assert_eq!(next_event(&mut rx).await, ev("gitlab"));
    assert!(store.delete_link("github", user).await.unwrap());
    assert_eq!(next_event(&mut rx).await, ev("github"));
    assert!(!store.delete_link("github", user).await.unwrap());

    // Kill the listener's connection: the feed says Resync and keeps working.
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(killed, vec![true]);
    // When the connection's death surfaces as an error, `Lost` comes first.
    let mut event = next_event(&mut rx).await;
    if event == ChangeEvent::Lost {
        event = next_event(&mut rx).await;
    }
    assert_eq!(event, ChangeEvent::Resync);
    store
        .put_link("github", user, &tokens("a3", "r3"))
        .await
        .unwrap();
    assert_eq!(next_event(&mut rx).await, ev("github"));
}

#[tokio::test]
async fn unreachable_database_is_unavailable() {
    let cfg = tokenproxy::config::DatabaseConfig {
        // Port 1 on loopback: nothing listens there.
        url: SecretString::from("postgres://postgres@127.0.0.1:1/none"),
        migrate_on_start: false,
        max_connections: 1,
        acquire_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let store = PgStore::connect(&cfg, Keyring::plaintext()).unwrap();
    let err = store.get_link("github", Uuid::new_v4()).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(matches!(
        store.ready().await.unwrap_err(),
        StoreError::Unavailable(_)
    ));
}

/// A rotated refresh token exists only in the row the store writes: on a server
/// whose default is `synchronous_commit = off`, an acknowledged commit can vanish
/// in a crash (the chaos suite lost a link that way to an immediate restart). The
/// store's own connections commit synchronously whatever the server's default.
#[sqlx::test(migrations = false)]
async fn store_connections_commit_synchronously_whatever_the_server_default(pool: PgPool) {
    let db = pool
        .connect_options()
        .get_database()
        .expect("sqlx::test names its database")
        .to_string();
    sqlx::query(&format!(
        "ALTER DATABASE \"{db}\" SET synchronous_commit = off"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL names the test server");
    let mut url = url::Url::parse(&base).unwrap();
    url.set_path(&db);
    let cfg = tokenproxy::config::DatabaseConfig {
        url: SecretString::from(url.to_string()),
        max_connections: 2,
        ..Default::default()
    };
    // A plain connection to that database gets the server's default …
    let plain: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&PgPool::connect(url.as_str()).await.unwrap())
        .await
        .unwrap();
    assert_eq!(plain, "off", "the database default did not take");
    // … the store's connections do not.
    let store = PgStore::connect(&cfg, Keyring::plaintext()).unwrap();
    for _ in 0..2 {
        let mut conn = store.pool().acquire().await.unwrap();
        let mode: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(mode, "on");
    }
}

// ---- SQLite only ----

#[tokio::test]
async fn sqlite_creates_its_directory_and_file_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = conformance::backends::Sqlite::config_in(dir.path());
    let file = dir.path().join("data").join("tokenproxy.db");
    assert!(!file.parent().unwrap().exists());
    let store = tokenproxy::store::open(&cfg, Keyring::plaintext()).unwrap();
    store.migrate().await.unwrap();
    store.ready().await.unwrap();
    assert!(file.is_file(), "the database file was created");
    let pool = tokenproxy::store::sqlite::SqliteStore::connect(&cfg, Keyring::plaintext())
        .unwrap()
        .pool()
        .clone();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(fk, 1);
    // FULL: a committed refresh survives power loss.
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(sync, 2);
}

#[tokio::test]
async fn sqlite_feed_resyncs_when_changes_were_pruned_unseen() {
    let backend = conformance::backends::Sqlite::migrated().await;
    let store = conformance::Backend::store(&backend, Keyring::plaintext()).await;
    let mut rx = store.watch_changes().await.unwrap();
    assert_eq!(next_event(&mut rx).await, ChangeEvent::Resync);
    // Changes the feed never saw are gone: it cannot tell what changed.
    sqlx::query(
        "INSERT INTO link_changes (seq, provider_id, user_id) \
         SELECT coalesce(max(seq), 0) + 5, 'github', ?1 FROM link_changes",
    )
    .bind(Uuid::new_v4().to_string())
    .execute(backend.pool())
    .await
    .unwrap();
    assert_eq!(next_event(&mut rx).await, ChangeEvent::Resync);
    // And then it goes on announcing.
    let user = Uuid::new_v4();
    store
        .put_link("github", user, &tokens("a", "r"))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut rx).await,
        ChangeEvent::Link {
            provider_id: "github".into(),
            user_id: user
        }
    );
}

#[tokio::test]
async fn sqlite_timestamps_use_one_sortable_shape() {
    let backend = conformance::backends::Sqlite::migrated().await;
    let store = conformance::Backend::store(&backend, Keyring::plaintext()).await;
    let user = Uuid::new_v4();
    store
        .put_link("github", user, &tokens("a0", "r0"))
        .await
        .unwrap();
    let link = store.get_link("github", user).await.unwrap().unwrap();
    let LeaseClaim::Acquired(lease) = store
        .claim_refresh_lease(
            "github",
            user,
            &link.refresh_token_stored,
            Duration::from_millis(1500),
        )
        .await
        .unwrap()
    else {
        panic!("claim must acquire")
    };
    let (created, expiry, leased): (String, String, String) = sqlx::query_as(
        "SELECT created_at, oauth_expiry, refresh_lease_expires_at FROM external_auth_links",
    )
    .fetch_one(backend.pool())
    .await
    .unwrap();
    let shape = |s: &str| {
        s.len() == "2026-01-01T00:00:00.000000Z".len() && s.ends_with('Z') && &s[10..11] == "T"
    };
    assert!(shape(&created), "{created}");
    assert_eq!(expiry, "2030-01-02T03:04:05.000000Z");
    assert!(shape(&leased), "{leased}");
    // The lease is 1.5 s after the database clock's "now" at the claim.
    let span = lease.expires_at - link.updated_at;
    assert!(span >= chrono::Duration::milliseconds(1500), "{span}");
}

#[test]
fn backend_is_chosen_by_url_scheme() {
    use tokenproxy::store::Backend;
    for (url, want) in [
        ("postgres://u@h/db", Backend::Postgres),
        ("postgresql://u@h/db", Backend::Postgres),
        ("sqlite://./data/tokenproxy.db", Backend::Sqlite),
        ("sqlite:///var/lib/tokenproxy.db", Backend::Sqlite),
        ("sqlite:tokenproxy.db", Backend::Sqlite),
    ] {
        assert_eq!(Backend::of_url(url).unwrap(), want, "{url}");
    }
    let cfg = tokenproxy::config::DatabaseConfig {
        url: SecretString::from("mysql://user:hunter2@h/db"),
        ..Default::default()
    };
    let err = tokenproxy::store::open(&cfg, Keyring::plaintext())
        .err()
        .expect("mysql is refused");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_replicas_migrating_at_once_both_succeed() {
    // Two processes started together both migrate on start; sqlx takes no lock
    // for SQLite, so the store must absorb the race.
    for _ in 0..5 {
        let backend = conformance::backends::Sqlite::fresh().await;
        let stores: Vec<_> = [(); 3]
            .iter()
            .map(|_| {
                let cfg = backend.config();
                tokio::spawn(async move {
                    let store = tokenproxy::store::open(&cfg, Keyring::plaintext()).unwrap();
                    store.migrate().await
                })
            })
            .collect();
        for s in stores {
            s.await.unwrap().unwrap();
        }
        let store = conformance::Backend::store(&backend, Keyring::plaintext()).await;
        store.ready().await.unwrap();
    }
}

/// The PostgreSQL count classifies in SQL where the columns decide and decrypts
/// only the rest: with encryption on (where "no refresh token" is a ciphertext)
/// it must agree with classifying every listed link, for every kind of row.
#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn link_states_counted_in_the_database_agree_with_every_listed_link(pool: PgPool) {
    use tokenproxy::store::{LinkState, LinkStates};
    for format in [EncryptionFormat::Coder, EncryptionFormat::Native] {
        sqlx::query("DELETE FROM external_auth_links")
            .execute(&pool)
            .await
            .unwrap();
        let store = PgStore::from_pool(pool.clone(), keyring(format, &[KEY_A]));
        let now = Utc::now();
        let hours = |h: i64| Some(now + chrono::Duration::hours(h));
        // (refresh token, expiry, failure): every branch of LinkState::of.
        let rows = [
            ("r", hours(-1), ""),   // ok: expired but refreshable
            ("r", hours(1), ""),    // ok
            ("r", None, ""),        // ok: never expires
            ("", None, ""),         // ok: no refresh token, never expires
            ("", hours(48), ""),    // ok: no refresh token, far from expiry
            ("", hours(1), ""),     // expiring_soon
            ("", hours(-1), ""),    // reauth_required: expired, nothing to refresh with
            ("r", hours(1), "bad"), // reauth_required: recorded failure
        ];
        for (refresh, expiry, failure) in rows {
            let user = Uuid::new_v4();
            let mut set = tokens("a", refresh);
            set.expiry = expiry;
            store.put_link("p", user, &set).await.unwrap();
            sqlx::query("UPDATE external_auth_links SET oauth_refresh_failure_reason = $1 WHERE user_id = $2")
                .bind(failure)
                .bind(user)
                .execute(&pool)
                .await
                .unwrap();
        }
        let mut listed = LinkStates::default();
        for link in store.list_links(None).await.unwrap() {
            match LinkState::of(&link, now) {
                LinkState::Ok => listed.ok += 1,
                LinkState::ExpiringSoon => listed.expiring_soon += 1,
                LinkState::ReauthRequired => listed.reauth_required += 1,
            }
        }
        let expected = LinkStates {
            ok: 5,
            expiring_soon: 1,
            reauth_required: 2,
        };
        assert_eq!(listed, expected, "{format:?}: the listing itself");
        assert_eq!(
            store.count_link_states(now).await.unwrap(),
            expected,
            "{format:?}"
        );
    }
}
