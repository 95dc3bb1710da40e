//! Follows the README's quick start as written (issue 6): the shell block after
//! the `<!-- quickstart` marker runs with bash in a fresh directory holding only
//! what a clone provides (README.md and config/), and its last request must get
//! the upstream's answer.
//!
//! What the test changes, and why:
//! - lines starting with `cargo ` (building and installing) are skipped; the
//!   binary under test is first on PATH instead;
//! - GitHub's URLs in the copied `config/quickstart.toml` point at the test IdP
//!   (token and device endpoints) and a local test upstream that accepts only
//!   tokens the IdP issued, since no test may leave 127.0.0.1 (plain http there
//!   is allowed for secret-bearing endpoints: it is loopback);
//! - the user is played as a human would: when `link login` prints the
//!   verification URL and the code, the test submits that code at the URL;
//! - the config's listeners bind port 0 (no fixed port to collide on, none picked
//!   and released beforehand); the script's stderr is also copied to a log in
//!   which `serve`'s `listening` line names the bound addresses, and the block's
//!   `127.0.0.1:8080` and its `healthcheck` (which would read port 0 from the
//!   config) take them from there ([`PREAMBLE`]).

mod support;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use support::idp::{Idp, IdpOptions};
use support::upstream::{CredentialForm, TestUpstream, TokenCheck};

const BIN: &str = env!("CARGO_BIN_EXE_tokenproxy");
const MARKER: &str = "<!-- quickstart";
/// Run before the block: copies the script's stderr (which `serve &` inherits)
/// to `.serve.log`, and defines `listening addr|admin`, the address of that
/// name in `serve`'s `listening` line (fails while there is none, so the
/// block's `until tokenproxy healthcheck` loop waits for it).
const PREAMBLE: &str = r#"exec 2> >(tee -a .serve.log >&2)
listening() { grep -m1 ' listening ' .serve.log 2>/dev/null | grep -o " $1=[^ ]*" | cut -d= -f2; }
"#;
/// The proxy address the block names, and what the script asks instead.
const PROXY: (&str, &str) = ("127.0.0.1:8080", "$(listening addr)");
/// The block's readiness check, and the same with the announced admin address.
const HEALTHCHECK: (&str, &str) = (
    "tokenproxy healthcheck",
    r#"tokenproxy healthcheck --addr "$(listening admin)""#,
);

/// The first ```sh block after the marker.
fn quickstart_block(readme: &str) -> String {
    let after = &readme[readme
        .find(MARKER)
        .expect("README has a quick-start marker")..];
    let start = after
        .find("```sh\n")
        .expect("a sh block follows the marker")
        + 6;
    let len = after[start..].find("```").expect("the block ends");
    after[start..start + len].to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_quick_start_works_as_written() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let block = quickstart_block(&readme);
    // The OAuth app `config/quickstart.toml` and the block name.
    let idp = Arc::new(
        Idp::start(IdpOptions {
            client_id: "Iv1.0123456789abcdef".into(),
            client_secret: "changeme".into(),
            ..IdpOptions::default()
        })
        .await,
    );
    let issued = idp.clone();
    let check: TokenCheck = Arc::new(move |t: &str| issued.is_valid_access_token(t));
    let upstream = TestUpstream::start(CredentialForm::Bearer, check).await;

    // A fresh checkout: README.md and config/, no ./data.
    let clone = tempfile::tempdir().unwrap();
    std::fs::copy(repo.join("README.md"), clone.path().join("README.md")).unwrap();
    copy_dir(&repo.join("config"), &clone.path().join("config"));
    let config_path = clone.path().join("config/quickstart.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let bind_any = |s: &str, key: &str, addr: &str| {
        let (from, to) = (
            format!("{key} = \"{addr}\""),
            format!("{key} = \"127.0.0.1:0\""),
        );
        assert!(s.contains(&from), "the config has {from}");
        s.replace(&from, &to)
    };
    let config = bind_any(&config, "listen", "127.0.0.1:8080");
    let config = bind_any(&config, "admin_listen", "127.0.0.1:9090")
        .replace(
            "https://github.com/login/oauth/access_token",
            &idp.token_url(),
        )
        .replace(
            "https://github.com/login/device/code",
            &format!("{}/oauth/device", idp.base_url()),
        )
        .replace(
            "https://github.com/login/oauth/authorize",
            &format!("{}/oauth/authorize", idp.base_url()),
        )
        .replace("https://api.github.com", &upstream.url())
        .replace("https://github.com", &upstream.url());
    assert!(!config.contains("github.com"), "every GitHub URL replaced");
    std::fs::write(&config_path, config).unwrap();
    for (named, _) in [PROXY, HEALTHCHECK] {
        assert!(block.contains(named), "the block has `{named}`:\n{block}");
    }
    let script: String = PREAMBLE.to_string()
        + &block
            .replace(PROXY.0, PROXY.1)
            .replace(HEALTHCHECK.0, HEALTHCHECK.1)
            .lines()
            .filter(|l| !l.trim_start().starts_with("cargo "))
            .map(|l| format!("{l}\n"))
            .collect::<String>();

    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(clone.path())
        .env_clear()
        .env("PATH", path)
        .env("HOME", clone.path())
        // Info for the `listening` line the preamble reads.
        .env("RUST_LOG", support::child::log_filter("warn"))
        // Its own process group, so the background `serve` can be stopped even
        // if the script fails before its `kill`.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("bash runs");
    let pgid = child.id().expect("running");
    let stdout = child.stdout.take().expect("piped");
    let approver = tokio::spawn(approve_printed_code(stdout));
    let mut stderr = child.stderr.take().expect("piped");
    let errors = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    // Bash's own exit, not the end of its output: the background `serve` (and
    // the preamble's `tee`) hold the pipes open after a failing command ends the
    // script, which would turn every failure into the 60 s timeout.
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
    let (approved, stdout) = approver.await.unwrap();
    let stderr = errors.await.unwrap();
    let status = match status {
        Ok(exit) => exit.unwrap(),
        Err(_) => panic!("the quick start did not end within 60 s\nscript:\n{script}\nstdout:\n{stdout}\nstderr:\n{stderr}"),
    };
    assert!(
        status.success(),
        "quick start failed ({status})\nscript:\n{script}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );

    // The last command printed the upstream's answer to GET /user.
    let answer: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("curl printed")).unwrap();
    assert_eq!(answer["target"], "/user");
    assert!(approved, "link login printed a URL and a code:\n{stdout}");
    assert_eq!(
        idp.device_authorizations(),
        1,
        "the block links by device flow"
    );
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].status, 200);
    let token = seen[0].token.clone().unwrap();
    assert!(
        idp.is_valid_access_token(&token),
        "the upstream got the token the device flow linked"
    );
    assert!(clone.path().join("data/tokenproxy.db").is_file());
}

/// Reads the script's output; when `link login` has printed where to go and the
/// code, enters the code there and approves, as the user at the browser would.
/// Returns whether it did, and everything the script printed.
async fn approve_printed_code(stdout: tokio::process::ChildStdout) -> (bool, String) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let (mut text, mut uri, mut approved) = (String::new(), None::<String>, false);
    while let Ok(Some(line)) = lines.next_line().await {
        text.push_str(&line);
        text.push('\n');
        if let Some(rest) = line.split("open ").nth(1).filter(|_| uri.is_none()) {
            uri = Some(rest.trim().to_string());
        }
        if let (Some(code), Some(at), false) =
            (line.split("enter the code: ").nth(1), &uri, approved)
        {
            let form = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs([
                    ("user_code", code.trim()),
                    ("account", &uuid::Uuid::new_v4().to_string()),
                    ("decision", "approve"),
                ])
                .finish();
            let status = tokio::process::Command::new("curl")
                .args(["-fsS", "-o", "/dev/null", "--data", &form, at])
                .status()
                .await
                .expect("curl runs");
            approved = status.success();
        }
    }
    (approved, text)
}
