//! The operator link API on the admin listener (`[admin] token`), revocation on
//! unlink against the test IdP (RFC 7009 over HTTPS, GitHub's grant API), and
//! the keep-alive refresh with its expiring-refresh-token gauge — each checked
//! in the database and in the IdP's own tally.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use harness::{send, Answer, Harness};
use http::Method;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use support::idp::{Idp, IdpOptions};
use support::upstream::TestCa;
use tokenproxy::config::Config;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{LinkStore, TokenSet};
use tokenproxy::telemetry::Metrics;
use tokenproxy::tokens::{SystemClock, TokenSource};
use uuid::Uuid;

const ADMIN: &str = "adm_s3cret_0123456789";

struct Setup {
    store: Arc<dyn LinkStore>,
    idp: Idp,
    cfg: Config,
    source: Arc<TokenSource>,
    proxy: Harness,
    _ca: TestCa,
}

fn config_text(idp: &Idp, ca: &TestCa, extra: &str) -> String {
    let base = idp.base_url();
    let ca = ca.ca.display();
    format!(
        r#"
{extra}

[[providers]]
id = "gl"
client_id = "test-client"
client_secret = "test-secret"
token_url = "{base}/oauth/token"
revocation_url = "{base}/oauth/revoke"
token_ca = "{ca}"
timeout = "2s"

[[providers]]
id = "gh"
preset = "github"
base_url = "{base}"
client_id = "test-client"
client_secret = "test-secret"
token_url = "{base}/oauth/token"
token_ca = "{ca}"
routes = []
timeout = "2s"

[[providers]]
id = "plain"
client_id = "test-client"
client_secret = "test-secret"
token_url = "{base}/oauth/token"
token_ca = "{ca}"
timeout = "2s"
"#
    )
}

async fn setup_with(pool: PgPool, extra: &str) -> Setup {
    let store: Arc<dyn LinkStore> = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let ca = TestCa::new();
    let idp = Idp::start(IdpOptions {
        tls: Some(ca.acceptor()),
        ..IdpOptions::default()
    })
    .await;
    let cfg = harness::config(&config_text(&idp, &ca, extra));
    let source = source(&store, &cfg);
    let proxy = Harness::start(cfg.clone(), store.clone(), source.clone()).await;
    Setup {
        store,
        idp,
        cfg,
        source,
        proxy,
        _ca: ca,
    }
}

fn source(store: &Arc<dyn LinkStore>, cfg: &Config) -> Arc<TokenSource> {
    TokenSource::new(
        store.clone(),
        &cfg.providers,
        &cfg.tokens,
        Metrics::new(),
        Arc::new(SystemClock),
    )
    .unwrap()
}

async fn setup(pool: PgPool) -> Setup {
    setup_with(pool, &format!("[admin]\ntoken = \"{ADMIN}\"")).await
}

impl Setup {
    async fn admin(&self, method: Method, path: &str, token: Option<&str>) -> Answer {
        let url = format!("http://{}{path}", self.proxy.admin);
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        send(method, &url, &headers, Bytes::new()).await
    }

    async fn ok(&self, method: Method, path: &str) -> serde_json::Value {
        let a = self.admin(method, path, Some(ADMIN)).await;
        assert_eq!(
            a.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&a.body)
        );
        a.json()
    }

    async fn link(&self, provider: &str, user: Uuid) -> TokenSet {
        let t = self.idp.seed(user);
        self.store.put_link(provider, user, &t).await.unwrap();
        t
    }

    async fn exists(&self, provider: &str, user: Uuid) -> bool {
        self.store.get_link(provider, user).await.unwrap().is_some()
    }
}

#[sqlx::test]
async fn the_link_api_needs_the_admin_token_and_health_does_not(pool: PgPool) {
    let s = setup(pool.clone()).await;
    s.admin(Method::GET, "/links", None)
        .await
        .assert_error(401, "unauthenticated");
    s.admin(Method::GET, "/links", Some("adm_wrong"))
        .await
        .assert_error(401, "unauthenticated");
    let long = format!("{ADMIN}x");
    s.admin(
        Method::DELETE,
        &format!("/links/gl/{}", Uuid::new_v4()),
        Some(&long),
    )
    .await
    .assert_error(401, "unauthenticated");
    for path in ["/healthz", "/metrics"] {
        assert_eq!(s.admin(Method::GET, path, None).await.status, 200, "{path}");
    }
    assert_eq!(
        s.ok(Method::GET, "/links").await["links"],
        serde_json::json!([])
    );

    // Without `[admin] token` the API is off.
    let off = setup_with(pool, "").await;
    off.admin(Method::GET, "/links", Some(ADMIN))
        .await
        .assert_error(404, "no_route");
}

#[sqlx::test]
async fn links_show_their_status_and_never_a_token(pool: PgPool) {
    let s = setup(pool.clone()).await;
    let user = Uuid::new_v4();
    let soon = chrono::Utc::now() + chrono::Duration::days(3);
    let mut gh = s.idp.seed(user);
    gh.extra = Some(serde_json::json!({ "refresh_token_expires_at": soon.to_rfc3339() }));
    s.store.put_link("gh", user, &gh).await.unwrap();
    let gl = s.link("gl", user).await;
    sqlx::query("UPDATE external_auth_links SET oauth_refresh_failure_reason = 'invalid_grant' WHERE provider_id = 'gl'")
        .execute(&pool)
        .await
        .unwrap();
    s.link("gl", Uuid::new_v4()).await;

    let all = s.ok(Method::GET, &format!("/links?user={user}")).await;
    let text = all.to_string();
    for t in [&gh, &gl] {
        assert!(!text.contains(t.access_token.expose_secret()), "{text}");
        assert!(!text.contains(t.refresh_token.expose_secret()), "{text}");
    }
    let list = all["links"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{text}");
    let gh_status = list.iter().find(|l| l["provider"] == "gh").unwrap();
    assert_eq!(gh_status["linked"], true);
    assert_eq!(gh_status["refresh_expiring_soon"], true);
    assert!(gh_status["refresh_expiry"].is_string());
    assert!(gh_status["access_expiry"].is_string());
    assert!(gh_status["last_refresh"].is_string());
    assert!(gh_status["failure_reason"].is_null());

    let one = s.ok(Method::GET, &format!("/links/gl/{user}")).await;
    assert_eq!(one["failure_reason"], "invalid_grant");
    assert_eq!(one["refresh_expiring_soon"], false);
    let none = s.ok(Method::GET, &format!("/links/plain/{user}")).await;
    assert_eq!(none["linked"], false);
    assert_eq!(
        s.ok(Method::GET, "/links").await["links"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    s.admin(Method::GET, "/links/gl/not-a-uuid", Some(ADMIN))
        .await
        .assert_error(400, "bad_request");
    s.admin(Method::GET, "/links?user=nope", Some(ADMIN))
        .await
        .assert_error(400, "bad_request");
    s.admin(Method::GET, &format!("/links/nope/{user}"), Some(ADMIN))
        .await
        .assert_error(404, "no_route");
}

#[sqlx::test]
async fn concurrent_admin_refreshes_share_one_exchange(pool: PgPool) {
    let s = setup(pool).await;
    let user = Uuid::new_v4();
    let seeded = s.link("gl", user).await;
    // Every call reads the row long before the (slow) exchange answers, so all
    // of them must join or adopt the one flight.
    s.idp.set_latency(Duration::from_millis(800));
    let path = format!("/links/gl/{user}/refresh");
    let calls = (0..8).map(|_| s.admin(Method::POST, &path, Some(ADMIN)));
    let answers = futures_util::future::join_all(calls).await;
    for a in &answers {
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.json()["link"]["linked"], true);
    }
    s.idp.assert_grants(1, 1, 0);
    let row = s.store.get_link("gl", user).await.unwrap().unwrap();
    assert_ne!(
        row.access_token.expose_secret(),
        seeded.access_token.expose_secret()
    );
    assert!(s
        .idp
        .is_valid_access_token(row.access_token.expose_secret()));

    // A dead grant: the refresh is refused and recorded; a missing link is said so.
    s.idp.set_latency(Duration::ZERO);
    s.idp.revoke(user);
    s.admin(Method::POST, &path, Some(ADMIN))
        .await
        .assert_error(403, "reauth_required");
    let row = s.store.get_link("gl", user).await.unwrap().unwrap();
    assert!(!row.refresh_failure_reason.is_empty());
    s.admin(
        Method::POST,
        &format!("/links/gl/{}/refresh", Uuid::new_v4()),
        Some(ADMIN),
    )
    .await
    .assert_error(403, "link_missing");
}

#[sqlx::test]
async fn delete_revokes_the_grant_then_deletes_the_row(pool: PgPool) {
    let s = setup(pool).await;
    let user = Uuid::new_v4();
    let t = s.link("gl", user).await;
    let out = s.ok(Method::DELETE, &format!("/links/gl/{user}")).await;
    assert_eq!(out["revocation"], "revoked", "{out}");
    assert_eq!(s.idp.revocations(), 1);
    // RFC 7009: the refresh token was revoked, which ended the whole grant.
    assert_eq!(
        s.idp.revoked_tokens(),
        vec![t.refresh_token.expose_secret().to_string()]
    );
    assert_eq!(s.idp.current_refresh_token(user), None);
    assert!(!s.idp.is_valid_access_token(t.access_token.expose_secret()));
    assert!(!s.exists("gl", user).await);
    s.admin(Method::DELETE, &format!("/links/gl/{user}"), Some(ADMIN))
        .await
        .assert_error(403, "link_missing");
    assert_eq!(s.idp.revocations(), 1);

    // GitHub: DELETE /applications/{client_id}/grant with the access token.
    let t = s.link("gh", user).await;
    let out = s.ok(Method::DELETE, &format!("/links/gh/{user}")).await;
    assert_eq!(out["revocation"], "revoked", "{out}");
    assert_eq!(s.idp.revocations(), 2);
    assert_eq!(
        s.idp.revoked_tokens()[1],
        t.access_token.expose_secret().to_string()
    );
    assert!(!s.idp.is_valid_access_token(t.access_token.expose_secret()));
    assert!(!s.exists("gh", user).await);

    // A provider that cannot revoke: deleted, and said so.
    s.link("plain", user).await;
    let out = s.ok(Method::DELETE, &format!("/links/plain/{user}")).await;
    assert_eq!(out["revocation"], "unsupported");
    assert!(!s.exists("plain", user).await);
    assert_eq!(s.idp.revocations(), 2);
}

#[sqlx::test]
async fn keep_grant_skips_revocation_and_a_failed_one_still_deletes(pool: PgPool) {
    let s = setup(pool).await;
    let user = Uuid::new_v4();
    let t = s.link("gl", user).await;
    let out = s
        .ok(Method::DELETE, &format!("/links/gl/{user}?keep_grant=true"))
        .await;
    assert_eq!(out["revocation"], "kept");
    assert_eq!(s.idp.revocations(), 0);
    assert!(s.idp.is_valid_access_token(t.access_token.expose_secret()));
    assert!(!s.exists("gl", user).await);

    let t = s.link("gl", user).await;
    s.idp.set_revocation_failing(true);
    let out = s.ok(Method::DELETE, &format!("/links/gl/{user}")).await;
    assert_eq!(out["revocation"], "failed", "{out}");
    assert!(
        out["revocation_error"].as_str().unwrap().contains("503"),
        "{out}"
    );
    assert!(!out.to_string().contains(t.refresh_token.expose_secret()));
    assert!(!s.exists("gl", user).await);
    assert_eq!(s.idp.revocations(), 0);
}

#[sqlx::test]
async fn keepalive_refreshes_idle_links_once_across_replicas(pool: PgPool) {
    let s = setup_with(pool.clone(), "[tokens]\nkeepalive_refresh = \"30d\"").await;
    let (idle, busy, dead) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let seeded = s.link("gl", idle).await;
    s.link("gl", busy).await;
    s.link("gl", dead).await;
    sqlx::query(
        "UPDATE external_auth_links SET updated_at = now() - interval '40 days' WHERE user_id <> $1",
    )
    .bind(busy)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE external_auth_links SET oauth_refresh_failure_reason = 'invalid_grant' WHERE user_id = $1")
        .bind(dead)
        .execute(&pool)
        .await
        .unwrap();
    // Two replicas run their pass at the same moment.
    s.idp.set_latency(Duration::from_millis(300));
    let other = source(&s.store, &s.cfg);
    let (a, b) = tokio::join!(s.source.keepalive_now(), other.keepalive_now());
    assert_eq!((a.due, b.due), (1, 1));
    s.idp.assert_grants(1, 1, 0);
    let row = s.store.get_link("gl", idle).await.unwrap().unwrap();
    assert_ne!(
        row.access_token.expose_secret(),
        seeded.access_token.expose_secret()
    );
    assert!(chrono::Utc::now() - row.updated_at < chrono::Duration::minutes(1));
    // Refreshed now: nothing is due any more.
    assert_eq!(s.source.keepalive_now().await.due, 0);
    s.idp.assert_grants(1, 1, 0);
}

#[sqlx::test]
async fn the_gauge_counts_refresh_tokens_expiring_within_seven_days(pool: PgPool) {
    let s = setup(pool).await;
    let at = |days: i64| {
        let t = chrono::Utc::now() + chrono::Duration::days(days);
        Some(serde_json::json!({ "refresh_token_expires_at": t.to_rfc3339() }))
    };
    for (days, user) in [
        (2, Uuid::new_v4()),
        (5, Uuid::new_v4()),
        (30, Uuid::new_v4()),
    ] {
        let mut t = s.idp.seed(user);
        t.extra = at(days);
        s.store.put_link("gh", user, &t).await.unwrap();
    }
    let mut none = s.idp.seed(Uuid::new_v4());
    none.refresh_token = SecretString::from(String::new());
    none.extra = at(1);
    s.store.put_link("gh", Uuid::new_v4(), &none).await.unwrap();
    let metrics = Metrics::new();
    let src = TokenSource::new(
        s.store.clone(),
        &s.cfg.providers,
        &s.cfg.tokens,
        metrics.clone(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let report = src.keepalive_now().await;
    assert_eq!(report.expiring, 2);
    assert_eq!(report.due, 0, "keep-alive is off by default");
    let text = metrics.encode();
    assert!(
        text.contains("tokenproxy_links_refresh_expiring{provider=\"gh\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("tokenproxy_links_refresh_expiring{provider=\"gl\"} 0"),
        "{text}"
    );
    s.idp.assert_grants(0, 0, 0);
}
