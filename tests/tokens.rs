//! Acceptance tests of the token source (issue 3) against real Postgres and the
//! test identity provider (single-use rotating refresh tokens, counting every grant).
//!
//! Each "replica" is an independent `TokenSource` with its own pool, cache and
//! metrics over the same database. Expiry is driven by a shared [`ManualClock`].

mod support;

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use support::idp::{Fault, Idp, IdpOptions, ManualClock};
use tokenproxy::config::{ProviderConfig, TokensConfig};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{LeaseClaim, LinkStore};
use tokenproxy::telemetry::{Metrics, RefreshLabels, RefreshOutcome};
use tokenproxy::tokens::{AccessToken, Clock, TokenError, TokenSource};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const P: &str = "idp";

/// One independent token source with its own pool, cache and metrics.
struct Replica {
    source: Arc<TokenSource>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Replica {
    fn outcome(&self, outcome: RefreshOutcome) -> u64 {
        self.metrics
            .refresh
            .get_or_create(&RefreshLabels {
                provider: P.into(),
                outcome,
            })
            .get()
    }
}

async fn own_pool(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap()
}

fn tokens_cfg() -> TokensConfig {
    TokensConfig {
        refresh_ahead: false,
        ..TokensConfig::default()
    }
}

async fn replica_with(
    store: Arc<dyn LinkStore>,
    providers: &[ProviderConfig],
    cfg: &TokensConfig,
    clock: Arc<dyn Clock>,
) -> Replica {
    let metrics = Metrics::new();
    let source = TokenSource::new(store, providers, cfg, metrics.clone(), clock).unwrap();
    let shutdown = CancellationToken::new();
    source.spawn_background(shutdown.clone());
    Replica {
        source,
        metrics,
        shutdown,
    }
}

async fn replica(
    pool: &PgPool,
    providers: &[ProviderConfig],
    cfg: &TokensConfig,
    clock: Arc<dyn Clock>,
) -> Replica {
    let store = Arc::new(PgStore::from_pool(
        own_pool(pool).await,
        Keyring::plaintext(),
    ));
    replica_with(store, providers, cfg, clock).await
}

fn store(pool: &PgPool) -> PgStore {
    PgStore::from_pool(pool.clone(), Keyring::plaintext())
}

/// Seeds a link whose access token already expired (at the IdP too).
async fn seed_expired(idp: &Idp, store: &PgStore, clock: &dyn Clock, user: Uuid) {
    let set = idp.seed_with_expiry(user, Some(clock.now() - chrono::Duration::seconds(10)));
    store.put_link(P, user, &set).await.unwrap();
}

/// Asserts the stored link holds the IdP's current refresh token and no failure.
async fn assert_link_intact(idp: &Idp, store: &PgStore, user: Uuid) {
    let row = store.get_link(P, user).await.unwrap().expect("link exists");
    assert_eq!(
        Some(row.refresh_token.expose_secret().to_string()),
        idp.current_refresh_token(user),
        "row holds the provider's current refresh token"
    );
    assert_eq!(row.refresh_failure_reason, "");
}

/// Waits (bounded) for a background effect such as a change notification.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn concurrent_gets(
    r: &Replica,
    user: Uuid,
    n: usize,
) -> Vec<Result<AccessToken, TokenError>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let s = r.source.clone();
            tokio::spawn(async move { s.get(P, user).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn all_same(results: &[Result<AccessToken, TokenError>]) -> AccessToken {
    let first = results[0].as_ref().expect("get succeeded").clone();
    for r in results {
        let t = r.as_ref().expect("get succeeded");
        assert_eq!(
            t.expose_secret(),
            first.expose_secret(),
            "all callers got the same token"
        );
    }
    first
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn five_hundred_concurrent_gets_refresh_once(pool: PgPool) {
    let clock = ManualClock::new();
    let idp = Idp::start(IdpOptions {
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    idp.set_latency(Duration::from_millis(50));
    let st = store(&pool);
    let user = Uuid::new_v4();
    seed_expired(&idp, &st, &*clock, user).await;
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;

    let results = concurrent_gets(&r, user, 500).await;
    let token = all_same(&results);
    assert_eq!(idp.attempts(), 1, "the provider saw exactly one request");
    assert_eq!(idp.refreshes(), 1);
    assert!(idp.is_valid_access_token(token.expose_secret()));
    assert_eq!(r.outcome(RefreshOutcome::Success), 1);
    assert_link_intact(&idp, &st, user).await;

    // Later lookups are cache hits: still one refresh.
    for _ in 0..10 {
        assert!(r.source.get(P, user).await.unwrap().same_version(&token));
    }
    assert_eq!(idp.attempts(), 1);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn three_replicas_refresh_once(pool: PgPool) {
    let clock = ManualClock::new();
    let idp = Idp::start(IdpOptions {
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    idp.set_latency(Duration::from_millis(50));
    let st = store(&pool);
    let user = Uuid::new_v4();
    seed_expired(&idp, &st, &*clock, user).await;
    let providers = [idp.provider(P)];
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(replica(&pool, &providers, &tokens_cfg(), clock.clone()).await);
    }

    for round in 1..=2u64 {
        let tasks: Vec<_> = replicas
            .iter()
            .map(|r| {
                let s = r.source.clone();
                tokio::spawn(async move {
                    let r = Replica {
                        source: s,
                        metrics: Metrics::new(),
                        shutdown: CancellationToken::new(),
                    };
                    concurrent_gets(&r, user, 200).await
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        assert_eq!(all.len(), 600);
        let token = all_same(&all);
        assert_eq!(idp.refreshes(), round, "exactly one refresh per expiry");
        assert_eq!(idp.rejected(), 0);
        assert!(idp.is_valid_access_token(token.expose_secret()));
        assert_link_intact(&idp, &st, user).await;
        // The next expiry: two hours later.
        clock.advance(Duration::from_secs(7200));
    }
    let adopted: u64 = replicas
        .iter()
        .map(|r| r.outcome(RefreshOutcome::Adopted))
        .sum();
    let success: u64 = replicas
        .iter()
        .map(|r| r.outcome(RefreshOutcome::Success))
        .sum();
    assert_eq!(success, 2);
    assert!(adopted >= 1, "waiting replicas adopted the winner's token");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn dead_lease_holder_delays_at_most_the_lease(pool: PgPool) {
    let clock = ManualClock::new();
    let idp = Idp::start(IdpOptions {
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    let st = store(&pool);
    let user = Uuid::new_v4();
    seed_expired(&idp, &st, &*clock, user).await;
    let mut provider = idp.provider(P);
    provider.timeout = Duration::from_millis(500);
    let cfg = TokensConfig {
        lease_timeout: Duration::from_secs(1),
        ..tokens_cfg()
    };
    // A "replica" claims the lease and dies: it never refreshes nor releases.
    let row = st.get_link(P, user).await.unwrap().unwrap();
    let claim = st
        .claim_refresh_lease(P, user, &row.refresh_token_stored, cfg.lease_timeout)
        .await
        .unwrap();
    assert!(matches!(claim, LeaseClaim::Acquired(_)));

    let r = replica(&pool, &[provider], &cfg, clock.clone()).await;
    let token = r
        .source
        .get(P, user)
        .await
        .expect("refreshed after the lease ran out");
    assert!(idp.is_valid_access_token(token.expose_secret()));
    assert_eq!(idp.refreshes(), 1);
    assert_eq!(idp.rejected(), 0);
    assert_link_intact(&idp, &st, user).await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn revoked_grant_is_permanent_and_asked_once(pool: PgPool) {
    let clock = ManualClock::new();
    let idp = Idp::start(IdpOptions {
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    let st = store(&pool);
    let user = Uuid::new_v4();
    seed_expired(&idp, &st, &*clock, user).await;
    idp.revoke(user);
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;

    assert_eq!(
        r.source.get(P, user).await.unwrap_err(),
        TokenError::ReauthRequired
    );
    for _ in 0..100 {
        assert_eq!(
            r.source.get(P, user).await.unwrap_err(),
            TokenError::ReauthRequired
        );
    }
    assert_eq!(idp.attempts(), 1, "the provider saw one attempt in total");
    assert_eq!(r.outcome(RefreshOutcome::InvalidGrant), 1);
    let row = st.get_link(P, user).await.unwrap().unwrap();
    assert!(!row.refresh_failure_reason.is_empty());

    // A new login (link put) clears it, and every replica sees it at once.
    st.put_link(P, user, &idp.seed(user)).await.unwrap();
    eventually("the new link is served", || async {
        r.source.get(P, user).await.is_ok()
    })
    .await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn github_bad_refresh_token_is_permanent(pool: PgPool) {
    let clock = ManualClock::new();
    let idp = Idp::start(IdpOptions {
        clock: clock.clone(),
        github_style: true,
        ..Default::default()
    })
    .await;
    let st = store(&pool);
    let user = Uuid::new_v4();
    seed_expired(&idp, &st, &*clock, user).await;
    idp.revoke(user);
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    for _ in 0..5 {
        assert_eq!(
            r.source.get(P, user).await.unwrap_err(),
            TokenError::ReauthRequired
        );
    }
    assert_eq!(idp.attempts(), 1);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn transient_failures_record_nothing_and_recover(pool: PgPool) {
    let clock = ManualClock::new();
    let idp = Idp::start(IdpOptions {
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    let st = store(&pool);
    let user = Uuid::new_v4();
    seed_expired(&idp, &st, &*clock, user).await;
    let mut provider = idp.provider(P);
    provider.timeout = Duration::from_millis(300);
    let r = replica(&pool, &[provider], &tokens_cfg(), clock.clone()).await;

    // 500s on every retry inside the budget → idp_unavailable, nothing recorded.
    for _ in 0..4 {
        idp.push_fault(Fault::ServerError);
    }
    assert_eq!(
        r.source.get(P, user).await.unwrap_err(),
        TokenError::IdpUnavailable
    );
    assert_eq!(idp.attempts(), 4, "bounded retries");
    assert_eq!(idp.refreshes(), 0);
    assert_link_intact(&idp, &st, user).await;

    // A hang past the provider deadline → idp_unavailable, not retried (the provider
    // may have processed it), nothing recorded.
    idp.push_fault(Fault::Hang(Duration::from_secs(2)));
    assert_eq!(
        r.source.get(P, user).await.unwrap_err(),
        TokenError::IdpUnavailable
    );
    assert_link_intact(&idp, &st, user).await;
    assert_eq!(r.outcome(RefreshOutcome::TransientError), 2);
    assert_eq!(r.outcome(RefreshOutcome::InvalidGrant), 0);

    // 429 with Retry-After: honoured and retried inside the budget.
    idp.push_fault(Fault::TooManyRequests {
        retry_after_secs: 0,
    });
    let before = idp.attempts();
    let token = r.source.get(P, user).await.expect("recovered");
    assert_eq!(idp.attempts() - before, 2);
    assert!(idp.is_valid_access_token(token.expose_secret()));
    assert_eq!(idp.refreshes(), 1);
    assert_link_intact(&idp, &st, user).await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn transient_failure_serves_still_valid_token(pool: PgPool) {
    let clock = ManualClock::new();
    let idp = Idp::start(IdpOptions {
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    let st = store(&pool);
    let user = Uuid::new_v4();
    // Within the skew (60 s) but not expired: due for refresh, still works.
    let set = idp.seed_with_expiry(user, Some(clock.now() + chrono::Duration::seconds(30)));
    st.put_link(P, user, &set).await.unwrap();
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    for _ in 0..4 {
        idp.push_fault(Fault::ServerError);
    }
    let token = r
        .source
        .get(P, user)
        .await
        .expect("still-valid token served");
    assert_eq!(token.expose_secret(), set.access_token.expose_secret());
    assert!(idp.is_valid_access_token(token.expose_secret()));
    assert_link_intact(&idp, &st, user).await;
    // Recovery: the next call refreshes.
    let fresh = r.source.get(P, user).await.unwrap();
    assert_ne!(fresh.expose_secret(), set.access_token.expose_secret());
    assert_eq!(idp.refreshes(), 1);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn expiry_follows_the_injected_clock(pool: PgPool) {
    let clock = ManualClock::new();
    let idp = Idp::start(IdpOptions {
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    let st = store(&pool);
    let user = Uuid::new_v4();
    let set = idp.seed_with_expiry(user, Some(clock.now() + chrono::Duration::seconds(120)));
    st.put_link(P, user, &set).await.unwrap();
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    let t0 = r.source.get(P, user).await.unwrap();
    assert_eq!(t0.expose_secret(), set.access_token.expose_secret());
    clock.advance(Duration::from_secs(59)); // 61 s left > 60 s skew: usable
    assert!(r.source.get(P, user).await.unwrap().same_version(&t0));
    assert_eq!(idp.attempts(), 0);
    clock.advance(Duration::from_secs(1)); // 60 s left: inside the skew
    let t1 = r.source.get(P, user).await.unwrap();
    assert!(!t1.same_version(&t0));
    assert_eq!(idp.refreshes(), 1);
    // expires_in → absolute expiry on the injected clock.
    assert_eq!(
        t1.expiry(),
        Some(clock.now() + chrono::Duration::seconds(3600))
    );
}
