//! Audit: the database failing at the worst moment. When the provider has
//! already rotated a single-use refresh token and the write of the new one
//! fails, the new token exists only in this process: it must be served, and
//! stored as soon as the database answers again, or the user's link is lost.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::PgPool;
use support::idp::{Idp, IdpOptions};
use support::store_wrapper::{HookedStore, Hooks};
use tokenproxy::config::TokensConfig;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{Fence, LinkStore, StoreError, TokenSet};
use tokenproxy::telemetry::Metrics;
use tokenproxy::tokens::{SystemClock, TokenSource};
use uuid::Uuid;

/// Postgres, except that the first `fail_writes` refreshed-token writes fail as
/// if the database had gone away.
struct FlakyWrites {
    fail_writes: AtomicUsize,
    writes: AtomicUsize,
}

#[async_trait::async_trait]
impl Hooks for FlakyWrites {
    async fn write_refreshed(
        &self,
        inner: &dyn LinkStore,
        p: &str,
        u: Uuid,
        old: &Fence,
        new: &TokenSet,
    ) -> Result<bool, StoreError> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        if n < self.fail_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection refused (test)".into()));
        }
        inner.write_refreshed(p, u, old, new).await
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_rotated_token_the_database_refused_is_stored_when_it_comes_back(pool: PgPool) {
    let idp = Idp::start(IdpOptions::default()).await;
    let store = Arc::new(HookedStore::new(
        PgStore::from_pool(pool, Keyring::plaintext()),
        FlakyWrites {
            // More failures than the request path retries.
            fail_writes: AtomicUsize::new(5),
            writes: AtomicUsize::new(0),
        },
    ));
    let user = Uuid::new_v4();
    let seeded = idp.seed_with_expiry(user, Some(chrono::Utc::now() - chrono::Duration::hours(1)));
    store.put_link("p", user, &seeded).await.unwrap();
    let source = TokenSource::new(
        store.clone(),
        &[idp.provider("p")],
        &TokensConfig::default(),
        Metrics::new(),
        Arc::new(SystemClock),
    )
    .unwrap();

    let token = source
        .get("p", user)
        .await
        .expect("the new token is served");
    assert!(idp.is_valid_access_token(token.expose_secret()));
    assert_eq!(idp.refreshes(), 1);
    // Later requests are served the same token without presenting the (now
    // dead) old refresh token again.
    let again = source.get("p", user).await.unwrap();
    assert!(again.same_version(&token));
    assert_eq!(idp.attempts(), 1);

    // Readiness polling (bounded), not a timing assertion: the background retry
    // stores the rotated refresh token once writes work again.
    let current = idp.current_refresh_token(user).unwrap();
    let mut stored = String::new();
    for _ in 0..100 {
        let row = store.inner.get_link("p", user).await.unwrap().unwrap();
        stored = row.refresh_token.expose_secret().to_string();
        if stored == current {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        stored, current,
        "the rotated refresh token was never stored"
    );
    let row = store.inner.get_link("p", user).await.unwrap().unwrap();
    assert_eq!(row.access_token.expose_secret(), token.expose_secret());
    assert_eq!(row.refresh_failure_reason, "");
}
