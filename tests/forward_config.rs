//! Forward-mode config: `[forward]`, route `hosts`, `connect_to` and
//! `allow_plain_http` load, and every mistake is one line naming its key.

use tokenproxy::config::{Config, HostPattern, Unrouted};

const FORWARD: &str = r#"
[forward]
ca_cert = "/tmp/ca.pem"
ca_key = "/tmp/ca-key.pem"
"#;

fn load(text: &str) -> Result<Config, String> {
    Config::from_toml_with_env(text, &[]).map_err(|e| e.to_string())
}

/// A config with `[forward]` (when `forward`) and one provider whose one route
/// has the given keys.
fn with_route(forward: bool, route: &str) -> String {
    format!(
        r#"{}
[[providers]]
id = "github"
client_id = "cid"
token_url = "https://github.com/login/oauth/access_token"

  [[providers.routes]]
  {route}
"#,
        if forward { FORWARD } else { "" }
    )
}

fn rejects(text: &str, key: &str) -> String {
    let err = load(text).expect_err("config should be rejected");
    assert!(
        err.starts_with(&format!("{key}: ")),
        "error should name `{key}`: {err}"
    );
    assert!(!err.contains('\n'), "one line: {err}");
    err
}

#[test]
fn forward_routes_load() {
    let cfg = load(&with_route(
        true,
        r#"hosts = ["API.github.com", "*.example.com:8443"]
  connect_to = "127.0.0.1:9443"
  allow_plain_http = true"#,
    ))
    .unwrap();
    let f = cfg.forward.as_ref().unwrap();
    assert_eq!(f.unrouted, Unrouted::Deny, "deny by default");
    let r = &cfg.providers[0].routes[0];
    assert!(r.prefix.is_none() && r.upstream.is_none());
    assert_eq!(r.hosts[0], HostPattern::parse("api.github.com").unwrap());
    assert!(r.hosts[1].wildcard);
    assert_eq!(r.connect_to.as_deref(), Some("127.0.0.1:9443"));
    assert!(r.allow_plain_http);
    // Both modes on one route.
    load(&with_route(
        true,
        r#"prefix = "/gh"
  upstream = "https://api.github.com"
  hosts = ["api.github.com"]"#,
    ))
    .unwrap();
    let tunnel = format!("{FORWARD}unrouted = \"tunnel\"\n");
    assert_eq!(
        load(&tunnel).unwrap().forward.unwrap().unrouted,
        Unrouted::Tunnel
    );
}

#[test]
fn route_mistakes_name_their_key() {
    rejects(
        &with_route(true, r#"inject = "bearer""#),
        "providers[0].routes[0].prefix",
    );
    rejects(
        &with_route(true, r#"prefix = "/gh""#),
        "providers[0].routes[0].upstream",
    );
    rejects(
        &with_route(
            true,
            r#"hosts = ["a.com"]
  upstream = "https://a.com""#,
        ),
        "providers[0].routes[0].upstream",
    );
    let err = rejects(
        &with_route(false, r#"hosts = ["a.com"]"#),
        "providers[0].routes[0].hosts",
    );
    assert!(err.contains("[forward]"), "{err}");
    rejects(
        &with_route(true, r#"hosts = ["https://a.com"]"#),
        "providers[0].routes[0].hosts[0]",
    );
    rejects(
        &with_route(true, r#"hosts = ["a.*.com"]"#),
        "providers[0].routes[0].hosts[0]",
    );
    rejects(
        &with_route(true, r#"hosts = ["a.com", "A.com"]"#),
        "providers[0].routes[0].hosts[1]",
    );
    rejects(
        &with_route(
            true,
            r#"hosts = ["a.com"]
  connect_to = "127.0.0.1""#,
        ),
        "providers[0].routes[0].connect_to",
    );
    rejects(
        &with_route(
            true,
            r#"prefix = "/gh"
  upstream = "https://a.com"
  allow_plain_http = true"#,
        ),
        "providers[0].routes[0].allow_plain_http",
    );
}

#[test]
fn forward_section_mistakes_name_their_key() {
    rejects("[forward]\nca_cert = \"/x\"\n", "forward");
    rejects(
        &format!("{FORWARD}unrouted = \"allow\"\n"),
        "forward.unrouted",
    );
    rejects(
        &format!("{FORWARD}listen = \"127.0.0.1:1\"\n"),
        "forward.listen",
    );
}
