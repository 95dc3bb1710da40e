//! TLS on both sides: an HTTPS upstream trusted through a route's `upstream_ca`
//! (and spoken to over HTTP/2 when it offers h2 by ALPN), an untrusted one
//! refused, and the proxy listener itself serving TLS from `[server.tls]`.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::sync::Arc;

use bytes::Bytes;
use harness::{create_token, FakeTokens, Harness};
use http_body_util::{BodyExt, Empty};
use sqlx::PgPool;
use support::upstream::{tokens, CredentialForm, TestCa, TestUpstream};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use uuid::Uuid;

const GH_TOKEN: &str = "gho_tls_token";

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn https_upstreams_need_a_trusted_ca_and_get_http2(pool: PgPool) {
    let ca = TestCa::new();
    let up =
        TestUpstream::start_tls(CredentialForm::Bearer, tokens(&[GH_TOKEN]), ca.acceptor()).await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let config = harness::config(&format!(
        r#"
[server]
tls = {{ cert = "{cert}", key = "{key}" }}

[[providers]]
id = "github"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  prefix = "/trusted"
  upstream = "https://127.0.0.1:{port}"
  upstream_ca = "{ca}"

  [[providers.routes]]
  prefix = "/untrusted"
  upstream = "https://127.0.0.1:{port}"
"#,
        cert = ca.cert.display(),
        key = ca.key.display(),
        ca = ca.ca.display(),
        port = up.addr.port(),
    ));
    let proxy = Harness::start(config, store, fake).await;

    // The proxy listener speaks TLS: connect with a client trusting the test CA.
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(ca.client_config())
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Empty<Bytes>>(https);
    let request = |path: &str| {
        http::Request::get(format!("https://127.0.0.1:{}{path}", proxy.addr.port()))
            .header("authorization", format!("Bearer {token}"))
            .body(Empty::new())
            .unwrap()
    };
    let resp = client.request(request("/trusted/user")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.version(),
        http::Version::HTTP_2,
        "ALPN chose h2 with the caller"
    );
    let seen = up.requests().pop().unwrap();
    assert_eq!(
        seen.version,
        http::Version::HTTP_2,
        "ALPN chose h2 upstream"
    );
    assert_eq!(seen.token.as_deref(), Some(GH_TOKEN));
    assert_eq!(seen.headers["host"], up.addr.to_string());

    let resp = client.request(request("/untrusted/user")).await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["tokenproxy-error"], "upstream_unavailable");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "upstream_unavailable");
    assert_eq!(up.count(), 1, "the untrusted upstream got no request");

    // Plain HTTP to the TLS listener gets nowhere.
    let plain = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        harness::raw(proxy.addr, "GET /trusted/user HTTP/1.1\r\nHost: x\r\n\r\n"),
    )
    .await
    .unwrap();
    assert!(!plain.starts_with("HTTP/1.1 200"));
}
