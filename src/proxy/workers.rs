//! Thread-per-core serving of the proxy listener.
//!
//! `tokenproxy serve` runs the proxy listener on N worker threads, each with a
//! single-threaded tokio runtime, its own `SO_REUSEPORT` socket on the listen
//! address (the kernel spreads connections across them) and its own upstream
//! connection pools (see [`super::upstream::Upstreams`]). A request, the pooled
//! upstream connection it is sent on and the response all stay on one thread, so
//! handing the request to the upstream connection's task is a queue push rather
//! than waking another thread (a futex call and a scheduler switch per request
//! on the multi-threaded runtime). The database, the token source's background
//! work, signals and the admin listener stay on the main runtime.
//!
//! Worker runtimes are kept running until [`Workers::release`], after the
//! background work has stopped: database connections opened from a worker are
//! registered with its runtime and must keep working until then.

use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::server::{self, Handler, Shared};

/// Backlog of each worker's listening socket.
const BACKLOG: i32 = 1024;

/// How many proxy worker threads to run: `TOKIO_WORKER_THREADS` when set (as
/// for tokio's own runtime), otherwise one per available CPU.
pub fn count() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Binds `n` sockets to `addr` with `SO_REUSEPORT`, so `n` threads can each
/// accept on their own. With port 0, the later sockets take the port the first
/// one got.
///
/// A port already in use is an error, as with a plain bind: `SO_REUSEPORT` would
/// otherwise let a second tokenproxy (same user) silently share the port with
/// a running one, so the address is first bound once without it.
pub fn bind(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 {
        drop(std::net::TcpListener::bind(addr)?);
    }
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        let listener: std::net::TcpListener = socket.into();
        if listeners.is_empty() {
            addr = listener.local_addr()?;
        }
        listeners.push(listener);
    }
    Ok(listeners)
}

/// The running worker threads.
pub struct Workers {
    drained: Vec<oneshot::Receiver<()>>,
    release: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Starts one worker thread per listener; worker `i` uses upstream client set `i`.
pub fn spawn<H: Handler>(
    listeners: Vec<std::net::TcpListener>,
    shared: &Shared<H>,
) -> std::io::Result<Workers> {
    let release = CancellationToken::new();
    let mut workers = Workers {
        drained: Vec::new(),
        release: release.clone(),
        threads: Vec::new(),
    };
    for (index, listener) in listeners.into_iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (done_tx, done_rx) = oneshot::channel();
        let shared = shared.clone();
        let release = release.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tokenproxy-worker-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => server::serve_shared(listener, shared, index).await,
                        Err(e) => {
                            tracing::error!(worker = index, error = %e, "worker cannot listen")
                        }
                    }
                    let _ = done_tx.send(());
                    release.cancelled().await;
                });
            })?;
        workers.drained.push(done_rx);
        workers.threads.push(thread);
    }
    Ok(workers)
}

impl Drop for Workers {
    /// A dropped handle (a second signal: stop now) ends the workers at once.
    fn drop(&mut self) {
        self.release.cancel();
    }
}

impl Workers {
    /// Resolves once every worker has stopped accepting and drained (or ended).
    pub async fn drained(&mut self) {
        for rx in self.drained.drain(..) {
            // An error means the worker ended early (a panic): nothing to wait for.
            let _ = rx.await;
        }
    }

    /// Stops the worker runtimes and waits for their threads.
    pub async fn release(mut self) {
        self.release.cancel();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::bind;

    #[test]
    fn sockets_share_one_port_and_a_taken_port_is_refused() {
        let any = "127.0.0.1:0".parse().unwrap();
        let listeners = bind(any, 2).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        assert_eq!(listeners[1].local_addr().unwrap(), addr);
        // A second server on the same port fails as with a plain bind.
        let err = bind(addr, 2).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }
}
