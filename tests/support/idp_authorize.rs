//! The test IdP's authorization-code endpoint (RFC 6749 §4.1) with PKCE (RFC 7636)
//! and OIDC id_tokens, as a strict provider implements them:
//!
//! - `GET /oauth/authorize` checks `client_id`, `response_type=code`, a
//!   `redirect_uri` and an S256 `code_challenge` (plain or missing PKCE is refused),
//!   and shows a login page: a form with the account and two buttons, `#approve`
//!   and `#deny`, that a browser submits.
//! - `POST /oauth/authorize` (the form) redirects to `redirect_uri` with a
//!   single-use `code` and the `state`, or with `error=access_denied`.
//! - The token endpoint's `authorization_code` grant checks the code (unknown or
//!   reused: `invalid_grant`), the `redirect_uri` it was issued for, and
//!   `BASE64URL(SHA-256(code_verifier)) == code_challenge`; then issues tokens as
//!   a login does (retiring the account's previous refresh token) and, when
//!   `openid` was asked for, an ES256 `id_token` with `iss`, `aud`, `sub`,
//!   `nonce`, `exp`, signed by the key published at `GET /oauth/jwks`.
//! - [`IdTokenFault`] makes the next id_tokens wrong in one way each.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use uuid::Uuid;

use super::{issue, json, RefreshState, Shared};

/// One way to make an id_token wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdTokenFault {
    /// Signed by a key the JWKS does not publish (same `kid`).
    ForeignKey,
    /// A nonce other than the one asked for.
    WrongNonce,
    /// Meant for another client.
    WrongAudience,
    /// From another issuer.
    WrongIssuer,
    /// Left out of the token response.
    Missing,
}

struct PendingCode {
    account: Uuid,
    redirect_uri: String,
    challenge: String,
    nonce: Option<String>,
    openid: bool,
    used: bool,
}

/// The authorization side of the IdP's state.
pub(super) struct AuthState {
    key_pkcs8: Vec<u8>,
    foreign_pkcs8: Vec<u8>,
    codes: HashMap<String, PendingCode>,
    /// Account the login page offers (a fresh one per page when unset).
    pub(super) account: Option<Uuid>,
    pub(super) fault: Option<IdTokenFault>,
    pub(super) pages: u64,
    pub(super) code_grants: u64,
}

fn p256() -> Vec<u8> {
    let rng = ring::rand::SystemRandom::new();
    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .unwrap()
        .as_ref()
        .to_vec()
}

impl Default for AuthState {
    fn default() -> Self {
        Self {
            key_pkcs8: p256(),
            foreign_pkcs8: p256(),
            codes: HashMap::new(),
            account: None,
            fault: None,
            pages: 0,
            code_grants: 0,
        }
    }
}

fn html(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/html; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn redirect(to: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::FOUND)
        .header("location", to)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn with_query(base: &str, pairs: &[(&str, &str)]) -> String {
    let mut u = url::Url::parse(base).unwrap();
    u.query_pairs_mut().extend_pairs(pairs);
    u.to_string()
}

/// Whether this request is for the authorization side (page, form, JWKS).
pub(super) fn is_authorize(req: &Request<hyper::body::Incoming>) -> bool {
    matches!(req.uri().path(), "/oauth/authorize" | "/oauth/jwks")
}

/// Serves `/oauth/authorize` (GET: page, POST: decision) and `/oauth/jwks`.
pub(super) async fn answer(
    s: &Shared,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/oauth/jwks" {
        return json(StatusCode::OK, jwks(&s.state.lock().authorize));
    }
    let form: HashMap<String, String> = if req.method() == hyper::Method::POST {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        url::form_urlencoded::parse(&body).into_owned().collect()
    } else {
        let q = req.uri().query().unwrap_or_default().to_string();
        url::form_urlencoded::parse(q.as_bytes())
            .into_owned()
            .collect()
    };
    let get = |k: &str| form.get(k).cloned().unwrap_or_default();
    if get("client_id") != s.opts.client_id {
        return html(StatusCode::BAD_REQUEST, "unknown client_id".into());
    }
    if get("response_type") != "code" || get("redirect_uri").is_empty() {
        return html(StatusCode::BAD_REQUEST, "bad authorization request".into());
    }
    if get("code_challenge_method") != "S256" || get("code_challenge").len() < 43 {
        return html(StatusCode::BAD_REQUEST, "PKCE with S256 is required".into());
    }
    let mut st = s.state.lock();
    if !form.contains_key("decision") {
        st.authorize.pages += 1;
        let account = st.authorize.account.unwrap_or_else(Uuid::new_v4);
        return html(StatusCode::OK, login_page(&form, account));
    }
    let redirect_uri = get("redirect_uri");
    let state = get("state");
    if get("decision") != "approve" {
        return redirect(with_query(
            &redirect_uri,
            &[("error", "access_denied"), ("state", &state)],
        ));
    }
    let account: Uuid = get("account").parse().unwrap_or_else(|_| Uuid::new_v4());
    let code = format!("code_{:032x}", rand::random::<u128>());
    let nonce = form.get("nonce").cloned();
    st.authorize.codes.insert(
        code.clone(),
        PendingCode {
            account,
            redirect_uri: redirect_uri.clone(),
            challenge: get("code_challenge"),
            nonce,
            openid: get("scope").split(' ').any(|s| s == "openid"),
            used: false,
        },
    );
    redirect(with_query(
        &redirect_uri,
        &[("code", &code), ("state", &state)],
    ))
}

fn login_page(form: &HashMap<String, String>, account: Uuid) -> String {
    let esc = |v: &str| {
        v.replace('&', "&amp;")
            .replace('"', "&quot;")
            .replace('<', "&lt;")
    };
    let hidden: String = form
        .iter()
        .map(|(k, v)| {
            format!(
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">\n",
                esc(k),
                esc(v)
            )
        })
        .collect();
    format!(
        "<!doctype html><html><head><title>Test IdP sign-in</title></head><body>\n\
         <h1>Sign in to the test IdP</h1>\n<form method=\"post\" action=\"/oauth/authorize\">\n{hidden}\
         <label>Account <input id=\"account\" name=\"account\" value=\"{account}\"></label>\n\
         <button id=\"approve\" type=\"submit\" name=\"decision\" value=\"approve\">Authorize</button>\n\
         <button id=\"deny\" type=\"submit\" name=\"decision\" value=\"deny\">Cancel</button>\n\
         </form></body></html>\n"
    )
}

fn jwks(a: &AuthState) -> serde_json::Value {
    let rng = ring::rand::SystemRandom::new();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &a.key_pkcs8, &rng).unwrap();
    let point = pair.public_key().as_ref();
    serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
        "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
    }]})
}

/// The token endpoint's `authorization_code` grant (client already authenticated).
pub(super) fn exchange_code(
    s: &Shared,
    form: &HashMap<String, String>,
    issuer: &str,
) -> Response<Full<Bytes>> {
    let get = |k: &str| form.get(k).cloned().unwrap_or_default();
    let now = s.opts.clock.now();
    let mut st = s.state.lock();
    st.authorize.code_grants += 1;
    let invalid = |d: &str| {
        json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "invalid_grant", "error_description": d}),
        )
    };
    let Some(code) = st.authorize.codes.get_mut(&get("code")) else {
        return invalid("unknown code");
    };
    if code.used {
        return invalid("code already used");
    }
    code.used = true;
    if code.redirect_uri != get("redirect_uri") {
        return invalid("redirect_uri differs from the authorization request");
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, get("code_verifier").as_bytes());
    if B64.encode(digest.as_ref()) != code.challenge {
        return invalid("PKCE verification failed");
    }
    let (account, nonce, openid) = (code.account, code.nonce.clone(), code.openid);
    if let Some(old) = st.current.get(&account).cloned() {
        if let Some((_, state @ RefreshState::Current)) = st.refresh.get_mut(&old) {
            *state = RefreshState::Superseded;
        }
    }
    let expiry = s
        .opts
        .expires_in
        .map(|d| now + chrono::Duration::from_std(d).unwrap());
    let (access, refresh) = issue(s, &mut st, account, expiry);
    let mut body = serde_json::json!({
        "access_token": access, "refresh_token": refresh, "token_type": "bearer", "scope": "repo",
    });
    if let Some(d) = s.opts.expires_in {
        body["expires_in"] = d.as_secs().into();
    }
    let fault = st.authorize.fault;
    if openid && fault != Some(IdTokenFault::Missing) {
        body["id_token"] = id_token(&st.authorize, s, issuer, account, nonce, fault).into();
    }
    json(StatusCode::OK, body)
}

fn id_token(
    a: &AuthState,
    s: &Shared,
    issuer: &str,
    account: Uuid,
    nonce: Option<String>,
    fault: Option<IdTokenFault>,
) -> String {
    let now = chrono::Utc::now().timestamp();
    let f = |x| fault == Some(x);
    let claims = serde_json::json!({
        "iss": if f(IdTokenFault::WrongIssuer) { "https://evil.example".to_string() } else { issuer.to_string() },
        "aud": if f(IdTokenFault::WrongAudience) { "another-client".to_string() } else { s.opts.client_id.clone() },
        "sub": account.to_string(),
        "preferred_username": format!("user-{}", &account.to_string()[..8]),
        "nonce": if f(IdTokenFault::WrongNonce) { Some("not-the-nonce".to_string()) } else { nonce },
        "iat": now,
        "exp": now + 600,
    });
    let key = if f(IdTokenFault::ForeignKey) {
        &a.foreign_pkcs8
    } else {
        &a.key_pkcs8
    };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_der(key),
    )
    .unwrap()
}
