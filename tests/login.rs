//! Browser sign-in (issue 13, items 2 and 4) against the test IdP's
//! authorization endpoint, with real Postgres and real HTTP: a sign-in started
//! with a proxy token or a signed login URL links the account and the next
//! proxied request succeeds; every bad, missing, expired, replayed, foreign or
//! cross-browser callback, a provider's `access_denied`, a failed exchange and
//! every bad id_token is a 400 page that writes no link; states are single-use
//! across replicas; `reauth_required` carries a `login_url` that heals the link
//! on every replica within a second.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;
#[path = "support/login_world.rs"]
mod world;

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{create_token, get, Answer};
use sqlx::PgPool;
use support::idp::{IdTokenFault, Idp, IdpOptions};
use uuid::Uuid;
use world::{api_for, link_rows, oauth_provider, oidc_provider, replica, replica_behind, Replica};

/// What a browser keeps between the proxy's redirect and the callback.
struct Started {
    authorize_url: String,
    cookie: String,
}

/// `GET /login` (with `headers`), expecting the 302 to the IdP and the cookie.
async fn start(r: &Replica, path: &str, headers: &[(&str, &str)]) -> Started {
    let a = get(&r.url(path), headers).await;
    assert_eq!(a.status, 302, "login answers a redirect: {:?}", a.body);
    let set_cookie = a.headers["set-cookie"].to_str().unwrap().to_string();
    Started {
        authorize_url: a.headers["location"].to_str().unwrap().to_string(),
        cookie: set_cookie.split(';').next().unwrap().to_string(),
    }
}

/// The callback as the browser presents it (with its cookie, if any).
async fn callback(r: &Replica, callback_url: &str, cookie: Option<&str>) -> Answer {
    let u = url::Url::parse(callback_url).unwrap();
    let path = format!("{}?{}", u.path(), u.query().unwrap_or_default());
    let headers: Vec<(&str, &str)> = cookie.map(|c| ("cookie", c)).into_iter().collect();
    get(&r.url(&path), &headers).await
}

fn text(a: &Answer) -> String {
    String::from_utf8_lossy(&a.body).into_owned()
}

#[track_caller]
fn assert_refused(a: &Answer, reason: &str) {
    assert_eq!(a.status, 400, "{}", text(a));
    assert!(text(a).contains(reason), "want {reason:?} in {}", text(a));
    assert!(a.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
}

struct World {
    idp: Arc<Idp>,
    api: support::upstream::TestUpstream,
    proxy: Replica,
    user: Uuid,
    auth: String,
}

async fn world(pool: &PgPool) -> World {
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let api = api_for(&idp).await;
    let providers =
        oauth_provider("gh", &idp, &api.url()) + &oauth_provider("gl", &idp, &api.url());
    let proxy = replica(pool, &providers, "").await;
    let (user, auth) = caller(&proxy).await;
    World {
        idp,
        api,
        proxy,
        user,
        auth,
    }
}

/// A new user with a proxy token on `r`'s store: the user and its `Authorization` value.
async fn caller(r: &Replica) -> (Uuid, String) {
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*r.store, user, &[]).await;
    (user, format!("Bearer {token}"))
}

/// One IdP and API, and two replicas behind one load balancer (both have A's
/// public URL), for the cross-replica sign-in tests.
struct Pair {
    idp: Arc<Idp>,
    _api: support::upstream::TestUpstream,
    a: Replica,
    b: Replica,
}

async fn two_replicas(pool: &PgPool) -> Pair {
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let api = api_for(&idp).await;
    let providers = oauth_provider("gh", &idp, &api.url());
    let a = replica(pool, &providers, "").await;
    let b = replica_behind(pool, &providers, "", Some(a.addr)).await;
    Pair {
        idp,
        _api: api,
        a,
        b,
    }
}

#[sqlx::test]
async fn a_proxy_token_starts_a_sign_in_that_links_the_account(pool: PgPool) {
    let w = world(&pool).await;
    // Before: link_missing, with a login URL for exactly this user and provider.
    let before = get(&w.proxy.url("/gh/api/user"), &[("authorization", &w.auth)]).await;
    before.assert_error(403, "link_missing");
    assert!(before.json()["error"]["login_url"]
        .as_str()
        .unwrap()
        .starts_with(&w.proxy.url("/_tokenproxy/oauth/gh/login?ticket=")));

    let s = start(
        &w.proxy,
        "/_tokenproxy/oauth/gh/login",
        &[("authorization", &w.auth)],
    )
    .await;
    let set = get(
        &w.proxy.url("/_tokenproxy/oauth/gh/login"),
        &[("authorization", &w.auth)],
    )
    .await;
    let c = set.headers["set-cookie"].to_str().unwrap();
    assert!(
        c.contains("HttpOnly") && c.contains("SameSite=Lax") && c.contains("Max-Age=600"),
        "{c}"
    );
    assert!(!c.contains("Secure"), "public_url is http: {c}");
    assert!(c.contains("Path=/_tokenproxy/oauth/gh/"), "{c}");
    let q: std::collections::HashMap<_, _> = url::Url::parse(&s.authorize_url)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(
        q["redirect_uri"],
        w.proxy.url("/_tokenproxy/oauth/gh/callback")
    );
    assert_eq!(q["scope"], "repo read:user");

    let account = Uuid::new_v4();
    let back = w.idp.submit_login(&s.authorize_url, account, true).await;
    let done = callback(&w.proxy, &back, Some(&s.cookie)).await;
    assert_eq!(done.status, 200, "{}", text(&done));
    let page = text(&done);
    assert!(
        page.contains("Account linked") && page.contains(&w.user.to_string()),
        "{page}"
    );
    assert!(
        !page.contains("at_") && !page.contains("rt_"),
        "no token on the page: {page}"
    );
    assert_eq!(link_rows(&pool).await, 1);

    let after = get(&w.proxy.url("/gh/api/user"), &[("authorization", &w.auth)]).await;
    assert_eq!(after.status, 200, "{}", text(&after));
    let seen = w.api.requests().last().unwrap().headers["authorization"].clone();
    let token = seen
        .to_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_string();
    assert_eq!(
        w.idp.account_of(&token),
        Some(account),
        "the newly linked account is used"
    );
}

#[sqlx::test]
async fn a_browser_without_a_proxy_token_is_asked_for_one(pool: PgPool) {
    let w = world(&pool).await;
    let a = get(&w.proxy.url("/_tokenproxy/oauth/gh/login"), &[]).await;
    a.assert_error(401, "unauthenticated");
    assert!(a.headers.contains_key("www-authenticate"));
    let a = get(
        &w.proxy.url("/_tokenproxy/oauth/nope/login"),
        &[("authorization", &w.auth)],
    )
    .await;
    assert_eq!(a.status, 404);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM oauth_states")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "no state for refused starts");
}

impl World {
    /// Starts a sign-in with the proxy token, as a browser holding it would.
    async fn begin(&self) -> Started {
        start(
            &self.proxy,
            "/_tokenproxy/oauth/gh/login",
            &[("authorization", &self.auth)],
        )
        .await
    }

    /// Approves at the IdP as a fresh account; returns the callback URL.
    async fn approve(&self, s: &Started) -> String {
        self.idp
            .submit_login(&s.authorize_url, Uuid::new_v4(), true)
            .await
    }

    /// Asserts nothing was linked and the IdP exchanged `grants` codes.
    async fn assert_nothing_written(&self, pool: &PgPool, grants: u64) {
        assert_eq!(link_rows(pool).await, 0, "a refused callback wrote a link");
        assert_eq!(self.idp.code_grants(), grants, "codes exchanged");
    }
}

#[sqlx::test]
async fn a_callback_without_state_is_refused(pool: PgPool) {
    let w = world(&pool).await;
    let s = w.begin().await;
    let back = w.approve(&s).await;
    let u = url::Url::parse(&back).unwrap();
    let code: String = u.query_pairs().find(|(k, _)| k == "code").unwrap().1.into();
    let no_state = w
        .proxy
        .url(&format!("/_tokenproxy/oauth/gh/callback?code={code}"));
    assert_refused(
        &callback(&w.proxy, &no_state, Some(&s.cookie)).await,
        "no state",
    );
    w.assert_nothing_written(&pool, 0).await;
}

#[sqlx::test]
async fn a_tampered_state_is_refused(pool: PgPool) {
    let w = world(&pool).await;
    let s = w.begin().await;
    let back = w.approve(&s).await.replacen("state=", "state=X", 1);
    assert_refused(&callback(&w.proxy, &back, Some(&s.cookie)).await, "unknown");
    w.assert_nothing_written(&pool, 0).await;
}

#[sqlx::test]
async fn a_callback_in_another_browser_is_refused(pool: PgPool) {
    let w = world(&pool).await;
    // The right state, but no cookie (a link sent to someone else) ...
    let s = w.begin().await;
    let back = w.approve(&s).await;
    assert_refused(&callback(&w.proxy, &back, None).await, "another browser");
    // ... or the cookie of another sign-in.
    let s = w.begin().await;
    let other = w.begin().await;
    let back = w.approve(&s).await;
    assert_refused(
        &callback(&w.proxy, &back, Some(&other.cookie)).await,
        "another browser",
    );
    w.assert_nothing_written(&pool, 0).await;
}

#[sqlx::test]
async fn an_expired_state_is_refused(pool: PgPool) {
    let w = world(&pool).await;
    let s = w.begin().await;
    let back = w.approve(&s).await;
    // As ten minutes later.
    sqlx::query("UPDATE oauth_states SET expires_at = expires_at - 601")
        .execute(&pool)
        .await
        .unwrap();
    assert_refused(&callback(&w.proxy, &back, Some(&s.cookie)).await, "expired");
    w.assert_nothing_written(&pool, 0).await;
}

#[sqlx::test]
async fn access_denied_at_the_provider_is_refused(pool: PgPool) {
    let w = world(&pool).await;
    let s = w.begin().await;
    let back = w
        .idp
        .submit_login(&s.authorize_url, Uuid::new_v4(), false)
        .await;
    assert!(back.contains("error=access_denied"), "{back}");
    assert_refused(
        &callback(&w.proxy, &back, Some(&s.cookie)).await,
        "access_denied",
    );
    w.assert_nothing_written(&pool, 0).await;
}

#[sqlx::test]
async fn a_state_of_another_provider_is_refused(pool: PgPool) {
    let w = world(&pool).await;
    let s = w.begin().await;
    let back = w.approve(&s).await.replace("/oauth/gh/", "/oauth/gl/");
    let gl_cookie = s
        .cookie
        .replace("tokenproxy_login_gh", "tokenproxy_login_gl");
    assert_refused(
        &callback(&w.proxy, &back, Some(&gl_cookie)).await,
        "another provider",
    );
    w.assert_nothing_written(&pool, 0).await;
}

#[sqlx::test]
async fn a_failed_code_exchange_is_refused(pool: PgPool) {
    let w = world(&pool).await;
    let s = w.begin().await;
    // The provider refuses a code it did not issue.
    let back = w.approve(&s).await.replacen("code=code_", "code=code_0", 1);
    assert_refused(
        &callback(&w.proxy, &back, Some(&s.cookie)).await,
        "invalid_grant",
    );
    w.assert_nothing_written(&pool, 1).await;
}

#[sqlx::test]
async fn a_replayed_callback_changes_nothing(pool: PgPool) {
    let w = world(&pool).await;
    let s = start(
        &w.proxy,
        "/_tokenproxy/oauth/gh/login",
        &[("authorization", &w.auth)],
    )
    .await;
    let back = w
        .idp
        .submit_login(&s.authorize_url, Uuid::new_v4(), true)
        .await;
    assert_eq!(callback(&w.proxy, &back, Some(&s.cookie)).await.status, 200);
    let row = || async {
        sqlx::query_as::<_, (String, chrono::DateTime<chrono::Utc>)>(
            "SELECT oauth_access_token, updated_at FROM external_auth_links",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let first = row().await;
    let grants = w.idp.code_grants();
    assert_refused(
        &callback(&w.proxy, &back, Some(&s.cookie)).await,
        "already completed",
    );
    assert_eq!(row().await, first, "the replay wrote nothing");
    assert_eq!(
        w.idp.code_grants(),
        grants,
        "the replayed code was not exchanged"
    );
}

/// The replica that completes a sign-in serves the new link at once, even
/// though it answered `link_missing` (and remembered it) just before and no
/// change notification reaches it.
#[sqlx::test]
async fn a_sign_in_is_served_at_once_by_its_replica_without_a_change_feed(pool: PgPool) {
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let api = api_for(&idp).await;
    let providers = oauth_provider("gh", &idp, &api.url());
    let proxy = world::replica_without_feed(&pool, &providers, "").await;
    let (_, auth) = caller(&proxy).await;
    let before = get(&proxy.url("/gh/api/user"), &[("authorization", &auth)]).await;
    before.assert_error(403, "link_missing");
    let s = start(
        &proxy,
        "/_tokenproxy/oauth/gh/login",
        &[("authorization", &auth)],
    )
    .await;
    let back = idp
        .submit_login(&s.authorize_url, Uuid::new_v4(), true)
        .await;
    assert_eq!(callback(&proxy, &back, Some(&s.cookie)).await.status, 200);
    let after = get(&proxy.url("/gh/api/user"), &[("authorization", &auth)]).await;
    assert_eq!(
        after.status, 200,
        "the remembered link_missing outlived the sign-in"
    );
}

#[sqlx::test]
async fn signed_login_urls_work_once_for_their_user_and_provider(pool: PgPool) {
    let w = world(&pool).await;
    let before = get(&w.proxy.url("/gh/api/user"), &[("authorization", &w.auth)]).await;
    let login_url = before.json()["error"]["login_url"]
        .as_str()
        .unwrap()
        .to_string();
    let path = login_url
        .strip_prefix(&w.proxy.url(""))
        .unwrap()
        .to_string();

    // Altered or moved to another provider: refused before any state exists.
    // Change the last character (to one it is not: 'A' may already be it).
    let last = if path.ends_with('A') { 'B' } else { 'A' };
    let tampered = format!("{}{last}", &path[..path.len() - 1]);
    assert_refused(&get(&w.proxy.url(&tampered), &[]).await, "not valid");
    let moved = path.replace("/oauth/gh/", "/oauth/gl/");
    assert_refused(&get(&w.proxy.url(&moved), &[]).await, "another provider");

    // No proxy token needed: the URL says who.
    let s = start(&w.proxy, &path, &[]).await;
    assert_refused(&get(&w.proxy.url(&path), &[]).await, "already used");
    let account = Uuid::new_v4();
    let back = w.idp.submit_login(&s.authorize_url, account, true).await;
    assert_eq!(callback(&w.proxy, &back, Some(&s.cookie)).await.status, 200);
    let owner: Uuid = sqlx::query_scalar("SELECT user_id FROM external_auth_links")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(owner, w.user, "linked for the user the URL was issued for");
    assert_eq!(
        get(&w.proxy.url("/gh/api/user"), &[("authorization", &w.auth)])
            .await
            .status,
        200
    );
}

#[sqlx::test]
async fn an_expired_login_url_is_refused(pool: PgPool) {
    let w = world(&pool).await;
    let cfg = tokenproxy::config::Config::from_toml_with_env(
        &format!("[encryption]\nkeys = [\"{}\"]\n", world::KEY),
        &[],
    )
    .unwrap();
    let keys = tokenproxy::oauth::ticket::TicketKeys::derive(&cfg.encryption_keys()).unwrap();
    let t = keys.issue(
        "gh",
        w.user,
        chrono::Utc::now() - chrono::Duration::seconds(1),
    );
    let a = get(
        &w.proxy
            .url(&format!("/_tokenproxy/oauth/gh/login?ticket={t}")),
        &[],
    )
    .await;
    assert_refused(&a, "expired");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM oauth_states")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[sqlx::test]
async fn oidc_id_tokens_are_verified(pool: PgPool) {
    let idp = Arc::new(Idp::start(IdpOptions::default()).await);
    let api = api_for(&idp).await;
    let proxy = replica(&pool, &oidc_provider("corp", &idp, &api.url()), "").await;
    let (_, auth) = caller(&proxy).await;
    let flow = |fault: Option<IdTokenFault>| {
        let (idp, proxy, auth) = (&idp, &proxy, &auth);
        async move {
            idp.set_id_token_fault(fault);
            let s = start(
                proxy,
                "/_tokenproxy/oauth/corp/login",
                &[("authorization", auth)],
            )
            .await;
            assert!(s.authorize_url.contains("nonce="), "{}", s.authorize_url);
            let back = idp
                .submit_login(&s.authorize_url, Uuid::new_v4(), true)
                .await;
            callback(proxy, &back, Some(&s.cookie)).await
        }
    };
    for (fault, reason) in [
        (IdTokenFault::ForeignKey, "signature"),
        (IdTokenFault::WrongNonce, "nonce"),
        (IdTokenFault::WrongAudience, "another client"),
        (IdTokenFault::WrongIssuer, "another issuer"),
        (IdTokenFault::Missing, "no id_token"),
    ] {
        assert_refused(&flow(Some(fault)).await, reason);
        assert_eq!(link_rows(&pool).await, 0, "{fault:?} wrote a link");
    }
    let ok = flow(None).await;
    assert_eq!(ok.status, 200, "{}", text(&ok));
    assert!(
        text(&ok).contains("id=\"account\">user-"),
        "the page names the account"
    );
    assert_eq!(link_rows(&pool).await, 1);
}

#[sqlx::test]
async fn a_state_from_one_replica_is_accepted_once_by_another(pool: PgPool) {
    let Pair { idp, _api, a, b } = two_replicas(&pool).await;
    let (_, auth) = caller(&a).await;
    let s = start(
        &a,
        "/_tokenproxy/oauth/gh/login",
        &[("authorization", &auth)],
    )
    .await;
    let back = idp
        .submit_login(&s.authorize_url, Uuid::new_v4(), true)
        .await;
    // The redirect names replica A's public URL; the load balancer sends it to B.
    assert_eq!(callback(&b, &back, Some(&s.cookie)).await.status, 200);
    let row = || async {
        sqlx::query_scalar::<_, String>("SELECT oauth_access_token FROM external_auth_links")
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    let stored = row().await;
    assert_eq!(stored.len(), 1);
    assert_refused(
        &callback(&a, &back, Some(&s.cookie)).await,
        "already completed",
    );
    assert_refused(
        &callback(&b, &back, Some(&s.cookie)).await,
        "already completed",
    );
    assert_eq!(row().await, stored, "the replays wrote nothing");
    assert_eq!(idp.code_grants(), 1, "the code was exchanged once");
}

#[sqlx::test]
async fn reauth_required_heals_through_its_login_url_on_every_replica(pool: PgPool) {
    let Pair { idp, _api, a, b } = two_replicas(&pool).await;
    let (user, auth) = caller(&a).await;
    // A link whose access token expired and whose grant the provider revoked.
    let seeded = idp.seed_with_expiry(
        user,
        Some(chrono::Utc::now() - chrono::Duration::minutes(1)),
    );
    a.store.put_link("gh", user, &seeded).await.unwrap();
    idp.revoke(user);
    let dead = get(&a.url("/gh/api/user"), &[("authorization", &auth)]).await;
    dead.assert_error(403, "reauth_required");
    get(&b.url("/gh/api/user"), &[("authorization", &auth)])
        .await
        .assert_error(403, "reauth_required");
    let login_url = dead.json()["error"]["login_url"]
        .as_str()
        .unwrap()
        .to_string();
    let listed = get(&b.url("/_tokenproxy/links"), &[("authorization", &auth)])
        .await
        .json();
    assert!(
        listed["links"][0]["login_url"]
            .as_str()
            .unwrap()
            .contains("ticket="),
        "{listed}"
    );

    let path = login_url.strip_prefix(&a.url("")).unwrap().to_string();
    let s = start(&a, &path, &[]).await;
    let back = idp
        .submit_login(&s.authorize_url, Uuid::new_v4(), true)
        .await;
    assert_eq!(callback(&b, &back, Some(&s.cookie)).await.status, 200);
    let linked = Instant::now();
    // Each replica learns of the new link by the change feed; the bound is the
    // acceptance's 1 s (polling every 10 ms stands in for "the next request").
    for r in [&a, &b] {
        loop {
            let got = get(&r.url("/gh/api/user"), &[("authorization", &auth)]).await;
            if got.status == 200 {
                break;
            }
            assert!(
                linked.elapsed() < Duration::from_secs(1),
                "{} still {}",
                r.addr,
                text(&got)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    println!(
        "both replicas served the relinked account {:?} after the callback",
        linked.elapsed()
    );
    let listed = get(&a.url("/_tokenproxy/links"), &[("authorization", &auth)])
        .await
        .json();
    assert!(listed["links"][0]["login_url"].is_null(), "{listed}");
}

#[tokio::test]
async fn sqlite_keeps_sign_ins_and_login_urls_single_use_too() {
    use tokenproxy::store::login::{BeginLogin, LoginState, SpentTicket};
    let dir = tempfile::tempdir().unwrap();
    let store = tokenproxy::store::open(
        &tokenproxy::config::DatabaseConfig {
            url: secrecy::SecretString::from(format!(
                "sqlite://{}",
                dir.path().join("t.db").display()
            )),
            ..Default::default()
        },
        tokenproxy::crypto::Keyring::plaintext(),
    )
    .unwrap();
    store.migrate().await.unwrap();
    let login = store.login_store().expect("SQLite keeps sign-ins");
    let user = Uuid::new_v4();
    let expires_at = chrono::Utc::now() + chrono::Duration::minutes(10);
    let state = |hash: &str| LoginState {
        state_hash: hash.into(),
        provider_id: "gh".into(),
        user_id: user,
        browser_hash: "b".into(),
        pkce_verifier: secrecy::SecretString::from("v"),
        nonce: String::new(),
        expires_at,
    };
    let ticket = SpentTicket {
        id: "t1".into(),
        expires_at,
    };
    assert_eq!(
        login
            .begin_login(&state("s1"), Some(&ticket))
            .await
            .unwrap(),
        BeginLogin::Started
    );
    assert_eq!(
        login
            .begin_login(&state("s2"), Some(&ticket))
            .await
            .unwrap(),
        BeginLogin::TicketAlreadyUsed
    );
    let taken = login.take_login_state("s1").await.unwrap().unwrap();
    assert_eq!((taken.user_id, taken.provider_id.as_str()), (user, "gh"));
    assert_eq!(taken.expires_at.timestamp(), expires_at.timestamp());
    assert!(
        login.take_login_state("s1").await.unwrap().is_none(),
        "taken once"
    );
    assert!(
        login.take_login_state("s2").await.unwrap().is_none(),
        "never stored"
    );
}

#[test]
fn public_url_is_validated_naming_the_key() {
    for bad in [
        "ftp://proxy.example",
        "https://u:p@proxy.example",
        "https://proxy.example/?a=1",
    ] {
        let e = tokenproxy::config::Config::from_toml_with_env(
            &format!("[server]\npublic_url = \"{bad}\"\n"),
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key, "server.public_url", "{bad}: {}", e.message);
    }
}

/// A keyring with one key, as `[encryption] keys` gives.
fn test_keyring() -> tokenproxy::crypto::Keyring {
    tokenproxy::crypto::Keyring::new(
        vec![secrecy::SecretBox::new(Box::new([7u8; 32]))],
        tokenproxy::config::EncryptionFormat::Native,
    )
}

/// Begins a sign-in with a known verifier, checks the column does not hold it,
/// and takes it back decrypted.
async fn assert_verifier_sealed(
    store: &dyn tokenproxy::store::LinkStore,
    raw: impl std::future::Future<Output = String>,
) {
    use secrecy::ExposeSecret;
    use tokenproxy::store::login::{BeginLogin, LoginState};
    let verifier = "pkce-verifier-plain-text-0123456789abcdefghij";
    let login = store.login_store().expect("keeps sign-ins");
    let state = LoginState {
        state_hash: "sealed-state".into(),
        provider_id: "gh".into(),
        user_id: Uuid::new_v4(),
        browser_hash: "b".into(),
        pkce_verifier: secrecy::SecretString::from(verifier),
        nonce: String::new(),
        expires_at: chrono::Utc::now() + chrono::Duration::minutes(10),
    };
    assert!(matches!(
        login.begin_login(&state, None).await.unwrap(),
        BeginLogin::Started
    ));
    let column = raw.await;
    assert!(!column.is_empty());
    assert!(
        !column.contains(verifier),
        "the verifier is stored in plain text"
    );
    let taken = login
        .take_login_state("sealed-state")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.pkce_verifier.expose_secret(), verifier);
}

#[sqlx::test]
async fn pkce_verifiers_are_sealed_at_rest_in_postgres(pool: PgPool) {
    let store = tokenproxy::store::postgres::PgStore::from_pool(pool.clone(), test_keyring());
    let raw = async {
        sqlx::query_scalar::<_, String>("SELECT pkce_verifier FROM oauth_states")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_verifier_sealed(&store, raw).await;
}

#[tokio::test]
async fn pkce_verifiers_are_sealed_at_rest_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let store = tokenproxy::store::open(
        &tokenproxy::config::DatabaseConfig {
            url: secrecy::SecretString::from(format!("sqlite://{}", path.display())),
            ..Default::default()
        },
        test_keyring(),
    )
    .unwrap();
    store.migrate().await.unwrap();
    let raw = async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query_scalar::<_, String>("SELECT pkce_verifier FROM oauth_states")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_verifier_sealed(store.as_ref(), raw).await;
}
