//! A TCP relay between the replicas and PostgreSQL that the test controls: it adds
//! latency to the database connection, as a saturated network or an overloaded
//! database would.
//!
//! Every chunk read in either direction waits half the configured latency before it
//! is written on, so a query's round trip costs the whole latency. New connections
//! wait the latency before connecting (a slow handshake). A connection PostgreSQL
//! closes (restart) is closed towards the replica as well.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The running relay; stops accepting when dropped (open connections end with
/// their peers).
pub struct Relay {
    /// The port the replicas connect to.
    pub port: u16,
    latency_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays 127.0.0.1:<port> to 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let latency_ms = Arc::new(AtomicU64::new(0));
        let lat = latency_ms.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(relay_one(client, target, lat.clone()));
            }
        });
        Self {
            port,
            latency_ms,
            task,
        }
    }

    /// Sets the latency added to each round trip (zero = none).
    pub fn set_latency(&self, d: Duration) {
        self.latency_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_one(client: TcpStream, target: u16, latency_ms: Arc<AtomicU64>) {
    let delay = latency_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
        return; // PostgreSQL is down: the replica sees its connection closed.
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut up = tokio::spawn(pump(cr, sw, latency_ms.clone()));
    let mut down = tokio::spawn(pump(sr, cw, latency_ms));
    // When either side ends, end both (dropping the halves closes the sockets): a
    // half-open relay would hide a restart from the replica.
    tokio::select! {
        _ = &mut up => {}
        _ = &mut down => {}
    }
    up.abort();
    down.abort();
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    latency_ms: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let half = latency_ms.load(Ordering::SeqCst) / 2;
        if half > 0 {
            tokio::time::sleep(Duration::from_millis(half)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
