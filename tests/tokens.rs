//! Acceptance tests of the token source (issue 3) against real Postgres and the
//! test identity provider (single-use rotating refresh tokens, counting every grant).
//!
//! Each "replica" is an independent `TokenSource` with its own pool, cache and
//! metrics over the same database. Expiry is driven by a shared [`ManualClock`].

#[path = "tokens_harness/mod.rs"]
mod harness;
mod support;

use std::time::Duration;

use harness::*;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use support::idp::{Fault, IdpOptions};
use tokenproxy::config::TokensConfig;
use tokenproxy::store::{LeaseClaim, LinkStore};
use tokenproxy::telemetry::RefreshOutcome;
use tokenproxy::tokens::{Clock, TokenError};
use uuid::Uuid;

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn five_hundred_concurrent_gets_refresh_once(pool: PgPool) {
    on_multi_thread(&pool, five_hundred).await;
}

async fn five_hundred(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    idp.set_latency(Duration::from_millis(50));
    seed_expired(&idp, &st, &*clock, user).await;
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;

    let results = concurrent_gets(&r.source, user, 500).await;
    let token = all_same(&results);
    idp.assert_grants(1, 1, 0);
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
    on_multi_thread(&pool, three_replicas).await;
}

async fn three_replicas(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    idp.set_latency(Duration::from_millis(50));
    seed_expired(&idp, &st, &*clock, user).await;
    let providers = [idp.provider(P)];
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(replica(&pool, &providers, &tokens_cfg(), clock.clone()).await);
    }

    for round in 1..=2u64 {
        let all = gets_on_every_replica(&replicas, user, 200).await;
        assert_round(&all, 600, &idp, round);
        assert_link_intact(&idp, &st, user).await;
        // The next expiry: two hours later.
        clock.advance(Duration::from_secs(7200));
    }
    assert_eq!(outcome_sum(&replicas, RefreshOutcome::Success), 2);
    assert!(
        outcome_sum(&replicas, RefreshOutcome::Adopted) >= 1,
        "waiting replicas adopted the winner's token"
    );
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn dead_lease_holder_delays_at_most_the_lease(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    seed_expired(&idp, &st, &*clock, user).await;
    let mut provider = idp.provider(P);
    provider.timeout = Duration::from_millis(500);
    let cfg = TokensConfig {
        lease_timeout: Duration::from_secs(1),
        ..tokens_cfg()
    };
    // A "replica" claims the lease and dies: it never refreshes nor releases.
    let row = st.get_link(P, user).await.unwrap().unwrap();
    let claimed = tokio::time::Instant::now();
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
    let waited = claimed.elapsed();
    assert!(idp.is_valid_access_token(token.expose_secret()));
    idp.assert_grants(1, 1, 0);
    // Nothing reached the IdP while the dead holder's lease was live (it was claimed
    // after `claimed`, so it ran out no earlier than `claimed + lease`; 50 ms covers
    // the database clock's rounding) ...
    let first = idp.attempt_times()[0];
    assert!(
        first >= claimed + cfg.lease_timeout - Duration::from_millis(50),
        "the IdP was asked {:?} after the claim, inside the {:?} lease",
        first - claimed,
        cfg.lease_timeout
    );
    // ... and the waiter noticed the lease's end promptly: well under the flight's
    // give-up bound (3 leases), with slack for a loaded machine.
    assert!(
        waited < cfg.lease_timeout + Duration::from_millis(1500),
        "waited {waited:?} for a dead holder's {:?} lease",
        cfg.lease_timeout
    );
    assert_link_intact(&idp, &st, user).await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn revoked_grant_is_permanent_and_asked_once(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
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
    idp.assert_grants(1, 0, 1);
    // A known-dead link is answered from memory, not from the database.
    assert!(
        r.hits() >= 50,
        "dead link answered from memory: {} hits",
        r.hits()
    );
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
    let (clock, idp) = idp_with(IdpOptions {
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
    idp.assert_grants(1, 0, 1);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn transient_failures_record_nothing_and_recover(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    seed_expired(&idp, &st, &*clock, user).await;
    let mut provider = idp.provider(P);
    provider.timeout = Duration::from_millis(300);
    // A 2 s lease leaves the exchange a 1.5 s budget (the rest is the write reserve).
    let cfg = TokensConfig {
        lease_timeout: Duration::from_secs(2),
        ..tokens_cfg()
    };
    let r = replica(&pool, &[provider], &cfg, clock.clone()).await;

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
    // Within the 1 s backoff the provider is not asked again.
    assert_eq!(
        r.source.get(P, user).await.unwrap_err(),
        TokenError::IdpUnavailable
    );
    assert_eq!(idp.attempts(), 4, "backing off");
    clock.advance(Duration::from_secs(1));

    // A hang past the exchange's budget → idp_unavailable, not retried (the provider
    // may have processed it), nothing recorded.
    idp.push_fault(Fault::Hang(Duration::from_secs(2)));
    assert_eq!(
        r.source.get(P, user).await.unwrap_err(),
        TokenError::IdpUnavailable
    );
    assert_link_intact(&idp, &st, user).await;
    assert_eq!(r.outcome(RefreshOutcome::TransientError), 2);
    assert_eq!(r.outcome(RefreshOutcome::InvalidGrant), 0);

    // 429 with Retry-After: honoured and retried inside the budget (after the
    // second backoff step, 2 s).
    clock.advance(Duration::from_secs(2));
    idp.push_fault(Fault::TooManyRequests {
        retry_after_secs: 0,
    });
    let before = idp.attempts();
    let token = r.source.get(P, user).await.expect("recovered");
    assert_eq!(idp.attempts() - before, 2);
    assert!(idp.is_valid_access_token(token.expose_secret()));
    idp.assert_grants(before + 2, 1, 0);
    assert_link_intact(&idp, &st, user).await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn transient_failure_serves_still_valid_token(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
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
    // Recovery: the next call after the 1 s backoff refreshes.
    clock.advance(Duration::from_secs(1));
    let fresh = r.source.get(P, user).await.unwrap();
    assert_ne!(fresh.expose_secret(), set.access_token.expose_secret());
    idp.assert_grants(5, 1, 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn expiry_follows_the_injected_clock(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    let set = idp.seed_with_expiry(user, Some(clock.now() + chrono::Duration::seconds(120)));
    st.put_link(P, user, &set).await.unwrap();
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    // The change feed's first resync would retire what the first lookup cached.
    r.synced().await;
    // The synchronous hit path answers only from the cache.
    assert!(r.source.get_cached(P, user).is_none(), "nothing cached yet");
    let t0 = r.source.get(P, user).await.unwrap();
    assert_eq!(t0.expose_secret(), set.access_token.expose_secret());
    assert!(r.source.get_cached(P, user).unwrap().same_version(&t0));
    clock.advance(Duration::from_secs(59)); // 61 s left > 60 s skew: usable
    assert!(r.source.get_cached(P, user).unwrap().same_version(&t0));
    assert!(r.source.get(P, user).await.unwrap().same_version(&t0));
    assert_eq!(idp.attempts(), 0);
    clock.advance(Duration::from_secs(1)); // 60 s left: inside the skew
    assert!(
        r.source.get_cached(P, user).is_none(),
        "a token inside the skew is not served from the hit path"
    );
    let t1 = r.source.get(P, user).await.unwrap();
    assert!(!t1.same_version(&t0));
    idp.assert_grants(1, 1, 0);
    // expires_in → absolute expiry on the injected clock.
    assert_eq!(
        t1.expiry(),
        Some(clock.now() + chrono::Duration::seconds(3600))
    );
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn store_outage_serves_cached_unexpired_token_then_store_unavailable(pool: PgPool) {
    use tokenproxy::crypto::Keyring;
    use tokenproxy::store::postgres::PgStore;
    let (clock, idp, st, user) = setup(&pool).await;
    let set = idp.seed_with_expiry(user, Some(clock.now() + chrono::Duration::seconds(120)));
    st.put_link(P, user, &set).await.unwrap();
    let own = own_pool(&pool).await;
    let r = replica_with(
        std::sync::Arc::new(PgStore::from_pool(own.clone(), Keyring::plaintext())),
        &[idp.provider(P)],
        &tokens_cfg(),
        clock.clone(),
    )
    .await;
    let t0 = r.warm(user).await;
    own.close().await; // the database is gone for this replica
    clock.advance(Duration::from_secs(90)); // inside the skew, not yet expired
    let t = r
        .source
        .get(P, user)
        .await
        .expect("cached unexpired token served");
    assert!(t.same_version(&t0));
    clock.advance(Duration::from_secs(60)); // expired
    assert_eq!(
        r.source.get(P, user).await.unwrap_err(),
        TokenError::StoreUnavailable
    );
    idp.assert_grants(0, 0, 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn upstream_rejections_refresh_once_per_token_version(pool: PgPool) {
    // 50 rejections at once from 4 threads: the claim is about parallel callers.
    on_multi_thread(&pool, rejections_of_one_version).await;
}

async fn rejections_of_one_version(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    st.put_link(P, user, &idp.seed(user)).await.unwrap();
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    let t0 = r.source.get(P, user).await.unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let s = r.source.clone();
            let t0 = t0.clone();
            tokio::spawn(async move { s.refresh_rejected(P, user, &t0).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // 50 rejections of one version: one grant, no double spend of the refresh token.
    idp.assert_grants(1, 1, 0);
    let t1 = r.source.get(P, user).await.unwrap();
    assert!(!t1.same_version(&t0));
    assert_link_intact(&idp, &st, user).await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn interrupted_exchange_is_not_replayed(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    seed_expired(&idp, &st, &*clock, user).await;
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    // The provider rotates the token but the answer never arrives.
    idp.push_fault(Fault::ProcessThenDrop);
    assert_eq!(
        r.source.get(P, user).await.unwrap_err(),
        TokenError::IdpUnavailable
    );
    // An interrupted grant is not replayed: one attempt, processed at the IdP.
    idp.assert_grants(1, 1, 0);
    let row = st.get_link(P, user).await.unwrap().unwrap();
    assert_eq!(row.refresh_failure_reason, "", "nothing recorded");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn callers_going_away_do_not_abandon_the_refresh(pool: PgPool) {
    on_multi_thread(&pool, callers_going_away).await;
}

async fn callers_going_away(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    idp.set_latency(Duration::from_millis(200));
    seed_expired(&idp, &st, &*clock, user).await;
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    let callers: Vec<_> = (0..20)
        .map(|_| {
            let s = r.source.clone();
            tokio::spawn(async move { s.get(P, user).await })
        })
        .collect();
    // Every caller hangs up while the provider is still answering.
    eventually("the provider was asked", || async { idp.attempts() == 1 }).await;
    for c in &callers {
        c.abort();
    }
    // The flight still stores the rotated token: the link is not broken.
    eventually("the rotated token is stored", || async {
        st.get_link(P, user)
            .await
            .unwrap()
            .unwrap()
            .refresh_token
            .expose_secret()
            == idp.current_refresh_token(user).unwrap()
    })
    .await;
    assert_link_intact(&idp, &st, user).await;
    let t = r.source.get(P, user).await.unwrap();
    assert!(idp.is_valid_access_token(t.expose_secret()));
    idp.assert_grants(1, 1, 0);
}
