//! Acceptance tests of the Postgres link store (issue 2): migrations, Coder's row
//! layout, at-rest encryption, compare-and-swap writes, leases, rotation and the
//! change feed. Each test gets its own database from `#[sqlx::test]`.

mod support;

use chrono::{TimeZone, Utc};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sqlx::PgPool;
use tokenproxy::config::EncryptionFormat;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::{PgStore, MIGRATOR};
use tokenproxy::store::{LinkStore, TokenSet};
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
