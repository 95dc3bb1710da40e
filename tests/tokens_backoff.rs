//! Transient provider failures are remembered (issue 11, must-have 4): an IdP
//! outage costs O(log) token requests rather than one flight per caller request,
//! the still-valid token is served meanwhile, and recovery comes within one
//! backoff step. Time is the shared [`ManualClock`], so no test waits for real.

#[path = "tokens_harness/mod.rs"]
mod harness;
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use harness::*;
use sqlx::PgPool;
use support::idp::Fault;
use support::store_wrapper::{HookedStore, Hooks};
use tokenproxy::store::{Link, LinkStore, StoreError};
use tokenproxy::tokens::{Clock, TokenError};
use uuid::Uuid;

/// Counts link reads.
#[derive(Clone, Default)]
struct CountReads(Arc<AtomicU64>);

#[async_trait::async_trait]
impl Hooks for CountReads {
    async fn get_link(
        &self,
        inner: &dyn LinkStore,
        p: &str,
        u: Uuid,
    ) -> Result<Option<Link>, StoreError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        inner.get_link(p, u).await
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn an_idp_outage_costs_log_attempts_and_recovers_within_one_step(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    seed_expired(&idp, &st, &*clock, user).await;
    let reads = CountReads::default();
    let hooked: Arc<dyn LinkStore> = Arc::new(HookedStore::new(st.clone(), reads.clone()));
    let r = replica_with(hooked, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    // The token endpoint answers 500 to everything for the whole outage.
    for _ in 0..10_000 {
        idp.push_fault(Fault::ServerError);
    }
    // 10 s at 50 requests per second.
    for i in 0..500 {
        let got = r.source.get(P, user).await;
        assert_eq!(got.unwrap_err(), TokenError::IdpUnavailable, "request {i}");
        clock.advance(Duration::from_millis(20));
    }
    let attempts = idp.attempts();
    eprintln!(
        "outage: 500 requests -> {attempts} token requests, {} store reads",
        reads.0.load(Ordering::SeqCst)
    );
    // Backoff 1, 2, 4, 8 s: flights at about 0, 1, 3 and 7 s (+1 for rounding),
    // each at most 4 attempts inside its own budget.
    assert!(
        attempts <= 5 * 4,
        "{attempts} token requests for 500 caller requests"
    );
    assert!(
        reads.0.load(Ordering::SeqCst) <= 5 * 3,
        "store reads during the outage"
    );
    assert_eq!(idp.refreshes(), 0);
    let wait = r.source.retry_after(P, user).expect("backing off");
    assert!(wait <= Duration::from_secs(8), "{wait:?}");

    // The provider heals: the next request after one backoff step refreshes.
    idp.clear_faults();
    clock.advance(wait);
    let t = r.source.get(P, user).await.expect("recovered");
    assert!(idp.is_valid_access_token(t.expose_secret()));
    assert_eq!(idp.refreshes(), 1);
    assert!(r.source.retry_after(P, user).is_none());
    assert_link_intact(&idp, &st, user).await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn the_still_valid_token_is_served_while_backing_off(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    // Inside the refresh skew (60 s) but not expired: due, and still working.
    let set = idp.seed_with_expiry(user, Some(clock.now() + chrono::Duration::seconds(30)));
    st.put_link(P, user, &set).await.unwrap();
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    for _ in 0..100 {
        idp.push_fault(Fault::ServerError);
    }
    for _ in 0..50 {
        let t = r
            .source
            .get(P, user)
            .await
            .expect("the old token still works");
        assert!(idp.is_valid_access_token(t.expose_secret()));
        clock.advance(Duration::from_millis(20));
    }
    // One flight (up to 4 attempts); the rest met the 1 s backoff.
    assert!(idp.attempts() <= 4, "{}", idp.attempts());
    // Past expiry: idp_unavailable, with a Retry-After hint.
    clock.advance(Duration::from_secs(31));
    let before = idp.attempts();
    let err = loop {
        match r.source.get(P, user).await {
            Err(e) => break e,
            Ok(_) => clock.advance(Duration::from_millis(100)),
        }
    };
    assert_eq!(err, TokenError::IdpUnavailable);
    assert!(idp.attempts() - before <= 4);
    assert!(r.source.retry_after(P, user).is_some());
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn the_breaker_stops_calling_a_provider_that_fails_for_every_link(pool: PgPool) {
    let (clock, idp, st, _) = setup(&pool).await;
    let users: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        seed_expired(&idp, &st, &*clock, *u).await;
    }
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    for _ in 0..10_000 {
        idp.push_fault(Fault::ServerError);
    }
    // Five links fail (one flight each): the breaker opens.
    for u in &users[..5] {
        assert_eq!(
            r.source.get(P, *u).await.unwrap_err(),
            TokenError::IdpUnavailable
        );
    }
    let after_five = idp.attempts();
    assert!(r
        .metrics
        .encode()
        .contains(r#"tokenproxy_idp_breaker_open{provider="idp"} 1"#));
    // Links that never failed are not tried while it is open.
    for u in &users[5..] {
        assert_eq!(
            r.source.get(P, *u).await.unwrap_err(),
            TokenError::IdpUnavailable
        );
        assert!(r.source.retry_after(P, *u).is_some());
    }
    assert_eq!(idp.attempts(), after_five, "no token request while open");
    // Half-open after 1 s: one probe; the provider healed, so it closes.
    idp.clear_faults();
    clock.advance(Duration::from_secs(1));
    r.source.get(P, users[7]).await.expect("probe succeeds");
    assert_eq!(idp.attempts(), after_five + 1);
    assert!(r
        .metrics
        .encode()
        .contains(r#"tokenproxy_idp_breaker_open{provider="idp"} 0"#));
    r.source.get(P, users[6]).await.expect("closed again");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_dead_link_without_refresh_token_costs_one_store_read(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    let mut set = idp.seed_with_expiry(user, Some(clock.now() - chrono::Duration::seconds(10)));
    set.refresh_token = secrecy::SecretString::from(String::new());
    st.put_link(P, user, &set).await.unwrap();
    let reads = CountReads::default();
    let hooked: Arc<dyn LinkStore> = Arc::new(HookedStore::new(st.clone(), reads.clone()));
    let r = replica_with(hooked, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    for _ in 0..20 {
        assert_eq!(
            r.source.get(P, user).await.unwrap_err(),
            TokenError::ReauthRequired
        );
    }
    // The first read may race the change feed's opening resync (which forbids
    // remembering what was read before it); after that it is remembered.
    let warm = reads.0.load(Ordering::SeqCst);
    assert!(warm <= 2, "{warm} store reads for 20 requests");
    for _ in 0..100 {
        assert_eq!(
            r.source.get(P, user).await.unwrap_err(),
            TokenError::ReauthRequired
        );
    }
    assert_eq!(
        reads.0.load(Ordering::SeqCst),
        warm,
        "no store read once remembered"
    );
    assert_eq!(idp.attempts(), 0);
    // A new login (announced) is seen at once.
    st.put_link(P, user, &idp.seed(user)).await.unwrap();
    eventually("the new link is served", || async {
        r.source.get(P, user).await.is_ok()
    })
    .await;
}
