//! Audit: the refresh grant against the answers real providers give, not just the
//! RFC's. A token endpoint that answers a shape we cannot parse has usually
//! *already rotated* the refresh token, so a parse failure loses the user's link;
//! errors must be classified right (GitHub's HTTP 200 `bad_refresh_token`,
//! GitLab's and Google's 400 `invalid_grant`), and nothing the provider echoes
//! may reach an error message.
//!
//! Each test runs a scripted token endpoint on loopback that answers one canned
//! response and records the request it got.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretString};
use tokenproxy::config::ProviderConfig;
use tokenproxy::oauth::{ProviderClient, RefreshError, Refreshed, MAX_EXPIRES_IN};

const REFRESH: &str = "rt_secret_refresh_value_0123";

/// What the scripted endpoint answers.
#[derive(Clone)]
struct Canned {
    status: u16,
    content_type: &'static str,
    body: String,
}

/// What it was asked.
#[derive(Debug, Clone)]
struct Seen {
    accept: Option<String>,
    body: String,
}

/// A token endpoint that always answers `canned`.
struct Scripted {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    async fn start(canned: Canned) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let canned = canned.clone();
                let record = record.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                        let canned = canned.clone();
                        let record = record.clone();
                        async move {
                            let accept = req
                                .headers()
                                .get(http::header::ACCEPT)
                                .map(|v| v.to_str().unwrap().to_string());
                            let body: hyper::body::Incoming = req.into_body();
                            let body = body.collect().await.unwrap().to_bytes();
                            record.lock().push(Seen {
                                accept,
                                body: String::from_utf8_lossy(&body).into_owned(),
                            });
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(canned.status)
                                    .header("content-type", canned.content_type)
                                    .body(Full::new(Bytes::from(canned.body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }

    fn provider(&self) -> ProviderConfig {
        toml::from_str(&format!(
            "id = \"p\"\nclient_id = \"cid\"\nclient_secret = \"client_secret_value\"\ntoken_url = \"http://{}/token\"\ntimeout = \"2s\"\n",
            self.addr
        ))
        .unwrap()
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }
}

/// One refresh against an endpoint answering `status`, `content_type`, `body`.
async fn refresh_against(
    status: u16,
    content_type: &'static str,
    body: &str,
) -> (Result<Refreshed, RefreshError>, Vec<Seen>) {
    let idp = Scripted::start(Canned {
        status,
        content_type,
        body: body.to_string(),
    })
    .await;
    let client = ProviderClient::new(&idp.provider()).unwrap();
    let out = client
        .refresh(
            &SecretString::from(REFRESH.to_string()),
            Duration::from_secs(5),
        )
        .await;
    (out, idp.requests())
}

fn ok(r: Result<Refreshed, RefreshError>) -> Refreshed {
    r.unwrap_or_else(|e| panic!("expected a successful refresh, got {e}"))
}

const JSON: &str = "application/json";
const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";

#[tokio::test]
async fn the_grant_asks_for_json_and_sends_the_refresh_token() {
    // GitHub answers form-encoded unless the request accepts JSON.
    let (r, seen) = refresh_against(
        200,
        JSON,
        r#"{"access_token":"a1","token_type":"bearer","expires_in":3600}"#,
    )
    .await;
    ok(r);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].accept.as_deref(), Some("application/json"));
    assert!(seen[0].body.contains("grant_type=refresh_token"));
    assert!(seen[0].body.contains(REFRESH));
}

#[tokio::test]
async fn github_form_encoded_success_keeps_the_rotated_token() {
    let (r, _) = refresh_against(
        200,
        FORM,
        "access_token=ghu_new&expires_in=28800&refresh_token=ghr_rotated&refresh_token_expires_in=15811200&scope=&token_type=bearer",
    )
    .await;
    let r = ok(r);
    assert_eq!(r.access_token.expose_secret(), "ghu_new");
    assert_eq!(
        r.refresh_token
            .as_ref()
            .map(|t| t.expose_secret().to_string()),
        Some("ghr_rotated".into())
    );
    assert_eq!(r.expires_in, Some(Duration::from_secs(28800)));
}

#[tokio::test]
async fn github_bad_refresh_token_is_permanent_in_json_and_in_form() {
    let (r, _) = refresh_against(
        200,
        JSON,
        r#"{"error":"bad_refresh_token","error_description":"The refresh token passed is incorrect or expired.","error_uri":"https://docs.github.com"}"#,
    )
    .await;
    assert_eq!(
        r.unwrap_err(),
        RefreshError::Rejected("bad_refresh_token".into())
    );
    let (r, _) = refresh_against(
        200,
        FORM,
        "error=bad_refresh_token&error_description=The+refresh+token+passed+is+incorrect+or+expired.&error_uri=https%3A%2F%2Fdocs.github.com",
    )
    .await;
    assert_eq!(
        r.unwrap_err(),
        RefreshError::Rejected("bad_refresh_token".into())
    );
}

#[tokio::test]
async fn gitlab_and_google_invalid_grant_is_permanent() {
    let (r, _) = refresh_against(
        400,
        "application/json; charset=utf-8",
        r#"{"error":"invalid_grant","error_description":"The provided authorization grant is invalid, expired, revoked, does not match the redirection URI used in the authorization request, or was issued to another client."}"#,
    )
    .await;
    assert_eq!(
        r.unwrap_err(),
        RefreshError::Rejected("invalid_grant".into())
    );
    let (r, _) = refresh_against(400, FORM, "error=invalid_grant").await;
    assert_eq!(
        r.unwrap_err(),
        RefreshError::Rejected("invalid_grant".into())
    );
}

#[tokio::test]
async fn azure_string_expires_in_is_understood() {
    let (r, _) = refresh_against(
        200,
        "application/json; charset=utf-8",
        r#"{"token_type":"Bearer","scope":"499b84ac-1321-427f-aa17-267ca6975798/user_impersonation","expires_in":"3599","ext_expires_in":"3599","expires_on":"1700000000","access_token":"eyJ0eXAi","refresh_token":"0.AAAA-rotated"}"#,
    )
    .await;
    let r = ok(r);
    assert_eq!(r.expires_in, Some(Duration::from_secs(3599)));
    assert_eq!(
        r.refresh_token
            .as_ref()
            .map(|t| t.expose_secret().to_string()),
        Some("0.AAAA-rotated".into())
    );
}

#[tokio::test]
async fn loose_token_types_lifetimes_and_scopes_are_accepted() {
    for body in [
        // Lowercase type, no refresh token (the old one stays valid).
        r#"{"access_token":"a","token_type":"bearer","expires_in":60}"#,
        // No type at all.
        r#"{"access_token":"a","expires_in":60}"#,
        // A null type, a fractional lifetime.
        r#"{"access_token":"a","token_type":null,"expires_in":60.0}"#,
        // Scope as a list, a null refresh token.
        r#"{"access_token":"a","token_type":"Bearer","expires_in":"60","scope":["repo","user"],"refresh_token":null}"#,
    ] {
        let (r, _) = refresh_against(200, JSON, body).await;
        let r = r.unwrap_or_else(|e| panic!("{body}: {e}"));
        assert_eq!(r.access_token.expose_secret(), "a", "{body}");
        assert!(r.refresh_token.is_none(), "{body}");
        assert_eq!(r.expires_in, Some(Duration::from_secs(60)), "{body}");
    }
    // JSON labelled as text.
    let (r, _) = refresh_against(
        200,
        "text/plain",
        r#"{"access_token":"a","token_type":"bearer"}"#,
    )
    .await;
    assert_eq!(ok(r).expires_in, None);
}

#[tokio::test]
async fn an_absurd_lifetime_is_capped() {
    let (r, _) = refresh_against(
        200,
        JSON,
        r#"{"access_token":"a","token_type":"bearer","expires_in":18446744073709551615}"#,
    )
    .await;
    assert_eq!(ok(r).expires_in, Some(MAX_EXPIRES_IN));
}

#[tokio::test]
async fn invalid_client_is_the_proxys_problem_not_the_users() {
    let (r, _) = refresh_against(
        401,
        JSON,
        r#"{"error":"invalid_client","error_description":"Client authentication failed"}"#,
    )
    .await;
    assert!(matches!(r.unwrap_err(), RefreshError::Misconfigured(_)));
}

#[tokio::test]
async fn provider_echoes_never_reach_error_messages() {
    // Providers that echo the request (or a token) back in error text or in a
    // body we cannot parse.
    let cases: [(u16, &str, String); 5] = [
        (
            400,
            JSON,
            format!(
                r#"{{"error":"invalid_request","error_description":"refresh_token={REFRESH} client_secret=client_secret_value"}}"#
            ),
        ),
        (
            400,
            "text/html",
            format!("<html>bad token {REFRESH}</html>"),
        ),
        (
            200,
            JSON,
            format!(r#"{{"access_token":7,"refresh_token":"{REFRESH}"}}"#),
        ),
        (200, "text/html", format!("<html>{REFRESH}</html>")),
        (401, JSON, format!(r#"{{"error":"{REFRESH}"}}"#)),
    ];
    for (status, ct, body) in cases {
        let (r, _) = refresh_against(status, ct, &body).await;
        let err = r.expect_err(&body);
        let text = format!("{err} {err:?}");
        assert!(!text.contains(REFRESH), "{text}");
        assert!(!text.contains("client_secret_value"), "{text}");
    }
}

/// End to end through the token source: a provider claiming a lifetime past the
/// calendar's end must not crash the flight after it rotated the refresh token —
/// the rotated token is stored and the new access token served.
#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn an_absurd_lifetime_does_not_lose_the_rotated_token(pool: sqlx::PgPool) {
    use tokenproxy::config::TokensConfig;
    use tokenproxy::crypto::Keyring;
    use tokenproxy::store::postgres::PgStore;
    use tokenproxy::store::{LinkStore, TokenSet};
    use tokenproxy::telemetry::Metrics;
    use tokenproxy::tokens::{SystemClock, TokenSource};

    let idp = Scripted::start(Canned {
        status: 200,
        content_type: JSON,
        body: r#"{"access_token":"a_new","refresh_token":"rt_new","token_type":"bearer","expires_in":900000000000000}"#.into(),
    })
    .await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = uuid::Uuid::new_v4();
    store
        .put_link(
            "p",
            user,
            &TokenSet {
                access_token: SecretString::from("a_old".to_string()),
                refresh_token: SecretString::from("rt_old".to_string()),
                expiry: Some(chrono::Utc::now() - chrono::Duration::hours(1)),
                extra: None,
            },
        )
        .await
        .unwrap();
    let source = TokenSource::new(
        store.clone(),
        &[idp.provider()],
        &TokensConfig::default(),
        Metrics::new(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let token = source
        .get("p", user)
        .await
        .expect("the new token is served");
    assert_eq!(token.expose_secret(), "a_new");
    assert_eq!(idp.requests().len(), 1);
    let row = store.get_link("p", user).await.unwrap().unwrap();
    assert_eq!(row.refresh_token.expose_secret(), "rt_new");
    assert_eq!(row.access_token.expose_secret(), "a_new");
}

#[tokio::test]
async fn entra_interaction_required_means_the_user_must_sign_in_again() {
    let (r, _) = refresh_against(
        400,
        JSON,
        r#"{"error":"interaction_required","error_description":"AADSTS50076: Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication.","error_codes":[50076],"suberror":"basic_action"}"#,
    )
    .await;
    assert_eq!(
        r.unwrap_err(),
        RefreshError::Rejected("interaction_required".into())
    );
}

#[test]
fn debug_of_a_token_response_never_shows_extra_credentials() {
    let resp: oauth2::StandardTokenResponse<
        tokenproxy::oauth::OtherFields,
        oauth2::basic::BasicTokenType,
    > = serde_json::from_str(
        r#"{"access_token":"at_secret_1","refresh_token":"rt_secret_2","token_type":"bearer","id_token":"eyJ_id_secret_3"}"#,
    )
    .unwrap();
    let text = format!("{resp:?}");
    for secret in ["at_secret_1", "rt_secret_2", "eyJ_id_secret_3"] {
        assert!(!text.contains(secret), "{text}");
    }
    assert!(text.contains("id_token"), "{text}");
}

/// A provider that rejects our client (a rotated client secret) is not asked
/// again for every user and request: one rejection pauses refreshes briefly.
#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_rejected_client_does_not_hammer_the_provider(pool: sqlx::PgPool) {
    use tokenproxy::config::TokensConfig;
    use tokenproxy::crypto::Keyring;
    use tokenproxy::store::postgres::PgStore;
    use tokenproxy::store::{LinkStore, TokenSet};
    use tokenproxy::telemetry::Metrics;
    use tokenproxy::tokens::{SystemClock, TokenError, TokenSource};

    let idp = Scripted::start(Canned {
        status: 401,
        content_type: JSON,
        body: r#"{"error":"invalid_client","error_description":"Client authentication failed"}"#
            .into(),
    })
    .await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let users: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::new_v4()).collect();
    for &user in &users {
        store
            .put_link(
                "p",
                user,
                &TokenSet {
                    access_token: SecretString::from("a_old".to_string()),
                    refresh_token: SecretString::from(format!("rt_{user}")),
                    expiry: Some(chrono::Utc::now() - chrono::Duration::hours(1)),
                    extra: None,
                },
            )
            .await
            .unwrap();
    }
    let source = TokenSource::new(
        store.clone(),
        &[idp.provider()],
        &TokensConfig::default(),
        Metrics::new(),
        Arc::new(SystemClock),
    )
    .unwrap();
    for &user in &users {
        for _ in 0..2 {
            assert_eq!(
                source.get("p", user).await.unwrap_err(),
                TokenError::IdpUnavailable
            );
        }
    }
    assert_eq!(idp.requests().len(), 1, "one rejection, then a pause");
    // Nothing was recorded on any link.
    for &user in &users {
        let row = store.get_link("p", user).await.unwrap().unwrap();
        assert_eq!(row.refresh_failure_reason, "");
    }
}
