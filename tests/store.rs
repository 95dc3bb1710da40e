//! Acceptance tests of the Postgres link store (issue 2): migrations, Coder's row
//! layout, at-rest encryption, compare-and-swap writes, leases, rotation and the
//! change feed. Each test gets its own database from `#[sqlx::test]`.

mod support;

use std::time::Duration;

use chrono::{TimeZone, Utc};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sqlx::PgPool;
use tokenproxy::config::EncryptionFormat;
use tokenproxy::crypto::{Keyring, ValueContext};
use tokenproxy::store::postgres::{PgStore, MIGRATOR};
use tokenproxy::store::{
    ChangeEvent, LeaseClaim, LinkStore, NewProxyToken, StoreError, StoredSecret, TokenSet,
};
use uuid::Uuid;

const KEY_A: [u8; 32] = [0x11; 32];

fn keyring(format: EncryptionFormat, keys: &[[u8; 32]]) -> Keyring {
    Keyring::new(
        keys.iter().map(|k| SecretBox::new(Box::new(*k))).collect(),
        format,
    )
}

fn tokens(access: &str, refresh: &str) -> TokenSet {
    TokenSet {
        access_token: SecretString::from(access.to_owned()),
        refresh_token: SecretString::from(refresh.to_owned()),
        expiry: Some(Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap()),
        extra: Some(serde_json::json!({"scope": "repo"})),
    }
}

#[sqlx::test(migrations = false)]
async fn migrations_apply_twice(pool: PgPool) {
    let store = PgStore::from_pool(pool.clone(), Keyring::plaintext());
    assert!(store.ready().await.is_err(), "not ready before migrating");
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    MIGRATOR.run(&pool).await.unwrap();
    store.ready().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n as usize, MIGRATOR.iter().count());
}

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
        .write_refreshed(
            "github",
            user,
            &link.refresh_token_stored,
            &tokens("a1", "r1")
        )
        .await
        .unwrap());
    let link = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(link.refresh_token.expose_secret(), "r1");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn plaintext_put_get_roundtrip(pool: PgPool) {
    let store = PgStore::from_pool(pool, Keyring::plaintext());
    let user = Uuid::new_v4();
    store
        .put_link("github", user, &tokens("at1", "rt1"))
        .await
        .unwrap();
    let link = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(link.access_token.expose_secret(), "at1");
    assert_eq!(link.refresh_token.expose_secret(), "rt1");
    assert_eq!(link.refresh_token_stored.0, "rt1");
    assert_eq!(link.expiry, tokens("", "").expiry);
    assert_eq!(link.extra, Some(serde_json::json!({"scope": "repo"})));
    assert!(store.get_link("gitlab", user).await.unwrap().is_none());
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn encrypted_columns_never_hold_plaintext(pool: PgPool) {
    for format in [EncryptionFormat::Coder, EncryptionFormat::Native] {
        let store = PgStore::from_pool(pool.clone(), keyring(format, &[KEY_A]));
        let user = Uuid::new_v4();
        store
            .put_link("github", user, &tokens("secret-access", "secret-refresh"))
            .await
            .unwrap();
        let (a, r, aid, rid): (String, String, Option<String>, Option<String>) = sqlx::query_as(
            "SELECT oauth_access_token, oauth_refresh_token, oauth_access_token_key_id, \
             oauth_refresh_token_key_id FROM external_auth_links WHERE user_id = $1",
        )
        .bind(user)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(!a.contains("secret") && !r.contains("secret"));
        assert_eq!(aid, store.keyring().primary_key_id().map(str::to_owned));
        assert_eq!(rid, aid);
        let link = store.get_link("github", user).await.unwrap().unwrap();
        assert_eq!(link.access_token.expose_secret(), "secret-access");
        assert_eq!(link.refresh_token.expose_secret(), "secret-refresh");
    }
}

const KEY_B: [u8; 32] = [0x22; 32];

fn stored(s: &str) -> StoredSecret {
    StoredSecret(s.to_owned())
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
async fn concurrent_refresh_writes_exactly_one_applies(pool: PgPool) {
    for format in [EncryptionFormat::Native, EncryptionFormat::Coder] {
        let a = PgStore::from_pool(pool.clone(), keyring(format, &[KEY_A]));
        let b = PgStore::from_pool(pool.clone(), keyring(format, &[KEY_A]));
        for _ in 0..10 {
            let user = Uuid::new_v4();
            a.put_link("github", user, &tokens("a0", "r0"))
                .await
                .unwrap();
            let old = a.get_link("github", user).await.unwrap().unwrap();
            let (t1, t2) = (tokens("a1", "r1"), tokens("a2", "r2"));
            let old = &old.refresh_token_stored;
            let (ra, rb) = tokio::join!(
                a.write_refreshed("github", user, old, &t1),
                b.write_refreshed("github", user, old, &t2),
            );
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            assert!(ra ^ rb, "exactly one write applies (got {ra}, {rb})");
            let now = a.get_link("github", user).await.unwrap().unwrap();
            let want = if ra { "r1" } else { "r2" };
            assert_eq!(now.refresh_token.expose_secret(), want);
        }
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn failure_record_against_changed_token_applies_nothing(pool: PgPool) {
    let store = PgStore::from_pool(pool, keyring(EncryptionFormat::Native, &[KEY_A]));
    let user = Uuid::new_v4();
    store
        .put_link("github", user, &tokens("a0", "r0"))
        .await
        .unwrap();
    let old = store.get_link("github", user).await.unwrap().unwrap();
    assert!(store
        .write_refreshed(
            "github",
            user,
            &old.refresh_token_stored,
            &tokens("a1", "r1")
        )
        .await
        .unwrap());
    let applied = store
        .record_refresh_failure(
            "github",
            user,
            &old.refresh_token_stored,
            None,
            "invalid_grant",
        )
        .await
        .unwrap();
    assert!(!applied);
    let now = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(now.refresh_failure_reason, "");
    assert_eq!(now.refresh_token.expose_secret(), "r1");
    // Against the current token it applies, and a refresh/put clears it.
    assert!(store
        .record_refresh_failure(
            "github",
            user,
            &now.refresh_token_stored,
            None,
            "invalid_grant"
        )
        .await
        .unwrap());
    let failed = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(failed.refresh_failure_reason, "invalid_grant");
    store
        .put_link("github", user, &tokens("a2", "r2"))
        .await
        .unwrap();
    let relinked = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(relinked.refresh_failure_reason, "");
    // A lost link is reported as not applied, not as an error.
    assert!(!store
        .write_refreshed("github", Uuid::new_v4(), &stored("x"), &tokens("a", "r"))
        .await
        .unwrap());
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn lease_claim_held_changed_and_expiry(pool: PgPool) {
    let store = PgStore::from_pool(pool.clone(), keyring(EncryptionFormat::Native, &[KEY_A]));
    let user = Uuid::new_v4();
    let lease_for = Duration::from_secs(30);
    store
        .put_link("github", user, &tokens("a0", "r0"))
        .await
        .unwrap();
    let old = store.get_link("github", user).await.unwrap().unwrap();
    let old_stored = &old.refresh_token_stored;

    let LeaseClaim::Acquired(first) = store
        .claim_refresh_lease("github", user, old_stored, lease_for)
        .await
        .unwrap()
    else {
        panic!("first claim must acquire")
    };
    match store
        .claim_refresh_lease("github", user, old_stored, lease_for)
        .await
        .unwrap()
    {
        LeaseClaim::Held { until } => assert_eq!(until, first.expires_at),
        other => panic!("expected Held, got {other:?}"),
    }
    assert!(matches!(
        store
            .claim_refresh_lease("github", user, &stored("not-it"), lease_for)
            .await
            .unwrap(),
        LeaseClaim::Changed
    ));
    assert!(matches!(
        store
            .claim_refresh_lease("gitlab", user, old_stored, lease_for)
            .await
            .unwrap(),
        LeaseClaim::Changed
    ));

    // The holder crashes; its lease runs out (database clock, no sleeping).
    sqlx::query(
        "UPDATE external_auth_links SET refresh_lease_expires_at = now() - interval '1s' \
         WHERE user_id = $1",
    )
    .bind(user)
    .execute(&pool)
    .await
    .unwrap();
    let LeaseClaim::Acquired(second) = store
        .claim_refresh_lease("github", user, old_stored, lease_for)
        .await
        .unwrap()
    else {
        panic!("an expired lease can be claimed")
    };
    assert_ne!(second.expires_at, first.expires_at);

    // The old holder is fenced off: its failure record and release do nothing.
    assert!(!store
        .record_refresh_failure("github", user, old_stored, Some(&first), "invalid_grant")
        .await
        .unwrap());
    store.release_refresh_lease(&first).await.unwrap();
    let row = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(row.lease_expires_at, Some(second.expires_at));
    assert_eq!(row.refresh_failure_reason, "");

    // The current holder's failure record applies and releases the lease.
    assert!(store
        .record_refresh_failure("github", user, old_stored, Some(&second), "invalid_grant")
        .await
        .unwrap());
    let row = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(row.lease_expires_at, None);
    assert_eq!(row.refresh_failure_reason, "invalid_grant");

    // Release of a held lease frees it; a successful refresh write clears it.
    let LeaseClaim::Acquired(third) = store
        .claim_refresh_lease("github", user, old_stored, lease_for)
        .await
        .unwrap()
    else {
        panic!("released lease can be claimed")
    };
    store.release_refresh_lease(&third).await.unwrap();
    let LeaseClaim::Acquired(_fourth) = store
        .claim_refresh_lease("github", user, old_stored, lease_for)
        .await
        .unwrap()
    else {
        panic!("released lease can be claimed again")
    };
    assert!(store
        .write_refreshed("github", user, old_stored, &tokens("a1", "r1"))
        .await
        .unwrap());
    let row = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(row.lease_expires_at, None);
    assert_eq!(row.refresh_failure_reason, "");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn rotation_reencrypts_everything_and_keeps_failure_reasons(pool: PgPool) {
    let old = PgStore::from_pool(pool.clone(), keyring(EncryptionFormat::Coder, &[KEY_A]));
    let users: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for (i, u) in users.iter().enumerate() {
        old.put_link("github", *u, &tokens(&format!("a{i}"), &format!("r{i}")))
            .await
            .unwrap();
    }
    // One plain-text row from before encryption was turned on.
    let plain_user = Uuid::new_v4();
    insert_coder_row(
        &pool,
        plain_user,
        ("plain-a", None),
        ("plain-r", None),
        "0001-01-01 00:00:00+00",
    )
    .await;
    let failed = old.get_link("github", users[0]).await.unwrap().unwrap();
    assert!(old
        .record_refresh_failure(
            "github",
            users[0],
            &failed.refresh_token_stored,
            None,
            "bad"
        )
        .await
        .unwrap());

    // New first key, native format; the old key still decrypts.
    let rotating = PgStore::from_pool(
        pool.clone(),
        keyring(EncryptionFormat::Native, &[KEY_B, KEY_A]),
    );
    let report = rotating.rotate_keys().await.unwrap();
    assert_eq!(report.rotated, 6);
    assert_eq!(report.raced, 0);
    assert_eq!(rotating.rotate_keys().await.unwrap().unchanged, 6);

    let new_only = PgStore::from_pool(pool.clone(), keyring(EncryptionFormat::Native, &[KEY_B]));
    for (i, u) in users.iter().enumerate() {
        let link = new_only.get_link("github", *u).await.unwrap().unwrap();
        assert_eq!(link.access_token.expose_secret(), format!("a{i}"));
        assert_eq!(link.refresh_token.expose_secret(), format!("r{i}"));
    }
    let plain = new_only
        .get_link("github", plain_user)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(plain.refresh_token.expose_secret(), "plain-r");
    let still_failed = new_only
        .get_link("github", users[0])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(still_failed.refresh_failure_reason, "bad");
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM external_auth_links WHERE oauth_access_token LIKE 'plain%' \
         OR oauth_access_token_key_id IS DISTINCT FROM $1",
    )
    .bind(new_only.keyring().primary_key_id())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(leftovers, 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn refresh_write_racing_rotation_is_never_lost(pool: PgPool) {
    // A replica that has not switched yet: writes with the old key, knows both.
    let refresher = PgStore::from_pool(
        pool.clone(),
        keyring(EncryptionFormat::Coder, &[KEY_A, KEY_B]),
    );
    let rotator = PgStore::from_pool(
        pool.clone(),
        keyring(EncryptionFormat::Native, &[KEY_B, KEY_A]),
    );
    // Deterministic interleaving: the refresher reads, rotation re-encrypts the
    // row, then the refresher writes against the value it read.
    let user = Uuid::new_v4();
    refresher
        .put_link("github", user, &tokens("a0", "r0"))
        .await
        .unwrap();
    let read = refresher.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(rotator.rotate_keys().await.unwrap().rotated, 1);
    assert!(refresher
        .write_refreshed(
            "github",
            user,
            &read.refresh_token_stored,
            &tokens("a1", "r1")
        )
        .await
        .unwrap());
    let now = rotator.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(now.refresh_token.expose_secret(), "r1");

    // Likewise a failure record against a token that was only re-encrypted.
    assert_eq!(rotator.rotate_keys().await.unwrap().rotated, 1);
    assert!(refresher
        .record_refresh_failure("github", user, &now.refresh_token_stored, None, "revoked")
        .await
        .unwrap());
    let now = rotator.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(now.refresh_failure_reason, "revoked");

    // Truly concurrent: many refreshes while rotations run; every one lands.
    let users: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        refresher
            .put_link("github", *u, &tokens("a0", "r0"))
            .await
            .unwrap();
    }
    let mut reads = Vec::new();
    for u in &users {
        reads.push(refresher.get_link("github", *u).await.unwrap().unwrap());
    }
    let writes = async {
        let mut applied = 0;
        for (u, read) in users.iter().zip(&reads) {
            let ok = refresher
                .write_refreshed(
                    "github",
                    *u,
                    &read.refresh_token_stored,
                    &tokens("a1", "r1"),
                )
                .await
                .unwrap();
            applied += usize::from(ok);
        }
        applied
    };
    let rotations = async {
        for _ in 0..3 {
            rotator.rotate_keys().await.unwrap();
        }
    };
    let (applied, ()) = tokio::join!(writes, rotations);
    assert_eq!(applied, users.len());
    for u in &users {
        let link = rotator.get_link("github", *u).await.unwrap().unwrap();
        assert_eq!(link.refresh_token.expose_secret(), "r1");
    }
}

async fn next(rx: &mut tokio::sync::mpsc::Receiver<ChangeEvent>) -> ChangeEvent {
    // A bound so a broken feed fails the test instead of hanging it.
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("change event within the bound")
        .expect("feed open")
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn change_feed_announces_writes_and_resyncs(pool: PgPool) {
    let store = PgStore::from_pool(pool.clone(), keyring(EncryptionFormat::Native, &[KEY_A]));
    let mut rx = store.watch_changes().await.unwrap();
    assert_eq!(next(&mut rx).await, ChangeEvent::Resync);
    let user = Uuid::new_v4();
    let ev = |p: &str| ChangeEvent::Link {
        provider_id: p.to_owned(),
        user_id: user,
    };

    store
        .put_link("github", user, &tokens("a0", "r0"))
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await, ev("github"));
    let read = store.get_link("github", user).await.unwrap().unwrap();
    assert!(store
        .write_refreshed(
            "github",
            user,
            &read.refresh_token_stored,
            &tokens("a1", "r1")
        )
        .await
        .unwrap());
    assert_eq!(next(&mut rx).await, ev("github"));
    // A write that does not apply announces nothing: the next event is gitlab's.
    assert!(!store
        .write_refreshed(
            "github",
            user,
            &read.refresh_token_stored,
            &tokens("a2", "r2")
        )
        .await
        .unwrap());
    store
        .put_link("gitlab", user, &tokens("a0", "r0"))
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await, ev("gitlab"));
    assert!(store.delete_link("github", user).await.unwrap());
    assert_eq!(next(&mut rx).await, ev("github"));
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
    assert_eq!(next(&mut rx).await, ChangeEvent::Resync);
    store
        .put_link("github", user, &tokens("a3", "r3"))
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await, ev("github"));
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn proxy_tokens_create_find_list_revoke_touch(pool: PgPool) {
    let store = PgStore::from_pool(pool, Keyring::plaintext());
    let user = Uuid::new_v4();
    let hash = [7u8; 32];
    let created = store
        .create_proxy_token(&NewProxyToken {
            user_id: user,
            name: "laptop".into(),
            hash,
            providers: vec!["github".into()],
            expires_at: None,
        })
        .await
        .unwrap();
    assert_eq!(created.providers, vec!["github".to_owned()]);
    assert!(created.last_used_at.is_none() && created.revoked_at.is_none());
    let found = store.find_proxy_token(&hash).await.unwrap().unwrap();
    assert_eq!(found.id, created.id);
    assert!(store.find_proxy_token(&[8u8; 32]).await.unwrap().is_none());
    // The same hash twice is refused.
    let dup = store
        .create_proxy_token(&NewProxyToken {
            user_id: user,
            name: "again".into(),
            hash,
            providers: vec![],
            expires_at: None,
        })
        .await;
    assert!(matches!(dup, Err(StoreError::Other(_))));

    store.touch_proxy_token(created.id).await.unwrap();
    assert!(store
        .find_proxy_token(&hash)
        .await
        .unwrap()
        .unwrap()
        .last_used_at
        .is_some());
    assert_eq!(store.list_proxy_tokens(Some(user)).await.unwrap().len(), 1);
    assert_eq!(
        store
            .list_proxy_tokens(Some(Uuid::new_v4()))
            .await
            .unwrap()
            .len(),
        0
    );
    assert_eq!(store.list_proxy_tokens(None).await.unwrap().len(), 1);
    assert!(store.revoke_proxy_token(created.id).await.unwrap());
    assert!(!store.revoke_proxy_token(created.id).await.unwrap());
    let revoked = store.find_proxy_token(&hash).await.unwrap().unwrap();
    assert!(revoked.revoked_at.is_some());
}

#[tokio::test]
async fn unreachable_database_is_unavailable() {
    let cfg = tokenproxy::config::DatabaseConfig {
        // Port 1 on loopback: nothing listens there.
        url: SecretString::from("postgres://postgres@127.0.0.1:1/none"),
        migrate_on_start: false,
        max_connections: 1,
        acquire_timeout: Duration::from_millis(500),
    };
    let store = PgStore::connect(&cfg, Keyring::plaintext()).unwrap();
    let err = store.get_link("github", Uuid::new_v4()).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(matches!(
        store.ready().await.unwrap_err(),
        StoreError::Unavailable(_)
    ));
}
