//! Coder mode against a simulated coderd (tests/support/coderd.rs, Coder's
//! protocol statement for statement) on a database built from Coder's schema
//! (tests/fixtures/coder_schema.sql): one refresh lease shared with coderd,
//! coderd's failure convention both ways, coderd's writes reaching every
//! replica without a NOTIFY, and `migrate` leaving Coder's schema alone.
//!
//! Values are encrypted in Coder's dbcrypt format with a key registered in
//! `dbcrypt_keys` the way coderd registers it.

#[path = "support/coderd.rs"]
mod coderd;
#[path = "tokens_harness/mod.rs"]
mod harness;
#[path = "support/proxy_harness.rs"]
mod ph;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use coderd::{Coderd, Outcome};
use harness::{on_multi_thread, replica_with, tokens_cfg, Replica, P};
use secrecy::{ExposeSecret, SecretBox};
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use support::idp::{Idp, IdpOptions, ManualClock};
use tokenproxy::config::EncryptionFormat;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::coder_store::{CoderOptions, CoderStore};
use tokenproxy::store::LinkStore;
use tokenproxy::telemetry::RefreshOutcome;
use tokenproxy::tokens::TokenError;
use uuid::Uuid;

const CODER_SCHEMA: &str = include_str!("fixtures/coder_schema.sql");
/// Coder key id of bytes 00..1f and `dbcrypt_keys.test` as coderd writes it
/// (the encryption of "coder"; see tests/coder.rs).
const KEY_ID: &str = "6d28cf8";
const KEY_TEST: &str = "oKGio6SlpqeoqaqrhXcYSDf2nFoNsjj8nsDkMo2nEys6";
const ACCESS_URL: &str = "https://coder.example.com";
/// Rounds of the coderd-vs-replicas race.
const ROUNDS: u64 = 100;
/// Access tokens the IdP issues live this long.
const LIFETIME: Duration = Duration::from_secs(3600);

fn keyring() -> Keyring {
    let key: [u8; 32] = std::array::from_fn(|i| i as u8);
    Keyring::new(vec![SecretBox::new(Box::new(key))], EncryptionFormat::Coder)
}

/// Coder's schema and coderd's registration of the key.
async fn coder_db(pool: &PgPool) {
    sqlx::raw_sql(CODER_SCHEMA).execute(pool).await.unwrap();
    sqlx::query("INSERT INTO dbcrypt_keys (number, active_key_digest, test) VALUES (1, $1, $2)")
        .bind(KEY_ID)
        .bind(KEY_TEST)
        .execute(pool)
        .await
        .unwrap();
}

fn opts(pool: &PgPool) -> PgConnectOptions {
    pool.connect_options().as_ref().clone()
}

fn poll(every: Duration) -> CoderOptions {
    CoderOptions {
        poll_interval: every,
        ..CoderOptions::default()
    }
}

async fn coder_store(pool: &PgPool, o: CoderOptions) -> Arc<CoderStore> {
    let store = CoderStore::from_connect_options(opts(pool), keyring(), o);
    store
        .check_coder_database()
        .await
        .expect("a Coder database we can share");
    store.migrate().await.unwrap();
    Arc::new(store)
}

fn coderd(pool: &PgPool, idp: &Idp, clock: Arc<ManualClock>) -> Coderd {
    Coderd {
        pool: pool.clone(),
        token_url: idp.token_url(),
        client_id: "test-client".into(),
        client_secret: "test-secret".into(),
        clock,
        keyring: keyring(),
        lease: Duration::from_secs(30),
    }
}

async fn replicas(
    pool: &PgPool,
    idp: &Idp,
    clock: &Arc<ManualClock>,
    o: CoderOptions,
) -> Vec<Replica> {
    let mut out = Vec::new();
    for _ in 0..3 {
        let store = coder_store(pool, o.clone()).await;
        out.push(replica_with(store, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await);
    }
    out
}

/// A link coderd made when the user linked: the IdP's initial tokens.
async fn linked(idp: &Idp, coderd: &Coderd, user: Uuid) {
    let set = idp.seed(user);
    coderd
        .insert(
            P,
            user,
            set.access_token.expose_secret(),
            set.refresh_token.expose_secret(),
            set.expiry,
        )
        .await;
}

/// The row as coderd reads it: (refresh token, failure reason).
async fn row_refresh(pool: &PgPool, user: Uuid) -> (String, String) {
    let store = CoderStore::from_connect_options(opts(pool), keyring(), CoderOptions::default());
    let link = store.get_link(P, user).await.unwrap().expect("link exists");
    (
        link.refresh_token.expose_secret().to_string(),
        link.refresh_failure_reason,
    )
}

#[sqlx::test(migrations = false)]
async fn coderd_and_three_replicas_exchange_each_refresh_token_once(pool: PgPool) {
    coder_db(&pool).await;
    on_multi_thread(&pool, |pool| async move {
        let clock = ManualClock::new();
        let idp = Idp::start(IdpOptions {
            clock: clock.clone(),
            expires_in: Some(LIFETIME),
            ..IdpOptions::default()
        })
        .await;
        let coderd = Arc::new(coderd(&pool, &idp, clock.clone()));
        let user = Uuid::new_v4();
        linked(&idp, &coderd, user).await;
        let replicas = replicas(&pool, &idp, &clock, poll(Duration::from_millis(100))).await;
        let mut coderd_won = 0;
        for round in 1..=ROUNDS {
            // Past the expiry for both sides (coderd: 10 s early; tokenproxy: refresh_skew).
            clock.advance(LIFETIME + Duration::from_secs(120));
            let c = coderd.clone();
            let coderd_task = tokio::spawn(async move { c.refresh(P, user).await });
            let gets: Vec<_> = replicas
                .iter()
                .flat_map(|r| (0..3).map(move |_| r.source.clone()))
                .map(|s| tokio::spawn(async move { s.get(P, user).await }))
                .collect();
            let theirs = coderd_task.await.unwrap();
            let mut ours = Vec::new();
            for g in gets {
                ours.push(g.await.unwrap().expect("every replica is served"));
            }
            let token = match &theirs {
                Outcome::Refreshed(t) => {
                    coderd_won += 1;
                    t.clone()
                }
                Outcome::Fresh(t) | Outcome::Adopted(t) => t.clone(),
                other => panic!("round {round}: coderd got {other:?}"),
            };
            for t in &ours {
                assert_eq!(
                    t.expose_secret(),
                    token,
                    "round {round}: one token for everyone"
                );
            }
            // Exactly one exchange per expiry, none rejected, no refresh token reused.
            assert_eq!(
                idp.refreshes(),
                round,
                "round {round}: one exchange per expiry"
            );
            assert_eq!(idp.rejected(), 0, "round {round}");
            assert_eq!(idp.reused(), 0, "round {round}");
            let (refresh, reason) = row_refresh(&pool, user).await;
            assert_eq!(
                Some(refresh),
                idp.current_refresh_token(user),
                "round {round}"
            );
            assert_eq!(reason, "");
        }
        let ours: u64 = replicas
            .iter()
            .map(|r| r.outcome(RefreshOutcome::Success))
            .sum();
        println!("coderd refreshed {coderd_won} times, tokenproxy {ours} of {ROUNDS}");
        assert_eq!(coderd_won + ours, ROUNDS);
        assert!(
            coderd_won > 0 && ours > 0,
            "both sides won some rounds: coderd {coderd_won}, tokenproxy {ours}"
        );
    })
    .await;
}

#[sqlx::test(migrations = false)]
async fn failures_are_recorded_coderds_way_in_both_directions(pool: PgPool) {
    coder_db(&pool).await;
    // Its own runtime: every pool and feed ends with it, so the test's
    // database can be dropped at once.
    on_multi_thread(&pool, |pool| async move {
        let clock = ManualClock::new();
        let idp = Idp::start(IdpOptions { clock: clock.clone(), ..IdpOptions::default() }).await;
        let coderd = coderd(&pool, &idp, clock.clone());
        let replicas = replicas(&pool, &idp, &clock, CoderOptions::default()).await;

        // coderd records the failure; tokenproxy answers reauth_required without
        // asking the provider again.
        let a = Uuid::new_v4();
        linked(&idp, &coderd, a).await;
        clock.advance(LIFETIME * 2);
        idp.revoke(a);
        assert!(matches!(coderd.refresh(P, a).await, Outcome::Failed(_)));
        let attempts = idp.attempts();
        let stored: (String, Option<String>) = sqlx::query_as(
            "SELECT oauth_refresh_token, oauth_refresh_token_key_id FROM external_auth_links \
             WHERE user_id = $1",
        )
        .bind(a)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(!stored.0.is_empty() && stored.1.as_deref() == Some(KEY_ID), "coderd encrypts ''");
        for r in &replicas {
            assert_eq!(r.source.get(P, a).await.unwrap_err(), TokenError::ReauthRequired);
        }
        assert_eq!(idp.attempts(), attempts, "no provider call for a recorded failure");

        // Through the proxy: the caller is sent to Coder's re-link page.
        let proxy = ph::Harness::start(
            ph::config(&format!(
                "[callers]\nmode = \"static\"\nstatic_user = \"{a}\"\n\n[coder]\naccess_url = \"{ACCESS_URL}\"\n\n\
                 [[providers]]\nid = \"{P}\"\nclient_id = \"c\"\ntoken_url = \"{}\"\n\
                 [[providers.routes]]\nprefix = \"/idp/api\"\nupstream = \"http://127.0.0.1:9\"\n",
                idp.token_url()
            )),
            coder_store(&pool, CoderOptions::default()).await,
            replicas[0].source.clone(),
        )
        .await;
        let answer = ph::get(&proxy.url("/idp/api/user"), &[]).await;
        answer.assert_error(403, "reauth_required");
        assert_eq!(
            answer.json()["error"]["login_url"],
            format!("{ACCESS_URL}/external-auth/{P}")
        );

        // tokenproxy records the failure; coderd sees '' + reason and stops too.
        let b = Uuid::new_v4();
        linked(&idp, &coderd, b).await;
        clock.advance(LIFETIME * 2);
        idp.revoke(b);
        assert_eq!(replicas[0].source.get(P, b).await.unwrap_err(), TokenError::ReauthRequired);
        let stored: (String, Option<String>, String) = sqlx::query_as(
            "SELECT oauth_refresh_token, oauth_refresh_token_key_id, oauth_refresh_failure_reason \
             FROM external_auth_links WHERE user_id = $1",
        )
        .bind(b)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(!stored.0.is_empty(), "the empty refresh token is encrypted, as coderd does");
        assert_eq!(stored.1.as_deref(), Some(KEY_ID));
        assert!(!stored.2.is_empty() && stored.2.len() <= 400, "{}", stored.2);
        let attempts = idp.attempts();
        assert!(matches!(coderd.refresh(P, b).await, Outcome::Failed(r) if r == stored.2));
        assert_eq!(idp.attempts(), attempts, "coderd does not try again either");
        let (refresh, _) = row_refresh(&pool, b).await;
        assert_eq!(refresh, "");
    })
    .await;
}

/// Waits until every replica serves what `want` accepts; the time it took.
async fn until_every_replica(
    replicas: &[Replica],
    user: Uuid,
    bound: Duration,
    want: impl Fn(&Result<tokenproxy::tokens::AccessToken, TokenError>) -> bool,
) -> Duration {
    let start = Instant::now();
    let mut done = vec![false; replicas.len()];
    // Polls the replicas' answers (the effect under test has no event to await).
    while start.elapsed() < bound {
        for (i, r) in replicas.iter().enumerate() {
            if !done[i] && want(&r.source.get(P, user).await) {
                done[i] = true;
            }
        }
        if done.iter().all(|d| *d) {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not every replica saw coderd's write within {bound:?}: {done:?}");
}

#[sqlx::test(migrations = false)]
async fn coderds_relink_and_delete_reach_every_replica_without_a_notify(pool: PgPool) {
    coder_db(&pool).await;
    // Its own runtime: every pool and feed ends with it, so the test's
    // database can be dropped at once.
    on_multi_thread(&pool, |pool| async move {
        let clock = ManualClock::new();
        let idp = Idp::start(IdpOptions {
            clock: clock.clone(),
            ..IdpOptions::default()
        })
        .await;
        let coderd = coderd(&pool, &idp, clock.clone());
        // The default poll interval (1 s): the bound is the one operators get.
        let replicas = replicas(&pool, &idp, &clock, CoderOptions::default()).await;
        let user = Uuid::new_v4();
        linked(&idp, &coderd, user).await;
        let old = replicas[0].source.get(P, user).await.unwrap();
        for r in &replicas {
            assert_eq!(
                r.source.get(P, user).await.unwrap().expose_secret(),
                old.expose_secret()
            );
        }

        // The user re-links in coderd's UI.
        let set = idp.seed(user);
        let new = set.access_token.expose_secret().to_string();
        coderd
            .relink(P, user, &new, set.refresh_token.expose_secret(), set.expiry)
            .await;
        let took = until_every_replica(&replicas, user, Duration::from_secs(5), |r| {
            r.as_ref().is_ok_and(|t| t.expose_secret() == new)
        })
        .await;
        println!("re-link reached every replica after {took:?}");
        assert!(
            took < Duration::from_secs(2),
            "re-link served within 2 s: {took:?}"
        );

        coderd.delete(P, user).await;
        let took = until_every_replica(&replicas, user, Duration::from_secs(35), |r| {
            matches!(r, Err(TokenError::LinkMissing))
        })
        .await;
        println!("delete reached every replica after {took:?}");
        assert!(
            took < Duration::from_secs(30),
            "deletion seen within 30 s: {took:?}"
        );

        // Linking again after the delete reaches the negative caches too.
        linked(&idp, &coderd, user).await;
        until_every_replica(&replicas, user, Duration::from_secs(5), |r| r.is_ok()).await;
    })
    .await;
}

fn token_set(access: &str, refresh: &str) -> tokenproxy::store::TokenSet {
    tokenproxy::store::TokenSet {
        access_token: access.to_string().into(),
        refresh_token: refresh.to_string().into(),
        expiry: None,
        extra: None,
    }
}

#[sqlx::test(migrations = false)]
async fn writes_under_a_lease_coderd_took_over_do_not_apply(pool: PgPool) {
    use tokenproxy::store::LeaseClaim;
    coder_db(&pool).await;
    let store = coder_store(&pool, CoderOptions::default()).await;
    let user = Uuid::new_v4();
    store
        .put_link(P, user, &token_set("gho_old", "ghr_old"))
        .await
        .unwrap();
    let link = store.get_link(P, user).await.unwrap().unwrap();
    let claim = store
        .claim_refresh_lease(P, user, &link.refresh_token_stored, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(matches!(claim, LeaseClaim::Acquired(_)), "{claim:?}");
    // Our lease runs out (say the database was away) and coderd claims the row
    // with its own function: it is now in the middle of its refresh.
    sqlx::query(
        "UPDATE external_auth_links SET refresh_lease_expires_at = now() - interval '1 second' \
         WHERE provider_id = $1 AND user_id = $2",
    )
    .bind(P)
    .bind(user)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("SELECT 1 FROM acquire_external_auth_link_refresh_lease($1, $2, 30000)")
        .bind(P)
        .bind(user)
        .fetch_one(&pool)
        .await
        .unwrap();
    // The token columns are still as we read them, so only coderd's lease fence
    // keeps our late writes out of its refresh.
    let new = token_set("gho_new", "ghr_new");
    assert!(!store
        .write_refreshed(P, user, &link.fence(), &new)
        .await
        .unwrap());
    assert!(!store
        .record_refresh_failure(P, user, &link.fence(), None, "invalid_grant")
        .await
        .unwrap());
    let (refresh, reason) = row_refresh(&pool, user).await;
    assert_eq!((refresh.as_str(), reason.as_str()), ("ghr_old", ""));
}
