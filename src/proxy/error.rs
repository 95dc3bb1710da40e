//! The one place where a failure becomes an HTTP response.
//!
//! Every response tokenproxy makes itself (rather than relaying the upstream's)
//! is built here, so each carries the `tokenproxy-error` header and the JSON body
//! of DESIGN.md, and the status for a code cannot drift between call sites. Each
//! error also says which side it came from, for logs and metrics.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt;

use super::headers::ERROR_HEADER;
use super::ProxyBody;
use crate::tokens::TokenError;

/// Why tokenproxy answered a request itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// No valid caller credential (reverse mode: 401).
    #[error("a valid proxy token is required")]
    Unauthenticated,
    /// No valid caller credential in forward mode (407).
    #[error("a valid proxy token is required in Proxy-Authorization")]
    ProxyAuthRequired,
    /// The caller's proxy token is not allowed the route's provider.
    #[error("this proxy token may not use this provider")]
    Forbidden,
    /// No route matches the path.
    #[error("no route for this path")]
    NoRoute,
    /// Forward mode: the target host has no route and unrouted hosts are denied.
    #[error("this host is not allowed")]
    HostNotAllowed,
    /// The request is malformed or unsafe (the reason is static text, never input).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// A method tokenproxy never forwards (`TRACE` reflects the injected
    /// credential back to the caller): 405, code `bad_request`.
    #[error("this method is not allowed through tokenproxy")]
    MethodNotAllowed,
    /// No token could be served for the user.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The link store failed while identifying the caller.
    #[error("the link store is unavailable")]
    StoreUnavailable,
    /// Connecting (TCP or TLS) to the upstream failed, or it broke the connection.
    #[error("cannot reach the upstream")]
    UpstreamUnavailable,
    /// The upstream did not answer in time.
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    /// Too many failed authentications from this source or with this
    /// credential, or too many new leaf certificates for this caller: 429 with
    /// `Retry-After` (the seconds held here).
    #[error("too many attempts; retry later")]
    RateLimited(u64),
    /// The route does not allow this method: 405 with `Allow` (the value
    /// held here), code `bad_request`.
    #[error("this route does not allow this method")]
    MethodNotAllowedHere(http::HeaderValue),
}

impl ProxyError {
    /// The DESIGN.md error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated | Self::ProxyAuthRequired => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::NoRoute => "no_route",
            Self::HostNotAllowed => "host_not_allowed",
            Self::BadRequest(_) | Self::MethodNotAllowed | Self::MethodNotAllowedHere(_) => {
                "bad_request"
            }
            Self::RateLimited(_) => "rate_limited",
            Self::Token(TokenError::LinkMissing) => "link_missing",
            Self::Token(TokenError::ReauthRequired) => "reauth_required",
            Self::Token(TokenError::IdpUnavailable) => "idp_unavailable",
            Self::Token(TokenError::StoreUnavailable) | Self::StoreUnavailable => {
                "store_unavailable"
            }
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// The HTTP status for [`code`](Self::code).
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::ProxyAuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Self::Forbidden
            | Self::HostNotAllowed
            | Self::Token(TokenError::LinkMissing | TokenError::ReauthRequired) => {
                StatusCode::FORBIDDEN
            }
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed | Self::MethodNotAllowedHere(_) => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Token(TokenError::IdpUnavailable) | Self::UpstreamUnavailable => {
                StatusCode::BAD_GATEWAY
            }
            Self::Token(TokenError::StoreUnavailable) | Self::StoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The response tokenproxy sends for this error. `provider` is the route's
    /// provider when one was matched.
    pub fn to_response(&self, provider: Option<&str>) -> Response<ProxyBody> {
        self.to_response_with_login(provider, None)
    }

    /// [`to_response`](Self::to_response), adding `login_url` (where the user can
    /// link again) to a `link_missing` or `reauth_required` body.
    pub fn to_response_with_login(
        &self,
        provider: Option<&str>,
        login_url: Option<&str>,
    ) -> Response<ProxyBody> {
        let mut body = serde_json::json!({
            "error": {
                "code": self.code(),
                "message": self.to_string(),
                "provider": provider,
            }
        });
        if let (Some(url), Self::Token(TokenError::LinkMissing | TokenError::ReauthRequired)) =
            (login_url, self)
        {
            body["error"]["login_url"] = serde_json::Value::String(url.to_owned());
        }
        let mut resp = Response::new(
            http_body_util::Full::new(Bytes::from(body.to_string()))
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            Self::Unauthenticated => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Basic realm="tokenproxy""#),
                );
            }
            Self::ProxyAuthRequired => {
                h.insert(
                    header::PROXY_AUTHENTICATE,
                    HeaderValue::from_static(r#"Basic realm="tokenproxy""#),
                );
            }
            Self::RateLimited(secs) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            Self::MethodNotAllowedHere(allow) => {
                h.insert(header::ALLOW, allow.clone());
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_json(resp: Response<ProxyBody>) -> serde_json::Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn every_code_has_its_design_status_header_and_body() {
        let cases = [
            (ProxyError::Unauthenticated, 401, "unauthenticated"),
            (ProxyError::ProxyAuthRequired, 407, "unauthenticated"),
            (ProxyError::Forbidden, 403, "forbidden"),
            (ProxyError::NoRoute, 404, "no_route"),
            (ProxyError::HostNotAllowed, 403, "host_not_allowed"),
            (TokenError::LinkMissing.into(), 403, "link_missing"),
            (TokenError::ReauthRequired.into(), 403, "reauth_required"),
            (TokenError::IdpUnavailable.into(), 502, "idp_unavailable"),
            (
                TokenError::StoreUnavailable.into(),
                503,
                "store_unavailable",
            ),
            (ProxyError::StoreUnavailable, 503, "store_unavailable"),
            (ProxyError::UpstreamUnavailable, 502, "upstream_unavailable"),
            (ProxyError::UpstreamTimeout, 504, "upstream_timeout"),
            (ProxyError::BadRequest("x"), 400, "bad_request"),
            (ProxyError::RateLimited(7), 429, "rate_limited"),
            (
                ProxyError::MethodNotAllowedHere(HeaderValue::from_static("GET")),
                405,
                "bad_request",
            ),
        ];
        for (err, status, code) in cases {
            let resp = err.to_response(Some("github"));
            assert_eq!(resp.status().as_u16(), status, "{code}");
            assert_eq!(resp.headers()[&ERROR_HEADER], code);
            let json = body_json(resp).await;
            assert_eq!(json["error"]["code"], code);
            assert_eq!(json["error"]["provider"], "github");
            assert!(json["error"]["message"].as_str().unwrap().len() > 3);
        }
    }

    #[test]
    fn unauthenticated_challenges_for_basic() {
        let resp = ProxyError::Unauthenticated.to_response(None);
        assert_eq!(
            resp.headers()[header::WWW_AUTHENTICATE],
            r#"Basic realm="tokenproxy""#
        );
        let resp = ProxyError::ProxyAuthRequired.to_response(None);
        assert!(resp.headers().contains_key(header::PROXY_AUTHENTICATE));
        let resp = ProxyError::RateLimited(7).to_response(None);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
        let allow = HeaderValue::from_static("GET, HEAD");
        let resp = ProxyError::MethodNotAllowedHere(allow).to_response(None);
        assert_eq!(resp.headers()[header::ALLOW], "GET, HEAD");
    }
}
