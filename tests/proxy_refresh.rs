//! The proxy over the real token source and the test identity provider: an
//! upstream's 401 causes exactly one refresh and one retry (and no loop), and the
//! token source's failures reach the caller as DESIGN.md error codes.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::sync::Arc;

use parking_lot::Mutex;

use harness::{create_token, get, Harness};
use sqlx::PgPool;
use support::idp::{Fault, Idp, IdpOptions};
use support::upstream::{CredentialForm, TestUpstream};
use tokenproxy::config::Config;
use tokenproxy::crypto::Keyring;
use tokenproxy::proxy::TokenLookup;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::LinkStore;
use tokenproxy::telemetry::Metrics;
use tokenproxy::tokens::{SystemClock, TokenSource};
use uuid::Uuid;

/// Config with one provider at `idp` routed to `upstream` with Bearer injection.
pub fn idp_config(idp: &Idp, upstream: &str) -> Config {
    harness::config(&format!(
        r#"
[callers]
cache_ttl = "5s"

[[providers]]
id = "github"
client_id = "test-client"
client_secret = "test-secret"
token_url = "{}"
timeout = "500ms"

  [[providers.routes]]
  prefix = "/gh/api"
  upstream = "{upstream}"
"#,
        idp.token_url()
    ))
}

/// The real token source for `config` over `store`.
pub fn token_source(config: &Config, store: Arc<dyn LinkStore>) -> Arc<TokenSource> {
    TokenSource::new(
        store,
        &config.providers,
        &config.tokens,
        Metrics::new(),
        Arc::new(SystemClock),
    )
    .unwrap()
}

struct World {
    idp: Arc<Idp>,
    api: TestUpstream,
    store: Arc<PgStore>,
    proxy: Harness,
    auth: String,
}

async fn world(pool: PgPool) -> World {
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let check = {
        let idp = idp.clone();
        Arc::new(move |t: &str| idp.is_valid_access_token(t))
    };
    let api = TestUpstream::start(CredentialForm::Bearer, check).await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    store
        .put_link("github", user, &idp.seed(user))
        .await
        .unwrap();
    let (_, token) = create_token(&*store, user, &[]).await;
    let config = idp_config(&idp, &api.url());
    let tokens = token_source(&config, store.clone());
    let proxy = Harness::start_source(config, store.clone(), tokens).await;
    World {
        idp,
        api,
        store,
        proxy,
        auth: format!("Bearer {token}"),
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn upstream_401_means_one_refresh_one_retry_and_no_loop(pool: PgPool) {
    let w = world(pool).await;
    let h = [("authorization", w.auth.as_str())];
    assert_eq!(get(&w.proxy.url("/gh/api/user"), &h).await.status, 200);
    w.idp.assert_grants(0, 0, 0);

    // An upstream that rejects every token: one refresh, one retry, then its 401.
    let a = get(&w.proxy.url("/gh/api/always401"), &h).await;
    assert_eq!(a.status, 401);
    assert!(
        a.error_code().is_none(),
        "the upstream's own 401 passes through"
    );
    w.idp.assert_grants(1, 1, 0);
    let seen: Vec<_> = w.api.requests().into_iter().map(|r| r.token).collect();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0], seen[1], "the first attempt used the cached token");
    assert_ne!(seen[1], seen[2], "the retry used the refreshed token");
    assert!(w.idp.is_valid_access_token(seen[2].as_deref().unwrap()));

    // The refreshed token is now served from the cache, without another refresh.
    assert_eq!(get(&w.proxy.url("/gh/api/user"), &h).await.status, 200);
    w.idp.assert_grants(1, 1, 0);
    assert_eq!(w.api.requests().pop().unwrap().token, seen[2]);

    // A streamed body (over 64 KiB) cannot be replayed: the 401 passes through
    // after one attempt, and within the cooldown nothing is refreshed again.
    let before = w.api.count();
    let a = harness::send(
        http::Method::POST,
        &w.proxy.url("/gh/api/always401"),
        &h,
        vec![1u8; 100 * 1024],
    )
    .await;
    assert_eq!(a.status, 401);
    assert_eq!(w.api.count(), before + 1);
    w.idp.assert_grants(1, 1, 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn twenty_401s_cost_at_most_one_grant(pool: PgPool) {
    // The burst races on 4 threads, as the proxy's workers would.
    support::runtime::on_multi_thread(&pool, twenty_401s).await;
}

async fn twenty_401s(pool: PgPool) {
    let w = world(pool).await;
    let h = [("authorization", w.auth.as_str())];
    let url = w.proxy.url("/gh/api/always401");
    // Concurrent first: the cooldown is claimed once however the requests race.
    let answers = futures_util::future::join_all((0..10).map(|_| get(&url, &h))).await;
    assert!(answers
        .iter()
        .all(|a| a.status == 401 && a.error_code().is_none()));
    // Requests that joined the forced refresh retry with its token (no grant).
    let after_burst = w.api.count();
    assert!((11..=20).contains(&after_burst), "{after_burst}");
    for _ in 0..10 {
        assert_eq!(get(&url, &h).await.status, 401);
    }
    assert_eq!(w.idp.refreshes(), 1, "one forced refresh per cooldown");
    assert_eq!(w.idp.attempts(), 1);
    // Later 401s pass through untouched: one attempt each, no retry.
    assert_eq!(w.api.count(), after_burst + 10);
    let metrics = w.proxy.metrics.encode();
    assert!(
        metrics.contains(r#"tokenproxy_upstream_rejections_total{provider="github"} 20"#),
        "{metrics}"
    );
    // The link still works for paths that accept it.
    assert_eq!(get(&w.proxy.url("/gh/api/user"), &h).await.status, 200);
    assert_eq!(w.idp.refreshes(), 1);
}

/// An upstream answering every request 401 with `headers`.
async fn rejecting_upstream(
    headers: &'static [(&'static str, &'static str)],
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    let stop = support::upstream::serve(listener, move |_req| {
        let count = count.clone();
        async move {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut b = http::Response::builder().status(401);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            use http_body_util::BodyExt;
            b.body(
                http_body_util::Full::new(bytes::Bytes::from_static(b"{}"))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .unwrap()
        }
    });
    std::mem::forget(stop);
    (url, seen)
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_401_that_does_not_blame_the_token_refreshes_nothing(pool: PgPool) {
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    store
        .put_link("github", user, &idp.seed(user))
        .await
        .unwrap();
    let (_, token) = create_token(&*store, user, &[]).await;
    let auth = format!("Bearer {token}");
    let h = [("authorization", auth.as_str())];
    let cases: [&'static [(&'static str, &'static str)]; 2] = [
        &[("x-github-otp", "required; app")],
        &[(
            "www-authenticate",
            r#"Bearer realm="api", error="insufficient_scope", scope="repo""#,
        )],
    ];
    for headers in cases {
        let (upstream, seen) = rejecting_upstream(headers).await;
        let config = idp_config(&idp, &upstream);
        let tokens = token_source(&config, store.clone());
        let proxy = Harness::start_source(config, store.clone(), tokens).await;
        let a = get(&proxy.url("/gh/api/user"), &h).await;
        assert_eq!(a.status, 401, "{headers:?}");
        assert!(
            a.error_code().is_none(),
            "the upstream's 401 passes through"
        );
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "no retry: {headers:?}"
        );
        assert_eq!(idp.attempts(), 0, "no refresh: {headers:?}");
    }
    // The same upstream saying the token is bad does get one refresh and a retry.
    let (upstream, seen) = rejecting_upstream(&[(
        "www-authenticate",
        r#"Bearer error="invalid_token", error_description="expired""#,
    )])
    .await;
    let config = idp_config(&idp, &upstream);
    let tokens = token_source(&config, store.clone());
    let proxy = Harness::start_source(config, store.clone(), tokens).await;
    assert_eq!(get(&proxy.url("/gh/api/user"), &h).await.status, 401);
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(idp.refreshes(), 1);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn the_reject_cooldown_spans_token_versions_and_then_expires(pool: PgPool) {
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    store
        .put_link("github", user, &idp.seed(user))
        .await
        .unwrap();
    let config = idp_config(&idp, "http://127.0.0.1:9");
    let clock = support::idp::ManualClock::new();
    let tokens = TokenSource::new(
        store.clone(),
        &config.providers,
        &config.tokens,
        Metrics::new(),
        clock.clone(),
    )
    .unwrap();
    let t1 = tokens.get("github", user).await.unwrap();
    let t2 = tokens.refresh_rejected("github", user, &t1).await.unwrap();
    assert!(!t2.same_version(&t1));
    assert_eq!(idp.refreshes(), 1);
    // A new version rejected within the cooldown: handed back, no grant.
    let again = tokens.refresh_rejected("github", user, &t2).await.unwrap();
    assert!(again.same_version(&t2));
    assert_eq!(idp.refreshes(), 1);
    // The old version rejected late still gets the current token, for free.
    let late = tokens.refresh_rejected("github", user, &t1).await.unwrap();
    assert!(late.same_version(&t2));
    clock.advance(std::time::Duration::from_secs(29));
    let t = tokens.refresh_rejected("github", user, &t2).await.unwrap();
    assert!(t.same_version(&t2));
    assert_eq!(idp.refreshes(), 1);
    // Past the default 30 s cooldown: one more forced refresh.
    clock.advance(std::time::Duration::from_secs(2));
    let t3 = tokens.refresh_rejected("github", user, &t2).await.unwrap();
    assert!(!t3.same_version(&t2));
    assert_eq!(idp.refreshes(), 2);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_token_the_upstream_revoked_is_replaced_transparently(pool: PgPool) {
    let w = world(pool).await;
    let h = [("authorization", w.auth.as_str())];
    let first = {
        assert_eq!(get(&w.proxy.url("/gh/api/user"), &h).await.status, 200);
        w.api.requests()[0].token.clone().unwrap()
    };
    // The upstream stops accepting the first token (e.g. it was revoked there).
    let idp = w.idp.clone();
    let bad = first.clone();
    w.api
        .set_check(Arc::new(move |t| t != bad && idp.is_valid_access_token(t)));
    let a = get(&w.proxy.url("/gh/api/user"), &h).await;
    assert_eq!(a.status, 200);
    w.idp.assert_grants(1, 1, 0);
    assert_eq!(w.api.count(), 3);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn token_source_failures_become_error_codes(pool: PgPool) {
    let w = world(pool.clone()).await;
    let url = w.proxy.url("/gh/api/user");

    // link_missing: a caller whose user never linked the provider.
    let stranger = Uuid::new_v4();
    let (_, t) = create_token(&*w.store, stranger, &[]).await;
    get(&url, &[("authorization", &format!("Bearer {t}"))])
        .await
        .assert_error(403, "link_missing");

    // idp_unavailable: the access token expired and the provider fails every
    // attempt the exchange's budget allows (a slow answer inside the budget would
    // be waited for, so a hang is no longer the way to provoke it).
    let flaky = Uuid::new_v4();
    let past = chrono::Utc::now() - chrono::Duration::hours(1);
    w.store
        .put_link("github", flaky, &w.idp.seed_with_expiry(flaky, Some(past)))
        .await
        .unwrap();
    let (_, t) = create_token(&*w.store, flaky, &[]).await;
    for _ in 0..4 {
        w.idp.push_fault(Fault::ServerError);
    }
    let a = get(&url, &[("authorization", &format!("Bearer {t}"))]).await;
    a.assert_error(502, "idp_unavailable");
    assert_eq!(a.json()["error"]["provider"], "github");
    // The provider is backing off (1 s after a first failure): say when to retry.
    assert_eq!(a.headers.get("retry-after").unwrap(), "1");

    // reauth_required: the provider revoked the grant.
    let revoked = Uuid::new_v4();
    w.store
        .put_link(
            "github",
            revoked,
            &w.idp.seed_with_expiry(revoked, Some(past)),
        )
        .await
        .unwrap();
    w.idp.revoke(revoked);
    let (_, t) = create_token(&*w.store, revoked, &[]).await;
    get(&url, &[("authorization", &format!("Bearer {t}"))])
        .await
        .assert_error(403, "reauth_required");

    // store_unavailable from the token phase: the token source's database is down
    // (callers are still verified against the live one).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let db = tokenproxy::config::DatabaseConfig {
        url: format!("postgres://postgres@127.0.0.1:{port}/none").into(),
        acquire_timeout: std::time::Duration::from_millis(500),
        ..Default::default()
    };
    let dead: Arc<dyn LinkStore> = Arc::new(PgStore::connect(&db, Keyring::plaintext()).unwrap());
    let config = idp_config(&w.idp, &w.api.url());
    let tokens: Arc<dyn TokenLookup> = token_source(&config, dead);
    let proxy = Harness::start(config, w.store.clone(), tokens).await;
    get(&proxy.url("/gh/api/user"), &[("authorization", &w.auth)])
        .await
        .assert_error(503, "store_unavailable");

    // None of the failing requests reached the upstream.
    assert_eq!(w.api.count(), 0);
}

/// A TCP relay in front of `to` that records, for every connection it accepts,
/// how many refreshes the IdP had completed at that moment.
async fn counting_relay(to: std::net::SocketAddr, idp: Arc<Idp>) -> (String, Arc<Mutex<Vec<u64>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let seen = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            seen.lock().push(idp.refreshes());
            tokio::spawn(async move {
                let mut out = tokio::net::TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            });
        }
    });
    (format!("http://{addr}"), accepted)
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn the_upstream_connection_opens_while_the_refresh_is_in_flight(pool: PgPool) {
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    idp.set_latency(std::time::Duration::from_millis(300));
    let check = {
        let idp = idp.clone();
        Arc::new(move |t: &str| idp.is_valid_access_token(t))
    };
    let api = TestUpstream::start(CredentialForm::Bearer, check).await;
    let api_addr: std::net::SocketAddr = api.url().trim_start_matches("http://").parse().unwrap();
    let (relay, accepted) = counting_relay(api_addr, idp.clone()).await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let expired = idp.seed_with_expiry(
        user,
        Some(chrono::Utc::now() - chrono::Duration::minutes(5)),
    );
    store.put_link("github", user, &expired).await.unwrap();
    let (_, token) = create_token(&*store, user, &[]).await;
    let config = idp_config(&idp, &relay);
    let tokens = token_source(&config, store.clone());
    // Without the change feed: the claim is about the request path, and the feed
    // echoes this replica's own write back to it, dropping the entry it just
    // cached, so whether the second request is a hit would depend on when that
    // notification lands (a store re-read, and a pre-opened connection, each time).
    let proxy = Harness::start(config, store.clone(), tokens).await;
    let auth = format!("Bearer {token}");
    let h = [("authorization", auth.as_str())];

    assert_eq!(get(&proxy.url("/gh/api/user"), &h).await.status, 200);
    idp.assert_grants(1, 1, 0);
    assert_eq!(
        *accepted.lock(),
        [0],
        "one upstream connection, opened before the provider answered the refresh, \
         and used by the request that waited"
    );
    let seen = api.requests();
    assert_eq!(seen.len(), 1);
    assert!(idp.is_valid_access_token(seen[0].token.as_deref().unwrap()));

    // Cache hits open nothing ahead: they reuse the pooled connection.
    for _ in 0..5 {
        assert_eq!(get(&proxy.url("/gh/api/user"), &h).await.status, 200);
    }
    assert_eq!(accepted.lock().len(), 1);
    idp.assert_grants(1, 1, 0);
}

/// A request body as the 401-retry boundary test sends it.
enum TestBody {
    /// `Content-Length: n`.
    Len(usize),
    /// `Transfer-Encoding: chunked` (length unknown up front).
    Chunked,
}

/// The 401 retry replays bodies of a declared length up to 64 KiB
/// (`RETRY_BODY_LIMIT`): 65,536 bytes are sent again with the refreshed token,
/// while 65,537 bytes and a chunked body (whose length is not known before it
/// has streamed) are sent once and the upstream's 401 passes through.
#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn the_401_retry_replays_bodies_up_to_64_kib(pool: PgPool) {
    use secrecy::ExposeSecret;
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    // The upstream rejects each user's first token and accepts the refreshed one.
    let rejected = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
    let check = {
        let (idp, rejected) = (idp.clone(), rejected.clone());
        Arc::new(move |t: &str| idp.is_valid_access_token(t) && !rejected.lock().contains(t))
    };
    let api = TestUpstream::start(CredentialForm::Bearer, check).await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let config = idp_config(&idp, &api.url());
    let tokens = token_source(&config, store.clone());
    let proxy = Harness::start_source(config, store.clone(), tokens).await;
    let cases = [
        (TestBody::Len(65_536), true),
        (TestBody::Len(65_537), false),
        (TestBody::Chunked, false),
    ];
    let mut grants = 0;
    for (body, retried) in cases {
        // A user per case: the reject cooldown is per link.
        let user = Uuid::new_v4();
        let seed = idp.seed(user);
        let first = seed.access_token.expose_secret().to_string();
        rejected.lock().insert(first.clone());
        store.put_link("github", user, &seed).await.unwrap();
        let (_, token) = create_token(&*store, user, &[]).await;
        let before = api.count();
        let (status, len) = match body {
            TestBody::Len(n) => {
                let auth = format!("Bearer {token}");
                let a = harness::send(
                    http::Method::POST,
                    &proxy.url("/gh/api/upload"),
                    &[("authorization", &auth)],
                    vec![7u8; n],
                )
                .await;
                (a.status.as_u16(), n as u64)
            }
            TestBody::Chunked => {
                let request = format!(
                    "POST /gh/api/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
                     Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                );
                (
                    harness::raw_status(&harness::raw(proxy.addr, &request).await),
                    5,
                )
            }
        };
        let seen = api.requests()[before..].to_vec();
        assert!(
            !seen.is_empty(),
            "{len} bytes: nothing reached the upstream (answered {status})"
        );
        assert!(seen.iter().all(|r| r.body_len == len), "whole bodies");
        assert_eq!(seen[0].token.as_deref(), Some(first.as_str()));
        if retried {
            assert_eq!(status, 200, "{len} bytes: retried with the new token");
            assert_eq!(seen.len(), 2, "{len} bytes: one retry");
            assert_ne!(seen[1].token, seen[0].token);
        } else {
            assert_eq!(status, 401, "{len} bytes: the 401 passes through");
            assert_eq!(seen.len(), 1, "{len} bytes: sent once, not replayed");
        }
        // Every case forces its link's one refresh, retried or not.
        grants += 1;
        idp.assert_grants(grants, grants, 0);
    }
}
