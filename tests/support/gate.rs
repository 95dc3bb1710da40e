//! An upstream that holds every request until the test lets one go, and counts
//! how many it holds at once. Connection and concurrency limits are proven by
//! that count (its high-water mark), not by sleeping and seeing nothing happen.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::upstream::serve;

/// The body type `support::upstream::serve` handlers answer with.
type Body =
    http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// How long a test waits for a request to reach the gate before failing: far
/// above any loopback round trip, so only a real stall trips it.
pub const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(10);

struct State {
    /// Requests that arrived so far.
    arrived: watch::Sender<usize>,
    /// Requests held right now.
    held: AtomicUsize,
    /// The most requests ever held at once.
    high: AtomicUsize,
    /// One permit lets one held request answer 200.
    release: Semaphore,
}

/// The gate upstream: every request waits for [`Gate::release`], then answers
/// 200 with an empty body.
pub struct Gate {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    state: Arc<State>,
    _stop: watch::Sender<()>,
}

impl Gate {
    /// Starts a gate on loopback.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            arrived: watch::channel(0).0,
            held: AtomicUsize::new(0),
            high: AtomicUsize::new(0),
            release: Semaphore::new(0),
        });
        let stop = serve(listener, {
            let state = state.clone();
            move |_req| {
                let state = state.clone();
                async move { hold(&state).await }
            }
        });
        Self {
            addr,
            state,
            _stop: stop,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until `n` requests have arrived in total; fails the test after
    /// [`ARRIVAL_TIMEOUT`].
    pub async fn arrived(&self, n: usize) {
        let mut rx = self.state.arrived.subscribe();
        let wait = async { rx.wait_for(|v| *v >= n).await.is_ok() };
        match tokio::time::timeout(ARRIVAL_TIMEOUT, wait).await {
            Ok(true) => {}
            Ok(false) => panic!("the gate stopped before {n} requests arrived"),
            Err(_) => panic!(
                "{n} requests did not arrive within {ARRIVAL_TIMEOUT:?} ({} did)",
                *self.state.arrived.borrow()
            ),
        }
    }

    /// Lets `n` held (or future) requests answer.
    pub fn release(&self, n: usize) {
        self.state.release.add_permits(n);
    }

    /// Requests held right now.
    pub fn held(&self) -> usize {
        self.state.held.load(Ordering::SeqCst)
    }

    /// The most requests held at once so far.
    pub fn high_water(&self) -> usize {
        self.state.high.load(Ordering::SeqCst)
    }
}

async fn hold(state: &State) -> Response<Body> {
    let now = state.held.fetch_add(1, Ordering::SeqCst) + 1;
    state.high.fetch_max(now, Ordering::SeqCst);
    state.arrived.send_modify(|n| *n += 1);
    state
        .release
        .acquire()
        .await
        .expect("the gate's semaphore is never closed")
        .forget();
    state.held.fetch_sub(1, Ordering::SeqCst);
    let mut resp = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = StatusCode::OK;
    resp
}
