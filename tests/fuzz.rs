//! Property-based fuzzing (issue 12, must-have 8) of the parsers that read
//! untrusted or operator-written input: caller credentials, the config file
//! (and its environment overrides), and forward mode's CONNECT authority and
//! absolute-form request target. Path canonicalisation has its own property in
//! `proxy::route`; token responses in `oauth::http`; injected header values in
//! `proxy::inject`.
//!
//! Every property runs 2,000 cases by default (the quick mode `scripts/test`
//! runs); `FUZZ_CASES=1000000 cargo test --release --test fuzz` is the long run
//! whose figures the README records.

use std::str::FromStr;

use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use proptest::prelude::*;
use proptest::sample::select;
use secrecy::ExposeSecret;
use tokenproxy::config::Config;
use tokenproxy::proxy::caller::{
    is_well_formed, presented_proxy_token, CHECKSUMMED_LEN, TOKEN_PREFIX,
};
use tokenproxy::proxy::connect::connect_target;
use tokenproxy::proxy::pipeline::{forward_uri, upstream_authority};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Credential header values: structured (a scheme, then a token-like or
/// Basic-encoded payload) or arbitrary bytes.
fn credential_value() -> impl Strategy<Value = Vec<u8>> {
    let scheme = select(vec![
        "Bearer", "bearer", "BEARER", "token", "Basic", "basic", "Digest", "", "Bearer\t",
    ]);
    let payload = prop_oneof![
        "tpx_[0-9A-Za-z_-]{0,60}",
        "[ -~]{0,80}",
        ("[ -~]{0,30}", "(tpx_)?[ -~]{0,60}").prop_map(|(u, p)| {
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        }),
        proptest::collection::vec(any::<u8>(), 0..60)
            .prop_map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
    ];
    prop_oneof![
        (scheme, " {0,3}", payload).prop_map(|(s, sp, p)| format!("{s}{sp}{p}").into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..200),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// Whatever the credential headers hold, parsing never panics, and what it
    /// finds is a syntactically valid proxy token.
    #[test]
    fn caller_credentials_parse_without_panic(
        headers in proptest::collection::vec(
            (select(vec!["authorization", "proxy-authorization", "private-token"]), credential_value()),
            0..4,
        )
    ) {
        let mut map = HeaderMap::new();
        for (name, value) in &headers {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                map.append(HeaderName::from_static(name), v);
            }
        }
        if let Ok(Some(token)) = presented_proxy_token(&map) {
            let t = token.expose_secret();
            prop_assert!(t.starts_with(TOKEN_PREFIX) && t.len() > TOKEN_PREFIX.len());
            prop_assert!(t.len() <= 256);
            prop_assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
            let _ = is_well_formed(t);
        }
    }

    /// The offline check accepts only the two token shapes we issue.
    #[test]
    fn only_issued_token_shapes_are_well_formed(
        s in prop_oneof!["tpx_[0-9A-Za-z]{49}", "tpx_[0-9A-Za-z_-]{43}", "\\PC{0,80}"]
    ) {
        if is_well_formed(&s) {
            prop_assert!(s.starts_with(TOKEN_PREFIX));
            prop_assert!(s.len() == CHECKSUMMED_LEN || s.len() == TOKEN_PREFIX.len() + 43);
        }
    }

    /// Arbitrary text as a config file: parsed or refused, never a panic, and a
    /// refusal is one line that names a key.
    #[test]
    fn arbitrary_config_text_is_refused_in_one_line(text in "\\PC{0,300}") {
        if let Err(e) = Config::from_toml_with_env(&text, &[]) {
            assert_one_line_naming_a_key(&e.to_string())?;
        }
    }

    /// Every known key set to a value of any type (through the file or through
    /// its environment override): accepted or refused in one line naming it.
    #[test]
    fn any_value_for_any_key_is_refused_in_one_line(
        (section, key) in select(KEYS.to_vec()),
        value in toml_value(),
        through_env in any::<bool>(),
    ) {
        let (text, env) = if through_env {
            let name = format!("TOKENPROXY_{}__{}", section.to_uppercase(), key.to_uppercase());
            let raw = value.trim_matches('"').to_string();
            (format!("{}\n", BASE_PROVIDER), vec![(name, raw)])
        } else {
            (format!("[{section}]\n{key} = {value}\n{}\n", BASE_PROVIDER), vec![])
        };
        if let Err(e) = Config::from_toml_with_env(&text, &env) {
            assert_one_line_naming_a_key(&e.to_string())?;
        }
    }

    /// Route keys set to a value of any type.
    #[test]
    fn any_value_for_any_route_key_is_refused_in_one_line(
        key in select(ROUTE_KEYS.to_vec()),
        value in toml_value(),
    ) {
        let text = format!(
            "{BASE_PROVIDER}\n  [[providers.routes]]\n  prefix = \"/r\"\n  upstream = \"https://u.example\"\n  {key} = {value}\n"
        );
        let text = if key == "prefix" || key == "upstream" {
            format!("{BASE_PROVIDER}\n  [[providers.routes]]\n  hosts = [\"h.example\"]\n  {key} = {value}\n")
        } else {
            text
        };
        if let Err(e) = Config::from_toml_with_env(&text, &[]) {
            assert_one_line_naming_a_key(&e.to_string())?;
        }
    }

    /// CONNECT targets: the host that comes out is plain (no userinfo, path,
    /// brackets or upper case), and the upstream authority built from it
    /// carries exactly that host and port.
    #[test]
    fn connect_authorities_parse_without_panic(target in connect_target_text()) {
        let Ok(uri) = Uri::from_str(&target) else { return Ok(()) };
        let Ok((host, port)) = connect_target(&uri) else { return Ok(()) };
        prop_assert!(!host.contains(['@', '/', '[', ']', ' ']), "{target} -> {host}");
        prop_assert_eq!(host.to_ascii_lowercase(), host.clone());
        if let Ok(authority) = upstream_authority(&host, port, 443) {
            prop_assert!(authority.as_str().starts_with(&host) || authority.host() == host);
            prop_assert_eq!(authority.port_u16().unwrap_or(443), port);
        }
    }

    /// Absolute-form targets (`GET http://host/path`): the upstream URI keeps
    /// the path and query byte for byte and drops any userinfo.
    #[test]
    fn absolute_form_targets_keep_path_and_lose_userinfo(target in absolute_target_text()) {
        let Ok(uri) = Uri::from_str(&target) else { return Ok(()) };
        // Only absolute-form reaches this phase (`is_absolute_form`).
        if uri.scheme().is_none() {
            return Ok(());
        }
        let Some(authority) = uri.authority() else { return Ok(()) };
        let port = authority.port_u16().unwrap_or(443);
        let Ok(up) = upstream_authority(authority.host(), port, 443) else { return Ok(()) };
        prop_assert!(!up.as_str().contains('@'));
        if let Ok(out) = forward_uri("https", up, &uri) {
            prop_assert_eq!(out.path(), uri.path());
            prop_assert_eq!(out.query(), uri.query());
            prop_assert!(out.authority().is_some_and(|a| !a.as_str().contains('@')));
        }
    }
}

fn assert_one_line_naming_a_key(msg: &str) -> Result<(), TestCaseError> {
    prop_assert!(!msg.contains('\n') && !msg.contains('\r'), "{msg:?}");
    let (key, rest) = msg
        .split_once(": ")
        .ok_or_else(|| TestCaseError::fail(format!("no key in {msg:?}")))?;
    prop_assert!(!key.is_empty() && !rest.is_empty(), "{msg:?}");
    Ok(())
}

/// A provider every generated config carries, so route and provider checks run.
const BASE_PROVIDER: &str = r#"
[[providers]]
id = "p"
client_id = "c"
token_url = "https://idp.example/token"
"#;

/// (section, key) of every scalar key outside `providers`.
const KEYS: &[(&str, &str)] = &[
    ("server", "listen"),
    ("server", "admin_listen"),
    ("server", "max_connections"),
    ("server", "max_header_bytes"),
    ("server", "header_read_timeout"),
    ("server", "upstream_timeout"),
    ("server", "connect_timeout"),
    ("server", "shutdown_grace"),
    ("server", "forwarded_headers"),
    ("server", "body_idle_timeout"),
    ("server", "max_connections_per_ip"),
    ("server", "idle_timeout"),
    ("server", "http2_keepalive_interval"),
    ("server", "http2_keepalive_timeout"),
    ("server", "http2_max_concurrent_streams"),
    ("server", "retry_buffer_budget"),
    ("database", "url"),
    ("database", "migrate_on_start"),
    ("database", "max_connections"),
    ("database", "acquire_timeout"),
    ("tokens", "refresh_skew"),
    ("tokens", "cache_capacity"),
    ("tokens", "refresh_ahead_remaining"),
    ("tokens", "lease_timeout"),
    ("tokens", "reject_cooldown"),
    ("callers", "mode"),
    ("callers", "static_user"),
    ("callers", "cache_ttl"),
    ("callers", "outage_grace"),
    ("callers", "max_concurrent_lookups"),
    ("callers", "lookup_wait"),
    ("callers", "auth_failure_limit"),
    ("callers", "auth_failure_window"),
    ("logging", "format"),
    ("logging", "audit"),
];

const ROUTE_KEYS: &[&str] = &[
    "prefix",
    "upstream",
    "hosts",
    "connect_to",
    "allow_plain_http",
    "inject",
    "upstream_ca",
    "cookies",
    "methods",
];

/// TOML values of every type, including the awkward ones.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| if f.is_finite() {
            format!("{f:?}")
        } else {
            "nan".into()
        }),
        any::<bool>().prop_map(|b| b.to_string()),
        select(vec![
            "\"0s\"",
            "\"1ns\"",
            "\"10y\"",
            "\"-1s\"",
            "\"bearer\"",
            "\"static\"",
            "\"\"",
            "\"::\"",
            "\"127.0.0.1:0\"",
            "\"[::1]:99999\"",
            "[]",
            "{}",
            "[\"GET\"]",
            "{ header = \"X\" }",
            "{ basic_username = \"\" }",
            "\"env:NOPE\"",
            "\"file:/nope\"",
            "\"postgres://\"",
            "\"sqlite://\"",
            "18446744073709551615",
            "1e400",
        ])
        .prop_map(String::from),
        "[ -~&&[^\"\\\\]]{0,40}".prop_map(|s| format!("\"{s}\"")),
        proptest::collection::vec("[ -~&&[^\"\\\\]]{0,10}", 0..3).prop_map(|v| format!(
            "[{}]",
            v.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    ]
}

fn host_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9.-]{0,30}",
        "\\[[0-9a-fA-F:]{0,20}\\]",
        "[ -~]{0,30}",
        select(vec![
            "api.github.test.",
            "API.GITHUB.TEST",
            "*.x",
            "user@host",
            "h%2e",
            "[::1]"
        ])
        .prop_map(String::from),
    ]
}

fn connect_target_text() -> impl Strategy<Value = String> {
    (host_text(), prop_oneof!["", ":[0-9]{0,6}", ":[ -~]{0,6}"])
        .prop_map(|(h, p)| format!("{h}{p}"))
}

fn absolute_target_text() -> impl Strategy<Value = String> {
    (
        select(vec!["http://", "https://", "HTTPS://", "ftp://", ""]),
        prop_oneof!["", "[a-z]{1,5}@", "[a-z]{1,5}:[a-z]{0,5}@"],
        host_text(),
        prop_oneof!["", ":[0-9]{1,5}"],
        "(/[ -~&&[^ #]]{0,20}){0,3}",
        prop_oneof!["", "\\?[ -~&&[^ #]]{0,20}"],
    )
        .prop_map(|(s, u, h, p, path, q)| format!("{s}{u}{h}{p}{path}{q}"))
}

/// Regressions found by the long run (`FUZZ_CASES=1000000`): a stray bracket in
/// a CONNECT host (`&[]:1` came out as the host `&[`) is refused; bracketed
/// IPv6 literals and ordinary names still parse.
#[test]
fn connect_hosts_with_stray_brackets_are_refused() {
    for bad in ["&[]:1", "a]:443", "x[y]:443", "[::1]]:443"] {
        let Ok(uri) = Uri::from_str(bad) else {
            continue;
        };
        assert!(connect_target(&uri).is_err(), "{bad} accepted");
    }
    for (good, host) in [("[::1]:443", "::1"), ("Example.COM.:443", "example.com")] {
        let uri = Uri::from_str(good).unwrap();
        assert_eq!(connect_target(&uri).unwrap(), (host.to_string(), 443));
    }
}
