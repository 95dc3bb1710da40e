//! OIDC `id_token` verification for browser sign-in (OpenID Connect Core §3.1.3.7):
//! the signature against the provider's JWKS (`jwks_uri` from discovery, cached,
//! fetched again once when a token names an unknown key), then `iss`, `aud`,
//! `exp` and the `nonce` this sign-in sent. Only asymmetric algorithms are
//! accepted: an `HS256` token would be "signed" with our own client secret, and
//! `none` with nothing.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;
use url::Url;

use super::HttpClient;

/// Largest JWKS document read.
const MAX_JWKS: usize = 256 * 1024;

/// The claims tokenproxy reads from a verified `id_token`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Claims {
    /// Subject: the provider's id of the account.
    pub sub: String,
    /// The nonce echoed back.
    #[serde(default)]
    pub nonce: Option<String>,
    /// Display name, if the provider sends one.
    #[serde(default)]
    pub preferred_username: Option<String>,
    /// E-mail, if the provider sends one.
    #[serde(default)]
    pub email: Option<String>,
}

impl Claims {
    /// How the account is named on the result page.
    pub fn account(&self) -> String {
        self.preferred_username
            .clone()
            .or_else(|| self.email.clone())
            .unwrap_or_else(|| self.sub.clone())
    }
}

/// Verifies one provider's id_tokens.
pub struct IdTokenVerifier {
    issuer: Url,
    client_id: String,
    jwks_uri: Url,
    http: HttpClient,
    timeout: Duration,
    jwks: Mutex<Option<Arc<JwkSet>>>,
}

impl IdTokenVerifier {
    /// A verifier for tokens from `issuer` meant for `client_id`.
    pub fn new(
        issuer: Url,
        client_id: String,
        jwks_uri: Url,
        http: HttpClient,
        timeout: Duration,
    ) -> Self {
        Self {
            issuer,
            client_id,
            jwks_uri,
            http,
            timeout,
            jwks: Mutex::new(None),
        }
    }

    async fn fetch_jwks(&self) -> Result<Arc<JwkSet>, String> {
        let req = http::Request::get(self.jwks_uri.as_str())
            .header(http::header::ACCEPT, "application/json")
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(self.timeout, self.http.send(req))
            .await
            .map_err(|_| "the JWKS did not arrive in time".to_string())?
            .map_err(|e| format!("cannot fetch the JWKS: {e}"))?;
        if !resp.status().is_success() || resp.body().len() > MAX_JWKS {
            return Err(format!("the JWKS answered HTTP {}", resp.status().as_u16()));
        }
        let set: JwkSet = serde_json::from_slice(resp.body())
            .map_err(|_| "the JWKS is not a JWK set".to_string())?;
        let set = Arc::new(set);
        *self.jwks.lock() = Some(set.clone());
        Ok(set)
    }

    /// Verifies `token` and that it carries `nonce`.
    pub async fn verify(&self, token: &str, nonce: &str) -> Result<Claims, String> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| "the id_token is not a JWT".to_string())?;
        if !is_asymmetric(header.alg) {
            return Err(format!(
                "id_token algorithm {:?} is not accepted",
                header.alg
            ));
        }
        let cached = self.jwks.lock().clone();
        let set = match cached {
            Some(set) if find_key(&set, header.kid.as_deref()).is_some() => set,
            // Unknown key: the provider may have rotated; fetch once more.
            _ => self.fetch_jwks().await?,
        };
        let jwk = find_key(&set, header.kid.as_deref())
            .ok_or_else(|| "the id_token names a key the JWKS does not hold".to_string())?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| "unusable JWKS key".to_string())?;
        let mut v = Validation::new(header.alg);
        let issuer = self.issuer.as_str();
        v.set_issuer(&[issuer, issuer.trim_end_matches('/')]);
        v.set_audience(&[&self.client_id]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => "the id_token signature does not verify".to_string(),
                K::InvalidIssuer => "the id_token names another issuer".to_string(),
                K::InvalidAudience => "the id_token is meant for another client".to_string(),
                K::ExpiredSignature => "the id_token has expired".to_string(),
                _ => "the id_token is not valid".to_string(),
            }
        })?;
        let got = data.claims.nonce.as_deref().unwrap_or_default();
        if nonce.is_empty() || !crate::crypto::same_text(got, nonce) {
            return Err("the id_token's nonce is not the one this sign-in sent".into());
        }
        Ok(data.claims)
    }
}

fn is_asymmetric(alg: Algorithm) -> bool {
    !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

fn find_key<'a>(set: &'a JwkSet, kid: Option<&str>) -> Option<&'a jsonwebtoken::jwk::Jwk> {
    match kid {
        Some(kid) => set.find(kid),
        // No kid: only an unambiguous set will do.
        None if set.keys.len() == 1 => set.keys.first(),
        None => None,
    }
}
