//! Config validation: every rejected case names the offending key (and never echoes
//! a secret), environment overrides apply, and every example in `config/` loads.

use std::path::Path;

use secrecy::ExposeSecret;
use tokenproxy::config::{CallerMode, Config, Inject};

/// A valid base64 32-byte key.
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A minimal valid config with one provider and one route.
const BASE: &str = r#"
[[providers]]
id = "github"
client_id = "Iv1.abc"
client_secret = "s3cr3t-literal"
token_url = "https://github.com/login/oauth/access_token"

  [[providers.routes]]
  prefix = "/github/api"
  upstream = "https://api.github.com"
"#;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load(text: &str) -> Result<Config, String> {
    load_env(text, &[])
}

fn load_env(text: &str, pairs: &[(&str, &str)]) -> Result<Config, String> {
    Config::from_toml_with_env(text, &env(pairs)).map_err(|e| e.to_string())
}

/// Asserts `text` is rejected with a one-line message starting with `key: `.
fn rejects(text: &str, pairs: &[(&str, &str)], key: &str) -> String {
    let err = load_env(text, pairs).expect_err("config should be rejected");
    assert!(
        err.starts_with(&format!("{key}: ")),
        "error should name `{key}`: {err}"
    );
    assert!(!err.contains('\n'), "error should be one line: {err}");
    err
}

#[test]
fn base_config_loads() {
    let cfg = load(BASE).unwrap();
    assert_eq!(cfg.providers.len(), 1);
    assert_eq!(cfg.providers[0].routes[0].inject, Inject::Bearer);
    assert_eq!(cfg.tokens.refresh_skew.as_secs(), 60);
    assert_eq!(cfg.callers.mode, CallerMode::Token);
}

#[test]
fn empty_file_is_all_defaults() {
    let cfg = load("").unwrap();
    assert_eq!(cfg.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(cfg.server.admin_listen.to_string(), "127.0.0.1:9090");
    assert!(cfg.database.migrate_on_start);
    assert!(cfg.encryption.keys.is_empty());
}

#[test]
fn unknown_top_level_key_is_named() {
    let err = rejects(&format!("colour = 1\n{BASE}"), &[], "colour");
    assert!(err.contains("unknown field"), "{err}");
}

#[test]
fn unknown_section_key_is_named() {
    rejects("[server]\nlisen = \"127.0.0.1:1\"\n", &[], "server.lisen");
}

#[test]
fn unknown_provider_key_is_named() {
    let text = BASE.replace("client_id =", "clinet_id = \"x\"\nclient_id =");
    rejects(&text, &[], "providers[0].clinet_id");
}

#[test]
fn unknown_route_key_is_named() {
    let text = format!("{BASE}  upstream_cert = \"x\"\n");
    rejects(&text, &[], "providers[0].routes[0].upstream_cert");
}

#[test]
fn duplicate_route_prefix_is_named() {
    let text = format!(
        "{BASE}\n  [[providers.routes]]\n  prefix = \"/github/api/\"\n  upstream = \"https://example.com\"\n"
    );
    let err = rejects(&text, &[], "providers[0].routes[1].prefix");
    assert!(err.contains("duplicate route prefix"), "{err}");
}

#[test]
fn duplicate_prefix_across_providers_is_named() {
    let second = BASE.replace("id = \"github\"", "id = \"other\"");
    let text = format!("{BASE}\n{second}");
    rejects(&text, &[], "providers[1].routes[0].prefix");
}

#[test]
fn duplicate_provider_id_is_named() {
    let second = BASE.replace("/github/api", "/other");
    rejects(&format!("{BASE}\n{second}"), &[], "providers[1].id");
}

#[test]
fn route_prefix_must_be_absolute() {
    rejects(
        &BASE.replace("\"/github/api\"", "\"github/api\""),
        &[],
        "providers[0].routes[0].prefix",
    );
}

#[test]
fn unparseable_url_is_named() {
    rejects(
        &BASE.replace("https://github.com/login", "not a url/login"),
        &[],
        "providers[0].token_url",
    );
}

#[test]
fn non_http_upstream_is_named() {
    let err = rejects(
        &BASE.replace("https://api.github.com", "ftp://api.github.com"),
        &[],
        "providers[0].routes[0].upstream",
    );
    assert!(err.contains("scheme"), "{err}");
}

#[test]
fn plain_http_secret_endpoints_are_refused_unless_loopback() {
    const GH_TOKEN_URL: &str = "token_url = \"https://github.com/login/oauth/access_token\"";
    // Each endpoint that is sent the client secret or a token, over plain http to
    // another host: refused with its key.
    for key in ["token_url", "device_authorization_url", "revocation_url"] {
        let line = format!("{key} = \"http://idp.example/oauth/x\"");
        let endpoints = if key == "token_url" {
            line
        } else {
            format!("{GH_TOKEN_URL}\n{line}")
        };
        let err = rejects(
            &BASE.replace(GH_TOKEN_URL, &endpoints),
            &[],
            &format!("providers[0].{key}"),
        );
        assert!(err.contains("http://") && err.contains("loopback"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
    }
    // The same keys to a loopback host (a local IdP, as the tests run): accepted.
    let local = BASE.replace(
        GH_TOKEN_URL,
        "token_url = \"http://127.0.0.1:9/oauth/token\"\n\
         device_authorization_url = \"http://[::1]:9/oauth/device\"\n\
         revocation_url = \"http://localhost:9/oauth/revoke\"",
    );
    load(&local).unwrap();
}

#[test]
fn upstream_with_credentials_is_named() {
    rejects(
        &BASE.replace("https://api.github.com", "https://u:pw@api.github.com"),
        &[],
        "providers[0].routes[0].upstream",
    );
}

#[test]
fn bad_inject_is_named() {
    let text = format!("{BASE}  inject = \"basic\"\n");
    rejects(&text, &[], "providers[0].routes[0].inject");
}

#[test]
fn short_encryption_key_is_named_without_echoing_it() {
    let short = "c2hvcnQta2V5"; // base64("short-key")
    let text = format!("[encryption]\nkeys = [\"{KEY}\", \"{short}\"]\n{BASE}");
    let err = rejects(&text, &[], "encryption.keys[1]");
    assert!(err.contains("32 bytes"), "{err}");
    assert!(!err.contains(short), "error echoes the key: {err}");
}

#[test]
fn non_base64_key_from_env_is_named_without_echoing_it() {
    let text = format!("[encryption]\nkeys = [\"env:TP_TEST_KEY\"]\n{BASE}");
    let err = rejects(
        &text,
        &[("TP_TEST_KEY", "%%not-base64%%")],
        "encryption.keys[0]",
    );
    assert!(!err.contains("not-base64"), "error echoes the key: {err}");
}

#[test]
fn encryption_key_from_env_loads() {
    let text = format!("[encryption]\nkeys = [\"env:TP_TEST_KEY\"]\n{BASE}");
    let cfg = load_env(&text, &[("TP_TEST_KEY", KEY)]).unwrap();
    assert_eq!(cfg.encryption_keys().len(), 1);
}

#[test]
fn static_mode_on_non_loopback_is_named() {
    let text = format!(
        "[server]\nlisten = \"0.0.0.0:8080\"\n[callers]\nmode = \"static\"\nstatic_user = \"6f9619ff-8b86-d011-b42d-00cf4fc964ff\"\n{BASE}"
    );
    let err = rejects(&text, &[], "server.listen");
    assert!(err.contains("loopback"), "{err}");
}

#[test]
fn static_mode_on_loopback_loads() {
    let text = format!(
        "[server]\nlisten = \"[::1]:8080\"\n[callers]\nmode = \"static\"\nstatic_user = \"6f9619ff-8b86-d011-b42d-00cf4fc964ff\"\n{BASE}"
    );
    assert_eq!(load(&text).unwrap().callers.mode, CallerMode::Static);
}

#[test]
fn static_mode_without_user_is_named() {
    rejects(
        &format!("[callers]\nmode = \"static\"\n{BASE}"),
        &[],
        "callers.static_user",
    );
}

#[test]
fn caller_outage_keys_default_and_zero_lookups_is_refused() {
    let cfg = load(BASE).unwrap();
    assert_eq!(
        cfg.callers.outage_grace,
        std::time::Duration::from_secs(3600)
    );
    assert_eq!(cfg.callers.max_concurrent_lookups, 8);
    rejects(
        &format!("[callers]\nmax_concurrent_lookups = 0\n{BASE}"),
        &[],
        "callers.max_concurrent_lookups",
    );
}

#[test]
fn unset_env_secret_names_the_key_and_the_variable() {
    let text = BASE.replace("\"s3cr3t-literal\"", "\"env:TP_TEST_UNSET_SECRET\"");
    let err = rejects(&text, &[], "providers[0].client_secret");
    assert!(
        err.ends_with("environment variable TP_TEST_UNSET_SECRET is not set"),
        "{err}"
    );
}

#[test]
fn env_secret_resolves() {
    let text = BASE.replace("\"s3cr3t-literal\"", "\"env:TP_TEST_SECRET\"");
    let cfg = load_env(&text, &[("TP_TEST_SECRET", "from-env")]).unwrap();
    let secret = cfg.providers[0].client_secret.as_ref().unwrap();
    assert_eq!(secret.expose_secret(), "from-env");
}

#[test]
fn file_secret_resolves_and_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, "from-file\n").unwrap();
    let text = BASE.replace(
        "\"s3cr3t-literal\"",
        &format!("\"file:{}\"", path.display()),
    );
    let cfg = load(&text).unwrap();
    let secret = cfg.providers[0].client_secret.as_ref().unwrap();
    assert_eq!(secret.expose_secret(), "from-file");

    let missing = BASE.replace(
        "\"s3cr3t-literal\"",
        &format!("\"file:{}\"", dir.path().join("nope").display()),
    );
    rejects(&missing, &[], "providers[0].client_secret");
}

#[test]
fn bad_duration_is_named() {
    let err = rejects(
        "[tokens]\nrefresh_skew = \"soon\"\n",
        &[],
        "tokens.refresh_skew",
    );
    assert!(err.contains("invalid duration"), "{err}");
}

#[test]
fn durations_parse() {
    let cfg = load("[tokens]\nrefresh_skew = \"1m 30s\"\nlease_timeout = \"2m\"\n").unwrap();
    assert_eq!(cfg.tokens.refresh_skew.as_secs(), 90);
    assert_eq!(cfg.tokens.lease_timeout.as_secs(), 120);
}

#[test]
fn bad_listen_address_is_named() {
    rejects("[server]\nlisten = \"localhost\"\n", &[], "server.listen");
}

#[test]
fn bad_database_url_is_named_without_echoing_it() {
    let text = "[database]\nurl = \"mysql://root:hunter2@db/x\"\n";
    let err = rejects(text, &[], "database.url");
    assert!(!err.contains("hunter2"), "error echoes the URL: {err}");
}

#[test]
fn invalid_toml_is_one_line_with_a_line_number() {
    let err = rejects("[server]\nlisten = \n", &[], "config");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn refresh_fraction_out_of_range_is_named() {
    rejects(
        "[tokens]\nrefresh_ahead_remaining = 1.5\n",
        &[],
        "tokens.refresh_ahead_remaining",
    );
}

#[test]
fn database_url_env_overrides_the_file() {
    let cfg = load_env(BASE, &[("DATABASE_URL", "postgres://u:pw@db:5432/x")]).unwrap();
    assert_eq!(
        cfg.database.url.expose_secret(),
        "postgres://u:pw@db:5432/x"
    );
}

#[test]
fn section_overrides_apply_with_types() {
    let cfg = load_env(
        BASE,
        &[
            ("TOKENPROXY_SERVER__LISTEN", "127.0.0.1:7000"),
            ("TOKENPROXY_TOKENS__CACHE_CAPACITY", "42"),
            ("TOKENPROXY_TOKENS__REFRESH_AHEAD", "false"),
            ("TOKENPROXY_TOKENS__REFRESH_SKEW", "5s"),
            ("TOKENPROXY_SERVER__TLS__CERT", "/tls/cert.pem"),
            ("TOKENPROXY_SERVER__TLS__KEY", "/tls/key.pem"),
            ("TOKENPROXY_ENCRYPTION__KEYS", &format!("{KEY},{KEY}")),
            // Not overrides: no `__`.
            ("TOKENPROXY_CONFIG", "/etc/x.toml"),
            ("TOKENPROXY_KEY", "whatever"),
        ],
    )
    .unwrap();
    assert_eq!(cfg.server.listen.port(), 7000);
    assert_eq!(cfg.tokens.cache_capacity, 42);
    assert!(!cfg.tokens.refresh_ahead);
    assert_eq!(cfg.tokens.refresh_skew.as_secs(), 5);
    assert_eq!(
        cfg.server.tls.as_ref().unwrap().cert,
        Path::new("/tls/cert.pem")
    );
    assert_eq!(cfg.encryption.keys.len(), 2);
}

#[test]
fn coder_section_can_be_set_from_the_environment() {
    let cfg = load_env(
        BASE,
        &[("TOKENPROXY_CODER__ACCESS_URL", "https://coder.example.com")],
    )
    .unwrap();
    assert_eq!(
        cfg.coder.unwrap().access_url.unwrap().as_str(),
        "https://coder.example.com/"
    );
}

#[test]
fn unknown_override_section_is_named() {
    rejects(
        BASE,
        &[("TOKENPROXY_SERVR__LISTEN", "127.0.0.1:1")],
        "TOKENPROXY_SERVR__LISTEN",
    );
}

#[test]
fn bad_override_value_names_key_and_variable() {
    let err = rejects(
        BASE,
        &[("TOKENPROXY_SERVER__LISTEN", "nowhere")],
        "server.listen",
    );
    assert!(err.contains("TOKENPROXY_SERVER__LISTEN"), "{err}");
}

#[test]
fn unknown_override_key_is_named() {
    let err = rejects(BASE, &[("TOKENPROXY_TOKENS__SKEW", "5s")], "tokens.skew");
    assert!(err.contains("TOKENPROXY_TOKENS__SKEW"), "{err}");
}

#[test]
fn debug_output_redacts_secrets() {
    let cfg = load_env(BASE, &[("DATABASE_URL", "postgres://u:hunter2@db/x")]).unwrap();
    let dbg = format!("{cfg:?}");
    assert!(!dbg.contains("s3cr3t-literal"), "{dbg}");
    assert!(!dbg.contains("hunter2"), "{dbg}");
}

#[test]
fn every_example_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let vars = [
        ("TOKENPROXY_KEY", KEY),
        ("GITHUB_CLIENT_SECRET", "gh-secret"),
        ("GITLAB_CLIENT_SECRET", "gl-secret"),
    ];
    let mut loaded = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            load_env(&text, &vars).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            loaded += 1;
        }
    }
    assert!(loaded >= 2, "expected the shared and sidecar examples");
}

#[test]
fn example_shapes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let vars = [
        ("TOKENPROXY_KEY", KEY),
        ("GITHUB_CLIENT_SECRET", "gh-secret"),
        ("GITLAB_CLIENT_SECRET", "gl-secret"),
    ];
    let shared = std::fs::read_to_string(dir.join("shared.toml")).unwrap();
    let shared = load_env(&shared, &vars).unwrap();
    assert_eq!(shared.callers.mode, CallerMode::Token);
    assert!(shared.providers.len() >= 2);
    let injects: Vec<_> = shared
        .providers
        .iter()
        .flat_map(|p| p.routes.iter().map(|r| r.inject.clone()))
        .collect();
    assert!(injects.contains(&Inject::Bearer));
    assert!(injects
        .iter()
        .any(|i| matches!(i, Inject::BasicUsername(_))));
    assert!(injects.iter().any(|i| matches!(i, Inject::Header(_))));

    let sidecar = std::fs::read_to_string(dir.join("sidecar.toml")).unwrap();
    let sidecar = load_env(&sidecar, &vars).unwrap();
    assert_eq!(sidecar.callers.mode, CallerMode::Static);
    assert!(sidecar.server.listen.ip().is_loopback());
}

/// The binary with `TOKENPROXY_CONFIG` naming a broken file: `--config` must win.
#[test]
fn config_flag_wins_over_environment() {
    let dir = tempfile::tempdir().unwrap();
    let given = dir.path().join("given.toml");
    std::fs::write(
        &given,
        "[database]\nurl = \"postgres://unused@127.0.0.1:1/x\"\n",
    )
    .unwrap();
    let from_env = dir.path().join("from_env.toml");
    std::fs::write(&from_env, "this is [not toml\n").unwrap();
    let check = |flag: Option<&Path>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tokenproxy"));
        cmd.env_clear()
            .env("TOKENPROXY_CONFIG", &from_env)
            .current_dir(dir.path());
        if let Some(f) = flag {
            cmd.arg("--config").arg(f);
        }
        cmd.arg("check-config").output().unwrap()
    };
    // Without the flag the environment's file is read (and is broken) ...
    let o = check(None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(64), "stderr: {err}");
    assert!(err.contains("invalid TOML"), "{err}");
    // ... with it, the flag's file, and the environment is ignored.
    let o = check(Some(&given));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "stderr: {err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n");
}

#[test]
fn the_first_write_after_an_answer_must_fit_in_the_write_reserve() {
    // A 12 s lease keeps 3 s for the write; a 4 s pool wait could outlast it.
    let text = "[tokens]\nlease_timeout = \"12s\"\n[database]\nacquire_timeout = \"4s\"\n";
    let err = rejects(text, &[], "database.acquire_timeout");
    assert!(
        err.contains("4s") && err.contains("3s") && err.contains("tokens.lease_timeout"),
        "names both values and the other key to change: {err}"
    );
    load("[tokens]\nlease_timeout = \"12s\"\n[database]\nacquire_timeout = \"3s\"\n")
        .expect("a 3 s pool wait fits a 3 s reserve");
}

#[test]
fn provider_timeout_and_pool_wait_must_fit_in_the_lease() {
    // 10 s provider + 2 × 5 s pool wait = 20 s; a 24 s lease keeps 5 s for the
    // write, leaving 19 s: no exchange could ever start.
    let text = BASE.replace("token_url =", "timeout = \"10s\"\ntoken_url =");
    let tight = format!("[tokens]\nlease_timeout = \"24s\"\n{text}");
    let err = rejects(&tight, &[], "providers[0].timeout");
    assert!(err.contains("database.acquire_timeout") && err.contains("tokens.lease_timeout"));
    // The defaults (30 s lease) fit.
    load(&text).expect("10 s provider, 5 s pool wait, 30 s lease fit");
}
