//! Provider presets: what a preset fills in, that explicit keys win, the forge
//! quirks in refresh-error classification (checked against the test IdP speaking
//! each dialect), OIDC discovery at start, and `tokenproxy providers`.

mod support;

use std::time::Duration;

use secrecy::ExposeSecret;
use support::idp::{Idp, IdpOptions};
use support::upstream::TestCa;
use tokenproxy::config::{Config, Inject};
use tokenproxy::oauth::revoke::Revoker;
use tokenproxy::oauth::{presets, ProviderClient, RefreshError};
use uuid::Uuid;

fn load(text: &str) -> Result<Config, tokenproxy::config::ConfigError> {
    Config::from_toml_with_env(text, &[("SECRET".into(), "s3cret".into())])
}

#[test]
fn a_preset_alone_is_a_working_provider() {
    let cfg = load(
        r#"
[[providers]]
id = "gh"
preset = "github"
client_id = "Iv1.abc"
client_secret = "env:SECRET"
"#,
    )
    .unwrap();
    let p = cfg.provider("gh").unwrap();
    assert_eq!(
        p.token_url.as_str(),
        "https://github.com/login/oauth/access_token"
    );
    assert_eq!(
        p.authorize_url.as_ref().unwrap().as_str(),
        "https://github.com/login/oauth/authorize"
    );
    assert_eq!(p.scopes, ["repo", "read:user"]);
    assert_eq!(p.routes.len(), 2);
    assert_eq!(p.routes[0].prefix.as_deref(), Some("/gh/api"));
    assert_eq!(p.routes[0].inject, Inject::Bearer);
    assert_eq!(p.routes[1].prefix.as_deref(), Some("/gh/git"));
    assert_eq!(
        p.routes[1].inject,
        Inject::BasicUsername("x-access-token".into())
    );
    assert!(p
        .extra_fields
        .contains(&"refresh_token_expires_in".to_string()));
}

#[test]
fn each_forge_has_its_git_username() {
    for (preset, extra, user) in [
        ("gitlab", "", "oauth2"),
        ("bitbucket", "", "x-token-auth"),
        ("gitea", "base_url = \"https://codeberg.org\"", "oauth2"),
    ] {
        let cfg = load(&format!(
            "[[providers]]\nid = \"p\"\npreset = \"{preset}\"\nclient_id = \"c\"\n{extra}\n"
        ))
        .unwrap_or_else(|e| panic!("{preset}: {e}"));
        let git = &cfg.providers[0].routes[1];
        assert_eq!(git.inject, Inject::BasicUsername(user.into()), "{preset}");
    }
}

#[test]
fn explicit_config_overrides_the_preset() {
    let cfg = load(
        r#"
[[providers]]
id = "gl"
preset = "gitlab"
base_url = "https://gitlab.example.com"
client_id = "c"
token_url = "https://other.example.com/token"
scopes = ["read_api"]
  [[providers.routes]]
  prefix = "/mine"
  upstream = "https://gitlab.example.com/api/v4"
"#,
    )
    .unwrap();
    let p = &cfg.providers[0];
    assert_eq!(p.token_url.as_str(), "https://other.example.com/token");
    assert_eq!(p.scopes, ["read_api"]);
    assert_eq!(p.routes.len(), 1);
    // What was not overridden still follows base_url.
    assert_eq!(
        p.device_authorization_url.as_ref().unwrap().as_str(),
        "https://gitlab.example.com/oauth/authorize_device"
    );
}

#[test]
fn bad_preset_config_is_refused_with_the_key() {
    for (text, key) in [
        ("preset = \"gitee\"", "providers[0].preset"),
        ("preset = \"gitea\"", "providers[0].base_url"),
        ("preset = \"oidc\"", "providers[0].issuer"),
        (
            "preset = \"github\"\nissuer = \"https://id.example\"",
            "providers[0].issuer",
        ),
        (
            "preset = \"gitlab\"\nbase_url = \"ftp://x\"",
            "providers[0].base_url",
        ),
    ] {
        let e = load(&format!(
            "[[providers]]\nid = \"p\"\nclient_id = \"c\"\n{text}\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, key, "{text}: {e}");
    }
}

#[test]
fn no_route_may_use_the_reserved_prefix() {
    for prefix in ["/_tokenproxy/x", "/_tokenproxy", "/_tokenproxy/"] {
        let e = load(&format!(
            "[[providers]]\nid = \"p\"\nclient_id = \"c\"\ntoken_url = \"https://t.example/t\"\n[[providers.routes]]\nprefix = \"{prefix}\"\nupstream = \"https://u.example\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "providers[0].routes[0].prefix", "{prefix}");
        assert!(e.message.contains("reserved"), "{e}");
    }
}

/// A provider pointing at `idp`, loaded through the whole config path so the
/// preset in `extra_toml` is expanded.
fn via_config(idp: &Idp, extra_toml: &str) -> tokenproxy::config::ProviderConfig {
    let cfg = load(&format!(
        "[[providers]]\nid = \"p\"\nclient_id = \"test-client\"\nclient_secret = \"test-secret\"\ntoken_url = {:?}\ntimeout = \"2s\"\nclient_auth = \"client_secret_basic\"\n{extra_toml}\n",
        idp.token_url()
    ))
    .unwrap();
    cfg.providers[0].clone()
}

/// Refreshes the seeded token once (rotating it), then presents the old one again.
async fn reuse(idp: &Idp, extra_toml: &str) -> (RefreshError, Uuid) {
    let user = Uuid::new_v4();
    let seeded = idp.seed(user);
    let client = ProviderClient::new(&via_config(idp, extra_toml)).unwrap();
    client
        .refresh(&seeded.refresh_token, Duration::from_secs(5))
        .await
        .unwrap();
    let err = client
        .refresh(&seeded.refresh_token, Duration::from_secs(5))
        .await
        .unwrap_err();
    (err, user)
}

#[tokio::test]
async fn gitea_reused_refresh_token_is_a_dead_link() {
    let idp = Idp::start(IdpOptions {
        gitea_style: true,
        ..Default::default()
    })
    .await;
    let (err, _) = reuse(
        &idp,
        &format!("preset = \"gitea\"\nbase_url = {:?}", idp.base_url()),
    )
    .await;
    assert!(matches!(err, RefreshError::Rejected(_)), "{err:?}");
    assert!(!err.is_client_rejected());
    assert_eq!(idp.reused(), 1);
}

#[tokio::test]
async fn without_the_gitea_preset_unauthorized_client_stays_a_client_problem() {
    let idp = Idp::start(IdpOptions {
        gitea_style: true,
        ..Default::default()
    })
    .await;
    let (err, _) = reuse(&idp, "").await;
    assert!(err.is_client_rejected(), "{err:?}");
}

#[tokio::test]
async fn github_200_bad_refresh_token_is_a_dead_link() {
    let idp = Idp::start(IdpOptions {
        github_style: true,
        ..Default::default()
    })
    .await;
    let (err, _) = reuse(
        &idp,
        &format!("preset = \"github\"\nbase_url = {:?}", idp.base_url()),
    )
    .await;
    assert_eq!(err, RefreshError::Rejected("bad_refresh_token".into()));
}

#[tokio::test]
async fn refresh_token_expiry_is_kept_as_an_instant() {
    let idp = Idp::start(IdpOptions {
        refresh_token_expires_in: Some(15_897_600),
        ..Default::default()
    })
    .await;
    let seeded = idp.seed(Uuid::new_v4());
    let p = via_config(
        &idp,
        &format!("preset = \"github-app\"\nbase_url = {:?}", idp.base_url()),
    );
    let before = chrono::Utc::now();
    let out = ProviderClient::new(&p)
        .unwrap()
        .refresh(&seeded.refresh_token, Duration::from_secs(5))
        .await
        .unwrap();
    let extra = out.extra.expect("extra fields kept");
    let at: chrono::DateTime<chrono::Utc> = extra["refresh_token_expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let expect = before + chrono::Duration::seconds(15_897_600);
    assert!((at - expect).num_seconds().abs() <= 5, "{at} vs {expect}");
    assert_eq!(extra["refresh_token_expires_in"], 15_897_600);
}

fn oidc_config(issuer: &str, token_url: &str) -> Config {
    load(&format!(
        "[[providers]]\nid = \"o\"\npreset = \"oidc\"\nclient_id = \"test-client\"\nclient_secret = \"test-secret\"\nissuer = {issuer:?}\ntimeout = \"2s\"\n{token_url}\n"
    ))
    .unwrap()
}

#[tokio::test]
async fn oidc_endpoints_come_from_discovery() {
    let idp = Idp::start(IdpOptions::default()).await;
    let mut cfg = oidc_config(&idp.base_url(), "");
    assert!(cfg.providers[0].needs_discovery);
    // Before discovery the placeholder token URL must not be used.
    assert!(ProviderClient::new(&cfg.providers[0]).is_err());
    presets::discover(&mut cfg).await.unwrap();
    let p = &cfg.providers[0];
    assert_eq!(p.token_url.as_str(), idp.token_url());
    assert_eq!(
        p.device_authorization_url.as_ref().unwrap().as_str(),
        format!("{}/oauth/device", idp.base_url())
    );
    assert_eq!(
        p.revocation_url.as_ref().unwrap().as_str(),
        format!("{}/oauth/revoke", idp.base_url())
    );
    assert_eq!(
        p.authorize_url.as_ref().unwrap().as_str(),
        format!("{}/oauth/authorize", idp.base_url())
    );
    let seeded = idp.seed(Uuid::new_v4());
    let out = ProviderClient::new(p)
        .unwrap()
        .refresh(&seeded.refresh_token, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(idp.is_valid_access_token(out.access_token.expose_secret()));
}

#[tokio::test]
async fn oidc_discovered_revocation_endpoint_is_what_unlinking_revokes_at() {
    // RFC 7009 endpoints must be https (the oauth2 crate refuses http), as at real providers.
    let ca = TestCa::new();
    let idp = Idp::start(IdpOptions {
        tls: Some(ca.acceptor()),
        ..IdpOptions::default()
    })
    .await;
    let ca_line = format!("token_ca = {:?}", ca.ca.display().to_string());
    let mut cfg = oidc_config(&idp.base_url(), &ca_line);
    presets::discover(&mut cfg).await.unwrap();
    let p = &cfg.providers[0];
    let seeded = idp.seed(Uuid::new_v4());
    let revoker = Revoker::new(p)
        .unwrap()
        .expect("discovery named a revocation endpoint");
    revoker
        .revoke(&seeded.access_token, &seeded.refresh_token)
        .await
        .unwrap();
    assert_eq!(idp.revocations(), 1);
    assert_eq!(
        idp.revoked_tokens(),
        vec![seeded.refresh_token.expose_secret().to_string()]
    );
}

#[tokio::test]
async fn discovered_endpoints_do_not_override_explicit_ones() {
    let idp = Idp::start(IdpOptions::default()).await;
    let mut cfg = oidc_config(
        &idp.base_url(),
        "revocation_url = \"https://revoke.example/r\"\ndevice_authorization_url = \"https://device.example/d\"",
    );
    presets::discover(&mut cfg).await.unwrap();
    let p = &cfg.providers[0];
    assert_eq!(p.token_url.as_str(), idp.token_url());
    assert_eq!(
        p.revocation_url.as_ref().unwrap().as_str(),
        "https://revoke.example/r"
    );
    assert_eq!(
        p.device_authorization_url.as_ref().unwrap().as_str(),
        "https://device.example/d"
    );
}

#[tokio::test]
async fn discovered_plain_http_endpoints_off_loopback_are_dropped_or_refused() {
    // The IdP runs on 127.0.0.1 (plain http there is allowed, as the test above
    // shows); its document names device and revocation endpoints elsewhere.
    let idp = Idp::start(IdpOptions {
        discovery_overrides: vec![
            (
                "revocation_endpoint",
                "http://idp.example/oauth/revoke".into(),
            ),
            (
                "device_authorization_endpoint",
                "http://idp.example/oauth/device".into(),
            ),
        ],
        ..Default::default()
    })
    .await;
    let mut cfg = oidc_config(&idp.base_url(), "");
    presets::discover(&mut cfg).await.unwrap();
    let p = &cfg.providers[0];
    assert_eq!(p.token_url.as_str(), idp.token_url());
    assert_eq!(p.revocation_url, None, "never sent a token in clear text");
    assert_eq!(p.device_authorization_url, None);
    assert!(Revoker::new(p).unwrap().is_none());

    // A plain-http token endpoint elsewhere: the provider is refused.
    let idp = Idp::start(IdpOptions {
        discovery_overrides: vec![("token_endpoint", "http://idp.example/oauth/token".into())],
        ..Default::default()
    })
    .await;
    let mut cfg = oidc_config(&idp.base_url(), "");
    let e = presets::discover(&mut cfg).await.unwrap_err();
    assert_eq!(e.key, "providers[0].issuer");
    assert!(
        e.message.contains("token_endpoint") && e.message.contains("loopback"),
        "{e}"
    );
    assert!(!e.to_string().contains('\n'), "{e}");
}

#[tokio::test]
async fn oidc_explicit_token_url_skips_discovery() {
    let mut cfg = oidc_config("http://127.0.0.1:9", "token_url = \"https://t.example/t\"");
    assert!(!cfg.providers[0].needs_discovery);
    presets::discover(&mut cfg).await.unwrap();
    assert_eq!(cfg.providers[0].token_url.as_str(), "https://t.example/t");
}

#[tokio::test]
async fn oidc_inconsistent_or_unreachable_issuer_is_refused() {
    let idp = Idp::start(IdpOptions {
        discovery_issuer: Some("https://evil.example".into()),
        ..Default::default()
    })
    .await;
    let mut cfg = oidc_config(&idp.base_url(), "");
    let e = presets::discover(&mut cfg).await.unwrap_err();
    assert_eq!(e.key, "providers[0].issuer");
    assert!(e.message.contains("evil.example"), "{e}");

    // Port 9 (discard) on loopback: nothing listens.
    let mut cfg = oidc_config("http://127.0.0.1:9", "");
    let e = presets::discover(&mut cfg).await.unwrap_err();
    assert_eq!(e.key, "providers[0].issuer");
    assert!(e.message.contains("cannot reach"), "{e}");
}

#[test]
fn providers_command_prints_every_preset() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .arg("providers")
        .env_remove("TOKENPROXY_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for p in presets::PRESETS {
        assert!(text.contains(&format!("{}: ", p.name)), "{}", p.name);
    }
    assert!(text.contains("x-token-auth"));
}
