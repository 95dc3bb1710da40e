//! The one rule for provider endpoints that receive a secret (`token_url`,
//! `device_authorization_url`, `revocation_url`): the client secret, refresh
//! tokens and device codes must not cross the network in clear text.
//!
//! `https://` is always accepted; plain `http://` only to a loopback host (an IP
//! in 127.0.0.0/8, `::1`, or `localhost`), where nothing leaves the machine — a
//! local test or development IdP, in the spirit of RFC 8252 §8.3. Config loading
//! refuses anything else with the key's name; OIDC discovery applies the same
//! test to the endpoints a discovery document names.

use url::{Host, Url};

/// The keys of `[[providers]]` this rule covers, as config errors name them.
pub const SECRET_ENDPOINT_KEYS: [&str; 3] =
    ["token_url", "device_authorization_url", "revocation_url"];

/// Whether `u` names a loopback host: nothing sent there leaves the machine.
pub fn is_loopback(u: &Url) -> bool {
    match u.host() {
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Refuses a plain-`http://` URL to a non-loopback host: an endpoint sent a
/// secret must use TLS. The message holds no part of the URL beyond its scheme.
pub fn check_secret_endpoint(u: &Url) -> Result<(), String> {
    if u.scheme() == "http" && !is_loopback(u) {
        return Err(
            "plain http:// to a non-loopback host would send the client secret and tokens \
             unencrypted; use https:// (http:// is allowed only to 127.0.0.1, ::1 or localhost)"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(u: &str) -> Result<(), String> {
        check_secret_endpoint(&Url::parse(u).unwrap())
    }

    #[test]
    fn https_anywhere_and_http_only_to_loopback() {
        for ok in [
            "https://github.com/login/oauth/access_token",
            "https://10.0.0.5/token",
            "http://127.0.0.1:8080/oauth/token",
            "http://127.8.9.10/oauth/token",
            "http://[::1]:9/oauth/revoke",
            "http://localhost:8080/oauth/device",
            "http://LOCALHOST/oauth/device",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for bad in [
            "http://github.com/login/oauth/access_token",
            "http://10.0.0.5/token",
            "http://[::ffff:7f00:1]/token",
            "http://localhost.evil.example/token",
            "http://127.0.0.1.nip.io/token",
            "http://0.0.0.0/token",
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
    }
}
