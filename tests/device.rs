//! The device flow over HTTP (`POST`/`GET /_tokenproxy/device/{provider}`):
//! a caller starts a login for its own user with its proxy token, tokenproxy
//! polls the test IdP (which speaks RFC 8628 strictly: pending, slow_down,
//! denied, expired, single-use codes) in the background, and the link is
//! stored only when the user approved — checked in the database every time.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use harness::{bearer, create_token, send, Answer, Harness};
use http::Method;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use support::idp::{Idp, IdpOptions};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::LinkStore;
use tokenproxy::telemetry::Metrics;
use tokenproxy::tokens::{SystemClock, TokenSource};
use uuid::Uuid;

struct Setup {
    store: Arc<dyn LinkStore>,
    idp: Idp,
    source: Arc<TokenSource>,
    proxy: Harness,
    token: String,
    user: Uuid,
}

async fn setup(pool: PgPool) -> Setup {
    let store: Arc<dyn LinkStore> = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let idp = Idp::start(IdpOptions::default()).await;
    let base = idp.base_url();
    let cfg = harness::config(&format!(
        r#"
[[providers]]
id = "idp"
client_id = "test-client"
client_secret = "test-secret"
token_url = "{base}/oauth/token"
device_authorization_url = "{base}/oauth/device"
timeout = "2s"

[[providers]]
id = "plain"
client_id = "c"
token_url = "{base}/oauth/token"
"#
    ));
    let source = TokenSource::new(
        store.clone(),
        &cfg.providers,
        &cfg.tokens,
        Metrics::new(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &[]).await;
    let proxy = Harness::start(cfg, store.clone(), source.clone()).await;
    Setup {
        store,
        idp,
        source,
        proxy,
        token,
        user,
    }
}

impl Setup {
    async fn call(&self, method: Method, provider: &str) -> Answer {
        let (k, v) = bearer(&self.token);
        let url = self.proxy.url(&format!("/_tokenproxy/device/{provider}"));
        send(method, &url, &[(&k, &v)], Bytes::new()).await
    }

    async fn start(&self) -> serde_json::Value {
        let a = self.call(Method::POST, "idp").await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        a.json()
    }

    /// Waits (bounded: 20 s, several poll intervals) until `GET` reports `status`.
    async fn wait_status(&self, status: &str) -> serde_json::Value {
        for _ in 0..400 {
            let v = self.call(Method::GET, "idp").await.json();
            if v["status"] == status {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("device flow never reached `{status}`");
    }

    /// Waits (bounded: 20 s) until the IdP has answered `n` polls.
    async fn wait_polls(&self, n: usize) {
        for _ in 0..400 {
            if self.idp.device_polls().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the IdP never saw {n} polls");
    }

    async fn rows(&self) -> usize {
        self.store.list_links(Some(self.user)).await.unwrap().len()
    }
}

#[sqlx::test]
async fn an_approved_device_flow_stores_the_link_once(pool: PgPool) {
    let s = setup(pool).await;
    let started = s.start().await;
    assert_eq!(started["status"], "pending");
    let code = started["user_code"].as_str().unwrap().to_string();
    assert_eq!(Some(code.clone()), s.idp.last_user_code());
    assert!(started["verification_uri"]
        .as_str()
        .unwrap()
        .ends_with("/device"));
    assert!(started["verification_uri_complete"]
        .as_str()
        .unwrap()
        .contains(&code));
    assert_eq!(started["interval"], 1);

    // The user has not approved yet: polls are answered pending, nothing stored.
    s.wait_polls(2).await;
    assert_eq!(s.rows().await, 0);
    // One pending flow per user and provider: a second start answers the same code.
    let again = s.start().await;
    assert_eq!(again["user_code"], code.as_str());
    assert_eq!(s.idp.device_authorizations(), 1);
    assert_eq!(s.call(Method::GET, "idp").await.json()["status"], "pending");

    s.idp.device_approve(&code, s.user);
    s.wait_status("linked").await;

    let row = s.store.get_link("idp", s.user).await.unwrap().unwrap();
    assert!(s
        .idp
        .is_valid_access_token(row.access_token.expose_secret()));
    assert_eq!(
        Some(row.refresh_token.expose_secret().to_string()),
        s.idp.current_refresh_token(s.user)
    );
    let left = row.expiry.unwrap() - chrono::Utc::now();
    assert!(left > chrono::Duration::minutes(59), "expiry {left}");
    assert!(row.refresh_failure_reason.is_empty());
    // Every poll honoured the interval; the code was redeemed exactly once.
    assert_eq!(s.idp.device_too_fast(), 0);
    let tokens = s
        .idp
        .device_polls()
        .iter()
        .filter(|p| p.1 == "tokens")
        .count();
    assert_eq!(tokens, 1);
    // The stored link works: the token source serves it and refreshes it.
    let served = s.source.get("idp", s.user).await.unwrap();
    assert_eq!(served.expose_secret(), row.access_token.expose_secret());
    s.source.refresh_now("idp", s.user).await.unwrap();
    s.idp.assert_grants(1, 1, 0);
}

/// The harness runs no change feed, so the only way the token source can learn
/// of the new link is the device flow telling it. Without that, the "no link"
/// it remembered before the login answers `link_missing` until a NOTIFY arrives.
#[sqlx::test]
async fn a_device_login_is_served_at_once_by_its_replica_without_a_change_feed(pool: PgPool) {
    let s = setup(pool).await;
    assert!(
        matches!(
            s.source.get("idp", s.user).await,
            Err(tokenproxy::tokens::TokenError::LinkMissing)
        ),
        "no link yet"
    );
    let code = s.start().await["user_code"].as_str().unwrap().to_string();
    s.idp.device_approve(&code, s.user);
    s.wait_status("linked").await;
    let served = s
        .source
        .get("idp", s.user)
        .await
        .expect("the remembered link_missing outlived the device login");
    assert!(s.idp.is_valid_access_token(served.expose_secret()));
}

#[sqlx::test]
async fn a_denied_device_flow_stores_nothing(pool: PgPool) {
    let s = setup(pool).await;
    let code = s.start().await["user_code"].as_str().unwrap().to_string();
    s.idp.device_deny(&code);
    let v = s.wait_status("failed").await;
    assert_eq!(v["reason"], "access_denied");
    assert_eq!(s.rows().await, 0);
    // Failed: a new start gets a new code.
    let next = s.start().await;
    assert_ne!(next["user_code"], code.as_str());
    assert_eq!(s.idp.device_authorizations(), 2);
}

#[sqlx::test]
async fn an_expired_device_flow_stores_nothing(pool: PgPool) {
    let s = setup(pool).await;
    let code = s.start().await["user_code"].as_str().unwrap().to_string();
    s.wait_polls(1).await;
    s.idp.device_expire(&code);
    let v = s.wait_status("failed").await;
    assert_eq!(v["reason"], "expired_token");
    assert_eq!(s.rows().await, 0);
    s.idp.assert_grants(0, 0, 0);
}

#[sqlx::test]
async fn slow_down_adds_five_seconds_to_the_interval(pool: PgPool) {
    let s = setup(pool).await;
    let code = s.start().await["user_code"].as_str().unwrap().to_string();
    s.wait_polls(1).await;
    s.idp.device_force_slow_down(1);
    // The poll after the first is answered slow_down; the one after that must
    // wait interval + 5 s = 6 s.
    s.wait_polls(2).await;
    s.idp.device_approve(&code, s.user);
    s.wait_status("linked").await;
    let polls = s.idp.device_polls();
    let slow = polls.iter().position(|p| p.1 == "slow_down").unwrap();
    let gap = polls[slow + 1].0 - polls[slow].0;
    assert!(gap >= Duration::from_secs(6), "polled again after {gap:?}");
    // Before the slow_down, the 1 s interval was kept too.
    assert!(polls[1].0 - polls[0].0 >= Duration::from_secs(1));
    assert_eq!(s.idp.device_too_fast(), 0);
    assert_eq!(s.rows().await, 1);
}

#[sqlx::test]
async fn a_device_login_replaces_a_dead_link_and_clears_its_failure(pool: PgPool) {
    let s = setup(pool.clone()).await;
    s.store
        .put_link("idp", s.user, &s.idp.seed(s.user))
        .await
        .unwrap();
    sqlx::query(
        "UPDATE external_auth_links SET oauth_refresh_failure_reason = 'invalid_grant', \
         refresh_lease_expires_at = now() + interval '1 hour'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let code = s.start().await["user_code"].as_str().unwrap().to_string();
    s.idp.device_approve(&code, s.user);
    s.wait_status("linked").await;
    let row = s.store.get_link("idp", s.user).await.unwrap().unwrap();
    assert!(row.refresh_failure_reason.is_empty());
    assert!(row.lease_expires_at.is_none());
    assert!(s
        .idp
        .is_valid_access_token(row.access_token.expose_secret()));
    assert_eq!(s.rows().await, 1);
}

#[sqlx::test]
async fn shutdown_stops_polling_between_polls_and_stores_nothing(pool: PgPool) {
    let s = setup(pool).await;
    s.start().await;
    s.wait_polls(1).await;
    // The drain waits for tracked work; the poll task ends at its next wait.
    assert!(s.source.drain(Duration::from_secs(10)).await);
    let v = s.call(Method::GET, "idp").await.json();
    assert_eq!(v["status"], "failed");
    assert_eq!(v["reason"], "shutdown");
    let seen = s.idp.device_polls().len();
    tokio::time::sleep(Duration::from_millis(1500)).await; // > one interval: no poll may follow
    assert_eq!(s.idp.device_polls().len(), seen);
    assert_eq!(s.rows().await, 0);
}

#[sqlx::test]
async fn the_drain_waits_for_a_poll_in_flight_and_its_link(pool: PgPool) {
    let s = setup(pool).await;
    let code = s.start().await["user_code"].as_str().unwrap().to_string();
    s.wait_polls(1).await;
    // The next poll is held at the IdP; the user approves meanwhile.
    s.idp.set_latency(Duration::from_millis(1500));
    s.idp.device_approve(&code, s.user);
    for _ in 0..400 {
        if s.idp.device_polls_received() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        s.idp.device_polls_received(),
        2,
        "the second poll never left"
    );
    assert_eq!(s.rows().await, 0);
    // Shutdown begins with that poll in flight: the drain waits for its answer
    // and for the link it brings to be stored.
    assert!(s.source.drain(Duration::from_secs(10)).await);
    assert_eq!(s.rows().await, 1, "the approved link was lost in the drain");
    assert_eq!(s.call(Method::GET, "idp").await.json()["status"], "linked");
}

#[sqlx::test]
async fn the_device_endpoint_refuses_bad_callers_and_providers(pool: PgPool) {
    let s = setup(pool).await;
    let url = s.proxy.url("/_tokenproxy/device/idp");
    send(Method::POST, &url, &[], Bytes::new())
        .await
        .assert_error(401, "unauthenticated");
    s.call(Method::POST, "plain")
        .await
        .assert_error(400, "bad_request");
    s.call(Method::POST, "nope")
        .await
        .assert_error(404, "no_route");
    s.call(Method::PUT, "idp")
        .await
        .assert_error(400, "bad_request");
    // A token limited to another provider may not link this one.
    let (_, limited) = create_token(&*s.store, s.user, &["plain"]).await;
    let (k, v) = bearer(&limited);
    send(Method::POST, &url, &[(&k, &v)], Bytes::new())
        .await
        .assert_error(403, "forbidden");
    // Nothing known and no link: `none`.
    assert_eq!(s.call(Method::GET, "idp").await.json()["status"], "none");
    assert_eq!(s.idp.device_authorizations(), 0);
}
