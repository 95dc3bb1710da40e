//! Coder mode's configuration from coderd's own environment: providers and
//! routes built from `CODER_EXTERNAL_AUTH_<n>_*`, what `REGEX` and
//! `VALIDATE_URL` do, and the one-line errors naming each variable.

use secrecy::ExposeSecret;
use tokenproxy::config::Config;

#[test]
fn providers_and_routes_come_from_coders_external_auth_variables() {
    use tokenproxy::config::Inject;
    let env: Vec<(String, String)> = [
        ("CODER_EXTERNAL_AUTH_0_ID", "primary-github"),
        ("CODER_EXTERNAL_AUTH_0_TYPE", "github"),
        ("CODER_EXTERNAL_AUTH_0_CLIENT_ID", "Iv1.abc"),
        ("CODER_EXTERNAL_AUTH_0_CLIENT_SECRET", "gh-secret"),
        ("CODER_EXTERNAL_AUTH_1_ID", "gl"),
        ("CODER_EXTERNAL_AUTH_1_TYPE", "gitlab"),
        ("CODER_EXTERNAL_AUTH_1_CLIENT_ID", "gl-client"),
        (
            "CODER_EXTERNAL_AUTH_1_AUTH_URL",
            "https://gitlab.example.com/oauth/authorize",
        ),
        (
            "CODER_EXTERNAL_AUTH_1_TOKEN_URL",
            "https://gitlab.example.com/oauth/token",
        ),
        ("CODER_EXTERNAL_AUTH_2_ID", "bb"),
        ("CODER_EXTERNAL_AUTH_2_TYPE", "bitbucket-cloud"),
        ("CODER_EXTERNAL_AUTH_2_CLIENT_ID", "bb-client"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let toml =
        "[coder]\naccess_url = \"https://coder.example.com/\"\nexternal_auth_from_env = true\n";
    let cfg = Config::from_toml_with_env(toml, &env).unwrap();
    let ids: Vec<&str> = cfg.providers.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["primary-github", "gl", "bb"]);
    let git_user = |id: &str| {
        cfg.provider(id)
            .unwrap()
            .routes
            .iter()
            .find_map(|r| match &r.inject {
                Inject::BasicUsername(u) => Some(u.clone()),
                _ => None,
            })
    };
    // Coder's git usernames per type.
    assert_eq!(
        git_user("primary-github").as_deref(),
        Some("x-access-token")
    );
    assert_eq!(git_user("gl").as_deref(), Some("oauth2"));
    assert_eq!(git_user("bb").as_deref(), Some("x-token-auth"));
    let gh = cfg.provider("primary-github").unwrap();
    assert_eq!(
        gh.client_secret.as_ref().unwrap().expose_secret(),
        "gh-secret"
    );
    assert_eq!(
        cfg.provider("gl").unwrap().token_url.as_str(),
        "https://gitlab.example.com/oauth/token"
    );
    assert_eq!(
        cfg.coder.as_ref().unwrap().login_url("gl").as_deref(),
        Some("https://coder.example.com/external-auth/gl")
    );

    // A type without a preset needs its token URL; the error names the variable.
    let mut odd = env.clone();
    odd.push(("CODER_EXTERNAL_AUTH_3_ID".into(), "jfrog".into()));
    odd.push(("CODER_EXTERNAL_AUTH_3_TYPE".into(), "jfrog".into()));
    odd.push(("CODER_EXTERNAL_AUTH_3_CLIENT_ID".into(), "j".into()));
    let e = Config::from_toml_with_env(toml, &odd)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("CODER_EXTERNAL_AUTH_3_TYPE") && !e.contains('\n'),
        "{e}"
    );

    let slow = "[coder]\npoll_interval = \"5s\"\n";
    let e = Config::from_toml_with_env(slow, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("coder.poll_interval"), "{e}");
    let e = Config::from_toml_with_env("[coder]\ndatabase_url = \"sqlite://x.db\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("coder.database_url"), "{e}");
}

/// `CODER_EXTERNAL_AUTH_0_*` of a GitHub provider plus `extra`.
fn github_env(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    [
        ("CODER_EXTERNAL_AUTH_0_ID", "github"),
        ("CODER_EXTERNAL_AUTH_0_TYPE", "github"),
        ("CODER_EXTERNAL_AUTH_0_CLIENT_ID", "Iv1.abc"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

const FORWARD_CODER: &str = "[coder]\nexternal_auth_from_env = true\n\
    [forward]\nca_cert = \"/tmp/ca.pem\"\nca_key = \"/tmp/ca-key.pem\"\n";

/// The forward-mode hosts of provider `github`, sorted, and how many routes it has.
fn forward_hosts(extra: &[(&str, &str)]) -> Result<(Vec<String>, usize), String> {
    let cfg =
        Config::from_toml_with_env(FORWARD_CODER, &github_env(extra)).map_err(|e| e.to_string())?;
    let p = cfg.provider("github").unwrap();
    let mut hosts: Vec<String> = p
        .routes
        .iter()
        .flat_map(|r| r.hosts.iter().map(|h| h.host.clone()))
        .collect();
    hosts.sort();
    Ok((hosts, p.routes.len()))
}

#[test]
fn coders_regex_narrows_the_forward_hosts_a_provider_claims() {
    // Without REGEX, the preset's hosts: the API and git.
    let (all, routes) = forward_hosts(&[]).unwrap();
    assert_eq!(all, ["api.github.com", "github.com"]);
    // coderd's default GitHub regex names git remotes on github.com only: the API
    // host is no longer intercepted, but its reverse-mode route stays.
    let coder_default = r"^(https?://)?github\.com(/.*)?$";
    let (hosts, kept) = forward_hosts(&[("CODER_EXTERNAL_AUTH_0_REGEX", coder_default)]).unwrap();
    assert_eq!(hosts, ["github.com"]);
    assert_eq!(kept, routes, "routes keep their prefixes");
    // Unanchored, like Go's MatchString: `github\.com` matches both hosts.
    let (hosts, _) = forward_hosts(&[("CODER_EXTERNAL_AUTH_0_REGEX", r"github\.com")]).unwrap();
    assert_eq!(hosts, all);

    // A regex no host matches, or one that does not compile: one line naming it.
    for bad in [r"^https://gitlab\.example\.com/", "(unclosed"] {
        let e = forward_hosts(&[("CODER_EXTERNAL_AUTH_0_REGEX", bad)]).unwrap_err();
        assert!(
            e.contains("CODER_EXTERNAL_AUTH_0_REGEX") && !e.contains('\n'),
            "{e}"
        );
    }
}

#[test]
fn coders_validate_url_must_be_usable() {
    let ok = [(
        "CODER_EXTERNAL_AUTH_0_VALIDATE_URL",
        "https://api.github.com/user",
    )];
    forward_hosts(&ok).unwrap();
    for bad in ["not a url", "ftp://example.com/user"] {
        let e = forward_hosts(&[("CODER_EXTERNAL_AUTH_0_VALIDATE_URL", bad)]).unwrap_err();
        assert!(
            e.contains("CODER_EXTERNAL_AUTH_0_VALIDATE_URL") && !e.contains('\n'),
            "{e}"
        );
    }
}
