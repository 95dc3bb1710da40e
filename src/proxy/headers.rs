//! Header rules that hold in both directions: which headers belong to one hop
//! only, and which ones record the forwarding.
//!
//! A proxy is two HTTP connections glued together, so headers that describe a
//! connection (RFC 9110 §7.6.1) must not cross from one to the other. The caller's
//! own credential headers are connection-scoped here too: they authenticate the
//! caller to tokenproxy and must never reach an upstream.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that are hop-by-hop whatever `Connection` says (RFC 9110 §7.6.1 and
/// RFC 9112 §7.1; `Proxy-Connection` and `Keep-Alive` are the historic ones).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// The header tokenproxy puts on responses it makes itself; an upstream may not
/// forge it.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("tokenproxy-error");

/// Removes every hop-by-hop header: `Connection`, each header `Connection` names,
/// and the fixed list above. Used for requests and responses alike.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests and responses carry none of them: one look at the names
    // is cheaper than nine removals of headers that are not there.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    // Collect the names listed in (every) Connection header first: the header
    // itself is one of the ones removed below.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// What the forwarding headers describe about the caller's side.
#[derive(Debug, Clone)]
pub struct Forwarded<'a> {
    /// Caller's IP address.
    pub client_ip: std::net::IpAddr,
    /// `http` or `https`: how the caller reached tokenproxy.
    pub proto: &'static str,
    /// The `Host` the caller sent, if any.
    pub host: Option<&'a HeaderValue>,
    /// Protocol version of the caller's request, for `Via`.
    pub version: http::Version,
}

/// Appends `X-Forwarded-For`, sets `X-Forwarded-Proto`/`X-Forwarded-Host`, and
/// appends a `Via` entry (RFC 9110 §7.6.3).
pub fn add_forwarded(headers: &mut HeaderMap, fwd: &Forwarded<'_>) {
    let xff = HeaderName::from_static("x-forwarded-for");
    let ip = fwd.client_ip.to_string();
    let value = match headers.get(&xff).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(xff, v);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(fwd.proto),
    );
    if let Some(host) = fwd.host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
    }
    let via = match fwd.version {
        http::Version::HTTP_10 => "1.0 tokenproxy",
        http::Version::HTTP_2 => "2 tokenproxy",
        _ => "1.1 tokenproxy",
    };
    headers.append(header::VIA, HeaderValue::from_static(via));
}

/// Removes every forwarding claim a client may have written: `Forwarded`,
/// `X-Forwarded-*`, `X-Real-IP` and `Via`. Used when tokenproxy adds none.
pub fn remove_forwarding(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k.starts_with("x-forwarded-") || matches!(k, "forwarded" | "x-real-ip" | "via")
        })
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Joins several `Cookie` fields into one with `"; "` (RFC 9113 §8.2.3): an
/// HTTP/2 client may split its cookies, an HTTP/1.1 upstream expects one line.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    // Every part was a valid header value and "; " is too.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn forwarding_claims_are_removed() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("X-Forwarded-Host", "evil"),
            ("x-forwarded-prefix", "/admin"),
            ("forwarded", "for=10.0.0.1"),
            ("x-real-ip", "10.0.0.1"),
            ("via", "1.1 evil"),
            ("accept", "*/*"),
            ("x-forwardedx", "kept"),
        ]);
        remove_forwarding(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-forwardedx"]);
    }

    #[test]
    fn several_cookie_fields_become_one() {
        let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2; c=3"), ("cookie", "d=4")]);
        join_cookies(&mut h);
        let all: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3; d=4"]);
        let mut h = map(&[("cookie", "a=1")]);
        join_cookies(&mut h);
        assert_eq!(h["cookie"], "a=1");
    }

    #[test]
    fn removes_the_fixed_hop_by_hop_list() {
        let mut h = map(&[
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Bearer tpx_secret"),
            ("proxy-authenticate", "Basic"),
            ("content-type", "text/plain"),
            ("accept", "*/*"),
        ]);
        remove_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["accept", "content-type"]);
    }

    #[test]
    fn removes_headers_named_by_connection() {
        // RFC 9110 §7.6.1: a proxy MUST remove the headers Connection lists,
        // in any case and spread over several Connection headers.
        let mut h = map(&[
            ("connection", "X-Secret , keep-alive"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("X-Other", "2"),
            ("x-kept", "3"),
        ]);
        remove_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("x-other").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h.get("x-kept").unwrap(), "3");
    }

    #[test]
    fn ignores_garbage_in_connection() {
        let mut h = map(&[("connection", "bad header name, ,"), ("x-kept", "1")]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn keeps_end_to_end_headers() {
        let mut h = map(&[
            ("authorization", "Bearer x"),
            ("content-length", "10"),
            ("expect", "100-continue"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn forwarded_headers_append_to_prior_hops() {
        let mut h = map(&[("x-forwarded-for", "10.0.0.1"), ("via", "1.1 edge")]);
        let host = HeaderValue::from_static("proxy.example:8080");
        add_forwarded(
            &mut h,
            &Forwarded {
                client_ip: "127.0.0.1".parse().unwrap(),
                proto: "http",
                host: Some(&host),
                version: http::Version::HTTP_11,
            },
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.1");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "proxy.example:8080");
        let via: Vec<_> = h.get_all("via").iter().collect();
        assert_eq!(via, ["1.1 edge", "1.1 tokenproxy"]);
    }
}
