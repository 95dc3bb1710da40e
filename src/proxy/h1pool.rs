//! One worker's HTTP/1.1 upstream connections, without hyper-util's pool.
//!
//! hyper-util's legacy client, per request: a checkout future against a pool
//! behind a mutex shared by its clones, a boxed lazy connect future (and a clone
//! of the connector) even when an idle connection is there, a boxed response
//! future, and, when the connection is not ready at once, a spawned task that
//! waits to put it back. Profiled under `wrk -c64`, that was about a fifth of
//! the proxy's user time on a cache hit. Here a worker keeps its own idle
//! [`http1::SendRequest`]s per upstream (scheme and authority): a request takes
//! the newest ready one, or dials through the same connector (pre-opened
//! connections first, `connect_to`, TLS), and the sender goes back into the list
//! as soon as the response head is in; it is taken again once hyper says it is
//! ready (the response body consumed).
//!
//! An upstream that negotiates HTTP/2 through ALPN is remembered and left to
//! the legacy client, which multiplexes; the connection that found out is
//! closed (one extra handshake per worker and upstream, once).
//!
//! Idle connections are closed after the pool's idle timeout: checked when a
//! connection is taken or put back, and for every upstream at most once a
//! second, so one nobody asks for again is still closed (with a worker that
//! serves nothing at all, when it next does).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::Connection as _;
use parking_lot::Mutex;
use tower_service::Service;

use super::upstream::UpstreamConnector;
use super::ProxyBody;

/// How often, at most, every upstream's idle list is swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

type Dest = (Scheme, Authority);

/// What became of a request given to the pool.
pub enum Sent {
    /// The upstream's response head.
    Response(Response<Incoming>),
    /// The upstream speaks HTTP/2: the request, untouched, for the client that does.
    Http2(Request<ProxyBody>),
}

/// Why a request got no response.
#[derive(Debug)]
pub struct Failure {
    /// The connection could not be opened (TCP or TLS).
    pub connect: bool,
    /// What went wrong (never holds header values).
    pub error: Box<dyn std::error::Error + Send + Sync>,
}

/// What [`H1Pool::take`] found for an upstream.
enum Taken {
    /// It speaks HTTP/2: not ours.
    Http2,
    /// A ready idle connection.
    Idle(http1::SendRequest<ProxyBody>),
    /// Nothing ready: dial.
    None,
}

struct Idle {
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
}

#[derive(Default)]
struct State {
    idle: HashMap<Dest, Vec<Idle>, foldhash::fast::RandomState>,
    h2: HashSet<Dest, foldhash::fast::RandomState>,
    swept: Option<Instant>,
}

/// One worker's HTTP/1.1 connections for one upstream client (trust and `connect_to`).
pub struct H1Pool {
    state: Mutex<State>,
    idle_timeout: Duration,
}

impl H1Pool {
    /// An empty pool closing connections idle for `idle_timeout`.
    pub fn new(idle_timeout: Duration) -> Self {
        Self {
            state: Mutex::new(State::default()),
            idle_timeout,
        }
    }

    /// Sends `req` (absolute URI) on an idle or new connection to its upstream.
    pub async fn send(
        &self,
        connector: &UpstreamConnector,
        mut req: Request<ProxyBody>,
    ) -> Result<Sent, Failure> {
        let Some(dest) = dest(req.uri()) else {
            return Err(Failure {
                connect: false,
                error: "the upstream URI has no scheme or authority".into(),
            });
        };
        // `Host` is the pipeline's (the route's upstream authority).
        let target = req.uri().clone();
        *req.uri_mut() = origin_form(&target);
        loop {
            let (mut sender, reused) = match self.take(&dest) {
                Taken::Http2 => {
                    *req.uri_mut() = target;
                    return Ok(Sent::Http2(req));
                }
                Taken::Idle(sender) => (sender, true),
                Taken::None => match self.dial(connector, &dest, &target).await? {
                    Some(sender) => (sender, false),
                    None => {
                        *req.uri_mut() = target;
                        return Ok(Sent::Http2(req));
                    }
                },
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue; // closed by the upstream while idle
                }
                return Err(Failure {
                    connect: true,
                    error: "the new upstream connection closed".into(),
                });
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.put(dest, sender);
                    return Ok(Sent::Response(resp));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the connection closed as it was taken (an
                    // upstream's keep-alive ending). Another one may do.
                    Some(again) if reused => req = again,
                    _ => {
                        return Err(Failure {
                            connect: false,
                            error: Box::new(e.into_error()),
                        })
                    }
                },
            }
        }
    }

    /// The newest ready idle connection to `dest`, dropping closed and expired
    /// ones; one lock for this and the HTTP/2 check.
    fn take(&self, dest: &Dest) -> Taken {
        let now = Instant::now();
        let mut state = self.state.lock();
        if state.h2.contains(dest) {
            return Taken::Http2;
        }
        let Some(list) = state.idle.get_mut(dest) else {
            return Taken::None;
        };
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let idle = &list[i];
            if idle.sender.is_closed() || now.duration_since(idle.since) >= self.idle_timeout {
                list.swap_remove(i);
            } else if idle.sender.is_ready() {
                return Taken::Idle(list.swap_remove(i).sender);
            }
            // Otherwise still busy with its response body: left for later.
        }
        Taken::None
    }

    /// Puts a connection back (it is taken again once ready), and sweeps now and then.
    fn put(&self, dest: Dest, sender: http1::SendRequest<ProxyBody>) {
        let now = Instant::now();
        let mut state = self.state.lock();
        state
            .idle
            .entry(dest)
            .or_default()
            .push(Idle { sender, since: now });
        if state
            .swept
            .is_none_or(|at| now.duration_since(at) >= SWEEP_EVERY)
        {
            state.swept = Some(now);
            let timeout = self.idle_timeout;
            state.idle.retain(|_, list| {
                list.retain(|i| !i.sender.is_closed() && now.duration_since(i.since) < timeout);
                !list.is_empty()
            });
        }
    }

    /// Opens a connection to `dest` and starts its task on this thread; `None`
    /// when the upstream chose HTTP/2.
    async fn dial(
        &self,
        connector: &UpstreamConnector,
        dest: &Dest,
        target: &Uri,
    ) -> Result<Option<http1::SendRequest<ProxyBody>>, Failure> {
        let io = connector
            .clone()
            .call(target.clone())
            .await
            .map_err(|error| Failure {
                connect: true,
                error,
            })?;
        if io.connected().is_negotiated_h2() {
            self.state.lock().h2.insert(dest.clone());
            return Ok(None);
        }
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| Failure {
                connect: true,
                error: Box::new(e),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %crate::telemetry::error_chain(&e), "upstream connection ended");
            }
        });
        Ok(Some(sender))
    }
}

fn dest(uri: &Uri) -> Option<Dest> {
    Some((uri.scheme()?.clone(), uri.authority()?.clone()))
}

/// The request target an HTTP/1.1 origin server expects: path and query only.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(path) if path.as_str() != "/" => {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(path.clone());
            Uri::from_parts(parts).unwrap_or_default()
        }
        _ => Uri::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_keeps_path_and_query_only() {
        let uri: Uri = "http://u.example:8080/a/b?x=1".parse().unwrap();
        assert_eq!(origin_form(&uri).to_string(), "/a/b?x=1");
        let root: Uri = "https://u.example".parse().unwrap();
        assert_eq!(origin_form(&root).to_string(), "/");
    }
}
