//! The refresh lease covers the whole exchange, and a refreshed token's lifetime
//! counts from when its request was sent (issue 11, must-haves 1 and 8).

#[path = "tokens_harness/mod.rs"]
mod harness;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use harness::*;
use parking_lot::Mutex;
use sqlx::PgPool;
use support::idp::{Idp, IdpOptions, ManualClock};
use support::store_wrapper::{HookedStore, Hooks};
use tokenproxy::config::TokensConfig;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{Fence, LeaseClaim, LinkStore, StoreError, StoredSecret, TokenSet};
use tokenproxy::tokens::{Clock, TokenError};
use tokio::sync::Notify;
use uuid::Uuid;

/// The IdP's clock: the shared manual clock, moved forward once (when armed) as the
/// IdP handles a request — a provider that takes ten minutes to answer.
struct SlowAnswer {
    clock: Arc<ManualClock>,
    armed: AtomicBool,
}

impl Clock for SlowAnswer {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        if self.armed.swap(false, Ordering::AcqRel) {
            self.clock.advance(Duration::from_secs(600));
        }
        self.clock.now()
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn expiry_counts_from_when_the_request_was_sent(pool: PgPool) {
    let clock = ManualClock::new();
    let idp_clock = Arc::new(SlowAnswer {
        clock: clock.clone(),
        armed: AtomicBool::new(false),
    });
    let idp = Idp::start(IdpOptions {
        clock: idp_clock.clone(),
        ..IdpOptions::default()
    })
    .await;
    let (store, user) = (harness::store(&pool), Uuid::new_v4());
    seed_expired(&idp, &store, &*clock, user).await;
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    let sent = clock.now();
    idp_clock.armed.store(true, Ordering::Release);
    r.source.get(P, user).await.expect("refreshed");
    assert!(
        clock.now() >= sent + chrono::Duration::seconds(600),
        "the answer took ten minutes"
    );
    let row = store.get_link(P, user).await.unwrap().unwrap();
    let expiry = row.expiry.expect("the IdP's tokens expire");
    // The IdP grants an hour, counted from the request.
    let latest = sent + chrono::Duration::seconds(3600);
    assert!(
        expiry <= latest + chrono::Duration::seconds(1),
        "expiry {expiry} is later than send time + expires_in ({latest})"
    );
    assert_eq!(idp.refreshes(), 1);
}

/// A database that takes `0` (real time) to answer a lease claim.
struct SlowClaim(Duration);

#[async_trait::async_trait]
impl Hooks for SlowClaim {
    async fn claim_refresh_lease(
        &self,
        inner: &dyn LinkStore,
        p: &str,
        u: Uuid,
        old: &StoredSecret,
        lease: Duration,
    ) -> Result<LeaseClaim, StoreError> {
        let claim = inner.claim_refresh_lease(p, u, old, lease).await;
        // The claim applied on the database; its answer is slow to come back.
        tokio::time::sleep(self.0).await;
        claim
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn no_exchange_starts_when_the_lease_cannot_cover_it(pool: PgPool) {
    let (clock, idp, store, user) = setup(&pool).await;
    seed_expired(&idp, &store, &*clock, user).await;
    // A 4 s lease keeps 1 s for the write: 3 s for the provider, whose per-attempt
    // timeout is 2 s (the test IdP's provider config). A claim answered after
    // 1.5 s leaves 1.5 s — not enough for one attempt.
    let cfg = TokensConfig {
        lease_timeout: Duration::from_secs(4),
        ..tokens_cfg()
    };
    let slow = HookedStore::new(store.clone(), SlowClaim(Duration::from_millis(1500)));
    let r = replica_with(Arc::new(slow), &[idp.provider(P)], &cfg, clock.clone()).await;
    assert_eq!(
        r.source.get(P, user).await.unwrap_err(),
        TokenError::IdpUnavailable
    );
    assert_eq!(
        idp.attempts(),
        0,
        "no refresh token presented on a lease too short for the exchange"
    );
    assert_link_intact(&idp, &store, user).await;
}

/// Replica A's database: the write after its exchange is slow. It starts only
/// once A's claimed lease has run out (on the database clock), lets replica B
/// try the link, and is applied after B's claim was answered.
struct SlowWrite {
    b_may_go: Arc<Notify>,
    b_claimed: Arc<Notify>,
    delayed: AtomicBool,
}

#[async_trait::async_trait]
impl Hooks for SlowWrite {
    async fn write_refreshed(
        &self,
        inner: &dyn LinkStore,
        p: &str,
        u: Uuid,
        old: &Fence,
        new: &TokenSet,
    ) -> Result<bool, StoreError> {
        if !self.delayed.swap(true, Ordering::AcqRel) {
            let row = inner.get_link(p, u).await?.expect("link exists");
            let claimed_until = row.lease_expires_at.expect("A holds the lease");
            // Nothing to await: the point is that real time passes the lease A
            // claimed while this write hangs.
            let past = (claimed_until - chrono::Utc::now() + chrono::Duration::milliseconds(300))
                .to_std()
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(past).await;
            self.b_may_go.notify_one();
            self.b_claimed.notified().await;
        }
        inner.write_refreshed(p, u, old, new).await
    }
}

/// Replica B's database: records what each claim answered.
struct RecordClaims {
    claimed: Arc<Notify>,
    answers: Arc<Mutex<Vec<&'static str>>>,
}

#[async_trait::async_trait]
impl Hooks for RecordClaims {
    async fn claim_refresh_lease(
        &self,
        inner: &dyn LinkStore,
        p: &str,
        u: Uuid,
        old: &StoredSecret,
        lease: Duration,
    ) -> Result<LeaseClaim, StoreError> {
        let claim = inner.claim_refresh_lease(p, u, old, lease).await;
        let answer = match &claim {
            Ok(LeaseClaim::Acquired(_)) => "acquired",
            Ok(LeaseClaim::Held { .. }) => "held",
            Ok(LeaseClaim::Changed) => "changed",
            Err(_) => "error",
        };
        self.answers.lock().push(answer);
        self.claimed.notify_one();
        claim
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn the_holder_extends_its_lease_while_a_slow_write_runs(pool: PgPool) {
    let (clock, idp, store, user) = setup(&pool).await;
    seed_expired(&idp, &store, &*clock, user).await;
    let cfg = TokensConfig {
        lease_timeout: Duration::from_secs(4),
        ..tokens_cfg()
    };
    let (b_may_go, b_claimed) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let answers = Arc::new(Mutex::new(Vec::new()));
    let a_store = HookedStore::new(
        PgStore::from_pool(own_pool(&pool).await, Keyring::plaintext()),
        SlowWrite {
            b_may_go: b_may_go.clone(),
            b_claimed: b_claimed.clone(),
            delayed: AtomicBool::new(false),
        },
    );
    let b_store = HookedStore::new(
        PgStore::from_pool(own_pool(&pool).await, Keyring::plaintext()),
        RecordClaims {
            claimed: b_claimed,
            answers: answers.clone(),
        },
    );
    let a = replica_with(Arc::new(a_store), &[idp.provider(P)], &cfg, clock.clone()).await;
    let b = replica_with(Arc::new(b_store), &[idp.provider(P)], &cfg, clock.clone()).await;
    let a_source = a.source.clone();
    let a_get = tokio::spawn(async move { a_source.get(P, user).await });
    b_may_go.notified().await;
    let b_token = b.source.get(P, user).await.expect("B serves a token");
    let a_token = a_get.await.unwrap().expect("A refreshed");
    // One exchange, and the spent refresh token was never presented again.
    idp.assert_grants(1, 1, 0);
    assert_eq!(
        answers.lock().first().copied(),
        Some("held"),
        "A's lease, extended past what it claimed, still holds the row"
    );
    assert_eq!(
        a_token.expose_secret(),
        b_token.expose_secret(),
        "B serves A's token"
    );
    assert_link_intact(&idp, &store, user).await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_slow_answer_within_the_budget_is_waited_for(pool: PgPool) {
    let (clock, idp, store, user) = setup(&pool).await;
    seed_expired(&idp, &store, &*clock, user).await;
    // The provider's per-attempt timeout is 2 s; the default lease leaves the
    // exchange 25 s. An answer after 3 s carries the rotated refresh token: giving
    // up on it would lose that token and leave the spent one in the row.
    idp.set_latency(Duration::from_secs(3));
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    let token = r
        .source
        .get(P, user)
        .await
        .expect("the slow answer is used");
    assert!(idp.is_valid_access_token(token.expose_secret()));
    idp.assert_grants(1, 1, 0);
    assert_link_intact(&idp, &store, user).await;
}

/// Replica A's database refuses the first writes after its exchange (so the
/// token is handed to a background re-save); the re-save's first attempt lets
/// replica B try the link before failing too.
struct RefusedWrites {
    calls: std::sync::atomic::AtomicU32,
    b_may_go: Arc<Notify>,
    b_claimed: Arc<Notify>,
}

#[async_trait::async_trait]
impl Hooks for RefusedWrites {
    async fn write_refreshed(
        &self,
        inner: &dyn LinkStore,
        p: &str,
        u: Uuid,
        old: &Fence,
        new: &TokenSet,
    ) -> Result<bool, StoreError> {
        let call = self.calls.fetch_add(1, Ordering::AcqRel) + 1;
        // Three attempts in the flight, then the background re-save's first.
        if call == 4 {
            self.b_may_go.notify_one();
            self.b_claimed.notified().await;
        }
        if call <= 4 {
            return Err(StoreError::Unavailable("refused by the test".into()));
        }
        inner.write_refreshed(p, u, old, new).await
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_background_resave_keeps_the_lease(pool: PgPool) {
    let (clock, idp, store, user) = setup(&pool).await;
    seed_expired(&idp, &store, &*clock, user).await;
    let (b_may_go, b_claimed) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let answers = Arc::new(Mutex::new(Vec::new()));
    let a_store = HookedStore::new(
        PgStore::from_pool(own_pool(&pool).await, Keyring::plaintext()),
        RefusedWrites {
            calls: Default::default(),
            b_may_go: b_may_go.clone(),
            b_claimed: b_claimed.clone(),
        },
    );
    let b_store = HookedStore::new(
        PgStore::from_pool(own_pool(&pool).await, Keyring::plaintext()),
        RecordClaims {
            claimed: b_claimed,
            answers: answers.clone(),
        },
    );
    let cfg = tokens_cfg();
    let a = replica_with(Arc::new(a_store), &[idp.provider(P)], &cfg, clock.clone()).await;
    let b = replica_with(Arc::new(b_store), &[idp.provider(P)], &cfg, clock.clone()).await;
    let a_token = a.source.get(P, user).await.expect("A serves its new token");
    b_may_go.notified().await;
    let b_result = b.source.get(P, user).await;
    idp.assert_grants(1, 1, 0);
    assert_eq!(
        answers.lock().first().copied(),
        Some("held"),
        "the re-save still holds the lease"
    );
    let b_token = b_result.expect("B serves a token");
    assert_eq!(a_token.expose_secret(), b_token.expose_secret());
    assert_link_intact(&idp, &store, user).await;
}
