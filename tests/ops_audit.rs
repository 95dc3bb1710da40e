//! The audit trail (`[logging] audit`) of a real `tokenproxy serve` and its CLI:
//! one JSON line per event with stable fields, authentication failures counted
//! per source address (never one line per attempt), and never a secret — the
//! scenario's whole trail is scanned for every token value it issued.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;

use harness::{create_token, get, Spawned};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use support::idp::{Idp, IdpOptions};
use support::upstream::{CredentialForm, TestUpstream};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{LinkStore, NewProxyToken};
use uuid::Uuid;

/// Runs the `tokenproxy` binary with `config`, `args` and `stdin`; its stdout.
fn cli(config: &std::path::Path, args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .env_clear()
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "tokenproxy {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Stops a spawned server with SIGTERM and waits until it has exited (the
/// audit trail's last aggregated failures are written on the way out).
fn stop(mut proxy: Spawned) {
    proxy.terminate();
    let status = proxy.child.wait().unwrap();
    assert!(status.success(), "tokenproxy serve exited with {status}");
}

/// The audit file's lines, each parsed as JSON.
fn events(path: &std::path::Path) -> (String, Vec<serde_json::Value>) {
    let text = std::fs::read_to_string(path).unwrap();
    let events = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("a JSON line: {l}")))
        .collect();
    (text, events)
}

/// The config after `[server]` and `[database]` (which `Spawned` writes).
fn rest(audit: &std::path::Path, idp: &Idp, api: &TestUpstream) -> String {
    format!(
        "[callers]\n# the trail aggregates refusals; the failed-auth limit (429) would cut them off\nauth_failure_limit = 0\n\n[logging]\naudit = \"{}\"\n\n[[providers]]\nid = \"github\"\nclient_id = \"test-client\"\nclient_secret = \"test-secret\"\ntoken_url = \"{}\"\n[[providers.routes]]\nprefix = \"/gh/api\"\nupstream = \"{}\"\n",
        audit.display(),
        idp.token_url(),
        api.url()
    )
}

async fn idp_and_api() -> (Arc<Idp>, TestUpstream) {
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let check = {
        let idp = idp.clone();
        Arc::new(move |t: &str| idp.is_valid_access_token(t))
    };
    let api = TestUpstream::start(CredentialForm::Bearer, check).await;
    (idp, api)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn the_audit_trail_records_a_scenario_and_never_a_token(pool: PgPool) {
    let (idp, api) = idp_and_api().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let rest = rest(&audit, &idp, &api);
    let config = dir.path().join("cli.toml");
    std::fs::write(
        &config,
        format!("[database]\nurl = \"{}\"\n\n{rest}", harness::db_url(&pool)),
    )
    .unwrap();

    // Link (twice: created, then replaced) with an already expired access token,
    // so the first request refreshes; a proxy token for the user.
    let user = Uuid::new_v4();
    let seed = idp.seed_with_expiry(user, Some(chrono::Utc::now() - chrono::Duration::hours(1)));
    let response = serde_json::json!({
        "access_token": seed.access_token.expose_secret(),
        "refresh_token": seed.refresh_token.expose_secret(),
        "expires_at": (chrono::Utc::now() - chrono::Duration::hours(1)).timestamp(),
    })
    .to_string();
    let user_arg = user.to_string();
    let put = ["link", "put", "--provider", "github", "--user", &user_arg];
    cli(&config, &put, &response);
    cli(&config, &put, &response);
    let created = cli(&config, &["token", "create", "--user", &user_arg], "");
    let proxy_token = created.lines().last().unwrap().to_string();
    let token_id = created
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap()
        .to_string();
    // A holder that crashed mid-refresh: its lease ran out and was never released.
    sqlx::query(
        "UPDATE external_auth_links SET refresh_lease_expires_at = now() - interval '1 minute' WHERE user_id = $1",
    )
    .bind(user)
    .execute(&pool)
    .await
    .unwrap();
    // A proxy token that expired an hour ago.
    let store = PgStore::from_pool(pool.clone(), Keyring::plaintext());
    let (expired_token, expired_hash) = tokenproxy::proxy::caller::generate_token();
    let expired = store
        .create_proxy_token(&NewProxyToken {
            user_id: user,
            name: "old".into(),
            hash: expired_hash,
            providers: vec![],
            expires_at: Some(chrono::Utc::now() - chrono::Duration::hours(1)),
        })
        .await
        .unwrap();

    let proxy = Spawned::start(&harness::db_url(&pool), &rest).await;
    let url = proxy.url("/gh/api/user");
    for _ in 0..2 {
        let a = get(&url, &[("authorization", &format!("Bearer {proxy_token}"))]).await;
        assert_eq!(a.status, 200);
    }
    assert_eq!(idp.refreshes(), 1);
    let bad = [
        format!("Bearer {}", expired_token.expose_secret()),
        format!("Bearer {}", expired_token.expose_secret()),
        "Bearer tpx_notatoken".to_string(),
        "Bearer tpx_notatoken".to_string(),
        "Bearer tpx_notatoken".to_string(),
    ];
    for h in &bad {
        get(&url, &[("authorization", h)])
            .await
            .assert_error(401, "unauthenticated");
    }
    // No credential at all: not a failure (clients ask without one first).
    get(&url, &[]).await.assert_error(401, "unauthenticated");
    let metrics = get(&format!("http://{}/metrics", proxy.admin), &[]).await;
    let metrics = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        metrics.contains("tokenproxy_lease_takeovers_total{provider=\"github\"} 1\n"),
        "{metrics}"
    );
    stop(proxy);
    cli(&config, &["token", "revoke", &token_id], "");

    let (text, events) = events(&audit);
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "link_created",
            "link_replaced",
            "proxy_token_created",
            "proxy_token_first_use",
            "lease_taken_over",
            "refresh",
            "proxy_token_expired",
            "auth_failures",
            "proxy_token_revoked"
        ],
        "{text}"
    );
    for e in &events {
        assert_eq!(e["target"], "tokenproxy::audit");
        assert!(e["timestamp"].is_string());
    }
    let replica = hostname();
    assert_eq!(events[0]["source"], "cli");
    assert_eq!(events[0]["user"], user_arg);
    assert_eq!(events[3]["token_id"], token_id);
    assert_eq!(events[3]["address"], "127.0.0.1");
    assert_eq!(events[3]["replica"], replica.as_str());
    assert_eq!(events[4]["provider"], "github");
    assert_eq!(events[4]["user"], user_arg);
    let refresh = &events[5];
    assert_eq!(refresh["outcome"], "success");
    assert_eq!(refresh["provider"], "github");
    assert_eq!(refresh["user"], user_arg);
    assert_eq!(refresh["replica"], replica.as_str());
    assert!(refresh["duration_ms"].is_u64(), "{refresh}");
    assert_eq!(events[6]["token_id"], expired.id.to_string());
    assert_eq!(events[7]["address"], "127.0.0.1");
    assert_eq!(events[7]["count"], 5, "two expired, three unknown: {text}");
    assert!(events[7]["window_s"].is_u64());
    assert_eq!(events[8]["token_id"], token_id);

    // Every token value issued in the scenario, and the client secret.
    let mut secrets = vec![
        seed.access_token.expose_secret().to_string(),
        seed.refresh_token.expose_secret().to_string(),
        proxy_token.clone(),
        expired_token.expose_secret().to_string(),
        idp.current_refresh_token(user).unwrap(),
        "test-secret".to_string(),
    ];
    secrets.extend(api.requests().into_iter().filter_map(|r| r.token));
    assert!(secrets.len() >= 7, "the upstream saw the refreshed token");
    for s in &secrets {
        assert!(!s.is_empty());
        assert!(
            !text.contains(s.as_str()),
            "a secret in the audit trail: {text}"
        );
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_hundred_refused_credentials_make_one_line_with_their_count(pool: PgPool) {
    let (idp, api) = idp_and_api().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let store = PgStore::from_pool(pool.clone(), Keyring::plaintext());
    let user = Uuid::new_v4();
    store
        .put_link("github", user, &idp.seed(user))
        .await
        .unwrap();
    let (_, good) = create_token(&store, user, &[]).await;
    let proxy = Spawned::start(&harness::db_url(&pool), &rest(&audit, &idp, &api)).await;
    let url = proxy.url("/gh/api/user");
    // Unknown but well-formed tokens (each a store lookup) and malformed ones
    // (refused before any lookup), between requests that succeed.
    let (unknown, _) = tokenproxy::proxy::caller::generate_token();
    for i in 0..100 {
        let h = if i % 2 == 0 {
            format!("Bearer {}", unknown.expose_secret())
        } else {
            format!("Bearer tpx_guess{i}")
        };
        get(&url, &[("authorization", &h)])
            .await
            .assert_error(401, "unauthenticated");
        if i % 25 == 0 {
            let a = get(&url, &[("authorization", &format!("Bearer {good}"))]).await;
            assert_eq!(a.status, 200);
        }
    }
    stop(proxy);
    let (text, events) = events(&audit);
    let failures: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "auth_failures")
        .collect();
    assert_eq!(failures.len(), 1, "one line, not one per attempt: {text}");
    assert_eq!(failures[0]["count"], 100, "{text}");
    assert_eq!(failures[0]["address"], "127.0.0.1");
    assert!(
        !text.contains(unknown.expose_secret()) && !text.contains("tpx_guess"),
        "a presented credential in the audit trail: {text}"
    );
    // The good caller's first use is recorded once, not per request.
    let first_uses = events
        .iter()
        .filter(|e| e["event"] == "proxy_token_first_use")
        .count();
    assert_eq!(first_uses, 1, "{text}");
}

#[test]
fn logging_audit_takes_stderr_off_or_a_path_and_refuses_empty() {
    use tokenproxy::config::{AuditDestination, Config};
    let parse = |v: &str| Config::from_toml_with_env(&format!("[logging]\naudit = \"{v}\"\n"), &[]);
    assert_eq!(parse("off").unwrap().logging.audit, AuditDestination::Off);
    assert_eq!(
        parse("stderr").unwrap().logging.audit,
        AuditDestination::Stderr
    );
    assert_eq!(
        parse("/var/log/tokenproxy/audit.log")
            .unwrap()
            .logging
            .audit,
        AuditDestination::File("/var/log/tokenproxy/audit.log".into())
    );
    let err = parse("").unwrap_err().to_string();
    assert!(err.contains("logging.audit"), "{err}");
    assert_eq!(
        Config::from_toml_with_env("", &[]).unwrap().logging.audit,
        AuditDestination::Off
    );
}

#[test]
fn server_replica_id_is_checked_and_named_in_errors() {
    use tokenproxy::config::Config;
    let parse =
        |v: &str| Config::from_toml_with_env(&format!("[server]\nreplica_id = \"{v}\"\n"), &[]);
    assert_eq!(
        parse("tokenproxy-7c9f-0")
            .unwrap()
            .server
            .replica_id
            .as_deref(),
        Some("tokenproxy-7c9f-0")
    );
    for bad in ["", "two words", &"x".repeat(65)] {
        let err = parse(bad).unwrap_err().to_string();
        assert!(err.contains("server.replica_id"), "{bad:?}: {err}");
    }
    assert_eq!(
        Config::from_toml_with_env("", &[])
            .unwrap()
            .server
            .replica_id,
        None
    );
}
