//! A real browser through browser sign-in: headless Chromium (Debian's
//! `chromium`, driven over WebDriver by Debian's `chromedriver`; `scripts/test`
//! installs both) opens the login URL `tokenproxy link login-url` prints, is
//! redirected to the test IdP's login page, clicks "Authorize", comes back to
//! the proxy's callback and sees the result page; then a proxied request with
//! the user's proxy token is served with the account the browser just linked.
//! The result page is saved as `target/login-browser.png` for review.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;
#[path = "support/login_world.rs"]
mod world;

use std::process::Stdio;
use std::sync::Arc;

use fantoccini::{ClientBuilder, Locator};
use harness::{create_token, get};
use sqlx::PgPool;
use support::idp::{Idp, IdpOptions};
use uuid::Uuid;
use world::{api_for, link_rows, oauth_provider, replica};

/// chromedriver on a free loopback port, killed when dropped.
struct Driver {
    child: tokio::process::Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn chromedriver() -> Driver {
    let mut child = tokio::process::Command::new("chromedriver")
        // Port 0: it prints the port it bound ("started successfully on port N").
        .arg("--port=0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver is installed (Debian's chromium-driver; scripts/test installs it)");
    let stdout = child.stdout.take().unwrap();
    let port = support::net::announced_port(stdout, "started successfully on port ").await;
    Driver { child, port }
}

/// `tokenproxy link login-url`, as an operator runs it, against `config`.
fn login_url_from_cli(config: &str, provider: &str, user: Uuid) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenproxy.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .args(["link", "login-url", "--provider", provider, "--ttl", "5m"])
        .args(["--user", &user.to_string(), "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[sqlx::test]
async fn headless_chromium_links_an_account_through_the_login_page(pool: PgPool) {
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let api = api_for(&idp).await;
    let providers = oauth_provider("gh", &idp, &api.url());
    let proxy = replica(&pool, &providers, "").await;
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*proxy.store, user, &[]).await;
    let account = Uuid::new_v4();
    idp.set_login_account(account);

    let config = format!(
        "[server]\npublic_url = \"{}\"\n[encryption]\nkeys = [\"{}\"]\n{providers}",
        proxy.url(""),
        world::KEY
    );
    let login_url = login_url_from_cli(&config, "gh", user);
    assert!(login_url.starts_with(&proxy.url("/_tokenproxy/oauth/gh/login?ticket=")));

    let driver = chromedriver().await;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=900,600"],
        }),
    );
    let browser = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session with headless Chromium");
    let run = async {
        browser.goto(&login_url).await?;
        // The IdP's login page, reached through the proxy's redirect.
        let approve = browser.wait().for_element(Locator::Id("approve")).await?;
        assert_eq!(idp.login_pages(), 1);
        approve.click().await?;
        let title = browser.wait().for_element(Locator::Id("title")).await?;
        let heading = title.text().await?;
        let page = browser.source().await?;
        let png = browser.screenshot().await?;
        Ok::<_, fantoccini::error::CmdError>((heading, page, png))
    };
    let result = run.await;
    let _ = browser.close().await;
    let (heading, page, png) = result.expect("the browser went through the sign-in");
    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/login-browser.png");
    std::fs::write(&shot, &png).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    println!("screenshot of the result page: {}", shot.display());
    assert_eq!(heading, "Account linked", "{page}");
    assert!(
        page.contains(&user.to_string()) && page.contains(">gh<"),
        "{page}"
    );
    assert_eq!(link_rows(&pool).await, 1);

    let served = get(
        &proxy.url("/gh/api/user"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(served.status, 200, "{:?}", served.body);
    let seen = api.requests().last().unwrap().headers["authorization"].clone();
    let presented = seen
        .to_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_string();
    assert_eq!(
        idp.account_of(&presented),
        Some(account),
        "the account the browser linked"
    );
}
