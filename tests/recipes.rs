//! The README's "point this client at it" recipes (Transparent mode), each run
//! with the real client through forward mode: git, curl, `gh`, Python `requests`
//! and `httpx`, Node with undici's `EnvHttpProxyAgent`, and npm.
//!
//! A real `tokenproxy serve` (token caller mode: every client authenticates to
//! the proxy with `x:TOKEN@` in its proxy URL) intercepts the real host names —
//! `api.github.com`, `github.com`, `registry.npmjs.org` — and reaches local HTTPS
//! servers for them through each route's `connect_to`, trusting their test CA
//! (`upstream_ca`); nothing leaves 127.0.0.1. The clients trust only the
//! tokenproxy CA, made by `tokenproxy ca init`. Each upstream answers 200 only to
//! the credential of the user's link, so a client whose own (dummy) credential
//! got through, or that bypassed the proxy, fails.
//!
//! scripts/test installs the clients: Debian's `gh`, `nodejs`/`npm`, `requests`
//! and `httpx` in a venv under `target/recipes-venv`, `undici` under
//! `target/recipes-node`. A missing client fails its test, never skips it.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use support::forward::{ca_init, forward_section};

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use harness::{create_token, Spawned};
use secrecy::SecretString;
use sqlx::PgPool;
use support::upstream::{presented_token, tokens, CredentialForm, GitServer, TestCa, TestUpstream};
use support::util::git;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{LinkStore, TokenSet};
use uuid::Uuid;

/// The user's GitHub token in the link; clients never see it.
const GH_TOKEN: &str = "gho_recipe_link_token";
/// The user's npm registry token in the link.
const NPM_TOKEN: &str = "npm_recipe_link_token";
/// What clients present themselves where they insist on a credential (`gh`).
const DUMMY: &str = "ghp_dummy_not_a_real_token";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn link(token: &str) -> TokenSet {
    TokenSet {
        access_token: SecretString::from(token.to_string()),
        refresh_token: SecretString::from(String::new()),
        expiry: None,
        extra: None,
    }
}

/// A package document, as `registry.npmjs.org/<name>` answers it.
fn packument() -> String {
    serde_json::json!({
        "name": "left-pad",
        "dist-tags": {"latest": "1.3.0"},
        "versions": {"1.3.0": {
            "name": "left-pad",
            "version": "1.3.0",
            "description": "recipe test package",
            "dist": {"tarball": "https://registry.npmjs.org/left-pad/-/left-pad-1.3.0.tgz"}
        }},
        "time": {"1.3.0": "2018-04-09T00:00:00.000Z"}
    })
    .to_string()
}

/// A registry answering `/left-pad` to requests carrying the link's npm token.
async fn npm_registry(
    tls: tokio_rustls::TlsAcceptor,
) -> (
    std::net::SocketAddr,
    tokio::sync::watch::Sender<()>,
    Arc<parking_lot::Mutex<Vec<Option<String>>>>,
) {
    use http_body_util::{BodyExt, Full};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let stop = support::upstream::serve_with(listener, Some(tls), {
        let seen = seen.clone();
        move |req: http::Request<hyper::body::Incoming>| {
            let seen = seen.clone();
            async move {
                let token = presented_token(&CredentialForm::Bearer, req.headers());
                seen.lock().push(token.clone());
                let ok = token.as_deref() == Some(NPM_TOKEN);
                let (status, body) = match (ok, req.uri().path()) {
                    (false, _) => (401, r#"{"error":"unauthorized"}"#.to_string()),
                    (true, "/left-pad") => (200, packument()),
                    (true, _) => (404, r#"{"error":"not found"}"#.to_string()),
                };
                let mut resp = http::Response::new(
                    Full::new(bytes::Bytes::from(body))
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                );
                *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                resp.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                resp
            }
        }
    });
    (addr, stop, seen)
}

/// The proxy, its upstreams and a client environment.
struct World {
    dir: tempfile::TempDir,
    /// The tokenproxy CA certificate.
    ca: PathBuf,
    /// `http://x:TOKEN@127.0.0.1:PORT`, the recipes' proxy URL.
    proxy_url: String,
    proxy: Option<Spawned>,
    api: TestUpstream,
    git: GitServer,
    npm_seen: Arc<parking_lot::Mutex<Vec<Option<String>>>>,
    audit: PathBuf,
    token: String,
    _npm_stop: tokio::sync::watch::Sender<()>,
    _provider_ca: TestCa,
}

impl World {
    /// A client command with a clean environment: `PATH`, a private `HOME`, and
    /// nothing of the runner's proxy settings.
    fn client(&self, program: &str) -> Command {
        let home = self.dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let mut c = Command::new(program);
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &home)
            .current_dir(self.dir.path());
        c
    }

    /// Stops the proxy and returns its audit trail.
    fn audit_trail(&mut self) -> String {
        let mut proxy = self.proxy.take().unwrap();
        proxy.terminate();
        assert!(proxy.child.wait().unwrap().success());
        std::fs::read_to_string(&self.audit).unwrap()
    }
}

/// Runs `cmd` off the test's runtime (whose thread also serves the upstreams);
/// its stdout, or a panic with everything it printed.
async fn run(mut cmd: Command, what: &str) -> String {
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{what} could not start ({e}): scripts/test installs it"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn world(pool: PgPool) -> World {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_init(&dir.path().join("ca"));
    let provider_ca = TestCa::for_names(&["api.github.com", "github.com", "registry.npmjs.org"]);
    let api = TestUpstream::start_tls(
        CredentialForm::Bearer,
        tokens(&[GH_TOKEN]),
        provider_ca.acceptor(),
    )
    .await;
    let root = dir.path().join("git");
    std::fs::create_dir_all(&root).unwrap();
    git(&root, &["init", "--bare", "-q", "-b", "main", "repo.git"]);
    let seed = dir.path().join("seed");
    std::fs::create_dir_all(&seed).unwrap();
    git(&seed, &["init", "-q", "-b", "main"]);
    std::fs::write(seed.join("README"), "recipes\n").unwrap();
    git(&seed, &["add", "README"]);
    git(&seed, &["commit", "-q", "-m", "first"]);
    git(
        &seed,
        &[
            "push",
            "-q",
            &root.join("repo.git").to_string_lossy(),
            "main",
        ],
    );
    let git_server = GitServer::start_tls(
        root,
        "x-access-token",
        tokens(&[GH_TOKEN]),
        provider_ca.acceptor(),
    )
    .await;
    let (npm_addr, npm_stop, npm_seen) = npm_registry(provider_ca.acceptor()).await;

    let store = PgStore::from_pool(pool.clone(), Keyring::plaintext());
    let user = Uuid::new_v4();
    store
        .put_link("github", user, &link(GH_TOKEN))
        .await
        .unwrap();
    store.put_link("npm", user, &link(NPM_TOKEN)).await.unwrap();
    let (_, token) = create_token(&store, user, &[]).await;
    let audit = dir.path().join("audit.log");
    let upstream_ca = provider_ca.ca.display();
    let rest = format!(
        r#"[logging]
audit = "{audit}"

{forward}
[[providers]]
id = "github"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  hosts = ["api.github.com"]
  inject = "bearer"
  connect_to = "127.0.0.1:{api}"
  upstream_ca = "{upstream_ca}"

  [[providers.routes]]
  hosts = ["github.com"]
  inject = {{ basic_username = "x-access-token" }}
  connect_to = "127.0.0.1:{git}"
  upstream_ca = "{upstream_ca}"

[[providers]]
id = "npm"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  hosts = ["registry.npmjs.org"]
  inject = "bearer"
  connect_to = "127.0.0.1:{npm}"
  upstream_ca = "{upstream_ca}"
"#,
        audit = audit.display(),
        forward = forward_section(&dir.path().join("ca")),
        api = api.addr.port(),
        git = git_server.addr.port(),
        npm = npm_addr.port(),
    );
    let proxy = Spawned::start(&harness::db_url(&pool), &rest).await;
    World {
        proxy_url: format!("http://x:{token}@{}", proxy.addr),
        proxy: Some(proxy),
        dir,
        ca,
        api,
        git: git_server,
        npm_seen,
        audit,
        token,
        _npm_stop: npm_stop,
        _provider_ca: provider_ca,
    }
}

/// The upstream saw exactly the link's token on every request.
fn assert_link_token_only(api: &TestUpstream, at_least: usize) {
    let seen: Vec<_> = api.requests().into_iter().map(|r| r.token).collect();
    assert!(seen.len() >= at_least, "the upstream was asked: {seen:?}");
    assert!(
        seen.iter().all(|t| t.as_deref() == Some(GH_TOKEN)),
        "only the link's token reached the upstream: {seen:?}"
    );
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn git_clones_with_http_proxy_and_git_ssl_cainfo(pool: PgPool) {
    let mut w = world(pool).await;
    // The README's recipe: http.proxy in the global config, and the CA either as
    // GIT_SSL_CAINFO or as http.sslCAInfo (Debian's git uses libcurl-gnutls,
    // which ignores SSL_CERT_FILE).
    let mut config = w.client("git");
    config.args(["config", "--global", "http.proxy", &w.proxy_url]);
    run(config, "git config").await;
    let mut clone = w.client("git");
    clone
        .args(["clone", "-q", "https://github.com/repo.git", "by-env"])
        .env("GIT_SSL_CAINFO", &w.ca)
        .env("GIT_TERMINAL_PROMPT", "0");
    run(clone, "git clone (GIT_SSL_CAINFO)").await;
    assert_eq!(
        std::fs::read_to_string(w.dir.path().join("by-env/README")).unwrap(),
        "recipes\n"
    );
    let mut config = w.client("git");
    config
        .args(["config", "--global", "http.sslCAInfo"])
        .arg(&w.ca);
    run(config, "git config").await;
    let mut clone = w.client("git");
    clone
        .args(["clone", "-q", "https://github.com/repo.git", "by-config"])
        .env("GIT_TERMINAL_PROMPT", "0");
    run(clone, "git clone (http.sslCAInfo)").await;
    assert!(w.dir.path().join("by-config/README").exists());
    let asked = w.git.requests();
    assert!(
        asked
            .iter()
            .any(|(t, s)| t.contains("git-upload-pack") && *s == 200),
        "{asked:?}"
    );
    // Both clones went to one intercepted host: recorded once, with no secret.
    let trail = w.audit_trail();
    let intercepted: Vec<&str> = trail
        .lines()
        .filter(|l| l.contains("\"forward_host_intercepted\""))
        .collect();
    assert_eq!(intercepted.len(), 1, "{trail}");
    assert!(
        intercepted[0].contains("\"host\":\"github.com\""),
        "{trail}"
    );
    for secret in [GH_TOKEN, w.token.as_str()] {
        assert!(
            !trail.contains(secret),
            "a secret in the audit trail: {trail}"
        );
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn curl_with_proxy_and_cacert(pool: PgPool) {
    let w = world(pool).await;
    let mut curl = w.client("curl");
    curl.args(["-fsS", "--proxy", &w.proxy_url, "--cacert"])
        .arg(&w.ca)
        .arg("https://api.github.com/user");
    let body = run(curl, "curl").await;
    assert!(body.contains("\"target\":\"/user\""), "{body}");
    assert_link_token_only(&w.api, 1);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn gh_api_user_with_a_dummy_gh_token(pool: PgPool) {
    let w = world(pool).await;
    let mut gh = w.client("gh");
    gh.args(["api", "user"])
        .env("HTTPS_PROXY", &w.proxy_url)
        .env("SSL_CERT_FILE", &w.ca)
        .env("GH_TOKEN", DUMMY)
        .env("GH_CONFIG_DIR", w.dir.path().join("gh"))
        .env("GH_NO_UPDATE_NOTIFIER", "1")
        .env("GH_PROMPT_DISABLED", "1");
    let body = run(gh, "gh").await;
    assert!(body.contains("\"target\":\"/user\""), "{body}");
    // gh sent its dummy token; tokenproxy replaced it with the link's.
    assert_link_token_only(&w.api, 1);
}

/// The Python in the venv scripts/test builds.
fn python() -> PathBuf {
    repo().join("target/recipes-venv/bin/python")
}

const PY_REQUESTS: &str = r#"
import requests
r = requests.get("https://api.github.com/user", timeout=30)
r.raise_for_status()
print(r.text)
"#;

const PY_HTTPX: &str = r#"
import httpx
r = httpx.get("https://api.github.com/user", timeout=30)
r.raise_for_status()
print(r.text)
"#;

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn python_requests_and_httpx_with_https_proxy_and_a_ca_bundle(pool: PgPool) {
    let w = world(pool).await;
    let py = python().to_string_lossy().into_owned();
    let mut requests = w.client(&py);
    requests
        .args(["-c", PY_REQUESTS])
        .env("HTTPS_PROXY", &w.proxy_url)
        .env("REQUESTS_CA_BUNDLE", &w.ca);
    let body = run(requests, "python requests").await;
    assert!(body.contains("\"target\":\"/user\""), "{body}");
    let mut httpx = w.client(&py);
    httpx
        .args(["-c", PY_HTTPX])
        .env("HTTPS_PROXY", &w.proxy_url)
        .env("SSL_CERT_FILE", &w.ca);
    let body = run(httpx, "python httpx").await;
    assert!(body.contains("\"target\":\"/user\""), "{body}");
    assert_link_token_only(&w.api, 2);
}

const NODE_UNDICI: &str = r#"
const { EnvHttpProxyAgent, setGlobalDispatcher, fetch } = require("undici");
setGlobalDispatcher(new EnvHttpProxyAgent());
fetch("https://api.github.com/user").then(async (r) => {
  const body = await r.text();
  if (!r.ok) { console.error(r.status, body); process.exit(1); }
  console.log(body);
}).catch((e) => { console.error(e); process.exit(1); });
"#;

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn node_with_undici_env_http_proxy_agent(pool: PgPool) {
    let w = world(pool).await;
    let script = w.dir.path().join("app.js");
    std::fs::write(&script, NODE_UNDICI).unwrap();
    let mut node = w.client("node");
    node.arg(&script)
        .env("NODE_PATH", repo().join("target/recipes-node/node_modules"))
        .env("HTTPS_PROXY", &w.proxy_url)
        .env("NODE_EXTRA_CA_CERTS", &w.ca);
    let body = run(node, "node (undici)").await;
    assert!(body.contains("\"target\":\"/user\""), "{body}");
    assert_link_token_only(&w.api, 1);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn npm_view_through_the_proxy(pool: PgPool) {
    let w = world(pool).await;
    let mut npm = w.client("npm");
    npm.args(["view", "left-pad", "version"])
        .env("HTTPS_PROXY", &w.proxy_url)
        .env("npm_config_cafile", &w.ca)
        .env("npm_config_cache", w.dir.path().join("npm-cache"))
        .env("npm_config_update_notifier", "false")
        .env("npm_config_audit", "false")
        .env("npm_config_fund", "false");
    let out = run(npm, "npm view").await;
    assert_eq!(out.trim(), "1.3.0");
    let seen = w.npm_seen.lock().clone();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|t| t.as_deref() == Some(NPM_TOKEN)),
        "only the link's npm token reached the registry: {seen:?}"
    );
}
