//! Where a `tokenproxy serve` child listens, read from its own log.
//!
//! With `listen = "127.0.0.1:0"` (and the same for `admin_listen`) the kernel
//! picks the ports, and the `listening` line (info, see README "Logs") names both
//! bound addresses. No port is picked and released
//! beforehand, so no other process can take it in between, and the line is an
//! event to wait for instead of a connect-and-retry loop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::ChildStderr;
use std::sync::mpsc;
use std::time::Duration;

/// How long a child may take to start listening: generous, because a loaded
/// 2-core runner can take seconds to start a debug binary and connect it to
/// Postgres. A child that fails exits, which is reported at once, not after this.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `RUST_LOG` a child needs so that its `listening` line is written: `base`
/// (e.g. `warn`) plus info for the module that logs it (the access log has its
/// own target). `tokenproxy::app` logs its lifecycle lines under the README's
/// `tokenproxy::proxy`.
pub fn log_filter(base: &str) -> String {
    format!("{base},tokenproxy::proxy=info")
}

/// The proxy and admin addresses of a `listening` line, in the text
/// (`addr=… admin=…`) or the JSON (`"addr":"…","admin":"…"`) log format.
pub fn listening_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    if !line.contains("listening") {
        return None;
    }
    let field = |name: &str| -> Option<SocketAddr> {
        for pattern in [format!(" {name}="), format!("\"{name}\":\"")] {
            if let Some(i) = line.find(&pattern) {
                let rest = &line[i + pattern.len()..];
                let end = rest.find([' ', '"', ',']).unwrap_or(rest.len());
                return rest[..end].parse().ok();
            }
        }
        None
    };
    Some((field("addr")?, field("admin")?))
}

/// Forwards a child's stderr to the test's output line by line (so a failing test
/// shows what the child said) and sends the addresses of its first `listening`
/// line; the receiver sees a disconnect when the child closes stderr (exits)
/// without one.
pub fn watch_stderr(stderr: ChildStderr) -> mpsc::Receiver<(SocketAddr, SocketAddr)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("[tokenproxy serve] {line}");
            if let Some(addrs) = listening_addrs(&line) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addrs);
                }
            }
        }
    });
    rx
}

/// Waits for the addresses from [`watch_stderr`], at most [`START_TIMEOUT`].
pub async fn wait_listening(
    rx: mpsc::Receiver<(SocketAddr, SocketAddr)>,
) -> Result<(SocketAddr, SocketAddr), String> {
    tokio::task::spawn_blocking(move || match rx.recv_timeout(START_TIMEOUT) {
        Ok(addrs) => Ok(addrs),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            Err(format!("no `listening` line within {START_TIMEOUT:?}"))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err("the child closed stderr (exited) without a `listening` line".into())
        }
    })
    .await
    .unwrap()
}

/// The addresses of the first `listening` line in the log file `path` after byte
/// `from` (its length before the child started): for a child whose stderr goes
/// to a file that its earlier processes wrote too. `None` while there is none.
pub fn listening_in_log(path: &std::path::Path, from: u64) -> Option<(SocketAddr, SocketAddr)> {
    let text = std::fs::read(path).ok()?;
    let from = usize::try_from(from).ok()?.min(text.len());
    // Only whole lines: one still being written could end inside a port number.
    let end = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    String::from_utf8_lossy(&text[from.min(end)..end])
        .lines()
        .find_map(listening_addrs)
}
