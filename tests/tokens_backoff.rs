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

/// One link whose token requests answer 503 with this `Retry-After` value: it
/// backs off that long (not 1 s), and says so as its `Retry-After`; then heals.
async fn provider_retry_after_is_honoured(pool: PgPool, value: String, wait: Duration) {
    let (clock, idp, st, user) = setup(&pool).await;
    seed_expired(&idp, &st, &*clock, user).await;
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    idp.fail_user(user, Fault::Unavailable { retry_after: value });
    assert_eq!(
        r.source.get(P, user).await.unwrap_err(),
        TokenError::IdpUnavailable
    );
    // The hint (plus the 2 s provider timeout) does not fit the exchange's budget
    // (25 s), so the exchange asked once and handed the hint to the backoff.
    assert_eq!(idp.attempts(), 1);
    let told = r.source.retry_after(P, user).expect("backing off");
    assert!(
        told <= wait && told + Duration::from_secs(2) >= wait,
        "Retry-After {told:?}, the provider asked for {wait:?}"
    );
    // Long after the 1 s first step, still within the provider's wait: not asked.
    for _ in 0..10 {
        clock.advance(Duration::from_secs(2));
        assert_eq!(
            r.source.get(P, user).await.unwrap_err(),
            TokenError::IdpUnavailable
        );
    }
    assert_eq!(
        idp.attempts(),
        1,
        "no token request before the provider's Retry-After"
    );
    idp.heal_user(user);
    clock.advance(wait);
    let t = r
        .source
        .get(P, user)
        .await
        .expect("recovered after Retry-After");
    assert!(idp.is_valid_access_token(t.expose_secret()));
    assert_eq!(idp.attempts(), 2);
    assert_link_intact(&idp, &st, user).await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn retry_after_in_seconds_sets_the_backoff(pool: PgPool) {
    provider_retry_after_is_honoured(pool, "30".into(), Duration::from_secs(30)).await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn retry_after_as_an_http_date_sets_the_backoff(pool: PgPool) {
    let at = std::time::SystemTime::now() + Duration::from_secs(40);
    provider_retry_after_is_honoured(pool, httpdate::fmt_http_date(at), Duration::from_secs(40))
        .await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn one_failing_link_does_not_open_the_breaker_for_the_others(pool: PgPool) {
    let (clock, idp, st, _) = setup(&pool).await;
    let (sick, well) = (Uuid::new_v4(), Uuid::new_v4());
    seed_expired(&idp, &st, &*clock, sick).await;
    seed_expired(&idp, &st, &*clock, well).await;
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    idp.fail_user(sick, Fault::ServerError);
    // The sick link fails once per backoff step, six times in a row, with no
    // other exchange in between (the breaker's threshold is five).
    for i in 0..6 {
        assert_eq!(
            r.source.get(P, sick).await.unwrap_err(),
            TokenError::IdpUnavailable
        );
        if i < 5 {
            clock.advance(r.source.retry_after(P, sick).expect("backing off"));
        }
    }
    assert!(idp.attempts() >= 6);
    assert!(r
        .metrics
        .encode()
        .contains(r#"tokenproxy_idp_breaker_open{provider="idp"} 0"#));
    let t = r
        .source
        .get(P, well)
        .await
        .expect("a healthy link is not blocked by another's failures");
    assert!(idp.is_valid_access_token(t.expose_secret()));
    assert_link_intact(&idp, &st, well).await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_half_open_breaker_lets_exactly_one_probe_through(pool: PgPool) {
    let (clock, idp, st, _) = setup(&pool).await;
    let users: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        seed_expired(&idp, &st, &*clock, *u).await;
    }
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    for _ in 0..10_000 {
        idp.push_fault(Fault::ServerError);
    }
    for u in &users[..5] {
        assert_eq!(
            r.source.get(P, *u).await.unwrap_err(),
            TokenError::IdpUnavailable
        );
    }
    assert!(r
        .metrics
        .encode()
        .contains(r#"tokenproxy_idp_breaker_open{provider="idp"} 1"#));
    let before = idp.attempts();
    // Half-open. The provider healed but answers slowly (1 s: far longer than the
    // store round trips each of the other lookups makes before being refused).
    idp.clear_faults();
    idp.set_latency(Duration::from_secs(1));
    clock.advance(Duration::from_secs(1));
    let tasks: Vec<_> = users[5..]
        .iter()
        .map(|u| {
            let s = r.source.clone();
            let u = *u;
            tokio::spawn(async move { s.get(P, u).await })
        })
        .collect();
    let mut served = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => served += 1,
            Err(e) => assert_eq!(e, TokenError::IdpUnavailable),
        }
    }
    assert_eq!(idp.attempts() - before, 1, "one probe reached the provider");
    assert_eq!(
        served, 1,
        "the probe's link was refreshed, the others waited"
    );
    assert!(r
        .metrics
        .encode()
        .contains(r#"tokenproxy_idp_breaker_open{provider="idp"} 0"#));
}
