//! Browser sign-in on the proxy listener: `GET /_tokenproxy/oauth/{provider}/login`
//! and `GET /_tokenproxy/oauth/{provider}/callback` (issue 13, item 2), and the
//! signed login URLs of `link login-url` and of `link_missing` /
//! `reauth_required` errors (item 4).
//!
//! Who may start a sign-in for a user: a caller presenting its proxy token (a
//! browser asked with `WWW-Authenticate: Basic` sends it as the password), or
//! anyone holding a signed login URL for that user and provider
//! ([`crate::oauth::ticket`]), which is spent by starting. Starting stores the
//! state (hashed), PKCE verifier and nonce in the database for 10 minutes and
//! sets an HttpOnly, SameSite=Lax cookie whose hash the state row keeps: the
//! callback takes the row (single use across replicas) and must come from the
//! same browser, so a callback URL sent to someone else links nothing. Every
//! refusal is a 400 page with the reason, stores nothing, and writes an audit
//! line (`link_login_failed`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use chrono::Utc;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use url::Url;
use uuid::Uuid;

use super::caller::CallerIdentity;
use super::login_page::{self as page, escape};
use super::ProxyBody;
use crate::config::Config;
use crate::oauth::authorize::{self, AuthorizeClient};
use crate::oauth::ticket::{TicketKeys, MAX_TTL};
use crate::store::login::{BeginLogin, LoginState, SpentTicket};
use crate::store::LinkStore;
use crate::telemetry::audit::{self, Actor};

/// How long a started sign-in (state, cookie) is accepted.
pub const STATE_TTL: Duration = Duration::from_secs(600);

/// Lifetime of the `login_url` in `link_missing` / `reauth_required` errors.
pub const ERROR_LOGIN_TTL: Duration = Duration::from_secs(600);

/// Browser sign-in for every provider with an authorization endpoint.
pub struct Login {
    public_url: Url,
    secure: bool,
    clients: HashMap<String, AuthorizeClient>,
    tickets: Option<TicketKeys>,
    store: Arc<dyn LinkStore>,
    /// Told about each link a sign-in stores, so this replica's next request
    /// does not wait for the change notification to forget "no link".
    tokens: Option<Arc<dyn super::TokenLookup>>,
}

/// A refused sign-in: the page's reason, and the audit line's.
struct Refusal {
    reason: String,
    code: &'static str,
}

fn refuse(code: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal {
        reason: reason.into(),
        code,
    }
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

impl Login {
    /// Tells `tokens` about every link a sign-in stores.
    pub fn with_tokens(mut self, tokens: Arc<dyn super::TokenLookup>) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// Sign-in as `config` describes it; `None` without `server.public_url`.
    pub fn from_config(config: &Config, store: Arc<dyn LinkStore>) -> anyhow::Result<Option<Self>> {
        let Some(public_url) = config.server.public_url.clone() else {
            return Ok(None);
        };
        let mut clients = HashMap::new();
        for p in &config.providers {
            if let Some(c) = AuthorizeClient::new(p, &public_url).map_err(anyhow::Error::msg)? {
                clients.insert(p.id.clone(), c);
            }
        }
        Ok(Some(Self {
            secure: public_url.scheme() == "https",
            public_url,
            clients,
            tickets: TicketKeys::derive(&config.encryption_keys()),
            store,
            tokens: None,
        }))
    }

    /// A signed, single-use URL starting a sign-in of `user` at `provider`, valid
    /// for `ttl`; `None` when the provider has no browser sign-in or no
    /// encryption key is configured to sign with.
    pub fn login_url(&self, provider: &str, user: Uuid, ttl: Duration) -> Option<String> {
        let keys = self.tickets.as_ref()?;
        self.clients.get(provider)?;
        let ttl = chrono::Duration::from_std(ttl.min(MAX_TTL)).ok()?;
        let ticket = keys.issue(provider, user, Utc::now() + ttl);
        Some(format!(
            "{}?ticket={ticket}",
            authorize::login_path_url(&self.public_url, provider)
        ))
    }

    /// Answers `oauth/{provider}/{action}` under the reserved prefix.
    pub async fn handle<B>(
        &self,
        req: &Request<B>,
        callers: &CallerIdentity,
        provider: &str,
        action: &str,
    ) -> Response<ProxyBody> {
        if req.method() != http::Method::GET {
            return page::page(
                StatusCode::METHOD_NOT_ALLOWED,
                "Not allowed",
                "<p>Only GET is served here.</p>",
            );
        }
        let Some(client) = self.clients.get(provider) else {
            return page::page(
                StatusCode::NOT_FOUND,
                "Unknown provider",
                "<p>This provider has no browser sign-in.</p>",
            );
        };
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        let result = match action {
            "login" => self.login(req, callers, provider, client, &query).await,
            "callback" => self.callback(req, provider, client, &query).await,
            _ => {
                return page::page(StatusCode::NOT_FOUND, "Not found", "<p>No such page.</p>");
            }
        };
        match result {
            Ok(resp) => resp,
            Err(Outcome::Refused(r, user)) => {
                audit::link_login_failed(provider, user, action, r.code);
                page::refused(&r.reason)
            }
            Err(Outcome::Answer(resp)) => resp,
        }
    }

    async fn login<B>(
        &self,
        req: &Request<B>,
        callers: &CallerIdentity,
        provider: &str,
        client: &AuthorizeClient,
        query: &HashMap<String, String>,
    ) -> Result<Response<ProxyBody>, Outcome> {
        let (user, ticket) = match query.get("ticket") {
            Some(t) => {
                let keys = self.tickets.as_ref().ok_or_else(|| {
                    Outcome::refused(refuse("ticket_invalid", "login links are not enabled"))
                })?;
                let t = keys
                    .verify(t, provider, Utc::now())
                    .map_err(|e| Outcome::refused(refuse("ticket_invalid", e.to_string())))?;
                let spent = SpentTicket {
                    id: t.id,
                    expires_at: t.expires_at,
                };
                (t.user_id, Some(spent))
            }
            None => {
                let caller = callers
                    .identify(req.headers())
                    .await
                    .map_err(|e| Outcome::Answer(e.to_response(Some(provider))))?;
                if !caller.may_use(provider) {
                    return Err(Outcome::Answer(
                        super::ProxyError::Forbidden.to_response(Some(provider)),
                    ));
                }
                (caller.user_id, None)
            }
        };
        let store = self.store.login_store().ok_or_else(unavailable)?;
        let started = client.start();
        let browser = B64.encode(rand::random::<[u8; 32]>());
        let state = LoginState {
            state_hash: sha256_hex(started.state.expose_secret()),
            provider_id: provider.to_string(),
            user_id: user,
            browser_hash: sha256_hex(&browser),
            pkce_verifier: started.verifier,
            nonce: started.nonce,
            expires_at: Utc::now()
                + chrono::Duration::from_std(STATE_TTL).expect("ten minutes fit"),
        };
        match store.begin_login(&state, ticket.as_ref()).await {
            Ok(BeginLogin::Started) => {}
            Ok(BeginLogin::TicketAlreadyUsed) => {
                return Err(Outcome::Refused(
                    refuse("ticket_used", "this login link was already used"),
                    Some(user),
                ))
            }
            Err(_) => return Err(unavailable()),
        }
        let mut resp = page::page(
            StatusCode::FOUND,
            "Redirecting",
            "<p>Continuing at the provider.</p>",
        );
        let h = resp.headers_mut();
        let location = HeaderValue::from_str(&started.url).map_err(|_| unavailable())?;
        h.insert(header::LOCATION, location);
        h.insert(header::SET_COOKIE, self.cookie(provider, &browser));
        Ok(resp)
    }

    async fn callback<B>(
        &self,
        req: &Request<B>,
        provider: &str,
        client: &AuthorizeClient,
        query: &HashMap<String, String>,
    ) -> Result<Response<ProxyBody>, Outcome> {
        let state = query
            .get("state")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Outcome::refused(refuse("state_missing", "the provider sent no state"))
            })?;
        let store = self.store.login_store().ok_or_else(unavailable)?;
        // Taken before anything else is checked: whatever happens next, this
        // state is spent, on every replica.
        let row = store
            .take_login_state(&sha256_hex(state))
            .await
            .map_err(|_| unavailable())?
            .ok_or_else(|| {
                Outcome::refused(refuse(
                    "state_unknown",
                    "this sign-in is unknown or was already completed",
                ))
            })?;
        let user = Some(row.user_id);
        let fail = |code, reason: String| Outcome::Refused(refuse(code, reason), user);
        if row.provider_id != provider {
            return Err(fail(
                "state_foreign",
                "this sign-in was started for another provider".into(),
            ));
        }
        if row.expires_at <= Utc::now() {
            return Err(fail(
                "state_expired",
                "this sign-in has expired (10 minutes)".into(),
            ));
        }
        let cookie = page::read_cookie(req.headers(), &page::cookie_name(provider));
        let bound =
            cookie.is_some_and(|c| crate::crypto::same_text(&sha256_hex(&c), &row.browser_hash));
        if !bound {
            return Err(fail(
                "browser_mismatch",
                "this sign-in was started in another browser".into(),
            ));
        }
        if let Some(err) = query.get("error") {
            let code = crate::oauth::printable_code(err);
            return Err(fail(
                "provider_error",
                format!("the provider answered {code}"),
            ));
        }
        let code = query
            .get("code")
            .filter(|c| !c.is_empty())
            .ok_or_else(|| fail("code_missing", "the provider sent no code".into()))?;
        let obtained = client
            .exchange(code, &row.pkce_verifier, &row.nonce)
            .await
            .map_err(|e| fail("exchange_failed", e.to_string()))?;
        self.store_link(provider, row.user_id, obtained.tokens)
            .await?;
        let account = obtained
            .account
            .map(|a| format!("the account <b id=\"account\">{}</b>", escape(&a)))
            .unwrap_or_else(|| "your account".to_string());
        let mut resp = page::page(
            StatusCode::OK,
            "Account linked",
            &format!(
                "<p>tokenproxy now uses {account} at <b id=\"provider\">{}</b> for user \
                 <code id=\"user\">{}</code>.</p>\n<p>You can close this page.</p>",
                escape(provider),
                row.user_id
            ),
        );
        resp.headers_mut()
            .insert(header::SET_COOKIE, self.cookie(provider, ""));
        Ok(resp)
    }

    async fn store_link(
        &self,
        provider: &str,
        user: Uuid,
        t: crate::oauth::Refreshed,
    ) -> Result<(), Outcome> {
        let tokens = crate::links::device::token_set(t, Utc::now());
        crate::links::store_login(&*self.store, provider, user, &tokens, Actor::Browser)
            .await
            .map_err(|_| unavailable())?;
        if let Some(tokens) = &self.tokens {
            tokens.link_changed(provider, user).await;
        }
        Ok(())
    }

    fn cookie(&self, provider: &str, value: &str) -> HeaderValue {
        let path = format!(
            "{}{}oauth/{provider}/",
            self.public_url.path().trim_end_matches('/'),
            crate::config::RESERVED_PREFIX
        );
        let c = page::set_cookie(provider, value, &path, self.secure, STATE_TTL.as_secs());
        HeaderValue::from_str(&c).expect("cookie built from URL-safe parts")
    }
}

/// How a handler ends when it does not succeed.
enum Outcome {
    /// A refusal, shown as a 400 page and audited (with the user when known).
    Refused(Refusal, Option<Uuid>),
    /// Another answer (401 for a missing proxy token, 503 for the store).
    Answer(Response<ProxyBody>),
}

impl Outcome {
    fn refused(r: Refusal) -> Self {
        Self::Refused(r, None)
    }
}

fn unavailable() -> Outcome {
    Outcome::Answer(page::page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Try again",
        "<p>The link store is unavailable; nothing was linked. Try again shortly.</p>",
    ))
}
