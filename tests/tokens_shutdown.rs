//! Shutdown of the token source (issue 11, "drain on shutdown"): a refresh whose
//! provider answer is in hand but not yet stored must be stored before the process
//! exits, and no exchange may start once shutdown began.
//!
//! The replica runs on its own runtime ([`on_multi_thread`]); dropping that runtime
//! at the end is what a process exit does to every task still running on it.

#[path = "tokens_harness/mod.rs"]
mod harness;
#[path = "support/proxy_harness.rs"]
mod proxy_harness;
mod support;

use std::sync::Arc;
use std::time::Duration;

use harness::*;
use sqlx::PgPool;
use support::idp::{Fault, Idp, IdpOptions};
use support::store_wrapper::{HookedStore, Hooks};
use support::upstream::{CredentialForm, TestUpstream};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{Fence, LinkStore, StoreError, TokenSet};
use tokenproxy::tokens::{SystemClock, TokenError};
use tokio::sync::Notify;
use uuid::Uuid;

/// How long the slow database takes to store a refreshed token: long enough that a
/// shutdown not waiting for the write drops it, well inside the lease.
const SLOW_WRITE: Duration = Duration::from_millis(500);

/// A database that is slow to store a refreshed token, and says when a write began.
struct SlowWrite {
    began: Arc<Notify>,
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
        self.began.notify_one();
        // Latency of the database itself, not a stand-in for an event.
        tokio::time::sleep(SLOW_WRITE).await;
        inner.write_refreshed(p, u, old, new).await
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn shutdown_stores_a_refresh_nobody_waits_for(pool: PgPool) {
    let (clock, idp, store, user) = setup(&pool).await;
    seed_expired(&idp, &store, &*clock, user).await;
    let providers = vec![idp.provider(P)];
    {
        let providers = providers.clone();
        let clock = clock.clone();
        on_multi_thread(&pool, move |pool| async move {
            let began = Arc::new(Notify::new());
            let store = HookedStore::new(
                PgStore::from_pool(pool, Keyring::plaintext()),
                SlowWrite {
                    began: began.clone(),
                },
            );
            let r = replica_with(Arc::new(store), &providers, &tokens_cfg(), clock).await;
            // A caller that hangs up once the provider has answered: the flight goes
            // on with nobody waiting for it (as a refresh-ahead flight does).
            let source = r.source.clone();
            let caller = tokio::spawn(async move { source.get(P, user).await });
            began.notified().await;
            caller.abort();
            // SIGTERM: the drain must outlast the slow write.
            assert!(
                r.source.drain(Duration::from_secs(10)).await,
                "every exchange finished within the drain"
            );
        })
        .await;
    }
    // The replica's runtime is gone. Its refresh must be in the row.
    assert_eq!(idp.refreshes(), 1, "the provider was asked once");
    assert_link_intact(&idp, &store, user).await;
    // After a restart the new replica serves the stored token without presenting a
    // spent refresh token.
    let r = replica(&pool, &providers, &tokens_cfg(), clock.clone()).await;
    let token = r.source.get(P, user).await.expect("served after restart");
    assert!(idp.is_valid_access_token(token.expose_secret()));
    assert_eq!(idp.refreshes(), 1, "no second exchange after the restart");
    assert_eq!(idp.reused(), 0, "no refresh token was presented twice");
    assert_eq!(idp.rejected(), 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn no_exchange_starts_once_shutdown_began(pool: PgPool) {
    let (clock, idp, store, user) = setup(&pool).await;
    seed_expired(&idp, &store, &*clock, user).await;
    let r = replica(&pool, &[idp.provider(P)], &tokens_cfg(), clock.clone()).await;
    assert!(r.source.drain(Duration::from_secs(1)).await);
    assert_eq!(
        r.source.get(P, user).await.unwrap_err(),
        TokenError::IdpUnavailable,
        "an expired link answers idp_unavailable while shutting down"
    );
    assert_eq!(idp.attempts(), 0, "the provider was not called");
    assert_link_intact(&idp, &store, user).await;
}

/// How long the IdP holds its answer after rotating the refresh token: the
/// SIGTERM lands inside it, so the spent token's replacement is still on its way.
const HELD_ANSWER: Duration = Duration::from_secs(3);

/// The config after `[server]`/`[database]` for a `tokenproxy serve` child: the
/// IdP (wall clock) and an upstream route, refresh-ahead off (only the request's
/// flight refreshes).
fn binary_config(idp: &Idp, upstream: &TestUpstream) -> String {
    format!(
        "[tokens]\nrefresh_ahead = false\n\n[[providers]]\nid = \"{P}\"\nclient_id = \"test-client\"\n\
         client_secret = \"test-secret\"\ntoken_url = \"{}\"\ntimeout = \"10s\"\n\
         [[providers.routes]]\nprefix = \"/api\"\nupstream = \"{}\"\n",
        idp.token_url(),
        upstream.url()
    )
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn sigterm_to_the_binary_stores_a_refresh_nobody_waits_for(pool: PgPool) {
    // Real time throughout: the child process runs on the wall clock.
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let st = store(&pool);
    let user = Uuid::new_v4();
    seed_expired(&idp, &st, &SystemClock, user).await;
    let (_, caller) = proxy_harness::create_token(&st, user, &[]).await;
    let check = idp.clone();
    let upstream = TestUpstream::start(
        CredentialForm::Bearer,
        Arc::new(move |t: &str| check.is_valid_access_token(t)),
    )
    .await;
    let db = proxy_harness::db_url(&pool);
    let mut child = proxy_harness::Spawned::start(&db, &binary_config(&idp, &upstream)).await;
    idp.push_fault(Fault::ProcessThenDelay(HELD_ANSWER));
    // A caller whose request needs the refresh, and who hangs up once the IdP has
    // rotated the token: nobody waits for the flight any more.
    let (url, auth) = (child.url("/api/user"), format!("Bearer {caller}"));
    let request = tokio::spawn(async move {
        proxy_harness::try_send(http::Method::GET, &url, &[("authorization", &auth)], "").await
    });
    eventually("the IdP rotated the refresh token", || async {
        idp.refreshes() == 1
    })
    .await;
    request.abort();
    child.terminate();
    // The drain waits for the held answer and its write (well inside the 30 s
    // lease), then exits cleanly.
    let status = tokio::time::timeout(
        Duration::from_secs(25),
        tokio::task::spawn_blocking(move || {
            let status = child.child.wait().unwrap();
            (status, child)
        }),
    )
    .await
    .expect("serve exited after its drain")
    .unwrap()
    .0;
    assert!(status.success(), "serve exited with {status}");
    assert_link_intact(&idp, &st, user).await;

    // After a restart the stored token is served: no second exchange, no reuse.
    let child = proxy_harness::Spawned::start(&db, &binary_config(&idp, &upstream)).await;
    let answer = proxy_harness::get(
        &child.url("/api/user"),
        &[("authorization", &format!("Bearer {caller}"))],
    )
    .await;
    assert_eq!(answer.status, 200, "the upstream accepted the stored token");
    assert_eq!(idp.refreshes(), 1, "the provider was asked once");
    assert_eq!(idp.reused(), 0, "no refresh token was presented twice");
    assert_eq!(idp.rejected(), 0);
}
