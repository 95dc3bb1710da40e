//! Operations: what collectors, Prometheus and Grafana see. Text logs carry no
//! colour codes when stderr is not a terminal; `/metrics` after a scenario passes
//! `promtool check metrics`; the alerting rules in `deploy/prometheus/` pass their
//! `promtool test rules` unit tests; every metric the rules and the dashboard use
//! exists in a live `/metrics`; a real Prometheus scraping a real tokenproxy
//! counts exactly the requests sent; and links are counted by state in the
//! background, not per scrape. The audit trail's tests are in `ops_audit.rs`.
//!
//! The tests that need `promtool` or `prometheus` fail when the binary is missing
//! (scripts/test installs Debian's `prometheus` package): a skipped check would
//! let a broken rule through unnoticed.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn text_logs_have_no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenproxy.toml");
    // No routes (a warning right after logging starts) and a database that
    // refuses connections (so `serve` exits on its own).
    std::fs::write(
        &config,
        // Port 0: nothing is picked and released beforehand for another process to take.
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n[database]\nurl = \"postgres://postgres@127.0.0.1:9/none\"\n\n[logging]\nformat = \"text\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .env_clear()
        .env("RUST_LOG", "info")
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WARN") && stderr.contains("no [[providers]] with routes"),
        "the warning was logged: {stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "no ANSI escape sequences in a piped log: {stderr:?}"
    );
}

use std::sync::Arc;
use std::time::Duration;

use harness::{create_token, get, Spawned};
use sqlx::PgPool;
use support::idp::{Idp, IdpOptions};
use support::upstream::{CredentialForm, TestUpstream};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::LinkStore;
use uuid::Uuid;

/// A real `tokenproxy serve` after a scenario that touched every outcome the
/// rules and the dashboard look at.
struct Scenario {
    proxy: Spawned,
    /// Requests the test sent to the proxy listener.
    sent: u64,
    _idp: Arc<Idp>,
    _api: TestUpstream,
}

async fn scenario(pool: PgPool) -> Scenario {
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let check = {
        let idp = idp.clone();
        Arc::new(move |t: &str| idp.is_valid_access_token(t))
    };
    let api = TestUpstream::start(CredentialForm::Bearer, check).await;
    let store = PgStore::from_pool(pool.clone(), Keyring::plaintext());
    let expired = Some(chrono::Utc::now() - chrono::Duration::hours(1));
    // One user whose token must be refreshed (success), one whose grant was
    // revoked (invalid_grant).
    let (fine, revoked) = (Uuid::new_v4(), Uuid::new_v4());
    store
        .put_link("github", fine, &idp.seed_with_expiry(fine, expired))
        .await
        .unwrap();
    store
        .put_link("github", revoked, &idp.seed_with_expiry(revoked, expired))
        .await
        .unwrap();
    idp.revoke(revoked);
    let (_, fine_token) = create_token(&store, fine, &[]).await;
    let (_, revoked_token) = create_token(&store, revoked, &[]).await;
    let proxy = Spawned::start(
        &harness::db_url(&pool),
        &format!(
            "[[providers]]\nid = \"github\"\nclient_id = \"test-client\"\nclient_secret = \"test-secret\"\ntoken_url = \"{}\"\n[[providers.routes]]\nprefix = \"/gh/api\"\nupstream = \"{}\"\n",
            idp.token_url(),
            api.url()
        ),
    )
    .await;
    let url = proxy.url("/gh/api/user");
    let mut sent = 0;
    for _ in 0..5 {
        let a = get(&url, &[("authorization", &format!("Bearer {fine_token}"))]).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        sent += 1;
    }
    get(
        &url,
        &[("authorization", &format!("Bearer {revoked_token}"))],
    )
    .await
    .assert_error(403, "reauth_required");
    get(&url, &[]).await.assert_error(401, "unauthenticated");
    sent += 2;
    Scenario {
        proxy,
        sent,
        _idp: idp,
        _api: api,
    }
}

async fn fetch_metrics(s: &Scenario) -> String {
    let a = get(&format!("http://{}/metrics", s.proxy.admin), &[]).await;
    assert_eq!(a.status, 200);
    String::from_utf8(a.body.to_vec()).unwrap()
}

/// Runs a Prometheus tool, failing (never skipping) when it is not installed.
fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: scripts/test installs Debian's prometheus package"
    );
    Command::new(name)
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn metrics_after_a_scenario_pass_promtool_check_metrics(pool: PgPool) {
    let s = scenario(pool).await;
    let text = fetch_metrics(&s).await;
    assert!(text.contains("tokenproxy_refresh_total{provider=\"github\",outcome=\"success\"} 1"));
    assert!(text.contains("outcome=\"invalid_grant\""));
    // Prometheus itself negotiates OpenMetrics, which is complete (`# EOF`).
    let om = get(
        &format!("http://{}/metrics", s.proxy.admin),
        &[("accept", "application/openmetrics-text;version=1.0.0")],
    )
    .await;
    assert!(om.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(String::from_utf8_lossy(&om.body).ends_with("# EOF\n"));
    let mut child = tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics found problems:\n{report}\nin:\n{text}"
    );
}

#[test]
fn alerting_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo().join("deploy/prometheus");
    for args in [
        ["check", "rules", "tokenproxy-rules.yml"],
        ["test", "rules", "tokenproxy-rules.test.yml"],
    ] {
        let out = tool("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every `tokenproxy_*` name in `text`, with histogram suffixes folded onto the
/// histogram's own name.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("tokenproxy_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if boundary {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

/// Names with at least one sample in a `/metrics` text.
fn exported(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

fn rules_and_dashboard() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    for dir in ["deploy/prometheus", "deploy/grafana"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            // The rules' unit tests feed synthetic series; they are not queries.
            if name.ends_with(".test.yml") {
                continue;
            }
            files.push((path.clone(), std::fs::read_to_string(&path).unwrap()));
        }
    }
    assert!(files.len() >= 2, "rules and dashboard found: {files:?}");
    files
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn every_metric_the_rules_and_dashboard_use_is_exported(pool: PgPool) {
    let s = scenario(pool).await;
    let live = exported(&fetch_metrics(&s).await);
    let mut missing = Vec::new();
    let mut used = 0;
    for (path, text) in rules_and_dashboard() {
        for name in metric_names(&text) {
            used += 1;
            if !live.contains(&name) {
                missing.push(format!("{}: {name}", path.display()));
            }
        }
    }
    assert!(used >= 6, "the rules and dashboard use metrics");
    assert!(
        missing.is_empty(),
        "used but not in a live /metrics: {missing:#?}\nlive: {live:#?}"
    );
}

#[test]
fn the_metric_name_extraction_finds_names_in_queries() {
    let names = metric_names(
        r#"{"expr": "sum(rate(tokenproxy_requests_total{status=~\"5..\"}[5m])) / x_tokenproxy_no"}"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["tokenproxy_requests_total".to_string()]
    );
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_real_prometheus_scrape_counts_the_requests_sent(pool: PgPool) {
    let s = scenario(pool).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: tokenproxy\n    static_configs:\n      - targets: [\"{}\"]\n",
            s.proxy.admin
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::from(tool("prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        // Port 0: Prometheus logs the port it bound (`msg="Listening on"`).
        .arg("--web.listen-address=127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let port =
        support::net::announced_port(stderr, "msg=\"Listening on\" address=127.0.0.1:").await;
    let web = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let _prometheus = child;
    // Prometheus' own readiness endpoint answers once it can take queries.
    let ready = format!("http://{web}/-/ready");
    for _ in 0..240 {
        if get(&ready, &[]).await.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let query = format!(
        "http://{web}/api/v1/query?query=sum(tokenproxy_requests_total%7Bjob%3D%22tokenproxy%22%7D)"
    );
    // Poll Prometheus' own API until it has scraped the target (bounded): the
    // scrape is the event, and its answer is what we assert on.
    let mut last = String::new();
    for _ in 0..240 {
        {
            let a = get(&query, &[]).await;
            if a.status == 200 {
                let json = a.json();
                if let Some(v) = json["data"]["result"][0]["value"][1].as_str() {
                    assert_eq!(
                        v.parse::<f64>().unwrap(),
                        s.sent as f64,
                        "Prometheus counted exactly the requests sent"
                    );
                    return;
                }
                last = json.to_string();
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("Prometheus never scraped tokenproxy; last answer: {last}");
}

/// The manifests under `deploy/kubernetes/`.
const MANIFESTS: [&str; 2] = ["shared.yaml", "sidecar.yaml"];

fn manifest(name: &str) -> String {
    std::fs::read_to_string(repo().join("deploy/kubernetes").join(name)).unwrap()
}

/// The `tokenproxy.toml: |` block of the ConfigMap in `yaml` (its lines, with the
/// block's indentation removed).
fn embedded_config(yaml: &str) -> String {
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim() != "tokenproxy.toml: |");
    let key = lines.next().expect("a ConfigMap with tokenproxy.toml");
    let key_indent = key.len() - key.trim_start().len();
    let mut out = String::new();
    let mut indent = None;
    for line in lines {
        let this = line.len() - line.trim_start().len();
        if !line.trim().is_empty() && this <= key_indent {
            break;
        }
        let indent = *indent.get_or_insert(this);
        out.push_str(line.get(indent..).unwrap_or(""));
        out.push('\n');
    }
    out
}

/// The first `key: N` in `yaml` as seconds.
fn yaml_number(yaml: &str, key: &str) -> u64 {
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{key} in the manifest"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn kubernetes_manifests_pass_the_api_schemas_offline() {
    // scripts/test installs kubernetes-validate into target/kv-venv.
    let venv = repo().join("target/kv-venv/bin/kubernetes-validate");
    let bin = if venv.exists() {
        venv.to_string_lossy().to_string()
    } else {
        "kubernetes-validate".to_string()
    };
    let found = Command::new(&bin).arg("--version").output().is_ok();
    assert!(
        found,
        "kubernetes-validate is not installed: scripts/test installs it into target/kv-venv"
    );
    let dir = repo().join("deploy/kubernetes");
    // 1.30: the oldest release with native sidecars on by default that the
    // sidecar example needs; --strict rejects misspelt fields.
    let out = Command::new(&bin)
        .args(["--strict", "-k", "1.30.0"])
        .args(MANIFESTS.iter().map(|m| dir.join(m)))
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "invalid manifests:\n{report}");
    assert!(!report.contains("ERROR"), "{report}");
    for kind in [
        "deployment/",
        "service/",
        "poddisruptionbudget/",
        "job/",
        "pod/",
    ] {
        assert!(report.contains(kind), "{kind} validated: {report}");
    }
}

#[test]
fn the_configs_in_the_configmaps_pass_check_config() {
    let ca = tempfile::tempdir().unwrap();
    let init = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .args(["ca", "init", "--out"])
        .arg(ca.path().join("ca"))
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    for name in MANIFESTS {
        let config = embedded_config(&manifest(name))
            .replace(
                "/var/run/tokenproxy-ca/tls.crt",
                &ca.path().join("ca/ca.pem").to_string_lossy(),
            )
            .replace(
                "/var/run/tokenproxy-ca/tls.key",
                &ca.path().join("ca/ca-key.pem").to_string_lossy(),
            );
        assert!(config.contains("[[providers]]"), "{name}: {config}");
        let file = ca.path().join(format!("{name}.toml"));
        std::fs::write(&file, &config).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
            .env_clear()
            .env(
                "TOKENPROXY_KEY",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            )
            .env("GITHUB_CLIENT_SECRET", "x")
            .arg("--config")
            .arg(&file)
            .arg("check-config")
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stdout == b"ok\n",
            "{name}: check-config failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn termination_grace_outlasts_the_drain_and_a_held_lease() {
    for name in MANIFESTS {
        let yaml = manifest(name);
        let config = harness::config(
            &embedded_config(&yaml)
                .replace("env:TOKENPROXY_KEY", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
                .replace("env:GITHUB_CLIENT_SECRET", "x")
                .replace(
                    "[forward]\nca_cert = \"/var/run/tokenproxy-ca/tls.crt\"\nca_key = \"/var/run/tokenproxy-ca/tls.key\"\nunrouted = \"deny\"\n",
                    "",
                ),
        );
        let needed = config.server.shutdown_grace + config.tokens.lease_timeout;
        let grace = yaml_number(&yaml, "terminationGracePeriodSeconds");
        assert!(
            Duration::from_secs(grace) > needed,
            "{name}: terminationGracePeriodSeconds {grace} must exceed shutdown_grace + lease_timeout = {needed:?}"
        );
    }
    let shared = manifest("shared.yaml");
    assert_eq!(yaml_number(&shared, "replicas"), 3);
    for must in [
        "path: /readyz, port: admin",
        "path: /healthz, port: admin",
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "kind: PodDisruptionBudget",
        "command: [\"tokenproxy\", \"migrate\"]",
    ] {
        assert!(shared.contains(must), "shared.yaml has {must}");
    }
    let sidecar = manifest("sidecar.yaml");
    for must in [
        "restartPolicy: Always",
        "mode = \"static\"",
        "HTTPS_PROXY",
        "GIT_SSL_CAINFO",
    ] {
        assert!(sidecar.contains(must), "sidecar.yaml has {must}");
    }
}

/// The value of the sample `series` (name and labels exactly) in a `/metrics` text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn links_by_state_are_counted_in_the_background_not_per_scrape(pool: PgPool) {
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let store = PgStore::from_pool(pool.clone(), Keyring::plaintext());
    let now = chrono::Utc::now();
    // ok: refreshable; expiring_soon: no refresh token, an hour left;
    // reauth_required: the provider rejected its refresh token, and one that
    // expired with no refresh token.
    let (ok, soon, rejected, dead) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    store.put_link("github", ok, &idp.seed(ok)).await.unwrap();
    for (user, expiry) in [
        (soon, now + chrono::Duration::hours(1)),
        (dead, now - chrono::Duration::hours(1)),
    ] {
        let mut set = idp.seed_with_expiry(user, Some(expiry));
        set.refresh_token = secrecy::SecretString::from(String::new());
        store.put_link("github", user, &set).await.unwrap();
    }
    store
        .put_link("github", rejected, &idp.seed(rejected))
        .await
        .unwrap();
    sqlx::query("UPDATE external_auth_links SET oauth_refresh_failure_reason = 'invalid_grant' WHERE user_id = $1")
        .bind(rejected)
        .execute(&pool)
        .await
        .unwrap();
    let proxy = Spawned::start(
        &harness::db_url(&pool),
        &format!(
            "[[providers]]\nid = \"github\"\nclient_id = \"test-client\"\nclient_secret = \"test-secret\"\ntoken_url = \"{}\"\n[[providers.routes]]\nprefix = \"/gh/api\"\nupstream = \"https://127.0.0.1:9\"\n",
            idp.token_url(),
        ),
    )
    .await;
    let metrics_url = format!("http://{}/metrics", proxy.admin);
    // The first count runs as the server starts; wait for it (bounded poll).
    let mut text = String::new();
    for _ in 0..200 {
        text = String::from_utf8(get(&metrics_url, &[]).await.body.to_vec()).unwrap();
        if text.contains("tokenproxy_links{state=\"ok\"}")
            && sample(&text, "tokenproxy_store_listen_up") == Some(1.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        sample(&text, "tokenproxy_links{state=\"ok\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "tokenproxy_links{state=\"expiring_soon\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "tokenproxy_links{state=\"reauth_required\"}"),
        Some(2.0)
    );
    // Scrapes do not count links: still the one query made at start.
    for _ in 0..20 {
        text = String::from_utf8(get(&metrics_url, &[]).await.body.to_vec()).unwrap();
    }
    let counted = "tokenproxy_store_query_duration_seconds_count{op=\"count_link_states\"}";
    assert_eq!(sample(&text, counted), Some(1.0), "{text}");
    // The change feed is listening, and nothing is in flight.
    assert_eq!(
        sample(&text, "tokenproxy_store_listen_up"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "tokenproxy_flights_in_progress"), Some(0.0));
}
