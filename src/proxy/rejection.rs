//! Whether an upstream's 401 blames the access token we injected.
//!
//! A forced refresh costs a provider grant, so it is spent only when the 401 can
//! be the token's fault. Two kinds of 401 say it is not: GitHub's
//! `X-GitHub-OTP: required; <method>` (the account wants a one-time password; a
//! new token gets the same answer), and an RFC 6750 §3 `WWW-Authenticate`
//! challenge whose `error` is anything but `invalid_token` (`insufficient_scope`,
//! `invalid_request`: a new token with the same grant cannot help). A 401 without
//! either may be the token's fault.

use http::header::{HeaderMap, WWW_AUTHENTICATE};

/// Whether a refresh could fix the 401 that came with `headers`.
pub fn blames_token(headers: &HeaderMap) -> bool {
    let otp_required = headers.get_all("x-github-otp").iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.trim_start()
                .get(..8)
                .is_some_and(|p| p.eq_ignore_ascii_case("required"))
        })
    });
    if otp_required {
        return false;
    }
    let mut codes = headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(error_codes)
        .peekable();
    // No `error` parameter: the upstream says nothing either way.
    if codes.peek().is_none() {
        return true;
    }
    codes.any(|c| c.eq_ignore_ascii_case("invalid_token"))
}

/// The values of every `error` auth-param in a `WWW-Authenticate` value (RFC 9110
/// §11.2: `name=token` or `name="quoted string"`, comma-separated).
fn error_codes(value: &str) -> Vec<String> {
    let b = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut quoted = false;
    while i < b.len() {
        let c = b[i];
        if quoted {
            match c {
                b'\\' => i += 2,
                b'"' => {
                    quoted = false;
                    i += 1;
                }
                _ => i += 1,
            }
            continue;
        }
        if c == b'"' {
            quoted = true;
            i += 1;
            continue;
        }
        let at_name = i == 0 || matches!(b[i - 1], b' ' | b'\t' | b',');
        if at_name && b.len() - i >= 5 && b[i..i + 5].eq_ignore_ascii_case(b"error") {
            let mut j = skip_ws(b, i + 5);
            if b.get(j) == Some(&b'=') {
                j = skip_ws(b, j + 1);
                let (v, end) = param_value(b, j);
                out.push(v);
                i = end;
                continue;
            }
        }
        i += 1;
    }
    out
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t') {
        i += 1;
    }
    i
}

/// A token or quoted-string value starting at `i`, and where it ends.
fn param_value(b: &[u8], i: usize) -> (String, usize) {
    let mut v = Vec::new();
    if b.get(i) == Some(&b'"') {
        let mut j = i + 1;
        while j < b.len() && b[j] != b'"' {
            if b[j] == b'\\' {
                j += 1;
            }
            if let Some(&c) = b.get(j) {
                v.push(c);
            }
            j += 1;
        }
        (String::from_utf8_lossy(&v).into_owned(), j + 1)
    } else {
        let mut j = i;
        while j < b.len() && !matches!(b[j], b' ' | b'\t' | b',') {
            v.push(b[j]);
            j += 1;
        }
        (String::from_utf8_lossy(&v).into_owned(), j)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn a_bare_401_or_invalid_token_blames_the_token() {
        assert!(blames_token(&h(&[])));
        assert!(blames_token(&h(&[(
            "www-authenticate",
            r#"Bearer realm="api""#
        )])));
        assert!(blames_token(&h(&[(
            "www-authenticate",
            r#"Bearer realm="api", error="invalid_token", error_description="The access token expired""#
        )])));
        assert!(blames_token(&h(&[(
            "www-authenticate",
            "Bearer error=invalid_token"
        )])));
        assert!(blames_token(&h(&[("x-github-otp", "optional")])));
    }

    #[test]
    fn otp_and_other_bearer_errors_do_not() {
        assert!(!blames_token(&h(&[("x-github-otp", "required; app")])));
        assert!(!blames_token(&h(&[("X-GitHub-OTP", "Required; sms")])));
        assert!(!blames_token(&h(&[(
            "www-authenticate",
            r#"Bearer realm="api", error="insufficient_scope", scope="repo""#
        )])));
        assert!(!blames_token(&h(&[(
            "www-authenticate",
            "Bearer error = invalid_request, error_description=\"a, \\\"quoted\\\" error=invalid_token\""
        )])));
    }

    #[test]
    fn error_description_and_uri_are_not_the_error() {
        assert_eq!(
            error_codes(r#"Bearer error_description="x", error_uri="y", error="a""#),
            ["a"]
        );
        assert!(error_codes("Bearer myerror=invalid_scope").is_empty());
        // Truncated input never panics.
        assert_eq!(error_codes(r#"Bearer error=""#), [""]);
        assert_eq!(error_codes(r#"Bearer error="\"#), [""]);
        assert_eq!(error_codes("Bearer error="), [""]);
    }
}
