//! Token source behaviour across replicas (issue 3): a replica forced to exchange a
//! stale refresh token, cache coherence through change notifications, refresh-ahead,
//! and a seeded randomized race over several replicas with faults.
//!
//! Run the race with another seed: `TOKENS_RACE_SEED=42 cargo test --test tokens_replicas`.

#[path = "tokens_harness/mod.rs"]
mod harness;
mod support;

use std::sync::Arc;
use std::time::Duration;

use harness::*;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use support::idp::{Fault, IdpOptions, ManualClock};
use support::store_wrapper::{HookedStore, Hooks};
use tokenproxy::config::TokensConfig;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{Lease, LeaseClaim, Link, LinkStore, StoreError, StoredSecret};
use tokenproxy::telemetry::RefreshOutcome;
use tokenproxy::tokens::TokenError;
use uuid::Uuid;

/// A store that serves a stale snapshot of a link (to the flight's read and its
/// re-check under the lease) and grants a (fake) lease on it — forcing its replica to exchange a refresh token that another
/// replica already used. Everything else goes to the real store.
struct StaleOnce {
    stale: Mutex<Option<(Link, u8)>>,
    faked: Mutex<bool>,
}

#[async_trait::async_trait]
impl Hooks for StaleOnce {
    async fn get_link(
        &self,
        inner: &dyn LinkStore,
        p: &str,
        u: Uuid,
    ) -> Result<Option<Link>, StoreError> {
        let served = {
            let mut stale = self.stale.lock();
            let served = stale.as_mut().map(|(link, reads)| {
                *reads -= 1;
                (link.clone(), *reads == 0)
            });
            if served.as_ref().is_some_and(|(_, last)| *last) {
                *stale = None;
            }
            served
        };
        if let Some((link, _)) = served {
            *self.faked.lock() = true;
            return Ok(Some(link));
        }
        inner.get_link(p, u).await
    }
    async fn claim_refresh_lease(
        &self,
        inner: &dyn LinkStore,
        p: &str,
        u: Uuid,
        old: &StoredSecret,
        lease: Duration,
    ) -> Result<LeaseClaim, StoreError> {
        if std::mem::take(&mut *self.faked.lock()) {
            return Ok(LeaseClaim::Acquired(Lease {
                provider_id: p.into(),
                user_id: u,
                expires_at: chrono::Utc::now(),
            }));
        }
        inner.claim_refresh_lease(p, u, old, lease).await
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn stale_exchange_adopts_the_winner(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    seed_expired(&idp, &st, &*clock, user).await;
    let providers = [idp.provider(P)];
    let snapshot = st.get_link(P, user).await.unwrap().unwrap();

    // Replica B refreshes first: the snapshot's refresh token is now used up.
    let b = replica(&pool, &providers, &tokens_cfg(), clock.clone()).await;
    let winner = b.source.get(P, user).await.unwrap();
    assert_eq!(idp.refreshes(), 1);

    // Replica A reads the stale snapshot and is granted a lease on it.
    let stale = Arc::new(HookedStore::new(
        PgStore::from_pool(own_pool(&pool).await, Keyring::plaintext()),
        StaleOnce {
            stale: Mutex::new(Some((snapshot, 2))),
            faked: Mutex::new(false),
        },
    ));
    let a = replica_with(stale, &providers, &tokens_cfg(), clock.clone()).await;
    let got = a
        .source
        .get(P, user)
        .await
        .expect("serves the winner's token");

    assert_eq!(idp.rejected(), 1, "A's stale exchange was rejected");
    assert_eq!(got.expose_secret(), winner.expose_secret());
    assert_eq!(a.outcome(RefreshOutcome::InvalidGrant), 0);
    assert_eq!(a.outcome(RefreshOutcome::Adopted), 1);
    assert_link_intact(&idp, &st, user).await;
    assert_eq!(idp.refreshes(), 1);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn refresh_on_one_replica_is_seen_by_another(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    let other = Uuid::new_v4();
    // Links exist before the replicas start: their first resync covers them, and no
    // notification about them is still in flight.
    st.put_link(P, user, &idp.seed(user)).await.unwrap();
    st.put_link(P, other, &idp.seed(other)).await.unwrap();
    let providers = [idp.provider(P)];
    let a = replica(&pool, &providers, &tokens_cfg(), clock.clone()).await;
    let b = replica(&pool, &providers, &tokens_cfg(), clock.clone()).await;
    a.synced().await;
    b.synced().await;
    let t0 = a.warm(user).await;
    assert!(b.warm(user).await.same_version(&t0));
    b.warm(other).await;
    b.assert_hit(user).await;
    let (invalidated, resyncs) = (b.invalidations(), b.source.resyncs());

    // An upstream rejected t0 on A: A refreshes once; B follows without expiry.
    let t1 = a.source.refresh_rejected(P, user, &t0).await.unwrap();
    assert!(!t1.same_version(&t0));
    idp.assert_grants(1, 1, 0);
    // A second rejection of the same version does not refresh again.
    let again = a.source.refresh_rejected(P, user, &t0).await.unwrap();
    assert!(again.same_version(&t1));
    idp.assert_grants(1, 1, 0);
    // B had t0 cached (a hit above): only the change notification can make it
    // serve t1 before t0 expires on the manual clock.
    eventually("B serves A's new token", || async {
        b.source.get(P, user).await.unwrap().same_version(&t1)
    })
    .await;
    assert_eq!(b.source.resyncs(), resyncs, "no resync did the work");
    assert_eq!(
        b.invalidations() - invalidated,
        1,
        "B dropped exactly the changed key"
    );
    b.assert_hit(other).await;
    idp.assert_grants(1, 1, 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn link_put_is_seen_by_every_replica(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    let other = Uuid::new_v4();
    st.put_link(P, user, &idp.seed(user)).await.unwrap();
    st.put_link(P, other, &idp.seed(other)).await.unwrap();
    let providers = [idp.provider(P)];
    let mut replicas = Vec::new();
    let mut before = Vec::new();
    for _ in 0..3 {
        let r = replica(&pool, &providers, &tokens_cfg(), clock.clone()).await;
        // After the first resync, both keys cached and served from the cache: from
        // here on only a notification can change what this replica serves.
        r.synced().await;
        r.warm(user).await;
        r.warm(other).await;
        r.assert_hit(user).await;
        before.push((r.invalidations(), r.source.resyncs()));
        replicas.push(r);
    }
    let fresh = idp.seed(user);
    st.put_link(P, user, &fresh).await.unwrap();
    for r in &replicas {
        eventually("replica serves the new link", || async {
            r.source.get(P, user).await.unwrap().expose_secret()
                == fresh.access_token.expose_secret()
        })
        .await;
    }
    st.delete_link(P, user).await.unwrap();
    for r in &replicas {
        eventually("replica sees the deletion", || async {
            matches!(r.source.get(P, user).await, Err(TokenError::LinkMissing))
        })
        .await;
    }
    for (r, (invalidated, resyncs)) in replicas.iter().zip(before) {
        assert_eq!(r.source.resyncs(), resyncs, "no resync did the work");
        assert_eq!(
            r.invalidations() - invalidated,
            2,
            "one invalidation per change (put, delete) of the one key"
        );
        r.assert_hit(other).await;
    }
    idp.assert_grants(0, 0, 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn refresh_ahead_keeps_requests_off_the_provider(pool: PgPool) {
    let (clock, idp) = idp_with(IdpOptions {
        expires_in: Some(Duration::from_secs(1000)),
        ..Default::default()
    })
    .await;
    let st = store(&pool);
    let user = Uuid::new_v4();
    st.put_link(P, user, &idp.seed(user)).await.unwrap();
    let cfg = TokensConfig {
        refresh_ahead: true,
        refresh_ahead_remaining: 0.2,
        refresh_ahead_used_within: Duration::from_secs(600),
        ..TokensConfig::default()
    };
    let r = replica(&pool, &[idp.provider(P)], &cfg, clock.clone()).await;
    // Steady use over 5000 s (five lifetimes), a request every 50 s, with the
    // refresh-ahead pass stepped deterministically between requests.
    for _ in 0..100 {
        let t = r.source.get(P, user).await.unwrap();
        assert!(idp.is_valid_access_token(t.expose_secret()));
        r.source.refresh_ahead_now().await;
        clock.advance(Duration::from_secs(50));
    }
    assert_eq!(
        r.source.sync_refresh_count(),
        0,
        "no get() waited for the provider"
    );
    assert!(idp.refreshes() >= 5, "refreshed ahead: {}", idp.refreshes());
    let ahead = r
        .metrics
        .refresh_ahead
        .get_or_create(&tokenproxy::telemetry::ProviderLabels { provider: P.into() })
        .get();
    assert!(ahead >= 5, "refreshes started ahead: {ahead}");
    let g = idp.grants();
    assert_eq!(
        (g.attempts, g.rejections, g.reuse),
        (g.successes, 0, 0),
        "every grant succeeded, none presented a used refresh token"
    );
    assert_link_intact(&idp, &st, user).await;

    // Unused links are not refreshed ahead.
    let before = idp.refreshes();
    clock.advance(Duration::from_secs(700));
    r.source.refresh_ahead_now().await;
    assert_eq!(idp.refreshes(), before);
}

/// The refresh-ahead timer loop itself, not a stepped pass: a link in use past its
/// refresh point is refreshed in the background with no request and no call to
/// `refresh_ahead_now`, within a few ticks (one tick is 1 s, jittered ±25 %).
#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn refresh_ahead_timer_refreshes_a_link_in_use_by_itself(pool: PgPool) {
    let (clock, idp) = idp_with(IdpOptions {
        expires_in: Some(Duration::from_secs(1000)),
        ..Default::default()
    })
    .await;
    let st = store(&pool);
    let user = Uuid::new_v4();
    st.put_link(P, user, &idp.seed(user)).await.unwrap();
    let cfg = TokensConfig {
        refresh_ahead: true,
        // The refresh point is at about half the lifetime (jittered), well
        // before the 850 s below and far from the expiry skew.
        refresh_ahead_remaining: 0.5,
        refresh_ahead_used_within: Duration::from_secs(600),
        ..TokensConfig::default()
    };
    let r = replica(&pool, &[idp.provider(P)], &cfg, clock.clone()).await;
    let first = r.source.get(P, user).await.unwrap();
    clock.advance(Duration::from_secs(850));
    // Still valid, served from the cache, and now recently used.
    let again = r.source.get(P, user).await.unwrap();
    assert!(again.same_version(&first));
    eventually("the refresh-ahead timer refreshes the link", || async {
        idp.refreshes() == 1
    })
    .await;
    idp.assert_grants(1, 1, 0);
    assert_eq!(r.source.sync_refresh_count(), 0, "no get() waited for it");
    eventually("the refreshed token is served", || async {
        !r.source.get(P, user).await.unwrap().same_version(&first)
    })
    .await;
    assert_link_intact(&idp, &st, user).await;
    idp.assert_grants(1, 1, 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn client_secret_post_extra_params_and_kept_refresh_token(pool: PgPool) {
    let (clock, idp) = idp_with(IdpOptions {
        rotate: false,
        expires_in: None,
        ..Default::default()
    })
    .await;
    let st = store(&pool);
    let user = Uuid::new_v4();
    seed_expired(&idp, &st, &*clock, user).await;
    let before = st.get_link(P, user).await.unwrap().unwrap();
    let provider = idp.provider_with(
        P,
        "client_auth = \"client_secret_post\"\nextra_fields = [\"scope\"]\n[extra_params]\naudience = \"api\"",
    );
    let r = replica(&pool, &[provider], &tokens_cfg(), clock.clone()).await;
    let t = r.source.get(P, user).await.unwrap();
    assert_eq!(t.expiry(), None, "no expires_in: never expires");
    assert_eq!(idp.auth_methods(), vec!["post"]);
    assert_eq!(
        idp.extra_params_seen(),
        vec![vec![("audience".to_string(), "api".to_string())]]
    );
    let row = st.get_link(P, user).await.unwrap().unwrap();
    assert_eq!(
        row.refresh_token.expose_secret(),
        before.refresh_token.expose_secret(),
        "a response without refresh_token keeps the old one"
    );
    assert_eq!(row.expiry, None);
    assert_eq!(row.extra, Some(serde_json::json!({"scope": "repo"})));
}

/// An `invalid_client` answer pauses the provider's refreshes for 10 s (README,
/// "Where this differs from DESIGN.md"), then they resume: the gap between the
/// IdP's own attempt timestamps is checked against the pause both ways. The pause
/// runs on tokio's clock, so this test waits it out (about 10 s).
#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn invalid_client_pause_ends_after_ten_seconds(pool: PgPool) {
    let pause = Duration::from_secs(10);
    let (clock, idp, st, user) = setup(&pool).await;
    seed_expired(&idp, &st, &*clock, user).await;
    let mut provider = idp.provider(P);
    provider.client_secret = Some("wrong".to_string().into());
    let r = replica(&pool, &[provider], &tokens_cfg(), clock.clone()).await;
    assert_eq!(
        r.source.get(P, user).await.unwrap_err(),
        TokenError::IdpUnavailable
    );
    assert_eq!(idp.attempt_times().len(), 1, "the client was rejected once");
    // Within the pause nothing reaches the provider.
    assert_eq!(
        r.source.get(P, user).await.unwrap_err(),
        TokenError::IdpUnavailable
    );
    assert_eq!(idp.attempt_times().len(), 1, "paused");
    // Ask every 100 ms until the provider is asked again; bounded well past it.
    let give_up = tokio::time::Instant::now() + pause * 3;
    while idp.attempt_times().len() < 2 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "refreshes never resumed after the {pause:?} pause"
        );
        let _ = r.source.get(P, user).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let times = idp.attempt_times();
    let gap = times[1] - times[0];
    // Lower bound: the pause held (less timer granularity). Upper: the poll
    // interval plus slack for a loaded 2-core runner, far below a second pause.
    assert!(
        gap + Duration::from_millis(50) >= pause,
        "resumed after {gap:?}"
    );
    assert!(
        gap < pause + Duration::from_secs(3),
        "resumed only after {gap:?}"
    );
    assert_link_intact(&idp, &st, user).await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn invalid_client_is_not_recorded_on_the_link(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    seed_expired(&idp, &st, &*clock, user).await;
    let mut provider = idp.provider(P);
    provider.client_secret = Some("wrong".to_string().into());
    let r = replica(&pool, &[provider], &tokens_cfg(), clock.clone()).await;
    assert_eq!(
        r.source.get(P, user).await.unwrap_err(),
        TokenError::IdpUnavailable
    );
    assert_link_intact(&idp, &st, user).await;
}

/// Many rounds of concurrent calls over several replicas with random expiries,
/// provider latency, 500s and revocations. After every round: each link holds the
/// provider's current refresh token (or was legitimately revoked), and no caller was
/// ever handed a token the provider considered invalid at that moment.
#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn randomized_multi_replica_race(pool: PgPool) {
    on_multi_thread(&pool, race).await;
}

async fn race(pool: PgPool) {
    let seed: u64 = std::env::var("TOKENS_RACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_2026);
    eprintln!("randomized race seed: {seed} (TOKENS_RACE_SEED to reproduce)");
    let mut rng = StdRng::seed_from_u64(seed);
    let (clock, idp) = idp_with(IdpOptions::default()).await;
    let idp = Arc::new(idp);
    let st = store(&pool);
    let users: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    for &u in &users {
        st.put_link(P, u, &idp.seed(u)).await.unwrap();
    }
    let mut provider = idp.provider(P);
    provider.timeout = Duration::from_secs(1);
    let cfg = TokensConfig {
        lease_timeout: Duration::from_secs(3),
        ..tokens_cfg()
    };
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(replica(&pool, &[provider.clone()], &cfg, clock.clone()).await);
    }
    let mut revoked = vec![false; users.len()];
    let mut revocations = 0u64;
    let mut served = 0u64;
    for round in 0..40 {
        // Users revoked last round log in again, and the round starts once every
        // replica serves their new link (change notifications are asynchronous).
        // Users revoked now are skipped by the validity check this round: replicas
        // may still hold their revoked token, which no proxy can know about.
        let mut unsettled = vec![false; users.len()];
        for (i, &u) in users.iter().enumerate() {
            if revoked[i] {
                let fresh = idp.seed(u);
                st.put_link(P, u, &fresh).await.unwrap();
                revoked[i] = false;
                for r in &replicas {
                    eventually("every replica serves the new login", || async {
                        r.source
                            .get(P, u)
                            .await
                            .is_ok_and(|t| t.expose_secret() == fresh.access_token.expose_secret())
                    })
                    .await;
                }
            } else if rng.random_ratio(1, 12) {
                idp.revoke(u);
                revoked[i] = true;
                unsettled[i] = true;
                revocations += 1;
            }
        }
        let advance = [0u64, 600, 3500, 3570, 3600, 7200][rng.random_range(0..6)];
        clock.advance(Duration::from_secs(advance));
        idp.set_latency(Duration::from_millis(rng.random_range(0..30)));
        for _ in 0..rng.random_range(0..3) {
            idp.push_fault(Fault::ServerError);
        }
        let calls = rng.random_range(10..60);
        let mut tasks = Vec::new();
        for _ in 0..calls {
            let i = rng.random_range(0..users.len());
            let user = users[i];
            let check = !unsettled[i];
            let source = replicas[rng.random_range(0..replicas.len())].source.clone();
            let idp = idp.clone();
            tasks.push(tokio::spawn(async move {
                match source.get(P, user).await {
                    Ok(t) => {
                        let valid = idp.is_valid_access_token(t.expose_secret());
                        assert!(
                            !check || valid,
                            "round {round}: served an invalid token to user {i}: {}",
                            idp.describe_access_token(t.expose_secret())
                        );
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }));
        }
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => served += 1,
                Err(TokenError::IdpUnavailable | TokenError::ReauthRequired) => {}
                Err(e) => panic!("round {round}: unexpected error {e:?}"),
            }
        }
        for (i, &u) in users.iter().enumerate() {
            let row = st.get_link(P, u).await.unwrap().unwrap();
            if revoked[i] {
                continue;
            }
            assert_eq!(
                Some(row.refresh_token.expose_secret().to_string()),
                idp.current_refresh_token(u),
                "round {round}: link holds the provider's current refresh token"
            );
            assert_eq!(row.refresh_failure_reason, "", "round {round}");
        }
        assert_eq!(
            idp.reused(),
            0,
            "round {round}: a used refresh token was replayed"
        );
        assert!(
            idp.rejected() <= revocations,
            "round {round}: only revoked grants were rejected ({} > {revocations})",
            idp.rejected()
        );
    }
    assert!(served > 0);
    eprintln!(
        "race: {} refreshes, {} rejected, {revocations} revocations, {served} served",
        idp.refreshes(),
        idp.rejected()
    );
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn https_token_endpoint_trusts_only_the_configured_ca(pool: PgPool) {
    let ca = support::upstream::TestCa::new();
    let (clock, idp) = idp_with(IdpOptions {
        tls: Some(ca.acceptor()),
        ..Default::default()
    })
    .await;
    assert!(idp.token_url().starts_with("https://"));
    let st = store(&pool);
    let user = Uuid::new_v4();
    seed_expired(&idp, &st, &*clock, user).await;

    // Without the private CA the endpoint is untrusted: nothing is sent or recorded.
    let untrusting = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    assert_eq!(
        untrusting.source.get(P, user).await.unwrap_err(),
        TokenError::IdpUnavailable
    );
    assert_eq!(idp.attempts(), 0);
    assert_link_intact(&idp, &st, user).await;

    let provider = idp.provider_with(P, &format!("token_ca = {:?}", ca.ca.display().to_string()));
    let trusting = replica(&pool, &[provider], &tokens_cfg(), clock.clone()).await;
    let t = trusting
        .source
        .get(P, user)
        .await
        .expect("refreshed over TLS");
    assert!(idp.is_valid_access_token(t.expose_secret()));
    idp.assert_grants(1, 1, 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn background_tasks_stop_on_shutdown(pool: PgPool) {
    let clock = ManualClock::new();
    let cfg = TokensConfig {
        refresh_ahead: true,
        ..TokensConfig::default()
    };
    let source = tokenproxy::tokens::TokenSource::new(
        Arc::new(store(&pool)),
        &[],
        &cfg,
        tokenproxy::telemetry::Metrics::new(),
        clock,
    )
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let handle = source.spawn_background(shutdown.clone());
    tokio::time::sleep(Duration::from_millis(50)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("background tasks stopped")
        .unwrap();
}
