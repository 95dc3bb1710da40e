//! With debug logging on for every crate, a full scenario's logs contain no
//! token value: the test captures everything and searches it for every proxy
//! token, access token, refresh token and client secret it issued or saw.
//!
//! Both log formats (text and JSON) are captured and searched.
//!
//! Alone in its file because it installs the process-wide subscriber.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use support::util::basic;

use std::io::Write;
use std::sync::Arc;

use harness::{create_token, get, send, Harness};
use http::Method;
use parking_lot::Mutex;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use support::idp::{Idp, IdpOptions};
use support::upstream::{CredentialForm, TestUpstream};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::LinkStore;
use tokenproxy::telemetry::Metrics;
use tokenproxy::tokens::{SystemClock, TokenSource};
use uuid::Uuid;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn debug_logs_of_a_full_scenario_contain_no_token(pool: PgPool) {
    use tracing_subscriber::prelude::*;
    // Both log formats `serve` offers, as `telemetry::init_logging` builds them
    // (JSON: one flattened object per line), each into its own capture.
    let captured = Captured::default();
    let json = Captured::default();
    let (text_writer, json_writer) = (captured.clone(), json.clone());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || text_writer.clone())
                .with_ansi(false),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_writer(move || json_writer.clone()),
        )
        .with(tracing_subscriber::EnvFilter::new("debug"))
        .init();

    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let check = {
        let idp = idp.clone();
        Arc::new(move |t: &str| idp.is_valid_access_token(t))
    };
    let api = TestUpstream::start(CredentialForm::Bearer, check.clone()).await;
    let git = TestUpstream::start(
        CredentialForm::Basic("x-access-token".into()),
        check.clone(),
    )
    .await;
    let lab = TestUpstream::start(CredentialForm::Header("private-token".into()), check).await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let seed = idp.seed(user);
    store.put_link("github", user, &seed).await.unwrap();
    let (_, token) = create_token(&*store, user, &[]).await;
    let (_, limited) = create_token(&*store, user, &["other"]).await;
    let unknown = "tpx_unknownunknownunknownunknown".to_string();

    let config = harness::config(&format!(
        r#"
[server]
forwarded_headers = true

[[providers]]
id = "github"
client_id = "test-client"
client_secret = "test-secret"
token_url = "{}"
timeout = "2s"

  [[providers.routes]]
  prefix = "/api"
  upstream = "{}"

  [[providers.routes]]
  prefix = "/git"
  upstream = "{}"
  inject = {{ basic_username = "x-access-token" }}

  [[providers.routes]]
  prefix = "/lab"
  upstream = "{}"
  inject = {{ header = "PRIVATE-TOKEN" }}
"#,
        idp.token_url(),
        api.url(),
        git.url(),
        lab.url()
    ));
    let tokens = TokenSource::new(
        store.clone(),
        &config.providers,
        &config.tokens,
        Metrics::new(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let proxy = Harness::start_source(config, store.clone(), tokens).await;

    let bearer = format!("Bearer {token}");
    assert_eq!(
        get(&proxy.url("/api/user"), &[("authorization", &bearer)])
            .await
            .status,
        200
    );
    assert_eq!(
        get(
            &proxy.url("/git/o/r.git/info/refs"),
            &[("authorization", &basic("x", &token))]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        get(&proxy.url("/lab/p"), &[("proxy-authorization", &bearer)])
            .await
            .status,
        200
    );
    // A 401 from the upstream: refresh and retry (new access and refresh tokens).
    assert_eq!(
        send(
            Method::POST,
            &proxy.url("/api/always401"),
            &[("authorization", &bearer)],
            "x"
        )
        .await
        .status,
        401
    );
    // Failures: unknown token, limited token, no route.
    get(
        &proxy.url("/api/user"),
        &[("authorization", &format!("Bearer {unknown}"))],
    )
    .await
    .assert_error(401, "unauthenticated");
    get(
        &proxy.url("/api/user"),
        &[("authorization", &format!("Bearer {limited}"))],
    )
    .await
    .assert_error(403, "forbidden");
    get(&proxy.url("/nope"), &[("authorization", &bearer)])
        .await
        .assert_error(404, "no_route");
    proxy.shutdown().await;
    idp.assert_grants(1, 1, 0);

    let mut secrets = vec![
        token.clone(),
        limited.clone(),
        unknown.clone(),
        seed.access_token.expose_secret().to_string(),
        seed.refresh_token.expose_secret().to_string(),
        idp.current_refresh_token(user).unwrap(),
        "test-secret".to_string(),
    ];
    for up in [&api, &git, &lab] {
        secrets.extend(up.requests().into_iter().filter_map(|r| r.token));
    }
    // The Basic credentials as they travel, too.
    secrets.push(basic("x", &token));
    let logs = String::from_utf8_lossy(&captured.0.lock()).into_owned();
    if std::env::var_os("SHOW_LOGS").is_some() {
        println!("{logs}");
    }
    assert!(
        logs.contains("tokenproxy::access") && logs.contains("status=200"),
        "the access log is captured: {logs}"
    );
    assert!(logs.lines().count() > 20, "debug logging is on");
    let json = String::from_utf8_lossy(&json.0.lock()).into_owned();
    for line in json.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(event["level"].is_string(), "{line}");
    }
    assert!(
        json.contains(r#""target":"tokenproxy::access""#) && json.contains(r#""status":200"#),
        "the JSON access log is captured: {json}"
    );
    assert_eq!(
        json.lines().count(),
        logs.lines().count(),
        "the same events"
    );
    for (format, logs) in [("text", &logs), ("json", &json)] {
        for s in &secrets {
            assert!(s.len() >= 8);
            assert!(
                !logs.contains(s.as_str()),
                "a secret appears in the {format} logs"
            );
            // The part after a recognisable prefix, in case a prefix was stripped.
            assert!(
                !logs.contains(&s[4..]),
                "a secret appears in the {format} logs"
            );
        }
    }
}
