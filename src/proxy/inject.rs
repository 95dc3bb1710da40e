//! Injection phase: attach the user's provider credential to the upstream request
//! in the form the route names.
//!
//! Whatever the caller put in `Authorization` is removed first (it is either the
//! caller's proxy token or a credential the caller is not meant to choose), so the
//! upstream sees exactly one credential: ours. Injected values are marked sensitive
//! so HTTP/2 never adds them to a compression table and `Debug` never prints them.

use base64::Engine;
use http::header::{self, HeaderMap, HeaderValue};

use super::error::ProxyError;
use crate::config::Inject;
use crate::tokens::{AccessToken, TokenError};

/// Replaces the request's credential headers with `token` attached as `inject` says.
pub fn inject_credential(
    headers: &mut HeaderMap,
    inject: &Inject,
    token: &AccessToken,
) -> Result<(), ProxyError> {
    headers.remove(header::AUTHORIZATION);
    // A token that cannot be a header value is unusable as stored; only a new
    // login can fix it. The error text never includes the value.
    let unusable = || ProxyError::Token(TokenError::ReauthRequired);
    let (name, value) = match inject {
        // Built once per token version (see `AccessToken::bearer_header`).
        Inject::Bearer => (
            header::AUTHORIZATION,
            token.bearer_header().ok_or_else(unusable)?,
        ),
        Inject::Header(name) => {
            let mut value = HeaderValue::from_str(token.expose_secret()).map_err(|_| unusable())?;
            value.set_sensitive(true);
            (name.clone(), value)
        }
        Inject::BasicUsername(user) => {
            let pair = format!("{user}:{}", token.expose_secret());
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
            let mut value =
                HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|_| unusable())?;
            value.set_sensitive(true);
            (header::AUTHORIZATION, value)
        }
    };
    headers.insert(name, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn token(s: &str) -> AccessToken {
        AccessToken::new(SecretString::from(s.to_string()), None)
    }

    fn caller_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tpx_caller"),
        );
        h.insert("private-token", HeaderValue::from_static("caller-chosen"));
        h
    }

    #[test]
    fn bearer_replaces_the_caller_authorization() {
        let mut h = caller_headers();
        inject_credential(&mut h, &Inject::Bearer, &token("gho_1")).unwrap();
        let all: Vec<_> = h.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(all, ["Bearer gho_1"]);
        assert!(all[0].is_sensitive());
    }

    #[test]
    fn a_token_version_builds_its_header_value_once() {
        let t = token("gho_memo");
        let (mut a, mut b) = (caller_headers(), caller_headers());
        inject_credential(&mut a, &Inject::Bearer, &t).unwrap();
        inject_credential(&mut b, &Inject::Bearer, &t.clone()).unwrap();
        let (va, vb) = (&a[header::AUTHORIZATION], &b[header::AUTHORIZATION]);
        assert_eq!(va, "Bearer gho_memo");
        assert!(vb.is_sensitive());
        // The same bytes, shared: built once, not per request.
        assert_eq!(va.as_bytes().as_ptr(), vb.as_bytes().as_ptr());
        // A new version has its own.
        assert_eq!(
            token("gho_next").bearer_header().unwrap(),
            "Bearer gho_next"
        );
    }

    #[test]
    fn basic_username_encodes_user_and_token() {
        let mut h = caller_headers();
        let inject = Inject::BasicUsername("x-access-token".into());
        inject_credential(&mut h, &inject, &token("gho_2")).unwrap();
        assert_eq!(
            h[header::AUTHORIZATION],
            "Basic eC1hY2Nlc3MtdG9rZW46Z2hvXzI="
        );
    }

    #[test]
    fn header_form_sets_the_raw_token_and_drops_authorization() {
        let mut h = caller_headers();
        let inject = Inject::Header(http::HeaderName::from_static("private-token"));
        inject_credential(&mut h, &inject, &token("glpat-3")).unwrap();
        assert!(h.get(header::AUTHORIZATION).is_none());
        let all: Vec<_> = h.get_all("private-token").iter().collect();
        assert_eq!(all, ["glpat-3"]);
    }

    #[test]
    fn unusable_token_is_an_error_without_the_value() {
        let mut h = HeaderMap::new();
        let err = inject_credential(&mut h, &Inject::Bearer, &token("bad\nvalue")).unwrap_err();
        assert_eq!(err.code(), "reauth_required");
        assert!(!err.to_string().contains("bad"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(
            std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
        ))]

        /// Whatever a stored token holds, the header written upstream never
        /// carries a CR, LF or NUL: the token is refused instead.
        #[test]
        fn no_token_can_split_the_injected_header(
            raw in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(vec!['\r', '\n', '\0', '\t', ' ', '\u{7f}', 'é']),
                    proptest::char::range('!', '~'),
                ],
                0..40,
            ),
            form in 0..3u8,
        ) {
            let text: String = raw.into_iter().collect();
            let inject = match form {
                0 => Inject::Bearer,
                1 => Inject::BasicUsername("x-access-token".into()),
                _ => Inject::Header(http::HeaderName::from_static("private-token")),
            };
            let mut h = HeaderMap::new();
            match inject_credential(&mut h, &inject, &token(&text)) {
                Ok(()) => {
                    proptest::prop_assert_eq!(h.len(), 1);
                    for (_, v) in &h {
                        proptest::prop_assert!(
                            !v.as_bytes().iter().any(|b| matches!(b, b'\r' | b'\n' | 0)),
                            "{:?}", v
                        );
                        proptest::prop_assert!(v.is_sensitive());
                    }
                }
                Err(e) => {
                    proptest::prop_assert!(h.is_empty());
                    proptest::prop_assert_eq!(e.code(), "reauth_required");
                }
            }
        }
    }
}
