//! One `tokenproxy serve` replica as a child process: the real binary with the
//! real signal handling, started again after every stop. Each process binds
//! port 0 for both listeners and the replica reads the addresses it got from the
//! `listening` line it logs, so a restart moves it to new ports, as a restarted
//! Kubernetes pod gets a new IP: the traffic reads the current address at each
//! request ([`Replica::proxy_handle`]), and no port is picked and released
//! beforehand for another process to take.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio::process::{Child, Command};

use crate::support::child::{listening_in_log, log_filter};

/// An address that moves on every restart, shared with whoever addresses the
/// replica.
pub type Current = Arc<RwLock<SocketAddr>>;

/// A replica: its config and log stay, its process (and its ports) come and go.
pub struct Replica {
    /// Index among the replicas (0-based), also its tag at the IdP.
    pub idx: usize,
    proxy: Current,
    admin: Current,
    config: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// How many processes have been started.
    pub starts: u32,
}

/// How long a start may take before the test fails (a loaded 2-core machine
/// running two more replicas and the traffic).
const START_BOUND: Duration = Duration::from_secs(60);

impl Replica {
    /// Writes `config` (whose listeners are `127.0.0.1:0`) into `dir`; starts
    /// nothing yet.
    pub fn new(
        idx: usize,
        dir: &std::path::Path,
        env: Vec<(String, String)>,
        config: &str,
    ) -> Self {
        assert!(
            config.contains("listen = \"127.0.0.1:0\"")
                && config.contains("admin_listen = \"127.0.0.1:0\""),
            "a replica binds port 0 and announces where it listens"
        );
        let path = dir.join(format!("replica{idx}.toml"));
        std::fs::write(&path, config).unwrap();
        let unbound: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Self {
            idx,
            proxy: Arc::new(RwLock::new(unbound)),
            admin: Arc::new(RwLock::new(unbound)),
            config: path,
            log: dir.join(format!("replica{idx}.log")),
            env,
            child: None,
            starts: 0,
        }
    }

    /// The proxy listener of the current (or last) process.
    pub fn addr(&self) -> SocketAddr {
        *self.proxy.read()
    }

    /// The admin listener of the current (or last) process.
    pub fn admin(&self) -> SocketAddr {
        *self.admin.read()
    }

    /// The proxy address as the traffic holds it: updated by every restart.
    pub fn proxy_handle(&self) -> Current {
        self.proxy.clone()
    }

    /// Starts the process and returns once its `listening` line names the
    /// addresses it bound (both listeners accept from then on). A start that
    /// exits at once (say, its database unreachable) is tried again.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "replica {} already runs", self.idx);
        let deadline = tokio::time::Instant::now() + START_BOUND;
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap();
            // Earlier processes' lines (their `listening` too) end here.
            let from = log.metadata().unwrap().len();
            // The exchange's info lines say when a token was stored, which tells
            // a kill before the write from one after.
            let base = std::env::var("CHAOS_LOG")
                .unwrap_or_else(|_| "warn,tokenproxy::tokens::exchange=info".into());
            let mut child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("RUST_LOG", log_filter(&base))
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .arg("--config")
                .arg(&self.config)
                .arg("serve")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .expect("spawn tokenproxy serve");
            self.starts += 1;
            loop {
                if let Some((proxy, admin)) = listening_in_log(&self.log, from) {
                    *self.proxy.write() = proxy;
                    *self.admin.write() = admin;
                    self.child = Some(child);
                    return;
                }
                if let Some(status) = child.try_wait().unwrap() {
                    eprintln!(
                        "chaos: replica {} exited at start ({status}); retrying",
                        self.idx
                    );
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "replica {} did not listen within {START_BOUND:?}\n{}",
                    self.idx,
                    self.log_tail(30)
                );
                // Its stderr is a file, which gives no event to wait for:
                // polling, bounded above, not a timing assumption.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica {} kept exiting at start\n{}",
                self.idx,
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The running process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Sends `signal` (`"TERM"`, `"KILL"`) and waits at most `bound` for the exit.
    /// Returns the exit status, or an error naming what went wrong.
    pub async fn stop(&mut self, signal: &str, bound: Duration) -> Result<String, String> {
        let mut child = self.child.take().expect("replica runs");
        let pid = child.id().expect("not yet reaped").to_string();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {pid}");
        match tokio::time::timeout(bound, child.wait()).await {
            Ok(status) => Ok(status.unwrap().to_string()),
            Err(_) => {
                let _ = child.kill().await;
                Err(format!(
                    "replica {} did not exit within {bound:?} of SIG{signal}",
                    self.idx
                ))
            }
        }
    }

    /// Whether `/readyz` answers 200 (the store answers).
    pub async fn ready(&self) -> bool {
        let url = format!("http://{}/readyz", self.admin());
        super::http_status(&url).await == Some(200)
    }

    /// `VmRSS` of the running process, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The file every process of this replica logs to.
    pub fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    /// The last `n` lines the replica logged (all its processes).
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!(
            "--- replica {} log (last {n} lines) ---\n{}",
            self.idx,
            lines[from..].join("\n")
        )
    }
}
