//! Browser sign-in, the provider side: the authorization URL (RFC 6749 §4.1 with
//! PKCE S256, RFC 7636, and an OIDC `nonce`), and the exchange of the code the
//! provider sends back for tokens, verifying the `id_token` of `oidc` providers.
//!
//! Built with the `oauth2` crate over our rustls client ([`super::http`]). What
//! the proxy does around it — state in the database, the browser cookie, storing
//! the link — lives in `proxy::login`.

use std::time::Duration;

use oauth2::basic::{BasicErrorResponse, BasicTokenType};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RequestTokenError, Scope, StandardTokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::id_token::IdTokenVerifier;
use super::{HttpClient, HttpError, OtherFields, Refreshed};
use crate::config::{ClientAuth, ProviderConfig, RESERVED_PREFIX};

/// The redirect URI registered at the provider for `provider_id`.
pub fn callback_url(public_url: &Url, provider_id: &str) -> String {
    format!(
        "{}{RESERVED_PREFIX}oauth/{provider_id}/callback",
        public_url.as_str().trim_end_matches('/')
    )
}

/// The URL that starts a sign-in for `provider_id` (add `?ticket=` for a signed one).
pub fn login_path_url(public_url: &Url, provider_id: &str) -> String {
    format!(
        "{}{RESERVED_PREFIX}oauth/{provider_id}/login",
        public_url.as_str().trim_end_matches('/')
    )
}

/// A started sign-in: where to send the browser, and what to remember.
pub struct Started {
    /// The provider's authorization URL with every parameter.
    pub url: String,
    /// The `state` parameter.
    pub state: SecretString,
    /// The PKCE verifier of the challenge in `url`.
    pub verifier: SecretString,
    /// The OIDC nonce in `url` (empty for plain OAuth2 providers).
    pub nonce: String,
}

/// A finished sign-in.
pub struct Obtained {
    /// The tokens, as a refresh would return them.
    pub tokens: Refreshed,
    /// The provider account, when the provider says (OIDC `id_token`).
    pub account: Option<String>,
}

/// Why the code exchange failed. Messages carry no secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExchangeError {
    /// The provider refused the code or the client.
    #[error("the provider refused the authorization code ({0})")]
    Refused(String),
    /// The provider could not be reached or answered unusably.
    #[error("the token exchange failed: {0}")]
    Failed(String),
    /// The `id_token` did not verify.
    #[error("{0}")]
    IdToken(String),
}

type Resp = StandardTokenResponse<OtherFields, BasicTokenType>;

/// One provider's authorization-code client.
pub struct AuthorizeClient {
    client_id: ClientId,
    client_secret: Option<SecretString>,
    auth_url: AuthUrl,
    token_url: TokenUrl,
    redirect: RedirectUrl,
    scopes: Vec<String>,
    auth: ClientAuth,
    timeout: Duration,
    extra_fields: Vec<String>,
    id_token: Option<IdTokenVerifier>,
    http: HttpClient,
}

impl AuthorizeClient {
    /// The client for `cfg`, redirecting to `public_url`; `None` when the
    /// provider has no authorization endpoint.
    pub fn new(cfg: &ProviderConfig, public_url: &Url) -> Result<Option<Self>, String> {
        let Some(authorize) = &cfg.authorize_url else {
            return Ok(None);
        };
        let http = HttpClient::new(cfg.token_ca.as_deref())
            .map_err(|e| format!("provider {}: {e}", cfg.id))?;
        let redirect = RedirectUrl::new(callback_url(public_url, &cfg.id))
            .map_err(|e| format!("server.public_url: {e}"))?;
        let oidc = cfg.preset.as_deref() == Some("oidc") || cfg.jwks_uri.is_some();
        let id_token = if oidc {
            let (Some(issuer), Some(jwks)) = (cfg.issuer.clone(), cfg.jwks_uri.clone()) else {
                return Err(format!(
                    "provider {}: an OIDC provider needs `issuer` and a `jwks_uri` (from discovery \
                     or configured) to verify id_tokens",
                    cfg.id
                ));
            };
            Some(IdTokenVerifier::new(
                issuer,
                cfg.client_id.clone(),
                jwks,
                http.clone(),
                cfg.timeout,
            ))
        } else {
            None
        };
        Ok(Some(Self {
            client_id: ClientId::new(cfg.client_id.clone()),
            client_secret: cfg.client_secret.clone(),
            auth_url: AuthUrl::from_url(authorize.clone()),
            token_url: TokenUrl::from_url(cfg.token_url.clone()),
            redirect,
            scopes: cfg.scopes.clone(),
            auth: cfg.client_auth,
            timeout: cfg.timeout,
            extra_fields: cfg.extra_fields.clone(),
            id_token,
            http,
        }))
    }

    fn client(
        &self,
    ) -> oauth2::Client<
        BasicErrorResponse,
        Resp,
        oauth2::basic::BasicTokenIntrospectionResponse,
        oauth2::StandardRevocableToken,
        oauth2::basic::BasicRevocationErrorResponse,
        oauth2::EndpointSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointSet,
    > {
        let mut c = oauth2::Client::new(self.client_id.clone())
            .set_auth_uri(self.auth_url.clone())
            .set_token_uri(self.token_url.clone())
            .set_redirect_uri(self.redirect.clone())
            .set_auth_type(match self.auth {
                ClientAuth::ClientSecretBasic => AuthType::BasicAuth,
                ClientAuth::ClientSecretPost => AuthType::RequestBody,
            });
        if let Some(s) = &self.client_secret {
            c = c.set_client_secret(ClientSecret::new(s.expose_secret().to_string()));
        }
        c
    }

    /// A new sign-in: fresh state, PKCE pair and (OIDC) nonce.
    pub fn start(&self) -> Started {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let client = self.client();
        let mut req = client
            .authorize_url(CsrfToken::new_random)
            .add_scopes(self.scopes.iter().cloned().map(Scope::new))
            .set_pkce_challenge(challenge);
        let nonce = if self.id_token.is_some() {
            CsrfToken::new_random().secret().clone()
        } else {
            String::new()
        };
        if !nonce.is_empty() {
            req = req.add_extra_param("nonce", nonce.clone());
        }
        let (url, state) = req.url();
        Started {
            url: url.to_string(),
            state: SecretString::from(state.secret().clone()),
            verifier: SecretString::from(verifier.secret().clone()),
            nonce,
        }
    }

    /// Exchanges `code` (with the sign-in's PKCE verifier) and verifies the
    /// `id_token` against `nonce` for OIDC providers.
    pub async fn exchange(
        &self,
        code: &str,
        verifier: &SecretString,
        nonce: &str,
    ) -> Result<Obtained, ExchangeError> {
        let client = self.client();
        let req = client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.expose_secret().to_string()));
        let resp = tokio::time::timeout(self.timeout, req.request_async(&self.http))
            .await
            .map_err(|_| ExchangeError::Failed("no answer in time".into()))?
            .map_err(describe)?;
        let account = match &self.id_token {
            None => None,
            Some(v) => {
                let token = resp
                    .extra_fields()
                    .fields
                    .get("id_token")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| {
                        ExchangeError::IdToken("the token response has no id_token".into())
                    })?;
                let claims = v
                    .verify(token, nonce)
                    .await
                    .map_err(ExchangeError::IdToken)?;
                Some(claims.account())
            }
        };
        Ok(Obtained {
            tokens: super::accept(&self.extra_fields, resp),
            account,
        })
    }
}

fn describe(e: RequestTokenError<HttpError, BasicErrorResponse>) -> ExchangeError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let code = serde_json::to_value(r.error())
                .ok()
                .and_then(|v| v.as_str().map(super::printable_code))
                .unwrap_or_else(|| "unrecognised error code".into());
            ExchangeError::Refused(code)
        }
        RequestTokenError::Request(e) => ExchangeError::Failed(e.to_string()),
        RequestTokenError::Parse(e, _) => {
            ExchangeError::Failed(format!("unparseable token response at {}", e.path()))
        }
        RequestTokenError::Other(m) => ExchangeError::Failed(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(extra: &str) -> ProviderConfig {
        toml::from_str(&format!(
            "id = \"gh\"\nclient_id = \"cid\"\ntoken_url = \"https://idp.example/token\"\n\
             authorize_url = \"https://idp.example/authorize\"\nscopes = [\"repo\", \"read:user\"]\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn the_authorization_url_carries_state_pkce_s256_scopes_and_redirect() {
        let public = Url::parse("https://proxy.example/base/").unwrap();
        let c = AuthorizeClient::new(&provider(""), &public)
            .unwrap()
            .unwrap();
        let s = c.start();
        let url = Url::parse(&s.url).unwrap();
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["client_id"], "cid");
        assert_eq!(q["state"], s.state.expose_secret());
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["scope"], "repo read:user");
        assert_eq!(
            q["redirect_uri"],
            "https://proxy.example/base/_tokenproxy/oauth/gh/callback"
        );
        // S256: BASE64URL(SHA-256(verifier)), RFC 7636 §4.2.
        use base64::Engine;
        let digest =
            ring::digest::digest(&ring::digest::SHA256, s.verifier.expose_secret().as_bytes());
        assert_eq!(
            q["code_challenge"],
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
        );
        assert!(!q.contains_key("nonce"), "plain OAuth2 sends no nonce");
        assert_ne!(c.start().state.expose_secret(), s.state.expose_secret());
    }

    #[test]
    fn oidc_needs_a_jwks_and_sends_a_nonce() {
        let public = Url::parse("https://proxy.example").unwrap();
        let e = AuthorizeClient::new(&provider("preset = \"oidc\"\n"), &public)
            .err()
            .unwrap();
        assert!(e.contains("jwks_uri"), "{e}");
        let c = AuthorizeClient::new(
            &provider(
                "issuer = \"https://idp.example\"\njwks_uri = \"https://idp.example/jwks\"\n",
            ),
            &public,
        )
        .unwrap()
        .unwrap();
        let s = c.start();
        assert!(s.url.contains(&format!("nonce={}", s.nonce)), "{}", s.url);
        assert!(s.nonce.len() >= 20);
    }
}
