//! The HTTP client the `oauth2` crate sends its token requests through.
//!
//! `oauth2` is transport-agnostic: it builds an `http::Request` and parses the
//! `http::Response` we hand back. We send it over our own hyper-util client with
//! rustls (ring provider, webpki roots plus an optional extra CA per provider), never
//! follow redirects (a redirected token request would leak the client secret and the
//! refresh token to wherever the redirect points), bound the response body, and sort
//! out the answers the crate cannot classify on its own: 5xx and 429 become transient
//! errors here (with `Retry-After`), and an HTTP 200 carrying an OAuth `error` field
//! (GitHub's style) is turned into the 400 it should have been.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Largest token-endpoint response body we read.
const MAX_BODY: usize = 64 * 1024;

/// Why one HTTP exchange with a token endpoint failed. Never holds request bodies.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// TCP/TLS connection failed: the request was certainly not sent.
    #[error("cannot reach the token endpoint: {0}")]
    Connect(String),
    /// The exchange broke after the request may have been sent (connection reset,
    /// closed before the response): the provider may have processed it.
    #[error("token endpoint exchange interrupted: {0}")]
    Interrupted(String),
    /// The endpoint answered 5xx or 429.
    #[error("token endpoint answered HTTP {status}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// `Retry-After` (seconds or an HTTP-date), when given.
        retry_after: Option<Duration>,
    },
    /// The endpoint answered a redirect, which we never follow.
    #[error("token endpoint answered a redirect (HTTP {0}); redirects are not followed")]
    Redirect(u16),
    /// Reading the body failed or it was too large.
    #[error("bad response body: {0}")]
    Body(String),
    /// The request could not be built.
    #[error("bad request: {0}")]
    Request(String),
}

/// A pooled HTTPS (and, for tests and private endpoints, plain HTTP) client.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl HttpClient {
    /// Builds a client trusting the webpki roots plus the PEM certificates in `extra_ca`.
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, String> {
        let roots = crate::tls::roots(extra_ca).map_err(|m| match extra_ca {
            Some(path) => format!("CA file {}: {m}", path.display()),
            None => m,
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let inner = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self { inner })
    }

    /// Sends one request; the caller bounds the time.
    pub async fn send(&self, req: oauth2::HttpRequest) -> Result<oauth2::HttpResponse, HttpError> {
        let (mut parts, body) = req.into_parts();
        if !parts.headers.contains_key(http::header::HOST) {
            // The legacy client only adds Host when missing; set it from the URI so
            // virtual-hosted token endpoints see the right name.
            if let Some(auth) = parts.uri.authority() {
                let value = http::HeaderValue::from_str(auth.as_str())
                    .map_err(|e| HttpError::Request(e.to_string()))?;
                parts.headers.insert(http::header::HOST, value);
            }
        }
        let req = http::Request::from_parts(parts, Full::new(Bytes::from(body)));
        let resp = self.inner.request(req).await.map_err(|e| {
            if e.is_connect() {
                HttpError::Connect(crate::telemetry::error_chain(&e))
            } else {
                HttpError::Interrupted(crate::telemetry::error_chain(&e))
            }
        })?;
        let (parts, body) = resp.into_parts();
        let status = parts.status;
        if status.is_redirection() {
            return Err(HttpError::Redirect(status.as_u16()));
        }
        if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
            let retry_after = parts
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
            return Err(HttpError::Status {
                status: status.as_u16(),
                retry_after,
            });
        }
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| HttpError::Body(e.to_string()))?
            .to_bytes();
        let mut resp = http::Response::from_parts(parts, body.to_vec());
        normalize_body(&mut resp);
        Ok(resp)
    }
}

/// A `Retry-After` value (RFC 9110 §10.2.3): delay-seconds, or an HTTP-date
/// turned into the wait from `now` (a date already past means no wait). `None`
/// when unparseable.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

impl<'c> oauth2::AsyncHttpClient<'c> for HttpClient {
    type Error = HttpError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<oauth2::HttpResponse, HttpError>> + Send + 'c>,
    >;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}

/// Makes an answer acceptable to `oauth2`'s strict parser without losing what the
/// provider said. A successful refresh has already rotated the refresh token at
/// the provider, so failing to parse it would lose the user's link: be liberal.
///
/// - A form-encoded body (GitHub without `Accept: application/json`, some older
///   servers) is read as the JSON object it stands for.
/// - A 200 carrying an OAuth `error` (GitHub answers `bad_refresh_token` with
///   HTTP 200) becomes the 400 it should have been.
/// - In a 200: a missing or null `token_type` defaults to `bearer`; `expires_in`
///   given as a string (Azure) or a fraction becomes whole seconds (dropped when
///   it is not a number at all); a `scope` list becomes the space-separated string
///   RFC 6749 specifies.
fn normalize_body(resp: &mut oauth2::HttpResponse) {
    let Some(mut map) = body_object(resp) else {
        return;
    };
    let ok = resp.status() == http::StatusCode::OK;
    if ok && map.get("error").is_some_and(|e| e.is_string()) && !map.contains_key("access_token") {
        *resp.status_mut() = http::StatusCode::BAD_REQUEST;
    }
    if resp.status() == http::StatusCode::OK {
        normalize_token_fields(&mut map);
    }
    *resp.body_mut() = serde_json::to_vec(&map).unwrap_or_default();
    // The body is JSON now, whatever the provider labelled it.
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
}

/// The body as a JSON object: parsed as JSON, else as a form-encoded body that
/// holds an OAuth field. `None` for anything else (left for `oauth2` to refuse).
fn body_object(resp: &oauth2::HttpResponse) -> Option<serde_json::Map<String, serde_json::Value>> {
    use serde_json::Value;
    match serde_json::from_slice::<Value>(resp.body()) {
        Ok(Value::Object(map)) => return Some(map),
        Ok(_) => return None,
        Err(_) => {}
    }
    let map: serde_json::Map<String, Value> = url::form_urlencoded::parse(resp.body())
        .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
        .collect();
    (map.contains_key("access_token") || map.contains_key("error")).then_some(map)
}

/// Rewrites a token response's fields into the types RFC 6749 §5.1 names.
fn normalize_token_fields(map: &mut serde_json::Map<String, serde_json::Value>) {
    use serde_json::Value;
    if map.get("token_type").is_none_or(Value::is_null) {
        map.insert("token_type".into(), "bearer".into());
    }
    match map.get("expires_in") {
        Some(Value::Number(n)) if n.is_u64() => {}
        Some(Value::Null) | None => {}
        Some(v) => {
            let secs = match v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            match secs.filter(|s| s.is_finite()) {
                // Whole seconds, never negative (0 and below: already expired).
                Some(s) => map.insert("expires_in".into(), Value::from(s.max(0.0) as u64)),
                None => map.remove("expires_in"),
            };
        }
    }
    match map.get("scope") {
        Some(Value::String(_) | Value::Null) | None => {}
        Some(Value::Array(items)) => {
            let joined = items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ");
            map.insert("scope".into(), Value::String(joined));
        }
        Some(_) => {
            map.remove("scope");
        }
    }
    match map.get("refresh_token") {
        Some(Value::String(_) | Value::Null) | None => {}
        Some(Value::Number(n)) => {
            let text = n.to_string();
            map.insert("refresh_token".into(), Value::String(text));
        }
        Some(_) => {
            map.remove("refresh_token");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> oauth2::HttpResponse {
        http::Response::builder()
            .status(200)
            .body(body.as_bytes().to_vec())
            .unwrap()
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        use std::time::UNIX_EPOCH;
        // 1994-11-06T08:49:37Z, RFC 9110's example date.
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        // The obsolete forms a server may still send (RFC 850, asctime).
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-94 08:50:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Sun Nov  6 08:49:47 1994", now),
            Some(Duration::from_secs(10))
        );
        // A date already past: no wait. Garbage: no hint.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn github_style_error_in_200_becomes_400() {
        let mut r = ok(r#"{"error":"bad_refresh_token","error_description":"x"}"#);
        normalize_body(&mut r);
        assert_eq!(r.status(), 400);
    }

    #[test]
    fn missing_token_type_defaults_to_bearer() {
        let mut r = ok(r#"{"access_token":"a"}"#);
        normalize_body(&mut r);
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["token_type"], "bearer");
        assert_eq!(r.status(), 200);
    }

    /// Token-response bodies: JSON objects with fields of any type, form bodies,
    /// arbitrary bytes.
    fn body() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let value = prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| serde_json::json!(f).to_string()),
            "[ -~]{0,20}".prop_map(|s| serde_json::json!(s).to_string()),
            proptest::sample::select(vec![
                "null",
                "true",
                "[]",
                "{}",
                "[\"a\",1]",
                "\"3600\"",
                "-5",
                "1e308"
            ])
            .prop_map(String::from),
        ];
        let field = proptest::sample::select(vec![
            "access_token",
            "refresh_token",
            "expires_in",
            "token_type",
            "scope",
            "error",
            "error_description",
            "id_token",
            "refresh_token_expires_in",
        ]);
        prop_oneof![
            proptest::collection::vec((field.clone(), value), 0..6).prop_map(|fields| {
                let inner: Vec<String> =
                    fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", inner.join(",")).into_bytes()
            }),
            proptest::collection::vec((field, "[ -~]{0,12}"), 0..5).prop_map(|fields| {
                url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(fields)
                    .finish()
                    .into_bytes()
            }),
            proptest::collection::vec(any::<u8>(), 0..100),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(
            std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
        ))]

        /// Whatever a token endpoint answers, normalising and then parsing it as
        /// the RFC 6749 token response `oauth2` reads never panics; a 200 that
        /// parses keeps its access token as sent.
        #[test]
        fn any_token_response_is_normalised_and_parsed_without_panic(
            body in body(),
            status in proptest::sample::select(vec![200u16, 400, 401, 500]),
        ) {
            let mut r = http::Response::builder().status(status).body(body.clone()).unwrap();
            normalize_body(&mut r);
            let parsed = serde_json::from_slice::<super::super::TokenResp>(r.body());
            if let (Ok(resp), Ok(serde_json::Value::Object(orig))) =
                (parsed, serde_json::from_slice::<serde_json::Value>(&body))
            {
                use oauth2::TokenResponse;
                if status == 200 {
                    proptest::prop_assert_eq!(
                        Some(resp.access_token().secret().as_str()),
                        orig.get("access_token").and_then(|v| v.as_str())
                    );
                }
            }
        }
    }
}
