//! The audit lines of browser sign-in (issue 13): a refused callback or login
//! start writes `link_login_failed` with its documented fields (`source`,
//! `provider`, `user` when known, `step`, `reason`), a sign-in that stores a
//! link writes `link_created` / `link_replaced` with `source = "browser"`, and no
//! line carries a secret (state, code, cookie, ticket, proxy or provider token).
//!
//! The trail is captured in-process by a global JSON subscriber, which is why
//! these tests live in a binary of their own.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;
#[path = "support/login_world.rs"]
mod world;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use harness::{create_token, get};
use sqlx::PgPool;
use support::idp::{Idp, IdpOptions};
use uuid::Uuid;
use world::{api_for, link_rows, oauth_provider, replica};

/// Every line the global subscriber wrote.
fn trail() -> &'static Arc<Mutex<Vec<u8>>> {
    static TRAIL: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    TRAIL.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        buf
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The audit events about `provider` (each provider id is used by one test only).
fn audit_events(provider: &str) -> Vec<serde_json::Value> {
    let text = String::from_utf8(trail().lock().unwrap().clone()).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["target"] == "tokenproxy::audit" && e["provider"] == provider)
        .collect()
}

fn query(url: &str, key: &str) -> String {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no {key} in {url}"))
}

#[sqlx::test]
async fn sign_in_refusals_and_links_are_audited_without_secrets(pool: PgPool) {
    trail();
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let api = api_for(&idp).await;
    let proxy = replica(&pool, &oauth_provider("audgh", &idp, &api.url()), "").await;
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*proxy.store, user, &[]).await;
    let auth = format!("Bearer {token}");
    let mut secrets = vec![token.clone()];

    // 1. A callback in a browser without the starting cookie: refused.
    let started = get(
        &proxy.url("/_tokenproxy/oauth/audgh/login"),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(started.status, 302);
    let authorize = started.headers["location"].to_str().unwrap().to_string();
    let cookie = started.headers["set-cookie"].to_str().unwrap();
    secrets.push(
        cookie
            .split(';')
            .next()
            .unwrap()
            .split('=')
            .nth(1)
            .unwrap()
            .to_string(),
    );
    secrets.push(query(&authorize, "state"));
    secrets.push(query(&authorize, "code_challenge"));
    let back = idp.submit_login(&authorize, Uuid::new_v4(), true).await;
    secrets.push(query(&back, "code"));
    let u = url::Url::parse(&back).unwrap();
    let path = format!("{}?{}", u.path(), u.query().unwrap());
    let refused = get(&proxy.url(&path), &[]).await;
    assert_eq!(refused.status, 400);
    assert_eq!(link_rows(&pool).await, 0);

    // 2. A bad login URL ticket: refused at the start, user unknown.
    let ticket = "AAAAbogusticketvalue";
    secrets.push(ticket.to_string());
    let bad = get(
        &proxy.url(&format!("/_tokenproxy/oauth/audgh/login?ticket={ticket}")),
        &[],
    )
    .await;
    assert_eq!(bad.status, 400);

    // 3. A sign-in that completes: linked.
    let started = get(
        &proxy.url("/_tokenproxy/oauth/audgh/login"),
        &[("authorization", &auth)],
    )
    .await;
    let authorize = started.headers["location"].to_str().unwrap().to_string();
    let cookie = started.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let back = idp.submit_login(&authorize, Uuid::new_v4(), true).await;
    secrets.push(query(&back, "code"));
    let u = url::Url::parse(&back).unwrap();
    let path = format!("{}?{}", u.path(), u.query().unwrap());
    let done = get(&proxy.url(&path), &[("cookie", &cookie)]).await;
    assert_eq!(done.status, 200);
    assert_eq!(link_rows(&pool).await, 1);
    let link = proxy.store.get_link("audgh", user).await.unwrap().unwrap();
    {
        use secrecy::ExposeSecret;
        secrets.push(link.access_token.expose_secret().to_string());
        secrets.push(link.refresh_token.expose_secret().to_string());
    }

    let events = audit_events("audgh");
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "link_login_failed")
        .collect();
    assert_eq!(failed.len(), 2, "{events:#?}");
    let cb = failed
        .iter()
        .find(|e| e["step"] == "callback")
        .expect("callback refusal");
    assert_eq!(cb["reason"], "browser_mismatch", "{cb}");
    assert_eq!(cb["source"], "browser");
    // The state named the user before it was refused.
    assert_eq!(cb["user"], user.to_string(), "{cb}");
    assert_eq!(cb["level"], "INFO");
    let start = failed
        .iter()
        .find(|e| e["step"] == "login")
        .expect("login refusal");
    assert_eq!(start["reason"], "ticket_invalid", "{start}");
    assert_eq!(start["source"], "browser");
    assert!(
        start["user"].is_null(),
        "a bad ticket names no user: {start}"
    );
    let created: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "link_created")
        .collect();
    assert_eq!(created.len(), 1, "{events:#?}");
    assert_eq!(created[0]["source"], "browser");
    assert_eq!(created[0]["user"], user.to_string());

    let text = String::from_utf8(trail().lock().unwrap().clone()).unwrap();
    for s in &secrets {
        assert!(s.len() >= 8, "a secret worth looking for: {s:?}");
        assert!(!text.contains(s.as_str()), "a secret in the log: {s:?}");
    }
}

/// Waits (bounded: 20 s) until the caller's device flow at `provider` reports `failed`.
async fn wait_failed(proxy: &world::Replica, provider: &str, auth: &str) -> serde_json::Value {
    let url = proxy.url(&format!("/_tokenproxy/device/{provider}"));
    for _ in 0..400 {
        let v = get(&url, &[("authorization", auth)]).await.json();
        if v["status"] == "failed" {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the device flow never failed");
}

#[sqlx::test]
async fn device_flow_refusals_are_audited_without_secrets(pool: PgPool) {
    trail();
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let api = api_for(&idp).await;
    let providers = oauth_provider("auddev", &idp, &api.url()).replace(
        "timeout = \"2s\"",
        &format!(
            "timeout = \"2s\"\ndevice_authorization_url = \"{}/oauth/device\"",
            idp.base_url()
        ),
    );
    let proxy = replica(&pool, &providers, "").await;
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*proxy.store, user, &[]).await;
    let auth = format!("Bearer {token}");
    let start = proxy.url("/_tokenproxy/device/auddev");
    for (act, reason) in [("deny", "access_denied"), ("expire", "expired_token")] {
        let a = harness::send(
            http::Method::POST,
            &start,
            &[("authorization", &auth)],
            bytes::Bytes::new(),
        )
        .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        let code = a.json()["user_code"].as_str().unwrap().to_string();
        match act {
            "deny" => idp.device_deny(&code),
            _ => idp.device_expire(&code),
        }
        let v = wait_failed(&proxy, "auddev", &auth).await;
        assert_eq!(v["reason"], reason, "{v}");
    }
    assert_eq!(link_rows(&pool).await, 0);

    let events = audit_events("auddev");
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "link_login_failed")
        .collect();
    assert_eq!(failed.len(), 2, "{events:#?}");
    for (e, reason) in failed.iter().zip(["access_denied", "expired_token"]) {
        assert_eq!(e["reason"], reason, "{e}");
        assert_eq!(e["flow"], "device", "{e}");
        assert_eq!(e["source"], "device", "{e}");
        assert_eq!(e["step"], "poll", "{e}");
        assert_eq!(e["user"], user.to_string(), "{e}");
    }
    let text = String::from_utf8(trail().lock().unwrap().clone()).unwrap();
    assert!(!text.contains(&token), "the proxy token in the log");
    assert!(!text.contains("dc_"), "a device code in the log");
    assert!(
        !text.contains("test-secret"),
        "the client secret in the log"
    );
}
