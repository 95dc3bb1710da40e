//! `/_tokenproxy/links`: a caller lists its own links with its proxy token —
//! which providers are linked, expiries and failure reasons, never a token value
//! and never another user's link.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::sync::Arc;

use harness::{bearer, create_token, get, FakeTokens, Harness};
use secrecy::SecretString;
use sqlx::PgPool;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{LinkStore, TokenSet};
use uuid::Uuid;

const CONFIG: &str = r#"
[[providers]]
id = "gh"
client_id = "c"
token_url = "https://t.example/token"
  [[providers.routes]]
  prefix = "/gh/api"
  upstream = "https://api.example"

[[providers]]
id = "gl"
client_id = "c"
token_url = "https://t.example/token"

[[providers]]
id = "other"
client_id = "c"
token_url = "https://t.example/token"
"#;

fn set(access: &str, refresh: &str) -> TokenSet {
    TokenSet {
        access_token: SecretString::from(access.to_string()),
        refresh_token: SecretString::from(refresh.to_string()),
        expiry: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
        extra: None,
    }
}

#[sqlx::test]
async fn a_caller_lists_its_own_links_without_token_values(pool: PgPool) {
    let store: Arc<dyn LinkStore> =
        Arc::new(PgStore::from_pool(pool.clone(), Keyring::plaintext()));
    let me = Uuid::new_v4();
    let someone = Uuid::new_v4();
    store
        .put_link("gh", me, &set("gho_SECRET_ACCESS", "ghr_SECRET_REFRESH"))
        .await
        .unwrap();
    store
        .put_link("gl", me, &set("glpat_SECRET", ""))
        .await
        .unwrap();
    // As a refresh that met invalid_grant leaves it.
    sqlx::query("UPDATE external_auth_links SET oauth_refresh_failure_reason = 'invalid_grant' WHERE provider_id = 'gl'")
        .execute(&pool)
        .await
        .unwrap();
    store
        .put_link("gh", someone, &set("gho_NOT_MINE", "x"))
        .await
        .unwrap();
    // Limited to gh and gl: `other` is not listed at all.
    let (_, token) = create_token(&*store, me, &["gh", "gl"]).await;
    let proxy = Harness::start(harness::config(CONFIG), store.clone(), FakeTokens::new()).await;

    let (k, v) = bearer(&token);
    let a = get(&proxy.url("/_tokenproxy/links"), &[(&k, &v)]).await;
    let text = String::from_utf8_lossy(&a.body).to_string();
    assert_eq!(a.status, 200, "{text}");
    for secret in ["SECRET", "NOT_MINE"] {
        assert!(!text.contains(secret), "{text}");
    }
    let body = a.json();
    assert_eq!(body["user"], me.to_string());
    let links = body["links"].as_array().unwrap();
    assert_eq!(links.len(), 2, "{body}");
    assert_eq!(links[0]["provider"], "gh");
    assert_eq!(links[0]["linked"], true);
    assert_eq!(links[0]["has_refresh_token"], true);
    assert_eq!(links[0]["relink_needed"], false);
    assert!(links[0]["access_expiry"].is_string());
    assert_eq!(links[1]["provider"], "gl");
    assert_eq!(links[1]["failure_reason"], "invalid_grant");
    assert_eq!(links[1]["relink_needed"], true);

    // A user with no link sees its providers unlinked.
    let (_, fresh) = create_token(&*store, Uuid::new_v4(), &[]).await;
    let (k, v) = bearer(&fresh);
    let a = get(&proxy.url("/_tokenproxy/links"), &[(&k, &v)]).await;
    let links = a.json()["links"].as_array().unwrap().clone();
    assert_eq!(links.len(), 3);
    assert!(links.iter().all(|l| l["linked"] == false));
    proxy.shutdown().await;
}

#[sqlx::test]
async fn reserved_paths_need_a_caller_and_never_reach_a_route(pool: PgPool) {
    let store: Arc<dyn LinkStore> = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let proxy = Harness::start(harness::config(CONFIG), store.clone(), FakeTokens::new()).await;
    get(&proxy.url("/_tokenproxy/links"), &[])
        .await
        .assert_error(401, "unauthenticated");
    let (_, token) = create_token(&*store, Uuid::new_v4(), &[]).await;
    let (k, v) = bearer(&token);
    get(&proxy.url("/_tokenproxy/nothing"), &[(&k, &v)])
        .await
        .assert_error(404, "no_route");
    proxy.shutdown().await;
}

#[sqlx::test]
async fn in_coder_mode_login_urls_are_coders_external_auth_pages(pool: PgPool) {
    let store: Arc<dyn LinkStore> =
        Arc::new(PgStore::from_pool(pool.clone(), Keyring::plaintext()));
    let me = Uuid::new_v4();
    store
        .put_link("gl", me, &set("glpat_SECRET", ""))
        .await
        .unwrap();
    sqlx::query("UPDATE external_auth_links SET oauth_refresh_failure_reason = 'invalid_grant'")
        .execute(&pool)
        .await
        .unwrap();
    // tokenproxy's own sign-in is configured too: Coder's page must still win,
    // as it does in `link_missing` / `reauth_required` errors.
    let config = format!(
        "[server]\npublic_url = \"http://127.0.0.1:1\"\n\n[encryption]\nkeys = [\"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"]\n\n\
         [coder]\naccess_url = \"https://coder.example.com/\"\n{CONFIG}"
    );
    let (_, token) = create_token(&*store, me, &["gh", "gl"]).await;
    let proxy = Harness::start(harness::config(&config), store.clone(), FakeTokens::new()).await;
    let (k, v) = bearer(&token);
    let a = get(&proxy.url("/_tokenproxy/links"), &[(&k, &v)]).await;
    let body = a.json();
    let links = body["links"].as_array().unwrap();
    assert_eq!(links[0]["provider"], "gh");
    assert_eq!(links[0]["linked"], false);
    assert_eq!(
        links[0]["login_url"], "https://coder.example.com/external-auth/gh",
        "{body}"
    );
    assert_eq!(links[1]["provider"], "gl");
    assert_eq!(links[1]["relink_needed"], true);
    assert_eq!(
        links[1]["login_url"], "https://coder.example.com/external-auth/gl",
        "{body}"
    );
    proxy.shutdown().await;
}
