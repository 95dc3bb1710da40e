//! The token source over the SQLite store: independent replicas (each its own
//! pool on one file, its own cache and metrics) refresh each expiry exactly once.
//! The replicas that lose the lease learn of the winner's write from the polled
//! change log (or their own poll of the row) and adopt it.

#[path = "tokens_harness/mod.rs"]
mod harness;
mod support;

use std::sync::Arc;
use std::time::Duration;

use harness::{
    assert_round, gets_on_every_replica, idp_with, outcome_sum, replica_with, tokens_cfg, P,
};
use secrecy::{ExposeSecret, SecretString};
use support::idp::IdpOptions;
use tokenproxy::config::DatabaseConfig;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::LinkStore;
use tokenproxy::telemetry::RefreshOutcome;
use tokenproxy::tokens::Clock;
use uuid::Uuid;

fn open(dir: &std::path::Path) -> Arc<dyn LinkStore> {
    let cfg = DatabaseConfig {
        url: SecretString::from(format!("sqlite://{}", dir.join("links.db").display())),
        max_connections: 8,
        ..Default::default()
    };
    tokenproxy::store::open(&cfg, Keyring::plaintext()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_sqlite_replicas_refresh_each_expiry_once() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, idp) = idp_with(IdpOptions::default()).await;
    idp.set_latency(Duration::from_millis(50));
    let store = open(dir.path());
    store.migrate().await.unwrap();
    let user = Uuid::new_v4();
    let expired = clock.now() - chrono::Duration::seconds(10);
    store
        .put_link(P, user, &idp.seed_with_expiry(user, Some(expired)))
        .await
        .unwrap();

    let providers = [idp.provider(P)];
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas
            .push(replica_with(open(dir.path()), &providers, &tokens_cfg(), clock.clone()).await);
    }
    for round in 1..=2u64 {
        let all = gets_on_every_replica(&replicas, user, 200).await;
        assert_round(&all, 600, &idp, round);
        let row = store.get_link(P, user).await.unwrap().unwrap();
        assert_eq!(
            Some(row.refresh_token.expose_secret().to_string()),
            idp.current_refresh_token(user),
            "the row holds the provider's current refresh token"
        );
        assert_eq!(row.refresh_failure_reason, "");
        assert_eq!(
            row.lease_expires_at, None,
            "the winner's write cleared the lease"
        );
        // The next expiry: two hours later.
        clock.advance(Duration::from_secs(7200));
    }
    assert_eq!(outcome_sum(&replicas, RefreshOutcome::Success), 2);
    assert!(
        outcome_sum(&replicas, RefreshOutcome::Adopted) >= 1,
        "waiting replicas adopted the winner's token"
    );
}
