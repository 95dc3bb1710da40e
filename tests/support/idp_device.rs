//! The test IdP's device authorization grant (RFC 8628) and token revocation
//! (RFC 7009, and GitHub's grant API), behaving like strict real providers:
//!
//! - `POST /oauth/device` issues a device code and user code (`interval` 1 s by
//!   default, [`Idp::set_device_interval`]); the test plays the user with
//!   [`Idp::device_approve`], [`Idp::device_deny`] or [`Idp::device_expire`].
//! - Polls of the token endpoint answer `authorization_pending`, `access_denied`,
//!   `expired_token` or the tokens (once: a device code is single-use). A poll
//!   sooner than `interval` after the previous one is answered `slow_down` and
//!   counted ([`Idp::device_too_fast`]), and the code's interval grows by 5 s, as
//!   RFC 8628 §3.5 says; [`Idp::device_force_slow_down`] makes the next poll get
//!   `slow_down` however patient the client was.
//! - `POST /oauth/revoke` (RFC 7009) revokes a refresh token (ending the grant:
//!   the user's refresh and access tokens stop working) or one access token;
//!   `DELETE …/applications/{client_id}/grant` does GitHub's grant deletion.
//!   Both count ([`Idp::revocations`]) and can be made to fail with 503.
//!
//! Device polls and revocations are not token refreshes: they do not count in
//! [`Idp::grants`].

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper::{Response, StatusCode};

use super::{issue, json, RefreshState, Shared};

/// Where one device code stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Pending,
    Approved(uuid::Uuid),
    Denied,
    Expired,
    /// Tokens were issued for it.
    Used,
}

struct Code {
    user_code: String,
    grant: Grant,
    interval: Duration,
    expires_at: DateTime<Utc>,
    last_poll: Option<tokio::time::Instant>,
}

/// The device and revocation state of the IdP.
#[derive(Default)]
pub(super) struct DeviceState {
    codes: HashMap<String, Code>,
    interval_secs: Option<u64>,
    force_slow_down: u32,
    polls: Vec<(tokio::time::Instant, &'static str)>,
    too_fast: u64,
    authorizations: u64,
    revocations: u64,
    revoked_tokens: Vec<String>,
    revocation_fails: bool,
    last_user_code: Option<String>,
    received: usize,
}

/// The grant type of a device-code poll.
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Whether this module serves the request; counts device polls as they arrive
/// (before any latency), see [`Idp::device_polls_received`].
pub(super) fn serves(s: &Shared, parts: &http::request::Parts, body: &Bytes) -> bool {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let poll = parts.method == http::Method::POST
        && parts.uri.path() == "/oauth/token"
        && form.get("grant_type").map(String::as_str) == Some(DEVICE_GRANT);
    if poll {
        s.state.lock().device.received += 1;
    }
    let p = parts.uri.path();
    poll || (parts.method == http::Method::POST
        && matches!(p, "/oauth/device" | "/oauth/revoke" | "/device"))
        || (parts.method == http::Method::DELETE
            && p.ends_with("/grant")
            && p.contains("/applications/"))
}

/// Answers the requests this module serves; `None` for everything else.
pub(super) fn answer(
    s: &Shared,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Option<Response<Full<Bytes>>> {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let path = parts.uri.path();
    match (&parts.method, path) {
        (&http::Method::POST, "/oauth/device") => Some(authorize(s, parts, &form)),
        (&http::Method::POST, "/oauth/token")
            if form.get("grant_type").map(String::as_str) == Some(DEVICE_GRANT) =>
        {
            Some(poll(s, parts, &form))
        }
        (&http::Method::POST, "/oauth/revoke") => Some(revoke(s, parts, &form)),
        (&http::Method::POST, "/device") => Some(verify(s, &form)),
        (&http::Method::DELETE, p) if p.ends_with("/grant") && p.contains("/applications/") => {
            Some(github_grant(s, parts, body))
        }
        _ => None,
    }
}

/// The client id and secret the request authenticates with (Basic or form).
fn client(parts: &http::request::Parts, form: &HashMap<String, String>) -> (String, String) {
    let basic = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let dec = |x: &str| {
        url::form_urlencoded::parse(format!("x={x}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    match basic {
        Some(b) => {
            let (id, secret) = b.split_once(':').unwrap_or((&b, ""));
            (dec(id), dec(secret))
        }
        None => (
            form.get("client_id").cloned().unwrap_or_default(),
            form.get("client_secret").cloned().unwrap_or_default(),
        ),
    }
}

fn client_ok(s: &Shared, parts: &http::request::Parts, form: &HashMap<String, String>) -> bool {
    let (id, secret) = client(parts, form);
    id == s.opts.client_id && secret == s.opts.client_secret
}

fn error(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": code }))
}

fn authorize(
    s: &Shared,
    parts: &http::request::Parts,
    form: &HashMap<String, String>,
) -> Response<Full<Bytes>> {
    if !client_ok(s, parts, form) {
        return error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let mut st = s.state.lock();
    let d = &mut st.device;
    d.authorizations += 1;
    let n = d.authorizations;
    let device_code = format!("dc_{n}_{:016x}", rand::random::<u64>());
    let user_code = format!("{:04X}-{:04X}", rand::random::<u16>(), n as u16);
    let interval = d.interval_secs.unwrap_or(1);
    let expires_in = 600u64;
    d.codes.insert(
        device_code.clone(),
        Code {
            user_code: user_code.clone(),
            grant: Grant::Pending,
            interval: Duration::from_secs(interval),
            expires_at: s.opts.clock.now() + chrono::Duration::seconds(expires_in as i64),
            last_poll: None,
        },
    );
    d.last_user_code = Some(user_code.clone());
    let host = parts
        .headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let scheme = if s.opts.tls.is_some() {
        "https"
    } else {
        "http"
    };
    json(
        StatusCode::OK,
        serde_json::json!({
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": format!("{scheme}://{host}/device"),
            "verification_uri_complete": format!("{scheme}://{host}/device?user_code={user_code}"),
            "expires_in": expires_in,
            "interval": interval,
        }),
    )
}

fn poll(
    s: &Shared,
    parts: &http::request::Parts,
    form: &HashMap<String, String>,
) -> Response<Full<Bytes>> {
    if !client_ok(s, parts, form) {
        return error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let presented = form.get("device_code").cloned().unwrap_or_default();
    let now = s.opts.clock.now();
    let arrived = tokio::time::Instant::now();
    let mut st = s.state.lock();
    let d = &mut st.device;
    let forced = d.force_slow_down > 0;
    let Some(code) = d.codes.get_mut(&presented) else {
        d.polls.push((arrived, "invalid_grant"));
        return error(StatusCode::BAD_REQUEST, "invalid_grant");
    };
    let too_fast = code
        .last_poll
        .is_some_and(|last| arrived.duration_since(last) < code.interval);
    code.last_poll = Some(arrived);
    if code.grant == Grant::Pending && now >= code.expires_at {
        code.grant = Grant::Expired;
    }
    let answer = if too_fast || forced {
        // RFC 8628 §3.5: the client must add 5 s to its interval from now on.
        code.interval += Duration::from_secs(5);
        "slow_down"
    } else {
        match code.grant {
            Grant::Pending => "authorization_pending",
            Grant::Denied => "access_denied",
            Grant::Expired => "expired_token",
            Grant::Used => "invalid_grant",
            Grant::Approved(_) => "tokens",
        }
    };
    let grant = code.grant;
    if too_fast {
        d.too_fast += 1;
    } else if forced {
        d.force_slow_down -= 1;
    }
    d.polls.push((arrived, answer));
    if answer != "tokens" {
        return error(StatusCode::BAD_REQUEST, answer);
    }
    let Grant::Approved(user) = grant else {
        unreachable!("tokens only for an approved code")
    };
    d.codes.get_mut(&presented).expect("present").grant = Grant::Used;
    let expiry = s
        .opts
        .expires_in
        .map(|e| now + chrono::Duration::from_std(e).unwrap());
    // A new login replaces the user's grant, as at real providers.
    if let Some(old) = st.current.get(&user).cloned() {
        if let Some((_, state @ RefreshState::Current)) = st.refresh.get_mut(&old) {
            *state = RefreshState::Superseded;
        }
    }
    let (access, refresh) = issue(s, &mut st, user, expiry);
    let mut body = serde_json::json!({
        "access_token": access,
        "refresh_token": refresh,
        "token_type": "bearer",
        "scope": "repo",
    });
    if let Some(e) = s.opts.expires_in {
        body["expires_in"] = e.as_secs().into();
    }
    if let Some(r) = s.opts.refresh_token_expires_in {
        body["refresh_token_expires_in"] = r.into();
    }
    json(StatusCode::OK, body)
}

/// The verification page's form (`verification_uri`), as a signed-in user submits
/// it: `user_code`, `account` and `decision=approve` (else denied). 404 for a code
/// this IdP never issued.
fn verify(s: &Shared, form: &HashMap<String, String>) -> Response<Full<Bytes>> {
    let get = |k: &str| form.get(k).cloned().unwrap_or_default();
    let account: uuid::Uuid = get("account")
        .parse()
        .unwrap_or_else(|_| uuid::Uuid::new_v4());
    let mut st = s.state.lock();
    let Some(code) = st
        .device
        .codes
        .values_mut()
        .find(|c| c.user_code == get("user_code") && c.grant == Grant::Pending)
    else {
        return error(StatusCode::NOT_FOUND, "unknown_user_code");
    };
    code.grant = if get("decision") == "approve" {
        Grant::Approved(account)
    } else {
        Grant::Denied
    };
    json(StatusCode::OK, serde_json::json!({"done": true}))
}

/// Ends the grant of `user`: their refresh and access tokens stop working.
fn end_grant(st: &mut super::State, user: uuid::Uuid) {
    for (_, (u, s)) in st.refresh.iter_mut() {
        if *u == user {
            *s = RefreshState::Revoked;
        }
    }
    for (_, (u, _, revoked)) in st.access.iter_mut() {
        if *u == user {
            *revoked = true;
        }
    }
    st.current.remove(&user);
}

fn revoke(
    s: &Shared,
    parts: &http::request::Parts,
    form: &HashMap<String, String>,
) -> Response<Full<Bytes>> {
    let mut st = s.state.lock();
    if st.device.revocation_fails {
        return json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({}));
    }
    if !client_ok(s, parts, form) {
        return error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let token = form.get("token").cloned().unwrap_or_default();
    st.device.revocations += 1;
    st.device.revoked_tokens.push(token.clone());
    if let Some((user, _)) = st.refresh.get(&token).copied() {
        end_grant(&mut st, user);
    } else if let Some(entry) = st.access.get_mut(&token) {
        entry.2 = true;
    }
    // RFC 7009 §2.2: 200 whether or not the token was known.
    json(StatusCode::OK, serde_json::json!({}))
}

fn github_grant(s: &Shared, parts: &http::request::Parts, body: &Bytes) -> Response<Full<Bytes>> {
    let mut st = s.state.lock();
    if st.device.revocation_fails {
        return json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({}));
    }
    let (id, secret) = client(parts, &HashMap::new());
    let in_path = parts
        .uri
        .path()
        .contains(&format!("/applications/{}/grant", s.opts.client_id));
    if id != s.opts.client_id || secret != s.opts.client_secret || !in_path {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"message": "Not Found"}),
        );
    }
    if parts.headers.get("user-agent").is_none() {
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!({"message": "User-Agent required"}),
        );
    }
    let token: String = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["access_token"].as_str().map(str::to_string))
        .unwrap_or_default();
    let Some((user, _, _)) = st.access.get(&token).copied() else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"message": "Not Found"}),
        );
    };
    st.device.revocations += 1;
    st.device.revoked_tokens.push(token);
    end_grant(&mut st, user);
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

impl super::Idp {
    /// Seconds between polls in the device codes issued from now on (default 1).
    pub fn set_device_interval(&self, secs: u64) {
        self.shared.state.lock().device.interval_secs = Some(secs);
    }

    /// The user code of the latest device authorization, if any.
    pub fn last_user_code(&self) -> Option<String> {
        self.shared.state.lock().device.last_user_code.clone()
    }

    fn set_grant(&self, user_code: &str, grant: Grant) {
        let mut st = self.shared.state.lock();
        let code = st
            .device
            .codes
            .values_mut()
            .find(|c| c.user_code == user_code)
            .expect("a user code this IdP issued");
        code.grant = grant;
    }

    /// The user approves `user_code` as `user`.
    pub fn device_approve(&self, user_code: &str, user: uuid::Uuid) {
        self.set_grant(user_code, Grant::Approved(user));
    }

    /// The user denies `user_code`.
    pub fn device_deny(&self, user_code: &str) {
        self.set_grant(user_code, Grant::Denied);
    }

    /// `user_code` expires now.
    pub fn device_expire(&self, user_code: &str) {
        self.set_grant(user_code, Grant::Expired);
    }

    /// The next `n` polls get `slow_down`, however patient the client was.
    pub fn device_force_slow_down(&self, n: u32) {
        self.shared.state.lock().device.force_slow_down += n;
    }

    /// Every device-code poll: when it arrived and what it was answered.
    pub fn device_polls(&self) -> Vec<(tokio::time::Instant, &'static str)> {
        self.shared.state.lock().device.polls.clone()
    }

    /// Polls that came sooner than the code's interval allowed.
    pub fn device_too_fast(&self) -> u64 {
        self.shared.state.lock().device.too_fast
    }

    /// Device-code polls received, counted on arrival (before latency).
    pub fn device_polls_received(&self) -> usize {
        self.shared.state.lock().device.received
    }

    /// Device authorizations issued.
    pub fn device_authorizations(&self) -> u64 {
        self.shared.state.lock().device.authorizations
    }

    /// Revocations performed (RFC 7009 and GitHub's grant API).
    pub fn revocations(&self) -> u64 {
        self.shared.state.lock().device.revocations
    }

    /// The tokens presented for revocation, in order.
    pub fn revoked_tokens(&self) -> Vec<String> {
        self.shared.state.lock().device.revoked_tokens.clone()
    }

    /// Makes revocation answer 503 (`true`) or work again (`false`).
    pub fn set_revocation_failing(&self, failing: bool) {
        self.shared.state.lock().device.revocation_fails = failing;
    }
}
