//! Real `git clone` and `git push` through the proxy against `git http-backend`
//! behind a test server that demands the injected Basic credential. The git
//! client authenticates to tokenproxy with a proxy token as its Basic password,
//! exactly as a workspace would. The 100 MiB push runs the real binary so its
//! memory can be measured alone.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

pub use support::util::git;

use std::path::Path;
use std::sync::Arc;

use harness::{create_token, FakeTokens, Harness, Spawned};
use sqlx::PgPool;
use support::upstream::{tokens, GitServer};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{LinkStore, TokenSet};
use uuid::Uuid;

pub const GH_TOKEN: &str = "gho_git_access_token";

/// A git server with one empty bare repository and a proxy routing to it.
pub struct GitWorld {
    pub dir: tempfile::TempDir,
    pub server: GitServer,
    pub proxy: Harness,
    /// `http://x:tpx_…@127.0.0.1:PORT/gh/git/repo.git`
    pub remote: String,
}

pub async fn git_world(pool: PgPool) -> GitWorld {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("srv");
    std::fs::create_dir_all(&root).unwrap();
    git(&root, &["init", "--bare", "-q", "-b", "main", "repo.git"]);
    let server = GitServer::start(root, "x-access-token", tokens(&[GH_TOKEN])).await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &["github"]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let config = harness::config(&format!(
        r#"
[[providers]]
id = "github"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  prefix = "/gh/git"
  upstream = "{}"
  inject = {{ basic_username = "x-access-token" }}
"#,
        server.url()
    ));
    let proxy = Harness::start(config, store, fake).await;
    let remote = format!("http://x:{token}@{}/gh/git/repo.git", proxy.addr);
    GitWorld {
        dir,
        server,
        proxy,
        remote,
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn git_push_and_clone_through_the_proxy(pool: PgPool) {
    let w = git_world(pool).await;
    let work = w.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let remote = w.remote.clone();
    let work2 = work.clone();
    tokio::task::spawn_blocking(move || {
        git(&work2, &["init", "-q", "-b", "main"]);
        std::fs::write(work2.join("README"), "hello through tokenproxy\n").unwrap();
        git(&work2, &["add", "README"]);
        git(&work2, &["commit", "-q", "-m", "first"]);
        git(&work2, &["push", "-q", &remote, "main"]);
    })
    .await
    .unwrap();

    let clone = w.dir.path().join("clone");
    let remote = w.remote.clone();
    let clone2 = clone.clone();
    let parent = w.dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        git(&parent, &["clone", "-q", &remote, clone2.to_str().unwrap()]);
    })
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(clone.join("README")).unwrap(),
        "hello through tokenproxy\n"
    );
    let reqs = w.server.requests();
    assert!(reqs
        .iter()
        .any(|(t, s)| t.contains("git-receive-pack") && *s == 200));
    assert!(reqs
        .iter()
        .any(|(t, s)| t.contains("git-upload-pack") && *s == 200));
    // Every request that reached the git server carried our credential.
    assert!(reqs.iter().all(|(_, s)| *s == 200), "{reqs:?}");
}

/// Writes `mib` MiB of incompressible bytes (xorshift), one MiB at a time.
fn write_noise(path: &Path, mib: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk).unwrap();
    }
}

/// A 100 MiB push streams through the real `tokenproxy serve` binary with
/// bounded memory: the child's peak resident set (VmHWM) exceeds its resident set
/// before the push by less than 64 MiB.
#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn git_push_of_100_mib_streams_with_bounded_memory(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("srv");
    std::fs::create_dir_all(&root).unwrap();
    git(&root, &["init", "--bare", "-q", "-b", "main", "repo.git"]);
    let server = GitServer::start(root, "x-access-token", tokens(&[GH_TOKEN])).await;

    let store = PgStore::from_pool(pool.clone(), Keyring::plaintext());
    let user = Uuid::new_v4();
    store
        .put_link(
            "github",
            user,
            &TokenSet {
                access_token: GH_TOKEN.to_string().into(),
                refresh_token: String::new().into(),
                expiry: None,
                extra: None,
            },
        )
        .await
        .unwrap();
    let (_, token) = create_token(&store, user, &["github"]).await;
    let proxy = Spawned::start(
        &harness::db_url(&pool),
        &format!(
            r#"
[[providers]]
id = "github"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  prefix = "/gh/git"
  upstream = "{}"
  inject = {{ basic_username = "x-access-token" }}
"#,
            server.url()
        ),
    )
    .await;
    let remote = format!("http://x:{token}@{}/gh/git/repo.git", proxy.addr);

    let work = dir.path().join("big");
    std::fs::create_dir_all(&work).unwrap();
    let (work2, remote2) = (work.clone(), remote.clone());
    tokio::task::spawn_blocking(move || {
        git(&work2, &["init", "-q", "-b", "main"]);
        std::fs::write(work2.join("small"), "warm up\n").unwrap();
        git(&work2, &["add", "small"]);
        git(&work2, &["commit", "-q", "-m", "small"]);
        // Warm the proxy up (connections, caches, allocator) before the baseline.
        git(&work2, &["push", "-q", &remote2, "main"]);
        write_noise(&work2.join("blob.bin"), 100);
        git(&work2, &["add", "blob.bin"]);
        git(&work2, &["commit", "-q", "-m", "big"]);
    })
    .await
    .unwrap();

    let baseline = proxy.status_kib("VmRSS");
    let hwm_before = proxy.status_kib("VmHWM");
    let work2 = work.clone();
    tokio::task::spawn_blocking(move || git(&work2, &["push", "-q", &remote, "main"]))
        .await
        .unwrap();
    let peak = proxy.status_kib("VmHWM");
    let growth_mib = peak.saturating_sub(baseline) / 1024;
    println!(
        "100 MiB push through tokenproxy serve: RSS before {baseline} KiB (peak so far {hwm_before} KiB), peak after {peak} KiB, growth {growth_mib} MiB"
    );
    assert!(growth_mib < 64, "proxy RSS grew by {growth_mib} MiB");

    let pushed = git(&work, &["rev-parse", "HEAD"]);
    let served = git(&server.root.join("repo.git"), &["rev-parse", "main"]);
    assert_eq!(pushed, served);
}
