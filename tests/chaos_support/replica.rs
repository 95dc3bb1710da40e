//! One `tokenproxy serve` replica as a child process: the real binary with the
//! real signal handling, started again on the same ports after every stop, so
//! the traffic keeps addressing it by index.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A replica: its ports and config stay, its process comes and goes.
pub struct Replica {
    /// Index among the replicas (0-based), also its tag at the IdP.
    pub idx: usize,
    /// The proxy listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
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
    /// Writes the config (`config(addr, admin)`) into `dir`; starts nothing yet.
    pub fn new(
        idx: usize,
        dir: &std::path::Path,
        env: Vec<(String, String)>,
        config: impl Fn(SocketAddr, SocketAddr) -> String,
    ) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", super::free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", super::free_port()).parse().unwrap();
        let path = dir.join(format!("replica{idx}.toml"));
        std::fs::write(&path, config(addr, admin)).unwrap();
        Self {
            idx,
            addr,
            admin,
            config: path,
            log: dir.join(format!("replica{idx}.log")),
            env,
            child: None,
            starts: 0,
        }
    }

    /// Starts the process and returns once its proxy listener accepts. A start
    /// that exits at once (say, a port still held) is tried again.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "replica {} already runs", self.idx);
        let deadline = tokio::time::Instant::now() + START_BOUND;
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap();
            let mut child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env(
                    "RUST_LOG",
                    std::env::var("CHAOS_LOG")
                        // The exchange's info lines say when a token was stored,
                        // which tells a kill before the write from one after.
                        .unwrap_or_else(|_| "warn,tokenproxy::tokens::exchange=info".into()),
                )
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
                if TcpStream::connect(self.addr).await.is_ok() {
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
                // Readiness polling (bounded above), not a timing assumption.
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
        let url = format!("http://{}/readyz", self.admin);
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
