//! Follows the README's quick start as written (issue 6): the shell block after
//! the `<!-- quickstart` marker runs with bash in a fresh directory holding only
//! what a clone provides (README.md and config/), and its last request must get
//! the upstream's answer.
//!
//! What the test changes, and why:
//! - lines starting with `cargo ` (building and installing) are skipped; the
//!   binary under test is first on PATH instead;
//! - GitHub's URLs in the copied `config/quickstart.toml` point at a local test
//!   upstream (and a dead local token endpoint: the linked token never expires,
//!   so no refresh is attempted), since no test may leave 127.0.0.1;
//! - the ports 8080 and 9090 become free ones, in the script and the config, so
//!   parallel tests cannot collide.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use support::net::free_port;
use support::upstream::{tokens, CredentialForm, TestUpstream};

const BIN: &str = env!("CARGO_BIN_EXE_tokenproxy");
const MARKER: &str = "<!-- quickstart";

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

/// The value of `"access_token":"..."` in the script.
fn linked_access_token(script: &str) -> String {
    let key = r#""access_token":""#;
    let start = script.find(key).expect("the script links a token") + key.len();
    let len = script[start..].find('"').unwrap();
    script[start..start + len].to_string()
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
    let access = linked_access_token(&block);
    let upstream = TestUpstream::start(CredentialForm::Bearer, tokens(&[&access])).await;

    // A fresh checkout: README.md and config/, no ./data.
    let clone = tempfile::tempdir().unwrap();
    std::fs::copy(repo.join("README.md"), clone.path().join("README.md")).unwrap();
    copy_dir(&repo.join("config"), &clone.path().join("config"));
    let (proxy_port, admin_port) = (free_port(), free_port());
    let ports = |s: &str| {
        s.replace("127.0.0.1:8080", &format!("127.0.0.1:{proxy_port}"))
            .replace("127.0.0.1:9090", &format!("127.0.0.1:{admin_port}"))
    };
    let config_path = clone.path().join("config/quickstart.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let config = ports(&config)
        .replace(
            "https://github.com/login/oauth/access_token",
            "http://127.0.0.1:9/login/oauth/access_token",
        )
        .replace("https://api.github.com", &upstream.url())
        .replace("https://github.com", &upstream.url());
    assert!(!config.contains("github.com"), "every GitHub URL replaced");
    std::fs::write(&config_path, config).unwrap();
    let script: String = ports(&block)
        .lines()
        .filter(|l| !l.trim_start().starts_with("cargo "))
        .map(|l| format!("{l}\n"))
        .collect();

    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(clone.path())
        .env_clear()
        .env("PATH", path)
        .env("HOME", clone.path())
        .env("RUST_LOG", "warn")
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
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await;
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
    let out = out
        .expect("the quick start finishes within the bound")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "quick start failed ({:?})\nscript:\n{script}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );

    // The last command printed the upstream's answer to GET /user.
    let answer: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("curl printed")).unwrap();
    assert_eq!(answer["target"], "/user");
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].status, 200);
    assert_eq!(seen[0].token.as_deref(), Some(access.as_str()));
    assert!(clone.path().join("data/tokenproxy.db").is_file());
}
