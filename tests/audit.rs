//! Audit: what a hostile or careless caller can send. Every malformed request
//! gets an answer (tokenproxy's own JSON error with `tokenproxy-error` whenever
//! tokenproxy itself decides), nothing crashes a connection, and the proxy keeps
//! serving well-formed requests afterwards. The admin listener behaves the same.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::sync::Arc;

use harness::{create_token, get, raw, raw_bytes, raw_status, send, FakeTokens, Harness};
use http::Method;
use sqlx::PgPool;
use support::upstream::{tokens, CredentialForm, TestUpstream};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

const GH_TOKEN: &str = "gho_audit_access_1";

struct World {
    api: TestUpstream,
    proxy: Harness,
    token: String,
}

async fn world(pool: PgPool) -> World {
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
    let proxy = Harness::start(config, store, fake).await;
    World { api, proxy, token }
}

/// Asserts a raw response is tokenproxy's own error with `status` and `code`.
fn assert_own_error(resp: &str, status: u16, code: &str) {
    assert_eq!(raw_status(resp), status, "{resp}");
    let lower = resp.to_ascii_lowercase();
    assert!(
        lower.contains(&format!("tokenproxy-error: {code}")),
        "{resp}"
    );
    assert!(lower.contains("content-type: application/json"), "{resp}");
    assert!(resp.contains(&format!(r#""code":"{code}""#)), "{resp}");
}

fn b64(s: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn malformed_caller_credentials_are_401_json(pool: PgPool) {
    let w = world(pool).await;
    let not_utf8_token = [b"tpx_" as &[u8], &[0xff, 0xfe, 0x80]].concat();
    let bad: Vec<Vec<u8>> = vec![
        // Non-UTF-8 bytes in the header value.
        [b"Bearer tpx_\xff\xfe" as &[u8]].concat(),
        [
            b"Basic " as &[u8],
            b64(&[b"x:" as &[u8], &not_utf8_token].concat()).as_bytes(),
        ]
        .concat(),
        // Basic without a colon, with an empty password, not base64 at all.
        format!("Basic {}", b64(w.token.as_bytes())).into_bytes(),
        format!("Basic {}", b64(b"x:")).into_bytes(),
        b"Basic !!!not-base64!!!".to_vec(),
        b"Basic".to_vec(),
        // Bearer without a token, or with an unknown one.
        b"Bearer".to_vec(),
        b"Bearer ".to_vec(),
        b"Bearer tpx_unknown".to_vec(),
        b"Digest username=\"x\"".to_vec(),
    ];
    for value in bad {
        let req = [
            b"GET /gh/api/user HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
                as &[u8],
            &value,
            b"\r\n\r\n",
        ]
        .concat();
        let resp = raw_bytes(w.proxy.addr, &req).await;
        assert_own_error(&resp, 401, "unauthenticated");
        assert!(
            resp.contains(r#"www-authenticate: Basic realm="tokenproxy""#)
                || resp.contains(r#"WWW-Authenticate: Basic realm="tokenproxy""#),
            "{resp}"
        );
    }
    assert_eq!(w.api.count(), 0);

    // Duplicate Authorization headers: a junk one does not hide a valid one.
    let resp = raw(
        w.proxy.addr,
        &format!(
            "GET /gh/api/user HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer junk\r\nAuthorization: Bearer {}\r\n\r\n",
            w.token
        ),
    )
    .await;
    assert_eq!(raw_status(&resp), 200, "{resp}");
    // Only our credential reached the upstream, once.
    let seen = w.api.requests();
    assert_eq!(seen.len(), 1);
    let auth: Vec<_> = seen[0].headers.get_all("authorization").iter().collect();
    assert_eq!(auth, [format!("Bearer {GH_TOKEN}").as_str()]);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn malformed_requests_get_answers_and_the_proxy_keeps_serving(pool: PgPool) {
    let w = world(pool).await;
    let auth = format!("Authorization: Bearer {}", w.token);

    // CONNECT on a reverse-mode listener, with and without a usable authority.
    for target in ["example.com:443", "example.com", "[::1]:443", "host:99999"] {
        let resp = raw(
            w.proxy.addr,
            &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let status = raw_status(&resp);
        assert!(status == 400, "CONNECT {target}: {resp}");
    }

    // A body that ends before its Content-Length.
    let mut stream = TcpStream::connect(w.proxy.addr).await.unwrap();
    stream
        .write_all(
            format!("POST /gh/api/upload HTTP/1.1\r\nHost: x\r\n{auth}\r\nContent-Length: 100\r\n\r\nonly-ten!!").as_bytes(),
        )
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out);
    assert_own_error(&out, 400, "bad_request");

    // An absurd Content-Length: refused by the HTTP parser (or streamed), never a crash.
    let resp = raw(
        w.proxy.addr,
        &format!("POST /gh/api/upload HTTP/1.1\r\nHost: x\r\n{auth}\r\nContent-Length: 99999999999999999999999\r\nConnection: close\r\n\r\nx"),
    )
    .await;
    assert_eq!(raw_status(&resp), 400, "{resp}");

    // Garbage request lines and header values the HTTP parser refuses.
    for garbage in [
        "GARBAGE\r\n\r\n",
        "GET\r\n\r\n",
        "GET /gh/api/user HTTP/9.9\r\n\r\n",
        "GET /gh/api/user HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n",
    ] {
        // An empty answer would mean the connection task died without replying.
        let resp = raw(w.proxy.addr, garbage).await;
        let status = raw_status(&resp);
        assert!((400..=505).contains(&status), "{garbage:?}: {resp}");
    }

    // Unsafe and odd targets: tokenproxy's own 400 or 404.
    for path in ["/gh/api/%2e%2e/admin", "/gh/api/..%2fx", "/gh/api\\x", "*"] {
        let resp = raw(
            w.proxy.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let status = raw_status(&resp);
        assert!(status == 400 || status == 404, "{path}: {resp}");
        if status == 400 && resp.to_ascii_lowercase().contains("tokenproxy-error") {
            assert_own_error(&resp, 400, "bad_request");
        }
    }
    assert_eq!(w.api.count(), 0, "nothing malformed reached the upstream");

    // Still serving.
    let a = get(
        &w.proxy.url("/gh/api/user"),
        &[("authorization", &format!("Bearer {}", w.token))],
    )
    .await;
    assert_eq!(a.status, 200);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn admin_listener_errors_are_json_and_garbage_is_harmless(pool: PgPool) {
    let w = world(pool).await;
    let admin = |p: &str| format!("http://{}{p}", w.proxy.admin);
    get(&admin("/nope"), &[])
        .await
        .assert_error(404, "no_route");
    get(&admin("/metrics/../healthz"), &[])
        .await
        .assert_error(404, "no_route");
    send(Method::POST, &admin("/metrics"), &[], "x")
        .await
        .assert_error(400, "bad_request");
    send(Method::DELETE, &admin("/healthz"), &[], "")
        .await
        .assert_error(400, "bad_request");
    for garbage in [
        "GARBAGE\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n",
        "CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ] {
        // An empty answer would mean the connection task died without replying.
        let resp = raw(w.proxy.admin, garbage).await;
        let status = raw_status(&resp);
        assert!((400..=505).contains(&status), "{garbage:?}: {resp}");
    }
    assert_eq!(get(&admin("/healthz"), &[]).await.status, 200);
    assert_eq!(get(&admin("/readyz"), &[]).await.status, 200);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn github_and_gitlab_client_credential_forms_work_and_never_travel_upstream(pool: PgPool) {
    let w = world(pool).await;
    // `gh`, octokit and GitHub Actions send `Authorization: token <TOKEN>`;
    // glab and python-gitlab send `PRIVATE-TOKEN: <TOKEN>`.
    let token_scheme = format!("token {}", w.token);
    let a = get(
        &w.proxy.url("/gh/api/user"),
        &[("authorization", &token_scheme)],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = get(
        &w.proxy.url("/gh/api/user"),
        &[("private-token", w.token.as_str())],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    // A PRIVATE-TOKEN beside the usual credential is a caller credential too.
    let bearer = format!("Bearer {}", w.token);
    let a = get(
        &w.proxy.url("/gh/api/user"),
        &[("authorization", &bearer), ("private-token", &w.token)],
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = w.api.requests();
    assert_eq!(seen.len(), 3);
    for r in seen {
        for (name, value) in &r.headers {
            assert!(
                !String::from_utf8_lossy(value.as_bytes()).contains("tpx_"),
                "{name} carried the proxy token upstream"
            );
        }
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn upstream_redirects_come_back_through_the_proxy(pool: PgPool) {
    use http_body_util::{BodyExt, Full};
    // An upstream that redirects like GitHub does for a renamed repository.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let o = origin.clone();
    let _stop = support::upstream::serve_with(listener, None, move |req| {
        let o = o.clone();
        async move {
            let location = match req.uri().path() {
                "/base/old.git/info/refs" => {
                    format!("{o}/base/new.git/info/refs?service=git-upload-pack")
                }
                "/base/relative" => "/base/other".to_string(),
                "/base/outside" => "/elsewhere".to_string(),
                _ => "https://codeload.example/archive".to_string(),
            };
            let mut resp = http::Response::new(
                Full::new(bytes::Bytes::new())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            );
            *resp.status_mut() = http::StatusCode::MOVED_PERMANENTLY;
            resp.headers_mut()
                .insert("location", location.parse().unwrap());
            resp
        }
    });
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
  prefix = "/gh/git"
  upstream = "{origin}/base"
  inject = {{ basic_username = "x-access-token" }}
"#
    ));
    let proxy = Harness::start(config, store, fake).await;
    let auth = format!("Bearer {token}");
    let location = |path: &'static str| {
        let url = proxy.url(path);
        let auth = auth.clone();
        async move {
            let a = get(&url, &[("authorization", &auth)]).await;
            assert_eq!(a.status, 301);
            a.headers["location"].to_str().unwrap().to_string()
        }
    };
    assert_eq!(
        location("/gh/git/old.git/info/refs").await,
        "/gh/git/new.git/info/refs?service=git-upload-pack"
    );
    assert_eq!(location("/gh/git/relative").await, "/gh/git/other");
    assert_eq!(location("/gh/git/outside").await, "/elsewhere");
    assert_eq!(
        location("/gh/git/foreign").await,
        "https://codeload.example/archive"
    );
}
