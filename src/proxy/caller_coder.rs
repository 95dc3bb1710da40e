//! Caller identity for Coder workspace agents (`callers.mode = "coder_agent"`).
//!
//! A workspace's agent holds `workspace_agents.auth_token`, a UUID, as
//! `CODER_AGENT_TOKEN`. It may present it the way coderd accepts it — the
//! `Coder-Session-Token` header — or the way git and HTTP clients can be told
//! to: `Authorization: Bearer <token>`, or the password (failing that, the user
//! name) of Basic credentials; in forward mode only `Proxy-Authorization`
//! counts. The request then acts for the workspace owner, resolved from Coder's
//! tables exactly as coderd does (latest build — or the start build just before
//! a stop build still running, for shutdown scripts — deleted workspace or agent
//! refused; see [`crate::store::coder::agent_owner`]).
//!
//! Verification is the proxy tokens' (`CallerIdentity::verify`) with a
//! different store lookup: the same cache keyed by the token's SHA-256 (no agent
//! token sits in memory), `callers.cache_ttl`, `callers.outage_grace`, the
//! negative cache of unknown tokens and the cap on concurrent lookups. The
//! time-to-live is how long a superseded build's (or a finished stop build's
//! start agent's) or a deleted workspace's agent keeps working, as with revoked
//! proxy tokens. With `coder.proxy_tokens`,
//! a request without an agent token may present a `tpx_` token instead.

use base64::Engine;
use http::header::{self, HeaderMap, HeaderName};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::caller::{Caller, CallerIdentity, Credential};
use super::error::ProxyError;
use crate::store::{LinkStore, ProxyTokenInfo, StoreError};

/// The header coderd reads agent (and session) tokens from.
pub const CODER_SESSION_TOKEN: HeaderName = HeaderName::from_static("coder-session-token");

/// Finds an agent token in the request. `forward`: only `Proxy-Authorization`
/// (the other headers belong to the client's conversation with the origin).
/// A value that is not a UUID is no agent token and is skipped.
pub fn extract_agent_token(headers: &HeaderMap, forward: bool) -> Option<SecretString> {
    let credential_headers: &[HeaderName] = if forward {
        &[header::PROXY_AUTHORIZATION]
    } else {
        &[header::PROXY_AUTHORIZATION, header::AUTHORIZATION]
    };
    let from_credentials = credential_headers
        .iter()
        .flat_map(|name| headers.get_all(name))
        .filter_map(|v| v.to_str().ok())
        .find_map(parse_credential);
    if forward || from_credentials.is_some() {
        return from_credentials;
    }
    headers
        .get_all(CODER_SESSION_TOKEN)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .find(|v| is_agent_token(v))
        .map(|v| SecretString::from(v.to_string()))
}

/// Bearer token, or Basic password (or user name), that is a UUID.
fn parse_credential(value: &str) -> Option<SecretString> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return is_agent_token(rest).then(|| SecretString::from(rest.to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let decoded = SecretString::from(String::from_utf8(decoded).ok()?);
        let (user, pass) = decoded.expose_secret().split_once(':')?;
        return [pass, user]
            .into_iter()
            .find(|c| is_agent_token(c))
            .map(|c| SecretString::from(c.to_string()));
    }
    None
}

/// coderd parses the token with `uuid.Parse`; a hyphenated UUID is what Coder
/// issues, so only that form is accepted (no braces, no URN).
fn is_agent_token(s: &str) -> bool {
    s.len() == 36 && Uuid::try_parse(s).is_ok()
}

/// The record an agent token verifies to: the workspace owner, every provider
/// allowed, no expiry. Its id is nil — an agent token has no proxy-token row, so
/// nothing is written back for it. `None` when coderd would refuse the token.
pub(super) async fn find_agent(
    store: &dyn LinkStore,
    token: Uuid,
) -> Result<Option<ProxyTokenInfo>, StoreError> {
    Ok(store
        .find_coder_agent_owner(token)
        .await?
        .map(|owner| ProxyTokenInfo {
            id: Uuid::nil(),
            user_id: owner,
            name: String::new(),
            providers: Vec::new(),
            created_at: chrono::DateTime::<chrono::Utc>::MIN_UTC,
            expires_at: None,
            last_used_at: None,
            revoked_at: None,
        }))
}

impl CallerIdentity {
    /// The workspace owner behind the request's agent token, verified like a
    /// proxy token (see [`CallerIdentity::verify`]); `None` when the request
    /// carries no agent token (a `tpx_` token may still identify it).
    pub(super) async fn identify_agent(
        &self,
        headers: &HeaderMap,
        forward: bool,
    ) -> Option<Result<Caller, ProxyError>> {
        let token = extract_agent_token(headers, forward)?;
        let uuid = Uuid::try_parse(token.expose_secret()).ok()?;
        let hash: [u8; 32] = Sha256::digest(token.expose_secret().as_bytes()).into();
        drop(token);
        // Agent tokens are not proxy tokens: no first-use-from-address audit for them.
        Some(self.verify(hash, Credential::Agent(uuid), None).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const T: &str = "6f9619ff-8b86-d011-b42d-00cf4fc964ff";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn basic(user: &str, pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    }

    fn found(h: &HeaderMap, forward: bool) -> Option<String> {
        extract_agent_token(h, forward).map(|s| s.expose_secret().to_string())
    }

    #[test]
    fn every_accepted_place() {
        let bearer = format!("Bearer {T}");
        let git = basic("coder", T);
        let user_only = basic(T, "");
        for h in [
            headers(&[("coder-session-token", T)]),
            headers(&[("authorization", &bearer)]),
            headers(&[("authorization", &git)]),
            headers(&[("authorization", &user_only)]),
            headers(&[("proxy-authorization", &git)]),
        ] {
            assert_eq!(found(&h, false).as_deref(), Some(T), "{h:?}");
        }
        let h = headers(&[("proxy-authorization", &git)]);
        assert_eq!(found(&h, true).as_deref(), Some(T));
    }

    #[test]
    fn forward_mode_reads_only_proxy_authorization() {
        let bearer = format!("Bearer {T}");
        for h in [
            headers(&[("coder-session-token", T)]),
            headers(&[("authorization", &bearer)]),
        ] {
            assert_eq!(found(&h, true), None);
        }
    }

    #[test]
    fn non_uuid_values_are_not_agent_tokens() {
        for bad in [
            "Bearer tpx_abc",
            "Bearer ghp_x",
            "Bearer {6f9619ff-8b86-d011-b42d-00cf4fc964ff}",
            "Bearer 6f9619ff8b86d011b42d00cf4fc964ff",
            "Basic !!",
        ] {
            assert_eq!(
                found(&headers(&[("authorization", bad)]), false),
                None,
                "{bad}"
            );
        }
        assert_eq!(
            found(&headers(&[("coder-session-token", "x")]), false),
            None
        );
    }
}
