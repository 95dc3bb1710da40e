//! The small HTML pages and the cookie of browser sign-in (see [`super::login`]).
//!
//! Pages name the provider, the user and (when the provider said) the account —
//! never a token. Everything interpolated is HTML-escaped.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::ProxyBody;

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An HTML page with `title` and already-escaped `body_html`.
pub fn page(status: StatusCode, title: &str, body_html: &str) -> Response<ProxyBody> {
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title></head>\n\
         <body style=\"font-family: sans-serif; max-width: 40em; margin: 3em auto\">\n\
         <h1 id=\"title\">{t}</h1>\n{body_html}\n</body></html>\n",
        t = escape(title)
    );
    let mut resp = Response::new(
        Full::new(Bytes::from(html))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    resp
}

/// The 400 page of a refused sign-in.
pub fn refused(reason: &str) -> Response<ProxyBody> {
    page(
        StatusCode::BAD_REQUEST,
        "Sign-in failed",
        &format!(
            "<p id=\"reason\">{}</p>\n<p>Nothing was linked. Start again from a new login link.</p>",
            escape(reason)
        ),
    )
}

/// Name of the cookie binding a sign-in of `provider` to the browser that began it.
pub fn cookie_name(provider: &str) -> String {
    format!("tokenproxy_login_{provider}")
}

/// `Set-Cookie` for the binding: HttpOnly, SameSite=Lax (sent on the provider's
/// top-level redirect back, not on cross-site subrequests), Secure on https,
/// scoped to this provider's sign-in paths. An empty `value` clears it.
pub fn set_cookie(provider: &str, value: &str, path: &str, secure: bool, max_age: u64) -> String {
    let max_age = if value.is_empty() { 0 } else { max_age };
    format!(
        "{}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Lax{}",
        cookie_name(provider),
        if secure { "; Secure" } else { "" }
    )
}

/// The value of cookie `name` in the request, if sent.
pub fn read_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_bound_and_parsed() {
        let c = set_cookie("gh", "abc", "/_tokenproxy/oauth/gh/", true, 600);
        assert_eq!(
            c,
            "tokenproxy_login_gh=abc; Path=/_tokenproxy/oauth/gh/; Max-Age=600; HttpOnly; SameSite=Lax; Secure"
        );
        assert!(!set_cookie("gh", "abc", "/", false, 600).contains("Secure"));
        assert!(set_cookie("gh", "", "/", false, 600).contains("Max-Age=0"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; tokenproxy_login_gh=xyz; tokenproxy_login_g=no"),
        );
        assert_eq!(
            read_cookie(&h, "tokenproxy_login_gh").as_deref(),
            Some("xyz")
        );
        assert_eq!(read_cookie(&h, "tokenproxy_login_gl"), None);
    }

    #[test]
    fn pages_escape() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
