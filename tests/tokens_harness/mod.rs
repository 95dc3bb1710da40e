//! Shared harness of the token source tests: "replicas" (independent token
//! sources with their own pools, caches and metrics over one database), seeding,
//! and the link invariants every test checks.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokenproxy::config::{ProviderConfig, TokensConfig};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::LinkStore;
use tokenproxy::telemetry::{Metrics, RefreshLabels, RefreshOutcome};
use tokenproxy::tokens::{AccessToken, Clock, TokenError, TokenSource};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::idp::{Idp, IdpOptions, ManualClock};

pub const P: &str = "idp";

/// One independent token source with its own pool, cache and metrics.
pub struct Replica {
    pub source: Arc<TokenSource>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Replica {
    pub fn outcome(&self, outcome: RefreshOutcome) -> u64 {
        self.metrics
            .refresh
            .get_or_create(&RefreshLabels {
                provider: P.into(),
                outcome,
            })
            .get()
    }
}

pub async fn own_pool(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap()
}

pub fn tokens_cfg() -> TokensConfig {
    TokensConfig {
        refresh_ahead: false,
        ..TokensConfig::default()
    }
}

pub async fn replica_with(
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

pub async fn replica(
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

pub fn store(pool: &PgPool) -> PgStore {
    PgStore::from_pool(pool.clone(), Keyring::plaintext())
}

/// A manual clock and the test identity provider (with `opts`) running on it.
pub async fn idp_with(opts: IdpOptions) -> (Arc<ManualClock>, Idp) {
    let clock = ManualClock::new();
    let idp = Idp::start(IdpOptions {
        clock: clock.clone(),
        ..opts
    })
    .await;
    (clock, idp)
}

/// The common start of a test: a manual clock, the default identity provider on
/// it, the store over the test's database, and a fresh user.
pub async fn setup(pool: &PgPool) -> (Arc<ManualClock>, Idp, PgStore, Uuid) {
    let (clock, idp) = idp_with(IdpOptions::default()).await;
    (clock, idp, store(pool), Uuid::new_v4())
}

/// Seeds a link whose access token already expired (at the IdP too).
pub async fn seed_expired(idp: &Idp, store: &PgStore, clock: &dyn Clock, user: Uuid) {
    let set = idp.seed_with_expiry(user, Some(clock.now() - chrono::Duration::seconds(10)));
    store.put_link(P, user, &set).await.unwrap();
}

/// Asserts the stored link holds the IdP's current refresh token and no failure.
pub async fn assert_link_intact(idp: &Idp, store: &PgStore, user: Uuid) {
    let row = store.get_link(P, user).await.unwrap().expect("link exists");
    assert_eq!(
        Some(row.refresh_token.expose_secret().to_string()),
        idp.current_refresh_token(user),
        "row holds the provider's current refresh token"
    );
    assert_eq!(row.refresh_failure_reason, "");
}

pub use crate::support::util::eventually;

pub async fn concurrent_gets(
    source: &Arc<TokenSource>,
    user: Uuid,
    n: usize,
) -> Vec<Result<AccessToken, TokenError>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let s = source.clone();
            tokio::spawn(async move { s.get(P, user).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// `per_replica` concurrent gets on every replica at once; every result.
pub async fn gets_on_every_replica(
    replicas: &[Replica],
    user: Uuid,
    per_replica: usize,
) -> Vec<Result<AccessToken, TokenError>> {
    let tasks: Vec<_> = replicas
        .iter()
        .map(|r| {
            let s = r.source.clone();
            tokio::spawn(async move { concurrent_gets(&s, user, per_replica).await })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// How many refreshes ended with `outcome`, over all `replicas`.
pub fn outcome_sum(replicas: &[Replica], outcome: RefreshOutcome) -> u64 {
    replicas.iter().map(|r| r.outcome(outcome)).sum()
}

/// Checks one round of gets across replicas: `expected` results, all the same
/// valid token, `round` refreshes in total so far and no rejected grant.
#[track_caller]
pub fn assert_round(
    all: &[Result<AccessToken, TokenError>],
    expected: usize,
    idp: &Idp,
    round: u64,
) -> AccessToken {
    assert_eq!(all.len(), expected);
    let token = all_same(all);
    // Exactly one grant per expiry, and no double spend.
    idp.assert_grants(round, round, 0);
    assert!(idp.is_valid_access_token(token.expose_secret()));
    token
}

pub fn all_same(results: &[Result<AccessToken, TokenError>]) -> AccessToken {
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

/// Runs `f` on a multi-thread runtime (one copy, in `support::runtime`).
#[allow(unused_imports)]
pub use crate::support::runtime::on_multi_thread;

impl Replica {
    /// Cache hits so far.
    pub fn hits(&self) -> u64 {
        use tokenproxy::telemetry::{LookupLabels, LookupResult};
        self.metrics
            .token_lookups
            .get_or_create(&LookupLabels {
                result: LookupResult::Hit,
            })
            .get()
    }

    /// Keys dropped from the cache so far (by notifications and by resyncs).
    pub fn invalidations(&self) -> u64 {
        self.metrics.cache_invalidations.get()
    }

    /// Waits for the change feed's first resync: until then a cached entry may be
    /// retired by it, which would hide whether a notification did the work.
    pub async fn synced(&self) {
        eventually("the change feed's first resync", || async {
            self.source.resyncs() >= 1
        })
        .await;
    }

    /// Asserts the next lookup of `user` is served from the cache.
    #[track_caller]
    pub fn assert_hit<'a>(
        &'a self,
        user: Uuid,
    ) -> impl std::future::Future<Output = AccessToken> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let before = self.hits();
            let token = self.source.get(P, user).await.unwrap();
            assert_eq!(self.hits(), before + 1, "not a cache hit (at {caller})");
            token
        }
    }

    /// Gets until the token is served from the cache: the change feed's first
    /// resync may retire what the first lookup cached.
    pub async fn warm(&self, user: Uuid) -> AccessToken {
        let before = self.hits();
        for _ in 0..200 {
            let token = self.source.get(P, user).await.unwrap();
            if self.hits() > before {
                return token;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the token never got cached");
    }
}
