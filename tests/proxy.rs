//! Reverse-proxy acceptance tests (issue 4): credential injection verified by
//! upstreams, hop-by-hop and caller-credential stripping, every error code, SSRF
//! attempts against a canary, and the admin endpoints. The proxy runs in-process
//! on loopback over a real Postgres store; tokens come from a scripted lookup
//! (the refresh tests with the real token source live in `proxy_refresh.rs`).

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use support::util::basic;

use std::sync::Arc;

use harness::{create_token, get, raw, raw_status, send, FakeTokens, Harness};
use http::Method;
use sqlx::PgPool;
use support::upstream::{tokens, CredentialForm, TestUpstream};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::LinkStore;
use tokenproxy::tokens::TokenError;
use uuid::Uuid;

const GH_TOKEN: &str = "gho_github_access_1";
const GL_TOKEN: &str = "glpat_gitlab_access_1";

/// Three upstreams, one per injection form, and a proxy routing to them.
struct World {
    api: TestUpstream,
    git: TestUpstream,
    gitlab: TestUpstream,
    store: Arc<PgStore>,
    tokens: Arc<FakeTokens>,
    proxy: Harness,
    user: Uuid,
    token: String,
}

fn routes_toml(api: &str, git: &str, gitlab: &str, upstream_timeout: &str) -> String {
    format!(
        r#"
[server]
upstream_timeout = "{upstream_timeout}"
forwarded_headers = true

[callers]
cache_ttl = "300ms"

[[providers]]
id = "github"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  prefix = "/gh/api"
  upstream = "{api}"
  inject = "bearer"

  [[providers.routes]]
  prefix = "/gh/git"
  upstream = "{git}/base/"
  inject = {{ basic_username = "x-access-token" }}

[[providers]]
id = "gitlab"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  prefix = "/gl"
  upstream = "{gitlab}"
  inject = {{ header = "PRIVATE-TOKEN" }}
"#
    )
}

async fn world(pool: PgPool) -> World {
    world_with(pool, |toml| toml).await
}

/// [`world`] with its config text edited first.
async fn world_with(pool: PgPool, edit: impl FnOnce(String) -> String) -> World {
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let git = TestUpstream::start(
        CredentialForm::Basic("x-access-token".into()),
        tokens(&[GH_TOKEN]),
    )
    .await;
    let gitlab = TestUpstream::start(
        CredentialForm::Header("private-token".into()),
        tokens(&[GL_TOKEN]),
    )
    .await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    fake.set("gitlab", user, GL_TOKEN);
    let config = harness::config(&edit(routes_toml(
        &api.url(),
        &git.url(),
        &gitlab.url(),
        "5s",
    )));
    let proxy = Harness::start(config, store.clone(), fake.clone()).await;
    World {
        api,
        git,
        gitlab,
        store,
        tokens: fake,
        proxy,
        user,
        token,
    }
}

/// No header of any recorded request holds a proxy token or Proxy-Authorization.
fn assert_no_caller_credentials(up: &TestUpstream) {
    for r in up.requests() {
        assert!(r.headers.get("proxy-authorization").is_none());
        for (name, value) in &r.headers {
            let v = String::from_utf8_lossy(value.as_bytes());
            assert!(!v.contains("tpx_"), "{name} carried a proxy token");
            // Basic values are encoded: decode anything that looks like one.
            if let Some(b64) = v.strip_prefix("Basic ") {
                use base64::Engine;
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap_or_default();
                assert!(!String::from_utf8_lossy(&raw).contains("tpx_"));
            }
        }
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn bearer_basic_and_header_injection_are_verified_by_the_upstreams(pool: PgPool) {
    let w = world(pool).await;
    let bearer = format!("Bearer {}", w.token);

    // Bearer route, caller token in Authorization; query string preserved.
    let a = get(
        &w.proxy.url("/gh/api/user/repos?per_page=5&q=a%2Fb"),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["target"], "/user/repos?per_page=5&q=a%2Fb");

    // Basic route, caller token as the Basic password (what git sends).
    let a = get(
        &w.proxy
            .url("/gh/git/org/repo.git/info/refs?service=git-upload-pack"),
        &[("authorization", &basic("anyone", &w.token))],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.json()["target"],
        "/base/org/repo.git/info/refs?service=git-upload-pack"
    );

    // Header route, caller token in Proxy-Authorization and a caller-chosen
    // Authorization and PRIVATE-TOKEN that must both be replaced.
    let a = get(
        &w.proxy.url("/gl/projects"),
        &[
            ("proxy-authorization", &bearer),
            ("authorization", "Bearer caller-chosen"),
            ("private-token", "caller-chosen"),
        ],
    )
    .await;
    assert_eq!(a.status, 200);

    let api = w.api.requests();
    assert_eq!(api.len(), 1);
    assert_eq!(api[0].token.as_deref(), Some(GH_TOKEN));
    assert_eq!(api[0].headers["host"], w.api.addr.to_string());
    assert_eq!(api[0].headers["x-forwarded-proto"], "http");
    assert_eq!(api[0].headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(api[0].headers["via"], "1.1 tokenproxy");
    let git = w.git.requests();
    assert_eq!(git.len(), 1);
    assert_eq!(git[0].token.as_deref(), Some(GH_TOKEN));
    let gl = w.gitlab.requests();
    assert_eq!(gl.len(), 1);
    assert_eq!(gl[0].token.as_deref(), Some(GL_TOKEN));
    assert_eq!(gl[0].headers.get_all("private-token").iter().count(), 1);
    assert!(gl[0].headers.get("authorization").is_none());
    for up in [&w.api, &w.git, &w.gitlab] {
        assert_no_caller_credentials(up);
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn hop_by_hop_headers_are_removed_both_ways(pool: PgPool) {
    let w = world(pool).await;
    let a = get(
        &w.proxy.url("/gh/api/user"),
        &[
            ("authorization", &format!("Bearer {}", w.token)),
            ("connection", "x-caller-hop"),
            ("x-caller-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("x-end-to-end", "kept"),
        ],
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = &w.api.requests()[0].headers;
    for hop in ["x-caller-hop", "keep-alive", "proxy-connection", "te"] {
        assert!(seen.get(hop).is_none(), "{hop} reached the upstream");
    }
    assert_eq!(seen["x-end-to-end"], "kept");
    // The upstream named x-upstream-hop in Connection and forged our error header.
    assert!(a.headers.get("x-upstream-hop").is_none());
    assert!(a.headers.get("tokenproxy-error").is_none());
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn caller_credential_errors(pool: PgPool) {
    let w = world(pool).await;
    let url = w.proxy.url("/gh/api/user");

    // No credential, an unknown token, a foreign credential.
    for headers in [
        vec![],
        vec![("authorization", "Bearer tpx_unknown0000000000".to_string())],
        vec![("authorization", "Bearer ghp_not_a_proxy_token".to_string())],
    ] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let a = get(&url, &h).await;
        a.assert_error(401, "unauthenticated");
        assert_eq!(a.headers["www-authenticate"], r#"Basic realm="tokenproxy""#);
    }

    // A token limited to gitlab may not use github.
    let (_, gl_only) = create_token(&*w.store, w.user, &["gitlab"]).await;
    let a = get(&url, &[("authorization", &format!("Bearer {gl_only}"))]).await;
    a.assert_error(403, "forbidden");
    assert_eq!(a.json()["error"]["provider"], "github");
    let a = get(
        &w.proxy.url("/gl/x"),
        &[("authorization", &format!("Bearer {gl_only}"))],
    )
    .await;
    assert_eq!(a.status, 200);

    // An expired token.
    let (token, hash) = tokenproxy::proxy::caller::generate_token();
    w.store
        .create_proxy_token(&tokenproxy::store::NewProxyToken {
            user_id: w.user,
            name: "expired".into(),
            hash,
            providers: vec![],
            expires_at: Some(chrono::Utc::now() - chrono::Duration::seconds(1)),
        })
        .await
        .unwrap();
    use secrecy::ExposeSecret;
    let a = get(
        &url,
        &[(
            "authorization",
            &format!("Bearer {}", token.expose_secret()),
        )],
    )
    .await;
    a.assert_error(401, "unauthenticated");
    assert_eq!(w.api.count(), 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn routing_and_token_errors(pool: PgPool) {
    let w = world(pool).await;
    let auth = format!("Bearer {}", w.token);
    let h = [("authorization", auth.as_str())];

    get(&w.proxy.url("/nowhere"), &h)
        .await
        .assert_error(404, "no_route");
    get(&w.proxy.url("/gh/apix/user"), &h)
        .await
        .assert_error(404, "no_route");
    get(&w.proxy.url("/gh/api/%2e%2e/secret"), &h)
        .await
        .assert_error(400, "bad_request");

    let other = Uuid::new_v4();
    let (_, other_token) = create_token(&*w.store, other, &[]).await;
    let oh = format!("Bearer {other_token}");
    let oh = [("authorization", oh.as_str())];
    let cases = [
        (None, 403, "link_missing"),
        (Some(TokenError::ReauthRequired), 403, "reauth_required"),
        (Some(TokenError::IdpUnavailable), 502, "idp_unavailable"),
        (Some(TokenError::StoreUnavailable), 503, "store_unavailable"),
    ];
    for (err, status, code) in cases {
        if let Some(err) = err {
            w.tokens.fail("github", other, err);
        }
        let a = get(&w.proxy.url("/gh/api/user"), &oh).await;
        a.assert_error(status, code);
        assert_eq!(a.json()["error"]["provider"], "github");
    }
    assert_eq!(w.api.count(), 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn store_unavailable_when_the_caller_cannot_be_verified(pool: PgPool) {
    let w = world(pool).await;
    // A second proxy whose store points at a closed port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let db = tokenproxy::config::DatabaseConfig {
        url: format!("postgres://postgres@127.0.0.1:{port}/none").into(),
        acquire_timeout: std::time::Duration::from_millis(500),
        ..Default::default()
    };
    let dead = Arc::new(PgStore::connect(&db, Keyring::plaintext()).unwrap());
    let config = harness::config(&routes_toml(
        &w.api.url(),
        &w.git.url(),
        &w.gitlab.url(),
        "5s",
    ));
    let proxy = Harness::start(config, dead, w.tokens.clone()).await;
    let a = get(
        &proxy.url("/gh/api/user"),
        &[("authorization", &format!("Bearer {}", w.token))],
    )
    .await;
    a.assert_error(503, "store_unavailable");

    // Its readiness probe says so too, while liveness stays up.
    let ready = get(&format!("http://{}/readyz", proxy.admin), &[]).await;
    assert_eq!(ready.status, 503);
    let live = get(&format!("http://{}/healthz", proxy.admin), &[]).await;
    assert_eq!(live.status, 200);
    assert_eq!(w.api.count(), 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn upstream_unavailable_and_timeout(pool: PgPool) {
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    fake.set("gitlab", user, GL_TOKEN);
    let slow = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let config = harness::config(&routes_toml(&slow.url(), &closed_url, &slow.url(), "300ms"));
    let proxy = Harness::start(config, store, fake).await;
    let auth = format!("Bearer {token}");
    let h = [("authorization", auth.as_str())];

    get(&proxy.url("/gh/git/x"), &h)
        .await
        .assert_error(502, "upstream_unavailable");
    // The upstream holds /slow until released: the proxy gives up first.
    let a = get(&proxy.url("/gh/api/slow"), &h).await;
    a.assert_error(504, "upstream_timeout");
    slow.release_slow();
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn ssrf_attempts_never_reach_another_host(pool: PgPool) {
    let w = world(pool).await;
    let canary = TestUpstream::canary().await;
    let c = canary.addr;
    let auth = format!("Bearer {}", w.token);
    let requests = [
        // Absolute-form targets naming the canary: the path routes, the authority is ignored.
        format!("GET http://{c}/gh/api/user HTTP/1.1\r\nHost: {c}\r\n"),
        format!("GET http://{c}/ HTTP/1.1\r\nHost: {c}\r\n"),
        format!("GET http://{c}/gh/api/../../x HTTP/1.1\r\nHost: {c}\r\n"),
        // Host tricks.
        format!("GET /gh/api/user HTTP/1.1\r\nHost: {c}\r\n"),
        format!("GET /gh/api/user HTTP/1.1\r\nHost: {c}\r\nX-Forwarded-Host: {c}\r\n"),
        format!("GET //{c}/x HTTP/1.1\r\nHost: {c}\r\n"),
        format!("GET /gh/api@{c}/x HTTP/1.1\r\nHost: x\r\n"),
        // Traversal and its encodings.
        "GET /gh/api/../../x HTTP/1.1\r\nHost: x\r\n".to_string(),
        "GET /gh/api/%2e%2e/%2E%2E/x HTTP/1.1\r\nHost: x\r\n".to_string(),
        "GET /gh/api/..%2fx HTTP/1.1\r\nHost: x\r\n".to_string(),
        "GET /gh/api/..%5Cx HTTP/1.1\r\nHost: x\r\n".to_string(),
        "GET /gh/api/..\\x HTTP/1.1\r\nHost: x\r\n".to_string(),
        format!("CONNECT {c} HTTP/1.1\r\nHost: {c}\r\n"),
    ];
    for head in &requests {
        let resp = raw(
            w.proxy.addr,
            &format!("{head}Authorization: {auth}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let status = raw_status(&resp);
        assert!(
            status == 200 || status == 400 || status == 404,
            "{head:?} -> {resp}"
        );
    }
    assert_eq!(canary.count(), 0, "the canary was reached");
    // The ones that were forwarded went to the route's upstream with its Host.
    for r in w.api.requests() {
        assert_eq!(r.headers["host"], w.api.addr.to_string());
        assert!(!r.target.contains(".."));
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn bad_request_error_is_tokenproxys_own(pool: PgPool) {
    let w = world(pool).await;
    let auth = format!("Bearer {}", w.token);
    let resp = raw(
        w.proxy.addr,
        &format!("GET /gh/api/%2e%2e/x HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(raw_status(&resp), 400);
    assert!(resp
        .to_ascii_lowercase()
        .contains("tokenproxy-error: bad_request"));
    assert!(resp.contains(r#""code":"bad_request""#));
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn revoked_token_stops_working_within_the_ttl(pool: PgPool) {
    let w = world(pool).await;
    let (id, token) = create_token(&*w.store, w.user, &[]).await;
    let h = format!("Bearer {token}");
    let url = w.proxy.url("/gh/api/user");
    assert_eq!(get(&url, &[("authorization", &h)]).await.status, 200);
    assert!(w.store.revoke_proxy_token(id).await.unwrap());
    // cache_ttl is 300ms in this config: after it, the revocation is seen.
    tokio::time::sleep(std::time::Duration::from_millis(450)).await;
    get(&url, &[("authorization", &h)])
        .await
        .assert_error(401, "unauthenticated");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn upstream_401_refreshes_once_and_retries_once(pool: PgPool) {
    let w = world(pool).await;
    let auth = format!("Bearer {}", w.token);
    let h = [("authorization", auth.as_str())];
    // The upstream accepts only the refreshed token.
    w.api.set_check(tokens(&[&format!("{GH_TOKEN}-r1")]));
    let a = get(&w.proxy.url("/gh/api/user"), &h).await;
    assert_eq!(a.status, 200);
    assert_eq!(w.tokens.refresh_count(), 1);
    let seen: Vec<_> = w.api.requests().into_iter().map(|r| r.token).collect();
    assert_eq!(
        seen,
        [Some(GH_TOKEN.to_string()), Some(format!("{GH_TOKEN}-r1"))]
    );

    // An upstream that always says 401: one refresh, one retry, then its 401.
    let a = get(&w.proxy.url("/gh/api/always401"), &h).await;
    assert_eq!(a.status, 401);
    assert!(
        a.error_code().is_none(),
        "the upstream's 401 passes through"
    );
    assert_eq!(a.headers["www-authenticate"], r#"Bearer realm="upstream""#);
    assert_eq!(w.tokens.refresh_count(), 2);
    assert_eq!(w.api.count(), 4);

    // A small POST body is replayed on the retry.
    w.api.set_check(tokens(&[&format!("{GH_TOKEN}-r1-r2-r3")]));
    let a = send(
        Method::POST,
        &w.proxy.url("/gh/api/post"),
        &h,
        vec![7u8; 1000],
    )
    .await;
    assert_eq!(a.status, 200);
    let last = w.api.requests().pop().unwrap();
    assert_eq!(last.body_len, 1000);
    assert_eq!(w.tokens.refresh_count(), 3);

    // A body over 64 KiB streams and is not retried: the 401 passes through, and
    // the rejected token is still replaced for the next request.
    let before = w.api.count();
    let a = send(
        Method::POST,
        &w.proxy.url("/gh/api/always401"),
        &h,
        vec![7u8; 100 * 1024],
    )
    .await;
    assert_eq!(a.status, 401);
    assert_eq!(w.api.count(), before + 1);
    assert_eq!(w.tokens.refresh_count(), 4);
    assert_eq!(w.api.requests().pop().unwrap().body_len, 100 * 1024);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn admin_endpoints(pool: PgPool) {
    let w = world(pool).await;
    let admin = |p: &str| format!("http://{}{p}", w.proxy.admin);
    assert_eq!(get(&admin("/healthz"), &[]).await.status, 200);
    assert_eq!(get(&admin("/readyz"), &[]).await.status, 200);
    let auth = format!("Bearer {}", w.token);
    assert_eq!(
        get(&w.proxy.url("/gh/api/user"), &[("authorization", &auth)])
            .await
            .status,
        200
    );
    let m = get(
        &admin("/metrics"),
        &[("accept", "application/openmetrics-text; version=1.0.0")],
    )
    .await;
    assert_eq!(m.status, 200);
    assert!(m.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains(
            r#"tokenproxy_requests_total{provider="github",route="/gh/api",status="200"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("tokenproxy_request_duration_seconds_count 1"));
    assert!(text.contains("tokenproxy_upstream_duration_seconds_count 1"));
    // The admin endpoints are not on the proxy listener.
    get(&w.proxy.url("/metrics"), &[("authorization", &auth)])
        .await
        .assert_error(404, "no_route");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn encoded_slashes_pass_and_encoded_traversal_is_refused(pool: PgPool) {
    let w = world(pool).await;
    let auth = format!("Bearer {}", w.token);
    let h = [("authorization", auth.as_str())];
    // GitLab's API puts `%2F` inside segments: forwarded byte for byte.
    let target = "/projects/group%2Fproject/repository/files/app%2Fmodels%2Fkey.rb/raw?ref=main";
    let a = get(&w.proxy.url(&format!("/gl{target}")), &h).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(w.gitlab.requests()[0].target, target);
    for bad in [
        "/gh/api/%252e%252e/%252e%252e/outside",
        "/gh/api/%252E%252E/x",
        "/gh/api/%c0%ae%c0%ae/x",
        "/gh/api/..;/x",
        "/gh/api/%5c..%5cx",
        "/gh/api/x%2500y",
        "/gh/api%2fx",
    ] {
        get(&w.proxy.url(bad), &h)
            .await
            .assert_error(400, "bad_request");
    }
    assert_eq!(w.api.count(), 0, "a refused path reached the upstream");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn trace_and_unforwardable_framing_are_refused(pool: PgPool) {
    let w = world(pool).await;
    let auth = format!("Bearer {}", w.token);
    let h = [("authorization", auth.as_str())];
    send(Method::TRACE, &w.proxy.url("/gh/api/user"), &h, "")
        .await
        .assert_error(405, "bad_request");
    let track = Method::from_bytes(b"TRACK").unwrap();
    send(track, &w.proxy.url("/gh/api/user"), &h, "")
        .await
        .assert_error(405, "bad_request");
    // A coding hyper would strip (the upstream would see plain chunked).
    let resp = raw(
        w.proxy.addr,
        &format!(
            "POST /gh/api/user HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
             Transfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(raw_status(&resp), 400, "{resp}");
    assert_eq!(w.api.count(), 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn two_different_caller_tokens_are_refused(pool: PgPool) {
    let w = world(pool).await;
    let (_, other) = create_token(&*w.store, Uuid::new_v4(), &[]).await;
    let a = format!("Bearer {}", w.token);
    let b = format!("Bearer {other}");
    get(
        &w.proxy.url("/gh/api/user"),
        &[("authorization", &a), ("proxy-authorization", &b)],
    )
    .await
    .assert_error(400, "bad_request");
    // The same token in both headers is one caller.
    let same = get(
        &w.proxy.url("/gh/api/user"),
        &[("authorization", &a), ("proxy-authorization", &a)],
    )
    .await;
    assert_eq!(same.status, 200);
    assert_eq!(w.api.count(), 1);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn client_forwarding_claims_are_stripped_when_forwarded_headers_is_off(pool: PgPool) {
    let w = world_with(pool, |t| {
        t.replace("forwarded_headers = true", "forwarded_headers = false")
    })
    .await;
    let auth = format!("Bearer {}", w.token);
    let a = get(
        &w.proxy.url("/gh/api/user"),
        &[
            ("authorization", &auth),
            ("x-forwarded-for", "10.9.9.9"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=10.9.9.9"),
            ("x-real-ip", "10.9.9.9"),
            ("via", "1.1 evil"),
        ],
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = &w.api.requests()[0].headers;
    for name in [
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "forwarded",
        "x-real-ip",
        "via",
    ] {
        assert!(seen.get(name).is_none(), "{name} reached the upstream");
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn cookies_go_only_where_a_route_opts_in_joined_into_one_field(pool: PgPool) {
    let w = world_with(pool, |t| {
        t.replace(
            "inject = { header = \"PRIVATE-TOKEN\" }",
            "inject = { header = \"PRIVATE-TOKEN\" }\n  cookies = true",
        )
    })
    .await;
    let auth = format!("Bearer {}", w.token);
    // HTTP/2 lets a client split its cookies over several fields.
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    for path in ["/gh/api/user", "/gl/user"] {
        let req = http::Request::builder()
            .uri(w.proxy.url(path))
            .header("authorization", &auth)
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(http_body_util::Full::default())
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    assert!(
        w.api.requests()[0].headers.get("cookie").is_none(),
        "the caller's cookie reached a route that did not opt in"
    );
    let gl: Vec<_> = w.gitlab.requests()[0]
        .headers
        .get_all("cookie")
        .iter()
        .cloned()
        .collect();
    assert_eq!(gl, ["a=1; b=2"]);
}

/// A request body of `chunks` chunks of 1 KiB, `every` apart, that then stalls
/// forever when `stall` is set.
fn paced_body(
    chunks: u8,
    every: std::time::Duration,
    stall: bool,
) -> http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, std::convert::Infallible> {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    let paced = futures_util::stream::unfold(0u8, move |n| async move {
        (n < chunks).then_some(())?;
        tokio::time::sleep(every).await;
        let chunk = bytes::Bytes::from(vec![b'x'; 1024]);
        Some((Ok(hyper::body::Frame::data(chunk)), n + 1))
    });
    let tail = futures_util::stream::pending().take(usize::from(stall));
    BodyExt::boxed_unsync(http_body_util::StreamBody::new(paced.chain(tail).boxed()))
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn uploads_may_outlast_upstream_timeout_but_stalls_may_not(pool: PgPool) {
    use std::time::Duration;
    let w = world_with(pool, |t| {
        t.replace("upstream_timeout = \"5s\"", "upstream_timeout = \"1s\"")
            .replace("[server]\n", "[server]\nbody_idle_timeout = \"1500ms\"\n")
    })
    .await;
    let auth = format!("Bearer {}", w.token);
    let client: hyper_util::client::legacy::Client<_, _> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let post = |path: &str, body| {
        let req = http::Request::post(w.proxy.url(path))
            .header("authorization", &auth)
            .body(body)
            .unwrap();
        client.request(req)
    };

    // 3 s of upload (chunked, so streamed) through a 1 s upstream_timeout.
    let started = tokio::time::Instant::now();
    let resp = post(
        "/gh/api/upload",
        paced_body(6, Duration::from_millis(500), false),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(
        w.api.requests()[0].body_len,
        6 * 1024,
        "the whole upload arrived"
    );

    // A body that stops moving is the client's fault, cut after body_idle_timeout.
    let resp = post("/gh/api/upload", paced_body(1, Duration::ZERO, true))
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["tokenproxy-error"], "bad_request");

    // The upstream still has 1 s from the end of the body to answer.
    let resp = post(
        "/gh/api/slow",
        paced_body(2, Duration::from_millis(300), false),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.headers()["tokenproxy-error"], "upstream_timeout");
    w.api.release_slow();

    // A malformed chunked body is the client's fault too.
    let resp = raw(
        w.proxy.addr,
        &format!(
            "POST /gh/api/upload HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(raw_status(&resp), 400, "{resp}");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn h2_preface_only_connections_are_closed_within_the_header_deadline(pool: PgPool) {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = world_with(pool, |t| {
        t.replace(
            "[server]\n",
            "[server]\nmax_connections = 100\nheader_read_timeout = \"1s\"\n",
        )
    })
    .await;
    // Every slot taken by a connection that sends the h2 preface, or one byte
    // of it, and nothing else.
    let mut idle = Vec::new();
    for i in 0..100 {
        let mut s = tokio::net::TcpStream::connect(w.proxy.addr).await.unwrap();
        let preface: &[u8] = if i % 2 == 0 {
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        } else {
            b"P"
        };
        s.write_all(preface).await.unwrap();
        idle.push(s);
    }
    let started = tokio::time::Instant::now();
    let auth = format!("Bearer {}", w.token);
    let normal = tokio::time::timeout(
        Duration::from_secs(10),
        get(&w.proxy.url("/gh/api/user"), &[("authorization", &auth)]),
    )
    .await
    .expect("a normal request is served once idle connections are closed");
    assert_eq!(normal.status, 200);
    for mut s in idle {
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink))
            .await
            .expect("the idle connection was closed")
            .ok();
    }
    // Closed by the 1 s deadline (plus scheduling), not by anything later.
    assert!(started.elapsed() < Duration::from_secs(5));
}
