//! Forward (`HTTPS_PROXY`) mode end to end, with real clients: curl over
//! HTTP/1.1 and h2 through an intercepted CONNECT, git clone and push, 407 on a
//! missing or bad proxy credential (with the connection kept for the retry),
//! unrouted hosts denied or relayed untouched, an untrusted upstream refused
//! before it sees anything, minted leaves reused across connections, and the
//! tunnel's pins: a ClientHello for another host gets no leaf, an inner Host
//! naming another host is overwritten, a revoked token stops an open tunnel.
//!
//! The "provider" is a local HTTPS server whose certificate a test CA issued for
//! a made-up host (`api.github.test`); the route trusts that CA (`upstream_ca`)
//! and reaches it through `connect_to`, so nothing leaves 127.0.0.1. The
//! tokenproxy CA is made by the real `tokenproxy ca init`.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use support::forward::{
    ca_init, connect, forward_section, get_in_tunnel, read_response, tls_trusting_anything,
};

use support::util::{basic, git};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use harness::{create_token, FakeTokens, Harness};
use sqlx::PgPool;
use support::upstream::{tokens, CredentialForm, GitServer, TestCa, TestUpstream};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::LinkStore;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use uuid::Uuid;

const GH_TOKEN: &str = "gho_forward_token";
const API_HOST: &str = "api.github.test";

/// A provider API, an untrusted look-alike, and the proxy routing to them.
struct World {
    _dir: tempfile::TempDir,
    /// The tokenproxy CA certificate clients trust.
    ca: PathBuf,
    api: TestUpstream,
    untrusted: TestUpstream,
    /// A plain-HTTP upstream whose route allows plain http.
    plain: TestUpstream,
    proxy: Harness,
    token: String,
    /// The id of `token`, to revoke it.
    token_id: Uuid,
    store: Arc<PgStore>,
    _provider_ca: TestCa,
}

impl World {
    fn proxy_url(&self) -> String {
        format!("http://x:{}@{}", self.token, self.proxy.addr)
    }
}

async fn world(pool: PgPool, forward_extra: &str, callers: &str) -> World {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_init(&dir.path().join("ca"));
    let provider_ca = TestCa::for_names(&[API_HOST, "untrusted.github.test"]);
    let api = TestUpstream::start_tls(
        CredentialForm::Bearer,
        tokens(&[GH_TOKEN]),
        provider_ca.acceptor(),
    )
    .await;
    let untrusted = TestUpstream::start_tls(
        CredentialForm::Anything,
        Arc::new(|_| true),
        provider_ca.acceptor(),
    )
    .await;
    let plain = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let (token_id, token) = create_token(&*store, user, &["github"]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let static_user = Uuid::nil();
    fake.set("github", static_user, GH_TOKEN);
    let config = harness::config(&format!(
        r#"
{callers}

{forward}{forward_extra}

[[providers]]
id = "github"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  prefix = "/gh/api"
  upstream = "https://{API_HOST}"
  hosts = ["{API_HOST}"]
  connect_to = "127.0.0.1:{api}"
  upstream_ca = "{provider_ca}"

  [[providers.routes]]
  hosts = ["untrusted.github.test"]
  connect_to = "127.0.0.1:{untrusted}"

  [[providers.routes]]
  hosts = ["plain.github.test"]
  connect_to = "127.0.0.1:{plain}"
  allow_plain_http = true
"#,
        forward = forward_section(&dir.path().join("ca")),
        api = api.addr.port(),
        untrusted = untrusted.addr.port(),
        plain = plain.addr.port(),
        provider_ca = provider_ca.ca.display(),
    ));
    let proxy = Harness::start(config, store.clone(), fake).await;
    World {
        _dir: dir,
        ca,
        api,
        untrusted,
        plain,
        proxy,
        token,
        token_id,
        store,
        _provider_ca: provider_ca,
    }
}

/// What curl reported (stderr is read through `Debug` in assertion messages).
#[derive(Debug)]
#[allow(dead_code)]
struct Curl {
    ok: bool,
    status: u16,
    http_version: String,
    body: String,
    stderr: String,
}

/// Runs curl through `proxy`, trusting `cacert`, with extra `args`.
async fn curl(proxy: &str, cacert: &Path, url: &str, args: &[&str]) -> Curl {
    let mut cmd = Command::new("curl");
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(["-sS", "--max-time", "20", "--proxy", proxy, "--cacert"])
        .arg(cacert)
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(args)
        .arg(url);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let (status, version) = tail.split_once(' ').unwrap_or((tail, ""));
    Curl {
        ok: out.status.success(),
        status: status.parse().unwrap_or(0),
        http_version: version.to_string(),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn curl_gets_the_credential_over_http1_and_h2_and_leaves_are_reused(pool: PgPool) {
    let w = world(pool, "", "").await;
    let url = format!("https://{API_HOST}/repos/o/r/issues?state=open&q=%2F");
    let one = curl(&w.proxy_url(), &w.ca, &url, &["--http1.1"]).await;
    assert!(one.ok, "{one:?}");
    assert_eq!(
        (one.status, one.http_version.as_str()),
        (200, "1.1"),
        "{one:?}"
    );
    let two = curl(&w.proxy_url(), &w.ca, &url, &["--http2"]).await;
    assert!(two.ok, "{two:?}");
    assert_eq!(
        (two.status, two.http_version.as_str()),
        (200, "2"),
        "{two:?}"
    );

    let seen = w.api.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(
            r.token.as_deref(),
            Some(GH_TOKEN),
            "the credential was injected"
        );
        assert_eq!(
            r.target, "/repos/o/r/issues?state=open&q=%2F",
            "path unchanged"
        );
        assert_eq!(r.headers["host"], API_HOST);
        assert!(!r.headers.contains_key("proxy-authorization"));
        assert!(!r.headers.contains_key("tokenproxy-error"));
    }
    assert!(one.body.contains("/repos/o/r/issues"), "{}", one.body);
    // Two tunnels to one host: one minted leaf.
    assert_eq!(w.proxy.metrics.leaves_minted.get(), 1);

    // The same route still serves reverse mode by its prefix.
    let rev = harness::get(
        &w.proxy.url("/gh/api/user"),
        &[("authorization", &format!("Bearer {}", w.token))],
    )
    .await;
    assert_eq!(rev.status, 200);
    assert_eq!(w.api.requests()[2].headers["host"], API_HOST);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn untrusted_upstream_gets_nothing(pool: PgPool) {
    let w = world(pool, "", "").await;
    let r = curl(
        &w.proxy_url(),
        &w.ca,
        "https://untrusted.github.test/user",
        &["-D", "-"],
    )
    .await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        r.body.contains("tokenproxy-error: upstream_unavailable"),
        "{r:?}"
    );
    assert_eq!(
        w.untrusted.count(),
        0,
        "no request, so no Authorization, arrived"
    );
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn missing_or_bad_proxy_credential_is_407_and_the_connection_stays(pool: PgPool) {
    let w = world(pool, "", "").await;
    let target = format!("{API_HOST}:443");
    let mut s = TcpStream::connect(w.proxy.addr).await.unwrap();
    let (status, head) = connect(&mut s, &target, None).await;
    assert_eq!(status, 407, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("proxy-authenticate: basic realm=\"tokenproxy\""),
        "{head}"
    );
    assert!(head.contains("tokenproxy-error: unauthenticated"), "{head}");
    let (status, head) = connect(&mut s, &target, Some(&basic("x", "tpx_not_a_real_token"))).await;
    assert_eq!(status, 407, "{head}");
    // The client's own credential in Authorization does not count in forward mode.
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {}\r\n\r\n",
        w.token
    );
    s.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s).await.0, 407);
    // A token limited to another provider may not open the tunnel.
    let (_, gitlab_only) = create_token(&*w.store, Uuid::new_v4(), &["gitlab"]).await;
    let (status, head) = connect(&mut s, &target, Some(&basic("x", &gitlab_only))).await;
    assert_eq!(status, 403, "{head}");
    assert!(head.contains("tokenproxy-error: forbidden"), "{head}");
    // Same connection, right credential: the tunnel opens.
    let (status, head) = connect(&mut s, &target, Some(&basic("x", &w.token))).await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(w.api.count(), 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn unrouted_hosts_are_denied_by_default(pool: PgPool) {
    let w = world(pool, "", "").await;
    let other = TestUpstream::canary().await;
    let mut s = TcpStream::connect(w.proxy.addr).await.unwrap();
    let auth = basic("x", &w.token);
    let (status, head) = connect(&mut s, &other.addr.to_string(), Some(&auth)).await;
    assert_eq!(status, 403, "{head}");
    assert!(
        head.contains("tokenproxy-error: host_not_allowed"),
        "{head}"
    );
    // Absolute-form to an unrouted host: same answer.
    let req = format!(
        "GET http://{}/x HTTP/1.1\r\nHost: {}\r\nProxy-Authorization: {auth}\r\n\r\n",
        other.addr, other.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, head) = read_response(&mut s).await;
    assert_eq!(status, 403, "{head}");
    assert_eq!(other.count(), 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn unrouted_hosts_tunnel_blindly_when_configured(pool: PgPool) {
    let w = world(pool, r#"unrouted = "tunnel""#, "").await;
    let own_ca = TestCa::new();
    let other = TestUpstream::start_tls(
        CredentialForm::Anything,
        Arc::new(|_| true),
        own_ca.acceptor(),
    )
    .await;
    let url = format!("https://127.0.0.1:{}/tunneled", other.addr.port());
    // The client verifies the upstream's own certificate: nothing was intercepted.
    let r = curl(&w.proxy_url(), &own_ca.ca, &url, &[]).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.status, 200);
    // Trusting only tokenproxy's CA fails: tokenproxy did not terminate TLS.
    let r = curl(&w.proxy_url(), &w.ca, &url, &[]).await;
    assert!(!r.ok, "{r:?}");
    let seen = other.requests();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].headers.contains_key("authorization"),
        "nothing injected"
    );
    assert_eq!(w.proxy.metrics.leaves_minted.get(), 0);
    // A tunnel still needs a caller.
    let mut s = TcpStream::connect(w.proxy.addr).await.unwrap();
    assert_eq!(connect(&mut s, &other.addr.to_string(), None).await.0, 407);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn plain_http_is_refused_unless_the_route_allows_it(pool: PgPool) {
    let w = world(pool, "", "").await;
    let mut s = TcpStream::connect(w.proxy.addr).await.unwrap();
    let req = format!(
        "GET http://{API_HOST}/user HTTP/1.1\r\nHost: {API_HOST}\r\nProxy-Authorization: {}\r\n\r\n",
        basic("x", &w.token)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, head) = read_response(&mut s).await;
    assert_eq!(status, 400, "{head}");
    assert!(head.contains("tokenproxy-error: bad_request"), "{head}");
    assert_eq!(w.api.count(), 0);

    // Absolute-form with an https target: the upstream hop is TLS, so it is served.
    let req = format!(
        "GET https://{API_HOST}/user?a=1 HTTP/1.1\r\nHost: {API_HOST}\r\nProxy-Authorization: {}\r\n\r\n",
        basic("x", &w.token)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, head) = read_response(&mut s).await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(w.api.requests()[0].target, "/user?a=1");

    // A route that allows plain http gets it, credential and all; userinfo in the
    // target goes nowhere.
    let req = format!(
        "POST http://u:p@plain.github.test/graphql HTTP/1.1\r\nHost: plain.github.test\r\nProxy-Authorization: Bearer {}\r\nContent-Length: 2\r\n\r\n{{}}",
        w.token
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, head) = read_response(&mut s).await;
    assert_eq!(status, 200, "{head}");
    let seen = w.plain.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].token.as_deref(), Some(GH_TOKEN));
    assert_eq!(seen[0].target, "/graphql");
    assert_eq!(seen[0].headers["host"], "plain.github.test");
    assert_eq!(seen[0].body_len, 2);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn static_callers_need_no_proxy_credential(pool: PgPool) {
    let callers = format!(
        "[callers]\nmode = \"static\"\nstatic_user = \"{}\"",
        Uuid::nil()
    );
    let w = world(pool, "", &callers).await;
    let proxy = format!("http://{}", w.proxy.addr);
    let r = curl(&proxy, &w.ca, &format!("https://{API_HOST}/user"), &[]).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.status, 200);
    assert_eq!(w.api.requests()[0].token.as_deref(), Some(GH_TOKEN));
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn git_clone_and_push_through_the_forward_proxy(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_init(&dir.path().join("ca"));
    let root = dir.path().join("srv");
    std::fs::create_dir_all(&root).unwrap();
    git(&root, &["init", "--bare", "-q", "-b", "main", "repo.git"]);
    let git_ca = TestCa::for_names(&["github.test"]);
    let server = GitServer::start_tls(
        root,
        "x-access-token",
        tokens(&[GH_TOKEN]),
        git_ca.acceptor(),
    )
    .await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &["github"]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let config = harness::config(&format!(
        r#"
{forward}
[[providers]]
id = "github"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  hosts = ["github.test"]
  connect_to = "{addr}"
  upstream_ca = "{git_ca}"
  inject = {{ basic_username = "x-access-token" }}
"#,
        forward = forward_section(&dir.path().join("ca")),
        addr = server.addr,
        git_ca = git_ca.ca.display(),
    ));
    let proxy = Harness::start(config, store, fake).await;
    let proxy_url = format!("http://x:{token}@{}", proxy.addr);
    let with_proxy = |args: &[&str]| -> Vec<String> {
        let mut v = vec![
            "-c".to_string(),
            format!("http.proxy={proxy_url}"),
            "-c".to_string(),
            format!("http.sslCAInfo={}", ca.display()),
        ];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
    let remote = "https://github.test/repo.git";
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let push = with_proxy(&["push", "-q", remote, "main"]);
    let clone_dir = dir.path().join("clone");
    let clone = with_proxy(&["clone", "-q", remote, clone_dir.to_str().unwrap()]);
    let parent = dir.path().to_path_buf();
    let work2 = work.clone();
    tokio::task::spawn_blocking(move || {
        git(&work2, &["init", "-q", "-b", "main"]);
        std::fs::write(work2.join("README"), "hello through forward mode\n").unwrap();
        git(&work2, &["add", "README"]);
        git(&work2, &["commit", "-q", "-m", "first"]);
        let push: Vec<&str> = push.iter().map(String::as_str).collect();
        git(&work2, &push);
        let clone: Vec<&str> = clone.iter().map(String::as_str).collect();
        git(&parent, &clone);
    })
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(clone_dir.join("README")).unwrap(),
        "hello through forward mode\n"
    );
    let seen = server.requests();
    assert!(
        seen.iter().any(|(t, _)| t.contains("git-receive-pack")),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|(t, _)| t.contains("git-upload-pack")),
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|(_, s)| *s == 200),
        "every request carried the credential: {seen:?}"
    );
    assert_eq!(proxy.metrics.leaves_minted.get(), 1);
    // git's first CONNECT carries no credential; the 407 made it retry with one.
    let metrics = proxy.metrics.encode();
    assert!(metrics.contains(r#"status="407""#), "{metrics}");
}

#[test]
fn ca_init_writes_a_private_key_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ca");
    ca_init(&out);
    let mode = std::fs::metadata(out.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .args(["ca", "init", "--out"])
        .arg(&out)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already exists"), "{stderr}");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn shutdown_drains_a_request_inside_a_tunnel(pool: PgPool) {
    let mut w = world(pool, "", "").await;
    let (proxy_url, ca) = (w.proxy_url(), w.ca.clone());
    let client = tokio::spawn(async move {
        curl(&proxy_url, &ca, &format!("https://{API_HOST}/slow"), &[]).await
    });
    w.api.slow_arrived(1).await;
    let server = w.proxy.begin_shutdown();
    // No timed window: a server that stopped without draining the tunnel cuts
    // the request held at the upstream, so the client's 200 below is what
    // proves the drain; this check only catches a server already gone.
    tokio::task::yield_now().await;
    assert!(
        !server.is_finished(),
        "the server stopped while a tunnel request was in flight"
    );
    w.api.release_slow();
    let r = client.await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    server.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn wildcard_hosts_get_a_leaf_each_and_their_own_host_upstream(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_init(&dir.path().join("ca"));
    let provider_ca = TestCa::for_names(&["a.wild.test", "b.c.wild.test"]);
    let up = TestUpstream::start_tls(
        CredentialForm::Bearer,
        tokens(&[GH_TOKEN]),
        provider_ca.acceptor(),
    )
    .await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("wild", user, GH_TOKEN);
    let config = harness::config(&format!(
        r#"
{forward}
[[providers]]
id = "wild"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  hosts = ["*.wild.test"]
  connect_to = "{addr}"
  upstream_ca = "{provider_ca}"
"#,
        forward = forward_section(&dir.path().join("ca")),
        addr = up.addr,
        provider_ca = provider_ca.ca.display(),
    ));
    let proxy = Harness::start(config, store, fake).await;
    let proxy_url = format!("http://x:{token}@{}", proxy.addr);
    for host in ["a.wild.test", "b.c.wild.test", "a.wild.test"] {
        let r = curl(&proxy_url, &ca, &format!("https://{host}/x"), &[]).await;
        assert_eq!(r.status, 200, "{host}: {r:?}");
    }
    let hosts: Vec<_> = up
        .requests()
        .iter()
        .map(|r| r.headers["host"].clone())
        .collect();
    assert_eq!(hosts, ["a.wild.test", "b.c.wild.test", "a.wild.test"]);
    assert_eq!(
        proxy.metrics.leaves_minted.get(),
        2,
        "one leaf per host, reused"
    );
    // The bare domain is not covered by the wildcard.
    let r = curl(&proxy_url, &ca, "https://wild.test/x", &[]).await;
    assert!(!r.ok, "{r:?}");
    assert_eq!(up.count(), 3);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn odd_connect_targets_get_tokenproxys_own_answers(pool: PgPool) {
    let w = world(pool, "", "").await;
    let auth = basic("x", &w.token);
    for (target, want) in [
        ("api.github.test", 400),
        ("api.github.test:0", 400),
        ("[]:0", 400),
        ("[]:443", 400),
        (":443", 400),
        ("[not-v6]:443", 400),
        ("user@api.github.test:443", 400),
        ("[::1]:443", 403),
        ("127.0.0.1:1", 403),
        ("*.github.test:443", 403),
        ("API.GITHUB.TEST.:443", 200),
    ] {
        let mut s = TcpStream::connect(w.proxy.addr).await.unwrap();
        let (status, head) = connect(&mut s, target, Some(&auth)).await;
        assert_eq!(status, want, "CONNECT {target}: {head}");
        if want != 200 {
            assert!(head.contains("tokenproxy-error: "), "{target}: {head}");
        }
    }
    assert_eq!(w.api.count(), 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn connect_over_h2c_is_refused_not_tunnelled(pool: PgPool) {
    let w = world(pool, "", "").await;
    let tcp = TcpStream::connect(w.proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("{API_HOST}:443"))
        .header("proxy-authorization", basic("x", &w.token))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["tokenproxy-error"], "bad_request");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn new_leaves_for_wildcard_hosts_are_rate_limited_per_caller(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_init(&dir.path().join("ca"));
    let provider_ca = TestCa::for_names(&["a.wild.test", "b.wild.test", "c.wild.test"]);
    let up = TestUpstream::start_tls(
        CredentialForm::Bearer,
        tokens(&[GH_TOKEN]),
        provider_ca.acceptor(),
    )
    .await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let (user, other_user) = (Uuid::new_v4(), Uuid::new_v4());
    let (_, token) = create_token(&*store, user, &[]).await;
    let (_, other) = create_token(&*store, other_user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("wild", user, GH_TOKEN);
    fake.set("wild", other_user, GH_TOKEN);
    let config = harness::config(&format!(
        r#"
{forward}leaf_mint_limit = 2
leaf_mint_window = "1h"

[[providers]]
id = "wild"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  hosts = ["*.wild.test"]
  connect_to = "{addr}"
  upstream_ca = "{provider_ca}"
"#,
        forward = forward_section(&dir.path().join("ca")),
        addr = up.addr,
        provider_ca = provider_ca.ca.display(),
    ));
    let proxy = Harness::start(config, store, fake).await;
    let proxy_url = format!("http://x:{token}@{}", proxy.addr);
    for host in ["a.wild.test", "b.wild.test"] {
        let r = curl(&proxy_url, &ca, &format!("https://{host}/x"), &[]).await;
        assert_eq!(r.status, 200, "{host}: {r:?}");
    }
    // A third new host within the window: 429 before any leaf is minted.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let (status, head) = connect(&mut s, "c.wild.test:443", Some(&basic("x", &token))).await;
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("tokenproxy-error: rate_limited"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: "),
        "{head}"
    );
    // Hosts whose leaf is cached cost nothing and stay open to the caller.
    let r = curl(&proxy_url, &ca, "https://a.wild.test/x", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    // The limit is the caller's: another caller gets its own.
    let other_url = format!("http://x:{other}@{}", proxy.addr);
    let r = curl(&other_url, &ca, "https://c.wild.test/x", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(proxy.metrics.leaves_minted.get(), 3);
    assert_eq!(up.count(), 4);
}

/// Opens a CONNECT tunnel to `API_HOST:443` and starts TLS inside it naming
/// `sni`, trusting any certificate (see [`AnyCert`]).
async fn tls_in_tunnel(
    w: &World,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut s = TcpStream::connect(w.proxy.addr).await.unwrap();
    let (status, head) = connect(
        &mut s,
        &format!("{API_HOST}:443"),
        Some(&basic("x", &w.token)),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tls_trusting_anything(s, sni),
    )
    .await
    .expect("the proxy answered the ClientHello (bounded wait)")
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_client_hello_naming_another_host_than_the_connect_is_refused(pool: PgPool) {
    let w = world(pool, "", "").await;
    // The control: the CONNECT's own name gets a leaf and a credentialed request.
    let mut ok = tls_in_tunnel(&w, API_HOST)
        .await
        .expect("same SNI handshakes");
    assert_eq!(get_in_tunnel(&mut ok, "/user", API_HOST).await.0, 200);
    // Another name in SNI: no leaf, no handshake (even for a client that would
    // accept any certificate), and nothing reaches either upstream.
    let refused = tls_in_tunnel(&w, "untrusted.github.test").await;
    assert!(refused.is_err(), "a ClientHello for another host handshook");
    assert_eq!(w.api.count(), 1);
    assert_eq!(w.untrusted.count(), 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn an_inner_request_naming_another_host_is_pinned_to_the_connect_host(pool: PgPool) {
    let w = world(pool, "", "").await;
    let mut tls = tls_in_tunnel(&w, API_HOST).await.unwrap();
    // The tunnel was opened (and authorized) for API_HOST: a Host header naming
    // another routed host must not reach that host with its credential.
    let (status, head) = get_in_tunnel(&mut tls, "/user", "untrusted.github.test").await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(w.untrusted.count(), 0, "the Host header chose the upstream");
    // Pinned: the upstream is the CONNECT's, and so is the Host it is told.
    let seen = w.api.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["host"], API_HOST);
    assert_eq!(seen[0].token.as_deref(), Some(GH_TOKEN));
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_revoked_proxy_token_stops_an_open_tunnel(pool: PgPool) {
    let w = world(pool, "", "[callers]\ncache_ttl = \"500ms\"").await;
    let mut tls = tls_in_tunnel(&w, API_HOST).await.unwrap();
    assert_eq!(get_in_tunnel(&mut tls, "/user", API_HOST).await.0, 200);
    assert!(w.store.revoke_proxy_token(w.token_id).await.unwrap());
    // The same tunnel, after the revocation: each request identifies the caller
    // again, so once the cache entry (500ms) is gone the requests fail. Bounded
    // by a generous deadline, not asserted to the millisecond (a loaded runner).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let refused = loop {
        let (status, head) = get_in_tunnel(&mut tls, "/user", API_HOST).await;
        if status != 200 {
            break (status, head);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a revoked token still works in its tunnel"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(refused.0, 407, "{}", refused.1);
    assert!(
        refused.1.contains("tokenproxy-error: unauthenticated"),
        "{}",
        refused.1
    );
    let served = w.api.count();
    // And it stays refused.
    assert_eq!(get_in_tunnel(&mut tls, "/user", API_HOST).await.0, 407);
    assert_eq!(w.api.count(), served);
}
