//! Caller identity against a store that counts its calls: a busy caller costs
//! one token lookup per cache lifetime and an occasional last-use write, not a
//! query per request; static (sidecar) mode serves its one user without any
//! credential and never forwards one.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use harness::{create_token, get, FakeTokens, Harness};
use sqlx::PgPool;
use support::store_wrapper::{HookedStore, Hooks};
use support::upstream::{tokens, CredentialForm, TestUpstream};
use support::util::eventually;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{LinkStore, ProxyTokenInfo, StoreError};
use uuid::Uuid;

const GH_TOKEN: &str = "gho_callers";
/// A well-formed token of the first format (32 bytes in base64url) that the
/// store does not know: deleted, or never created.
const DELETED: &str = "tpx_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// Counts the proxy-token calls.
struct Counting {
    finds: AtomicUsize,
    touches: AtomicUsize,
    /// The proxy tokens touched, in call order.
    touched: parking_lot::Mutex<Vec<Uuid>>,
}

impl Counting {
    fn new() -> Self {
        Counting {
            finds: AtomicUsize::new(0),
            touches: AtomicUsize::new(0),
            touched: parking_lot::Mutex::new(Vec::new()),
        }
    }
}

#[async_trait::async_trait]
impl Hooks for Counting {
    async fn find_proxy_token(
        &self,
        inner: &dyn LinkStore,
        h: &[u8; 32],
    ) -> Result<Option<ProxyTokenInfo>, StoreError> {
        self.finds.fetch_add(1, Ordering::SeqCst);
        inner.find_proxy_token(h).await
    }
    async fn touch_proxy_token(&self, inner: &dyn LinkStore, id: Uuid) -> Result<(), StoreError> {
        self.touches.fetch_add(1, Ordering::SeqCst);
        self.touched.lock().push(id);
        inner.touch_proxy_token(id).await
    }
}

fn config_toml(upstream: &str, callers: &str) -> String {
    format!(
        r#"
[callers]
{callers}

[[providers]]
id = "github"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  prefix = "/gh/api"
  upstream = "{upstream}"
"#
    )
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_busy_caller_costs_one_lookup_and_one_touch(pool: PgPool) {
    // 50 requests at once on 4 threads: the single lookup and the single touch
    // must hold between threads, not only between tasks of one thread.
    support::runtime::on_multi_thread(&pool, a_busy_caller).await;
}

async fn a_busy_caller(pool: PgPool) {
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let store = Arc::new(HookedStore::new(
        PgStore::from_pool(pool, Keyring::plaintext()),
        Counting::new(),
    ));
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let config = harness::config(&config_toml(
        &api.url(),
        "cache_ttl = \"1h\"\ntouch_interval = \"1h\"",
    ));
    let proxy = Harness::start(config, store.clone(), fake).await;
    let auth = format!("Bearer {token}");
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let url = proxy.url("/gh/api/user");
            let auth = auth.clone();
            tokio::spawn(async move { get(&url, &[("authorization", &auth)]).await.status })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    assert_eq!(
        store.hooks.finds.load(Ordering::SeqCst),
        1,
        "one lookup for 50 requests"
    );
    // The last-use write is spawned off the request path: wait for it.
    eventually("last_used_at recorded", || async {
        store.inner.list_proxy_tokens(Some(user)).await.unwrap()[0]
            .last_used_at
            .is_some()
    })
    .await;
    assert_eq!(
        store.hooks.touches.load(Ordering::SeqCst),
        1,
        "touched once"
    );
    assert_eq!(api.count(), 50);
}

/// `touch_interval` is measured from the recorded last use, so a second replica
/// reading a freshly used token does not write `last_used_at` again.
#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn touch_interval_spans_replicas(pool: PgPool) {
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let replica = || {
        Arc::new(HookedStore::new(
            PgStore::from_pool(pool.clone(), Keyring::plaintext()),
            Counting::new(),
        ))
    };
    let (a_store, b_store) = (replica(), replica());
    let user = Uuid::new_v4();
    let (used, used_token) = create_token(&*a_store.inner, user, &[]).await;
    let (fresh, fresh_token) = create_token(&*a_store.inner, user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let config = || {
        harness::config(&config_toml(
            &api.url(),
            "cache_ttl = \"1h\"\ntouch_interval = \"1h\"",
        ))
    };
    let a = Harness::start(config(), a_store.clone(), fake.clone()).await;
    let b = Harness::start(config(), b_store.clone(), fake).await;
    let call = |proxy: &Harness, token: &str| {
        let url = proxy.url("/gh/api/user");
        let auth = format!("Bearer {token}");
        async move { get(&url, &[("authorization", &auth)]).await.status }
    };
    assert_eq!(call(&a, &used_token).await, 200);
    eventually("replica A records the last use", || async {
        a_store
            .inner
            .list_proxy_tokens(Some(user))
            .await
            .unwrap()
            .iter()
            .any(|t| t.id == used && t.last_used_at.is_some())
    })
    .await;
    // Replica B reads the recorded use with the token: no second write for it.
    // The never-used token is written, and its write (spawned after the first
    // request's) is the event that shows B has made both decisions.
    assert_eq!(call(&b, &used_token).await, 200);
    assert_eq!(call(&b, &fresh_token).await, 200);
    eventually("replica B records the never-used token", || async {
        b_store.hooks.touched.lock().contains(&fresh)
    })
    .await;
    assert_eq!(
        *b_store.hooks.touched.lock(),
        vec![fresh],
        "B did not write {used} again"
    );
    assert_eq!(*a_store.hooks.touched.lock(), vec![used]);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_client_retrying_an_unknown_token_costs_one_lookup(pool: PgPool) {
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let store = Arc::new(HookedStore::new(
        PgStore::from_pool(pool, Keyring::plaintext()),
        Counting::new(),
    ));
    let config = harness::config(&config_toml(
        &api.url(),
        "cache_ttl = \"1h\"\nauth_failure_limit = 0",
    ));
    let proxy = Harness::start(config, store.clone(), FakeTokens::new()).await;
    // A CI job still using a token that never existed (or a typo), in a loop.
    for _ in 0..20 {
        let a = get(
            &proxy.url("/gh/api/user"),
            &[("authorization", &format!("Bearer {DELETED}"))],
        )
        .await;
        a.assert_error(401, "unauthenticated");
    }
    assert_eq!(store.hooks.finds.load(Ordering::SeqCst), 1);
    // A real token still works, and is looked up once.
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &[]).await;
    let a = get(
        &proxy.url("/gh/api/user"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_ne!(a.status, 401);
    assert_eq!(store.hooks.finds.load(Ordering::SeqCst), 2);
    assert_eq!(api.count(), 0, "link_missing: nothing reached the upstream");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn forged_tokens_cost_no_lookup_and_old_tokens_still_work(pool: PgPool) {
    use secrecy::ExposeSecret;
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let store = Arc::new(HookedStore::new(
        PgStore::from_pool(pool, Keyring::plaintext()),
        Counting::new(),
    ));
    let user = Uuid::new_v4();
    let (_, real) = create_token(&*store, user, &[]).await;
    // A token issued before checksums existed (`tpx_` + 32 bytes base64url).
    let old = "tpx_q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80";
    store
        .create_proxy_token(&tokenproxy::store::NewProxyToken {
            user_id: user,
            name: "old".into(),
            hash: tokenproxy::proxy::caller::hash_token(&old.to_string().into()),
            providers: vec![],
            expires_at: None,
        })
        .await
        .unwrap();
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    // Every failure here comes from one address: the failed-authentication
    // rate limit (tested in proxy_limits.rs) would answer 429 long before the
    // end, and this test is about what a forged token costs without it.
    let config = harness::config(&config_toml(
        &api.url(),
        "cache_ttl = \"1h\"\nauth_failure_limit = 0",
    ));
    let proxy = Harness::start(config, store.clone(), fake).await;
    let call = |token: String| {
        let url = proxy.url("/gh/api/user");
        async move { get(&url, &[("authorization", &format!("Bearer {token}"))]).await }
    };
    // Forged: the real token with one character of its random part changed, so
    // the checksum no longer matches; then random and malformed `tpx_` strings.
    let mut forged = real.clone().into_bytes();
    forged[10] = if forged[10] == b'x' { b'y' } else { b'x' };
    let mut bad = vec![String::from_utf8(forged).unwrap()];
    for _ in 0..50 {
        let (t, _) = tokenproxy::proxy::caller::generate_token();
        let mut t = t.expose_secret().to_string();
        // Random part and checksum from two different tokens.
        t.replace_range(..10, &real[..10]);
        bad.push(t);
    }
    bad.extend(
        [
            "tpx_x",
            "tpx_short_one",
            &format!("{real}0"),
            &real[..real.len() - 1],
        ]
        .map(String::from),
    );
    // Same length as a first-format token, but not canonical base64url.
    bad.push(format!("{}_", &old[..old.len() - 1]));
    for t in bad {
        call(t).await.assert_error(401, "unauthenticated");
    }
    assert_eq!(
        store.hooks.finds.load(Ordering::SeqCst),
        0,
        "malformed or forged tokens never reach the store"
    );
    assert_eq!(call(real).await.status, 200);
    assert_eq!(
        call(old.to_string()).await.status,
        200,
        "first-format token"
    );
    assert_eq!(store.hooks.finds.load(Ordering::SeqCst), 2);
}

/// A store whose proxy-token lookups fail while `down` is set (the database
/// unreachable), and that counts them.
struct Outage {
    down: AtomicBool,
    finds: AtomicUsize,
}

#[async_trait::async_trait]
impl Hooks for Outage {
    async fn find_proxy_token(
        &self,
        inner: &dyn LinkStore,
        h: &[u8; 32],
    ) -> Result<Option<ProxyTokenInfo>, StoreError> {
        self.finds.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection refused".into()));
        }
        inner.find_proxy_token(h).await
    }
    async fn touch_proxy_token(&self, _: &dyn LinkStore, _: Uuid) -> Result<(), StoreError> {
        Ok(())
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn verified_callers_ride_out_a_store_outage(pool: PgPool) {
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let store = Arc::new(HookedStore::new(
        PgStore::from_pool(pool, Keyring::plaintext()),
        Outage {
            down: AtomicBool::new(false),
            finds: AtomicUsize::new(0),
        },
    ));
    let user = Uuid::new_v4();
    let (_, kept) = create_token(&*store, user, &[]).await;
    let (revoked_id, revoked) = create_token(&*store, user, &[]).await;
    let (_, never_seen) = create_token(&*store, user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let ttl = Duration::from_millis(300);
    let config = harness::config(&config_toml(
        &api.url(),
        "cache_ttl = \"300ms\"\noutage_grace = \"1h\"",
    ));
    let proxy = Harness::start(config, store.clone(), fake).await;
    let call = |token: &str| {
        let url = proxy.url("/gh/api/user");
        let auth = format!("Bearer {token}");
        async move { get(&url, &[("authorization", &auth)]).await }
    };
    assert_eq!(call(&kept).await.status, 200);
    assert_eq!(call(&revoked).await.status, 200);

    // The store goes away for several cache lifetimes.
    store.hooks.down.store(true, Ordering::SeqCst);
    store.inner.revoke_proxy_token(revoked_id).await.unwrap();
    let outage = tokio::time::Instant::now();
    while outage.elapsed() < ttl * 4 {
        assert_eq!(call(&kept).await.status, 200, "verified caller served");
        // The store cannot say it was revoked: served from the cache too.
        assert_eq!(call(&revoked).await.status, 200);
        // A token never verified cannot be served; its failure does not touch
        // the verified callers.
        call(&never_seen)
            .await
            .assert_error(503, "store_unavailable");
        tokio::time::sleep(ttl / 3).await;
    }
    let during = store.hooks.finds.load(Ordering::SeqCst);
    assert!(during > 2, "the store was asked again during the outage");

    // The store answers again: the revocation applies within cache_ttl.
    store.hooks.down.store(false, Ordering::SeqCst);
    let back = tokio::time::Instant::now();
    loop {
        let a = call(&revoked).await;
        if a.status == 401 {
            break;
        }
        assert_eq!(a.status, 200);
        assert!(
            back.elapsed() < ttl + Duration::from_millis(200),
            "still served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(call(&kept).await.status, 200);
    assert_eq!(call(&never_seen).await.status, 200);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn outage_grace_bounds_how_long_a_stale_caller_is_served(pool: PgPool) {
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let store = Arc::new(HookedStore::new(
        PgStore::from_pool(pool, Keyring::plaintext()),
        Outage {
            down: AtomicBool::new(false),
            finds: AtomicUsize::new(0),
        },
    ));
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let config = harness::config(&config_toml(
        &api.url(),
        "cache_ttl = \"200ms\"\noutage_grace = \"300ms\"",
    ));
    let proxy = Harness::start(config, store.clone(), fake).await;
    let call = || {
        let url = proxy.url("/gh/api/user");
        let auth = format!("Bearer {token}");
        async move { get(&url, &[("authorization", &auth)]).await }
    };
    assert_eq!(call().await.status, 200);
    let verified = tokio::time::Instant::now();
    store.hooks.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(call().await.status, 200, "within cache_ttl + outage_grace");
    // Past cache_ttl + outage_grace (500 ms after the verification): refused.
    tokio::time::sleep_until(verified + Duration::from_millis(600)).await;
    call().await.assert_error(503, "store_unavailable");
}

/// A store where the lookup of one token hangs until released; counts lookups
/// in flight at once.
struct Gate {
    slow: std::sync::OnceLock<[u8; 32]>,
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

#[async_trait::async_trait]
impl Hooks for Gate {
    async fn find_proxy_token(
        &self,
        inner: &dyn LinkStore,
        h: &[u8; 32],
    ) -> Result<Option<ProxyTokenInfo>, StoreError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        if self.slow.get() == Some(h) {
            self.entered.notify_one();
            self.release.notified().await;
        }
        let found = inner.find_proxy_token(h).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        found
    }
    async fn touch_proxy_token(&self, _: &dyn LinkStore, _: Uuid) -> Result<(), StoreError> {
        Ok(())
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn unknown_token_lookups_are_bounded_and_known_callers_are_not(pool: PgPool) {
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let store = Arc::new(HookedStore::new(
        PgStore::from_pool(pool, Keyring::plaintext()),
        Gate {
            slow: std::sync::OnceLock::new(),
            entered: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
        },
    ));
    let user = Uuid::new_v4();
    let (_, slow) = create_token(&*store, user, &[]).await;
    let (_, other) = create_token(&*store, user, &[]).await;
    let (_, known) = create_token(&*store, user, &[]).await;
    let slow_hash = tokenproxy::proxy::caller::hash_token(&slow.clone().into());
    store.hooks.slow.set(slow_hash).unwrap();
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let config = harness::config(&config_toml(
        &api.url(),
        "cache_ttl = \"200ms\"\nmax_concurrent_lookups = 1\nlookup_wait = \"100ms\"",
    ));
    let proxy = Harness::start(config, store.clone(), fake).await;
    let call = |token: String| {
        let url = proxy.url("/gh/api/user");
        async move { get(&url, &[("authorization", &format!("Bearer {token}"))]).await }
    };
    assert_eq!(call(known.clone()).await.status, 200);
    let verified = tokio::time::Instant::now();
    // The one lookup slot is taken by a lookup that hangs.
    let hanging = tokio::spawn(call(slow));
    store.hooks.entered.notified().await;
    // Another unknown token waits lookup_wait for the slot, then gets 503.
    call(other.clone())
        .await
        .assert_error(503, "store_unavailable");
    // A caller verified before is re-read without a slot once its cache_ttl ran out.
    tokio::time::sleep_until(verified + Duration::from_millis(250)).await;
    assert_eq!(call(known).await.status, 200, "known caller not locked out");
    store.hooks.release.notify_one();
    assert_eq!(hanging.await.unwrap().status, 200);
    assert_eq!(
        call(other).await.status,
        200,
        "a new lookup after the slot frees"
    );
    // The hanging lookup and the known caller's re-read, never two unknown ones.
    assert_eq!(store.hooks.most_in_flight.load(Ordering::SeqCst), 2);
}

/// p99 of `samples`.
fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() * 99 / 100]
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_flood_of_random_tokens_costs_no_query(pool: PgPool) {
    use secrecy::ExposeSecret;
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let store = Arc::new(HookedStore::new(
        PgStore::from_pool(pool, Keyring::plaintext()),
        Counting::new(),
    ));
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    // Every failure here comes from one address: the failed-authentication
    // rate limit (tested in proxy_limits.rs) would answer 429 long before the
    // end, and this test is about what a forged token costs without it.
    let config = harness::config(&config_toml(
        &api.url(),
        "cache_ttl = \"1h\"\nauth_failure_limit = 0",
    ));
    let proxy = Harness::start(config, store.clone(), fake).await;
    let legit = |n: usize| {
        let url = proxy.url("/gh/api/user");
        let auth = format!("Bearer {token}");
        async move {
            let mut took = Vec::with_capacity(n);
            for _ in 0..n {
                let t = tokio::time::Instant::now();
                assert_eq!(get(&url, &[("authorization", &auth)]).await.status, 200);
                took.push(t.elapsed());
            }
            took
        }
    };
    let quiet = p99(legit(200).await);
    // 10,000 random tokens of the new length, 50 at a time, beside the caller.
    let flood = {
        let url = proxy.url("/gh/api/user");
        async move {
            for _ in 0..200 {
                let batch = (0..50).map(|_| {
                    let (t, _) = tokenproxy::proxy::caller::generate_token();
                    // A random body with another token's checksum: forged.
                    let mut t = t.expose_secret().to_string();
                    t.replace_range(t.len() - 6.., "000000");
                    let url = url.clone();
                    async move {
                        get(&url, &[("authorization", &format!("Bearer {t}"))])
                            .await
                            .status
                    }
                });
                for status in futures_util::future::join_all(batch).await {
                    assert_eq!(status, 401);
                }
            }
        }
    };
    let started = tokio::time::Instant::now();
    let ((), loaded) = tokio::join!(flood, legit(200));
    let flood_took = started.elapsed();
    let loaded = p99(loaded);
    eprintln!(
        "10,000 forged tokens in {flood_took:?}; legit p99 quiet {quiet:?}, under flood {loaded:?}"
    );
    assert_eq!(
        store.hooks.finds.load(Ordering::SeqCst),
        1,
        "only the real token was ever looked up"
    );
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn static_mode_serves_its_user_without_a_credential(pool: PgPool) {
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let config = harness::config(&config_toml(
        &api.url(),
        &format!("mode = \"static\"\nstatic_user = \"{user}\""),
    ));
    let proxy = Harness::start(config, store, fake).await;
    let a = get(&proxy.url("/gh/api/user"), &[]).await;
    assert_eq!(a.status, 200);
    // A caller-supplied credential is replaced, never forwarded.
    let a = get(
        &proxy.url("/gh/api/user"),
        &[
            ("authorization", "Bearer caller-own"),
            ("proxy-authorization", "Basic eDp5"),
        ],
    )
    .await;
    assert_eq!(a.status, 200);
    for r in api.requests() {
        assert_eq!(r.token.as_deref(), Some(GH_TOKEN));
        assert!(r.headers.get("proxy-authorization").is_none());
        assert_eq!(r.headers.get_all("authorization").iter().count(), 1);
    }
}
