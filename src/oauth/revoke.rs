//! Revoking a user's grant at the provider when their link is deleted, so an
//! unlinked account leaves no live token behind.
//!
//! Two dialects: RFC 7009 (`POST revocation_url` with the refresh token, or the
//! access token when there is none; the `oauth2` crate builds it and insists on
//! HTTPS, as §2 requires), and GitHub's grant API (`DELETE
//! <api>/applications/{client_id}/grant` with the client's Basic credentials and
//! the access token in a JSON body), which deletes every token of the grant.

use std::time::Duration;

use base64::Engine;
use oauth2::basic::{BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenType};
use oauth2::{
    AccessToken, AuthType, ClientSecret, RefreshToken, RequestTokenError, RevocationUrl,
    StandardRevocableToken,
};
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::{HttpError, OtherFields, ProviderClient};
use crate::config::{ClientAuth, ProviderConfig};

/// Longest a revocation request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// How one provider revokes.
enum How {
    /// RFC 7009 endpoint.
    Rfc7009(RevocationUrl),
    /// GitHub's `DELETE /applications/{client_id}/grant` at this full URL.
    GitHubGrant(Url),
}

/// One provider's revocation.
pub struct Revoker {
    client: ProviderClient,
    how: How,
}

/// Whether the preset revokes through GitHub's grant API.
fn is_github(cfg: &ProviderConfig) -> bool {
    matches!(cfg.preset.as_deref(), Some("github" | "github-app"))
}

/// GitHub's grant URL for `cfg`: `revocation_url` when written, else the API of
/// github.com or of the Enterprise Server at `base_url`.
fn github_grant_url(cfg: &ProviderConfig) -> Result<Url, String> {
    if let Some(u) = &cfg.revocation_url {
        return Ok(u.clone());
    }
    let api = match &cfg.base_url {
        None => "https://api.github.com".to_string(),
        Some(b) => format!("{}/api/v3", b.as_str().trim_end_matches('/')),
    };
    let text = format!("{api}/applications/{}/grant", cfg.client_id);
    Url::parse(&text).map_err(|e| format!("GitHub grant URL `{text}`: {e}"))
}

impl Revoker {
    /// The revocation of `cfg`; `Ok(None)` when it has none configured.
    pub fn new(cfg: &ProviderConfig) -> Result<Option<Self>, String> {
        let how = if is_github(cfg) {
            How::GitHubGrant(github_grant_url(cfg)?)
        } else if let Some(u) = &cfg.revocation_url {
            How::Rfc7009(RevocationUrl::from_url(u.clone()))
        } else {
            return Ok(None);
        };
        Ok(Some(Self {
            client: ProviderClient::new(cfg)?,
            how,
        }))
    }

    /// Revokes the grant behind these tokens. The error is one line without secrets.
    pub async fn revoke(
        &self,
        access: &SecretString,
        refresh: &SecretString,
    ) -> Result<(), String> {
        let work = async {
            match &self.how {
                How::Rfc7009(url) => self.rfc7009(url, access, refresh).await,
                How::GitHubGrant(url) => self.github(url, access).await,
            }
        };
        tokio::time::timeout(TIMEOUT, work)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {TIMEOUT:?}")))
    }

    async fn rfc7009(
        &self,
        url: &RevocationUrl,
        access: &SecretString,
        refresh: &SecretString,
    ) -> Result<(), String> {
        let c = &self.client;
        let mut client = oauth2::Client::<
            BasicErrorResponse,
            oauth2::StandardTokenResponse<OtherFields, BasicTokenType>,
            oauth2::basic::BasicTokenIntrospectionResponse,
            StandardRevocableToken,
            BasicRevocationErrorResponse,
        >::new(c.client_id.clone())
        .set_revocation_url(url.clone())
        .set_auth_type(match c.auth {
            ClientAuth::ClientSecretBasic => AuthType::BasicAuth,
            ClientAuth::ClientSecretPost => AuthType::RequestBody,
        });
        if let Some(s) = &c.client_secret {
            client = client.set_client_secret(ClientSecret::new(s.expose_secret().to_string()));
        }
        // Revoking the refresh token ends the grant (RFC 7009 §2.1: the server
        // should drop the access tokens issued with it too).
        let token = if refresh.expose_secret().is_empty() {
            StandardRevocableToken::AccessToken(AccessToken::new(
                access.expose_secret().to_string(),
            ))
        } else {
            StandardRevocableToken::RefreshToken(RefreshToken::new(
                refresh.expose_secret().to_string(),
            ))
        };
        let req = client.revoke_token(token).map_err(|e| e.to_string())?;
        req.request_async(&c.http).await.map_err(|e| match e {
            RequestTokenError::ServerResponse(r) => {
                format!(
                    "the provider refused: {}",
                    super::printable_code(r.error().as_ref())
                )
            }
            RequestTokenError::Request(e) => e.to_string(),
            RequestTokenError::Parse(_, _) => "unparseable revocation answer".into(),
            RequestTokenError::Other(m) => m,
        })
    }

    async fn github(&self, url: &Url, access: &SecretString) -> Result<(), String> {
        let c = &self.client;
        let secret = c
            .client_secret
            .as_ref()
            .map(|s| s.expose_secret().to_string())
            .unwrap_or_default();
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{secret}", c.client_id.as_str()));
        let body = serde_json::json!({ "access_token": access.expose_secret() }).to_string();
        let req = http::Request::delete(url.as_str())
            .header(http::header::AUTHORIZATION, format!("Basic {basic}"))
            .header(http::header::ACCEPT, "application/vnd.github+json")
            .header(http::header::CONTENT_TYPE, "application/json")
            // GitHub's API refuses requests without a User-Agent.
            .header(http::header::USER_AGENT, "tokenproxy")
            .body(body.into_bytes())
            .map_err(|e| e.to_string())?;
        let resp = c
            .http
            .send(req)
            .await
            .map_err(|e: HttpError| e.to_string())?;
        match resp.status().as_u16() {
            200..=299 => Ok(()),
            status => Err(format!("GitHub answered HTTP {status}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(extra: &str) -> ProviderConfig {
        let text = format!("[[providers]]\nid = \"gh\"\nclient_id = \"Iv1.abc\"\n{extra}\n");
        crate::config::Config::from_toml_with_env(&text, &[])
            .unwrap()
            .providers
            .remove(0)
    }

    #[test]
    fn github_grant_url_follows_the_api() {
        let p = provider("preset = \"github\"");
        assert_eq!(
            github_grant_url(&p).unwrap().as_str(),
            "https://api.github.com/applications/Iv1.abc/grant"
        );
        let p = provider("preset = \"github\"\nbase_url = \"https://ghe.example.com\"");
        assert_eq!(
            github_grant_url(&p).unwrap().as_str(),
            "https://ghe.example.com/api/v3/applications/Iv1.abc/grant"
        );
    }

    #[test]
    fn only_presets_that_know_how_revoke() {
        assert!(Revoker::new(&provider("preset = \"bitbucket\""))
            .unwrap()
            .is_none());
        assert!(Revoker::new(&provider("preset = \"gitlab\""))
            .unwrap()
            .is_some());
        assert!(Revoker::new(&provider("preset = \"github-app\""))
            .unwrap()
            .is_some());
    }
}
