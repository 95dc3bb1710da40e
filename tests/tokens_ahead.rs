//! Refresh-ahead (issue 11, must-have 7): bounded concurrency, no pass waiting on
//! a slow link, and a background refresh that failed transiently retried ahead
//! once its backoff passed — without any caller. Expiry runs on the shared
//! [`ManualClock`]; the provider's latency is real time.

#[path = "tokens_harness/mod.rs"]
mod harness;
mod support;

use std::time::Duration;

use harness::*;
use sqlx::PgPool;
use support::idp::{Fault, Idp, IdpOptions, ManualClock};
use tokenproxy::config::TokensConfig;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::LinkStore;
use tokenproxy::tokens::Clock;
use uuid::Uuid;

/// Lifetime of the IdP's tokens; links are due for refresh-ahead in its last fifth.
const LIFETIME: Duration = Duration::from_secs(1000);
/// Where every link seeded at the start is due.
const DUE: Duration = Duration::from_secs(900);

/// Refresh-ahead settings with the background loop off: each test runs the
/// passes itself (`refresh_ahead_pass` is exactly one turn of that loop), so no
/// pass at an unknown moment takes a slot or a retry from under an assertion.
fn ahead_cfg(concurrency: usize) -> TokensConfig {
    TokensConfig {
        refresh_ahead: false,
        refresh_ahead_remaining: 0.2,
        refresh_ahead_used_within: Duration::from_secs(600),
        refresh_ahead_concurrency: concurrency,
        // Longer than the clock moves: entries stay the ones first cached.
        cache_max_age: Duration::from_secs(3600),
        ..TokensConfig::default()
    }
}

/// `n` linked users, each used once through `r` (so cached and recently used),
/// then the clock moved by `by` and each used again. 900 s of 1000 s makes them
/// due: past the latest jittered refresh point at 800 s, still usable.
async fn due_links(
    n: usize,
    idp: &Idp,
    st: &PgStore,
    clock: &ManualClock,
    r: &Replica,
    by: Duration,
) -> Vec<Uuid> {
    let users: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        st.put_link(P, *u, &idp.seed(*u)).await.unwrap();
    }
    r.synced().await;
    for u in &users {
        r.warm(*u).await;
    }
    clock.advance(by);
    for u in &users {
        // A use inside the window, after the move.
        r.source.get(P, *u).await.unwrap();
    }
    users
}

fn refreshed(idp: &Idp, st_tokens: &[(Uuid, String)], u: Uuid) -> bool {
    let before = &st_tokens.iter().find(|(x, _)| *x == u).unwrap().1;
    idp.current_refresh_token(u).as_deref() != Some(before.as_str())
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_hanging_link_holds_up_neither_the_others_nor_the_next_pass(pool: PgPool) {
    let (clock, idp) = idp_with(IdpOptions {
        expires_in: Some(LIFETIME),
        ..Default::default()
    })
    .await;
    let st = store(&pool);
    // The background loop itself, with 3 slots. A 12 s lease leaves a flight
    // 9 s for the provider (3 s are the write reserve): the hanging request is
    // awaited that long.
    let cfg = TokensConfig {
        refresh_ahead: true,
        lease_timeout: Duration::from_secs(12),
        ..ahead_cfg(3)
    };
    let r = replica(&pool, &[idp.provider(P)], &cfg, clock.clone()).await;
    // The slow link's token lives half as long, so it is due first, alone.
    let slow = Uuid::new_v4();
    let half = clock.now() + chrono::Duration::seconds(LIFETIME.as_secs() as i64 / 2);
    st.put_link(P, slow, &idp.seed_with_expiry(slow, Some(half)))
        .await
        .unwrap();
    let users = due_links(5, &idp, &st, &clock, &r, Duration::from_secs(420)).await;
    r.warm(slow).await;
    let before: Vec<(Uuid, String)> = users
        .iter()
        .map(|u| (*u, idp.current_refresh_token(*u).unwrap()))
        .collect();
    // Its token request hangs far beyond the test: its flight awaits the whole
    // 9 s budget.
    idp.fail_user(slow, Fault::Hang(Duration::from_secs(120)));
    eventually(
        "the slow link's background refresh reached the IdP",
        || async { idp.attempts() >= 1 },
    )
    .await;
    // Now the others come due (900 s of 1000 s), and are used.
    clock.advance(Duration::from_secs(480));
    for u in &users {
        r.assert_hit(*u).await;
    }
    // Later passes refresh them, two slots at a time, while the slow one still
    // holds the third. 5 s of real time is generous for three passes (about a
    // second each) against a local IdP; a loop waiting for the slow flight would
    // take its 9 s.
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !users.iter().all(|u| refreshed(&idp, &before, *u)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the other links were refreshed ahead while one hung");
    eprintln!(
        "5 links refreshed ahead in {:?} while one hung",
        started.elapsed()
    );
    assert_eq!(idp.attempts(), 1 + 5, "the slow one was asked once");
    assert_eq!(idp.rejected(), 0);
    assert_eq!(r.source.sync_refresh_count(), 0, "no caller waited");
    for u in &users {
        assert_link_intact(&idp, &st, *u).await;
    }
    // The slow flight gives up at the end of its budget; the drain waits for it
    // (so no task outlives the test's database).
    assert!(r.source.drain(Duration::from_secs(15)).await);
    assert_link_intact(&idp, &st, slow).await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn background_refreshes_never_exceed_the_concurrency_bound(pool: PgPool) {
    let (clock, idp) = idp_with(IdpOptions {
        expires_in: Some(LIFETIME),
        ..Default::default()
    })
    .await;
    let st = store(&pool);
    let r = replica(&pool, &[idp.provider(P)], &ahead_cfg(3), clock.clone()).await;
    let users = due_links(12, &idp, &st, &clock, &r, DUE).await;
    // Slow enough that flights started by consecutive passes overlap.
    idp.set_latency(Duration::from_millis(300));
    let first = r.source.refresh_ahead_pass();
    assert_eq!(first, 3, "one pass starts as many as the bound allows");
    tokio::time::timeout(Duration::from_secs(20), async {
        while idp.refreshes() < 12 {
            r.source.refresh_ahead_pass();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every due link was refreshed ahead");
    eprintln!(
        "12 links refreshed ahead; at most {} token requests in flight",
        idp.max_in_flight()
    );
    assert_eq!(
        idp.max_in_flight(),
        3,
        "concurrency reached the bound, never more"
    );
    let g = idp.grants();
    assert_eq!((g.attempts, g.successes, g.reuse), (12, 12, 0));
    // The IdP counts a grant when it answers; the last flights may still be
    // writing it. Their end is the event to wait for, not a guess at its time.
    assert!(
        r.source.drain(Duration::from_secs(15)).await,
        "background flights finished their writes"
    );
    for u in &users {
        assert_link_intact(&idp, &st, *u).await;
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_failed_background_refresh_is_retried_ahead_after_its_backoff(pool: PgPool) {
    let (clock, idp) = idp_with(IdpOptions {
        expires_in: Some(LIFETIME),
        ..Default::default()
    })
    .await;
    let st = store(&pool);
    let r = replica(&pool, &[idp.provider(P)], &ahead_cfg(3), clock.clone()).await;
    let user = due_links(1, &idp, &st, &clock, &r, DUE).await[0];
    // The IdP is down for this link's first background refresh.
    idp.fail_user(user, Fault::ServerError);
    assert_eq!(r.source.refresh_ahead_now().await, 1);
    assert_eq!(idp.refreshes(), 0);
    let failed_attempts = idp.attempts();
    assert!(failed_attempts >= 1);
    // Within the backoff (1 s): not retried.
    clock.advance(Duration::from_millis(500));
    assert_eq!(r.source.refresh_ahead_now().await, 0, "still backing off");
    // It heals; after the backoff step (plus at most a quarter of jitter) the
    // next pass retries it — no caller involved.
    idp.heal_user(user);
    clock.advance(Duration::from_millis(800));
    assert_eq!(r.source.refresh_ahead_now().await, 1, "retried ahead");
    assert_eq!(idp.refreshes(), 1);
    assert_eq!(r.source.sync_refresh_count(), 0, "no caller waited");
    assert_link_intact(&idp, &st, user).await;
    // Done: nothing more to retry.
    clock.advance(Duration::from_secs(5));
    assert_eq!(r.source.refresh_ahead_now().await, 0);
}
