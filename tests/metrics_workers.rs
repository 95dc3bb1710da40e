//! The metrics add up when the proxy serves on several worker threads, as
//! `tokenproxy serve` runs it: every request counted once, in the right series,
//! whichever worker answered it.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::sync::Arc;

use harness::{create_token, get, FakeTokens, Harness};
use sqlx::PgPool;
use support::upstream::{tokens, CredentialForm, TestUpstream};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use uuid::Uuid;

const GH_TOKEN: &str = "gho_workers";
const WORKERS: usize = 4;
/// Callers, each on its own connection: the kernel spreads connections over
/// the workers' `SO_REUSEPORT` sockets by a hash of the addresses, so 64 of
/// them reach every worker (the chance that all land on fewer is negligible).
const CALLERS: usize = 64;
const ROUTED: usize = 5;
const UNROUTED: usize = 2;

/// The sum of every sample of `name` whose labels contain each of `labels`.
fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let base = series.split('{').next()?;
            (base == name && labels.iter().all(|want| series.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn counts_from_every_worker_add_up_exactly(pool: PgPool) {
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let config = harness::config(&format!(
        r#"
[[providers]]
id = "github"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  prefix = "/gh/api"
  upstream = "{}"
"#,
        api.url()
    ));
    let proxy = Arc::new(Harness::start_workers(config, store, fake.clone(), WORKERS).await);
    let auth = Arc::new(format!("Bearer {token}"));

    let callers: Vec<_> = (0..CALLERS)
        .map(|i| {
            let (proxy, auth) = (proxy.clone(), auth.clone());
            tokio::spawn(async move {
                for j in 0..ROUTED + UNROUTED {
                    // Each `get` is a fresh connection, so a caller's requests
                    // land on several workers too.
                    let path = if j < ROUTED {
                        format!("/gh/api/user/{i}/{j}")
                    } else {
                        format!("/nowhere/{i}/{j}")
                    };
                    let a = get(&proxy.url(&path), &[("authorization", &auth)]).await;
                    let want = if j < ROUTED { 200 } else { 404 };
                    assert_eq!(a.status, want, "{path}");
                }
            })
        })
        .collect();
    for c in callers {
        c.await.unwrap();
    }

    let routed = (CALLERS * ROUTED) as f64;
    let unrouted = (CALLERS * UNROUTED) as f64;
    assert_eq!(
        api.count(),
        CALLERS * ROUTED,
        "the upstream saw every routed request"
    );
    let m = get(&format!("http://{}/metrics", proxy.admin), &[]).await;
    assert_eq!(m.status, 200);
    let text = String::from_utf8_lossy(&m.body);
    assert_eq!(
        sum(
            &text,
            "tokenproxy_requests_total",
            &[
                r#"provider="github""#,
                r#"route="/gh/api""#,
                r#"status="200""#
            ]
        ),
        routed,
        "{text}"
    );
    assert_eq!(
        sum(&text, "tokenproxy_requests_total", &[r#"status="404""#]),
        unrouted
    );
    assert_eq!(
        sum(&text, "tokenproxy_requests_total", &[]),
        routed + unrouted,
        "no request counted twice or in another series"
    );
    assert_eq!(
        sum(&text, "tokenproxy_request_duration_seconds_count", &[]),
        routed + unrouted
    );
    assert_eq!(
        sum(&text, "tokenproxy_upstream_duration_seconds_count", &[]),
        routed,
        "one upstream attempt per routed request"
    );
    let le_inf = sum(
        &text,
        "tokenproxy_request_duration_seconds_bucket",
        &[r#"le="+Inf""#],
    );
    assert_eq!(
        le_inf,
        routed + unrouted,
        "the +Inf bucket holds every request"
    );
    assert_eq!(
        fake.gets.load(std::sync::atomic::Ordering::SeqCst),
        CALLERS * ROUTED,
        "one token lookup per routed request"
    );
}
