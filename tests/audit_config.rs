//! Audit: configuration as an operator writes it. The example in DESIGN.md loads
//! as written, and nothing secret in a config (client secrets, database
//! passwords, keys, extra grant parameters such as a client assertion) shows in
//! its `Debug` output or in a validation error.

use tokenproxy::config::Config;

const DESIGN_EXAMPLE: &str = r#"
[server]
listen = "127.0.0.1:8080"        # the proxy
admin_listen = "127.0.0.1:9090"  # /healthz /readyz /metrics

[database]
url = "postgres://postgres@127.0.0.1:5432/tokenproxy"
migrate_on_start = true

[encryption]
keys = ["env:TOKENPROXY_KEY"]    # base64 32-byte keys; first encrypts, all decrypt

[tokens]
refresh_skew = "60s"
cache_capacity = 100000
refresh_ahead = true                # refresh links in use before they expire, in the background
refresh_ahead_used_within = "10m"   # ... links used within this window
refresh_ahead_remaining = 0.2       # ... once this fraction of their lifetime remains

[callers]
mode = "token"                   # "token": proxy tokens; "static": one fixed user (sidecar)
# static_user = "6f9619ff-8b86-d011-b42d-00cf4fc964ff"

[[providers]]
id = "github"
client_id = "Iv1.abc"
client_secret = "env:GITHUB_CLIENT_SECRET"   # any secret may be "env:VAR" or "file:PATH"
token_url = "https://github.com/login/oauth/access_token"

  [[providers.routes]]
  prefix = "/github/api"               # reverse mode: /github/api/user -> https://api.github.com/user
  upstream = "https://api.github.com"
  inject = "bearer"                    # Authorization: Bearer <token>

  [[providers.routes]]
  prefix = "/github/git"
  upstream = "https://github.com"
  inject = { basic_username = "x-access-token" }   # Authorization: Basic base64(x-access-token:<token>)
"#;

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes

fn env() -> Vec<(String, String)> {
    vec![
        ("TOKENPROXY_KEY".into(), KEY.into()),
        (
            "GITHUB_CLIENT_SECRET".into(),
            "gh_client_secret_value".into(),
        ),
        (
            "DATABASE_URL".into(),
            "postgres://svc:db_password_value@db.internal:5432/tokenproxy".into(),
        ),
        ("ASSERTION".into(), "client_assertion_value".into()),
    ]
}

#[test]
fn the_design_example_loads_and_debug_shows_no_secret() {
    let text = format!(
        "{DESIGN_EXAMPLE}\n  [providers.extra_params]\n  client_assertion = \"env:ASSERTION\"\n  audience = \"api\"\n"
    );
    let cfg = Config::from_toml_with_env(&text, &env()).unwrap();
    assert_eq!(cfg.providers[0].routes.len(), 2);
    assert_eq!(cfg.providers[0].extra_params.len(), 2);
    let debug = format!("{cfg:?}");
    for secret in [
        KEY,
        "gh_client_secret_value",
        "db_password_value",
        "client_assertion_value",
    ] {
        assert!(!debug.contains(secret), "{secret} in {debug}");
    }
}

#[test]
fn extra_params_resolve_env_and_file_like_other_secrets() {
    use secrecy::ExposeSecret;
    let text = format!(
        "{DESIGN_EXAMPLE}\n  [providers.extra_params]\n  client_assertion = \"env:ASSERTION\"\n"
    );
    let cfg = Config::from_toml_with_env(&text, &env()).unwrap();
    assert_eq!(
        cfg.providers[0].extra_params["client_assertion"].expose_secret(),
        "client_assertion_value"
    );
    let err = Config::from_toml_with_env(
        &format!("{DESIGN_EXAMPLE}\n  [providers.extra_params]\n  client_assertion = \"env:MISSING_VAR\"\n"),
        &env(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("MISSING_VAR"), "{err}");
}

#[test]
fn zero_timeouts_are_refused_with_their_key() {
    for (section, key) in [
        ("server", "header_read_timeout"),
        ("server", "upstream_timeout"),
        ("server", "connect_timeout"),
        ("database", "acquire_timeout"),
    ] {
        let text = format!("[{section}]\n{key} = \"0s\"\n");
        let err = Config::from_toml_with_env(&text, &[]).unwrap_err();
        assert_eq!(err.key, format!("{section}.{key}"), "{err}");
    }
}
