//! Two `tokenproxy serve` processes on one SQLite file (issue 6): under a
//! refresh storm the test provider sees exactly one refresh per expired link,
//! and every request is answered by the upstream with the fresh token.
//!
//! The lease claim is one conditional UPDATE that SQLite serialises across the
//! processes; the loser learns of the winner's write from the polled change log
//! (SQLite has no NOTIFY), which also carries a `link delete` made elsewhere to
//! both processes' caches.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::sync::Arc;
use std::time::Duration;

use harness::{create_token, get, Spawned};
use secrecy::SecretString;
use support::idp::{Idp, IdpOptions};
use support::upstream::{CredentialForm, TestUpstream};
use tokenproxy::config::DatabaseConfig;
use tokenproxy::crypto::Keyring;
use uuid::Uuid;

const P: &str = "idp";
/// Requests per process per storm.
const PER_PROCESS: usize = 100;

/// Sum of the samples of `name` whose labels contain `label`, in Prometheus text.
fn metric_sum(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_serve_processes_on_one_sqlite_file_refresh_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!(
        "sqlite://{}",
        dir.path().join("data/tokenproxy.db").display()
    );
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    // A slow token endpoint keeps the refresh in flight while the other
    // process's requests arrive and find the lease held.
    idp.set_latency(Duration::from_millis(300));
    let check = {
        let idp = idp.clone();
        Arc::new(move |t: &str| idp.is_valid_access_token(t))
    };
    let upstream = TestUpstream::start(CredentialForm::Bearer, check).await;

    // Seed through the store: links whose access tokens already expired.
    let store = tokenproxy::store::open(
        &DatabaseConfig {
            url: SecretString::from(db.clone()),
            ..Default::default()
        },
        Keyring::plaintext(),
    )
    .unwrap();
    store.migrate().await.unwrap();
    let users: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let mut tokens = Vec::new();
    for user in &users {
        let expired = chrono::Utc::now() - chrono::Duration::seconds(10);
        store
            .put_link(P, *user, &idp.seed_with_expiry(*user, Some(expired)))
            .await
            .unwrap();
        tokens.push(create_token(store.as_ref(), *user, &[]).await.1);
    }

    let rest = format!(
        "[callers]\nmode = \"token\"\n\n[tokens]\nrefresh_ahead = false\n\n\
         [[providers]]\nid = \"{P}\"\nclient_id = \"test-client\"\n\
         client_secret = \"test-secret\"\ntoken_url = \"{}\"\ntimeout = \"10s\"\n\
         [[providers.routes]]\nprefix = \"/idp/api\"\nupstream = \"{}\"\n",
        idp.token_url(),
        upstream.url()
    );
    let procs = [
        Spawned::start(&db, &rest).await,
        Spawned::start(&db, &rest).await,
    ];

    // One storm per user: both processes, many requests each, all at once.
    for (i, (user, token)) in users.iter().zip(&tokens).enumerate() {
        let auth = format!("Bearer {token}");
        let mut storm = Vec::new();
        for p in &procs {
            for _ in 0..PER_PROCESS {
                let url = p.url("/idp/api/whoami");
                let auth = auth.clone();
                storm.push(tokio::spawn(async move {
                    get(&url, &[("authorization", &auth)]).await
                }));
            }
        }
        let mut failed = Vec::new();
        for r in storm {
            let answer = r.await.unwrap();
            if answer.status != 200 {
                failed.push((answer.status, answer.body));
            }
        }
        assert_eq!(failed, vec![], "user {user}: every request succeeds");
        assert_eq!(
            idp.refreshes(),
            i as u64 + 1,
            "exactly one refresh per expired link"
        );
        assert_eq!(idp.rejected(), 0, "no refresh token was presented twice");
        // The row holds the provider's current refresh token.
        let row = store.get_link(P, *user).await.unwrap().unwrap();
        assert_eq!(
            Some(secrecy::ExposeSecret::expose_secret(&row.refresh_token).to_owned()),
            idp.current_refresh_token(*user)
        );
        assert_eq!(row.refresh_failure_reason, "");
    }
    assert_eq!(upstream.count(), users.len() * 2 * PER_PROCESS);

    // Both processes took part: one refreshed each link, the other adopted it.
    let mut success = 0;
    let mut adopted = 0;
    let mut served_by = 0;
    for p in &procs {
        let metrics = get(&format!("http://{}/metrics", p.admin), &[]).await;
        let text = String::from_utf8(metrics.body.to_vec()).unwrap();
        success += metric_sum(&text, "tokenproxy_refresh_total", "outcome=\"success\"");
        adopted += metric_sum(&text, "tokenproxy_refresh_total", "outcome=\"adopted\"");
        served_by += usize::from(metric_sum(&text, "tokenproxy_requests_total", "") > 0);
    }
    assert_eq!(success, users.len() as u64);
    assert!(adopted >= 1, "a waiting process adopted the winner's token");
    assert_eq!(served_by, 2);

    // A link deleted by another process (here: the test's own store) stops
    // being served by both, though their caches held a valid token.
    assert!(store.delete_link(P, users[0]).await.unwrap());
    let auth = format!("Bearer {}", tokens[0]);
    for p in &procs {
        let url = p.url("/idp/api/whoami");
        let h = [("authorization", auth.as_str())];
        support::util::eventually("the deleted link stops being served", || async {
            get(&url, &h).await.status != 200
        })
        .await;
        get(&url, &h).await.assert_error(403, "link_missing");
    }
}
