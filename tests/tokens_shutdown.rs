//! Shutdown of the token source (issue 11, "drain on shutdown"): a refresh whose
//! provider answer is in hand but not yet stored must be stored before the process
//! exits, and no exchange may start once shutdown began.
//!
//! The replica runs on its own runtime ([`on_multi_thread`]); dropping that runtime
//! at the end is what a process exit does to every task still running on it.

#[path = "tokens_harness/mod.rs"]
mod harness;
mod support;

use std::sync::Arc;
use std::time::Duration;

use harness::*;
use sqlx::PgPool;
use support::store_wrapper::{HookedStore, Hooks};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{Fence, LinkStore, StoreError, TokenSet};
use tokenproxy::tokens::TokenError;
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
