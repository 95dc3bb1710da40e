//! Opening upstream connections while requests wait for their token.
//!
//! A request that has to wait for a token (a refresh in flight, a cache miss) asks
//! for its upstream connection to be opened meanwhile, so the TCP and TLS
//! handshakes overlap the provider's round trip instead of following it. In a
//! refresh storm, hundreds of requests are released at once when the new token
//! arrives; they then find their connections open instead of all dialling at the
//! same instant.
//!
//! [`Prewarm`] wraps the upstream connector: hyper's pool calls it whenever it
//! needs a new connection, and it hands out a pre-opened one first. Pre-opened
//! connections nobody took are closed after [`MAX_IDLE`], well before any upstream
//! would time them out, so hyper is never given one the peer already gave up on.
//! HTTP/2 upstreams multiplex, so for them at most one connection is pre-opened.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Uri;
use hyper_util::client::legacy::connect::Connection;
use parking_lot::Mutex;
use tower_service::Service;

/// How long a pre-opened connection waits to be used before it is closed.
pub const MAX_IDLE: Duration = Duration::from_secs(5);

/// At most this many pre-opened (or opening) connections per upstream.
const MAX_PER_UPSTREAM: usize = 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What is known about one upstream (scheme and authority).
struct Slot<T> {
    /// Pre-opens started and not finished.
    opening: usize,
    /// Open connections nobody has taken yet, oldest first.
    ready: VecDeque<(Instant, T)>,
    /// The last connection to it negotiated HTTP/2 (None: not known yet).
    h2: Option<bool>,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self {
            opening: 0,
            ready: VecDeque::new(),
            h2: None,
        }
    }
}

impl<T> Slot<T> {
    /// Whether one more pre-open is worth starting.
    fn wants_more(&self, plain_http: bool) -> bool {
        let held = self.opening + self.ready.len();
        let limit = match (plain_http, self.h2) {
            // hyper speaks HTTP/1.1 to plain-http upstreams: one connection per request.
            (true, _) | (false, Some(false)) => MAX_PER_UPSTREAM,
            // Unknown yet: open one and learn; HTTP/2: one is enough.
            (false, None) | (false, Some(true)) => 1,
        };
        held < limit
    }

    fn drop_expired(&mut self, now: Instant) {
        while self
            .ready
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= MAX_IDLE)
        {
            self.ready.pop_front();
        }
    }
}

type Stash<T> = Arc<Mutex<HashMap<String, Slot<T>>>>;

/// A connector that hands out pre-opened connections before dialling.
pub struct Prewarm<C: Service<Uri>> {
    inner: C,
    stash: Stash<C::Response>,
}

impl<C: Service<Uri> + Clone> Clone for Prewarm<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            stash: self.stash.clone(),
        }
    }
}

/// The stash key: scheme and authority, as hyper's pool keys connections.
fn dest(uri: &Uri) -> Option<String> {
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?))
}

impl<C> Prewarm<C>
where
    C: Service<Uri> + Clone + Send + 'static,
    C::Response: Connection + Send + 'static,
    C::Future: Send,
    C::Error: Into<BoxError> + Send,
{
    /// Wraps `inner`.
    pub fn new(inner: C) -> Self {
        Self {
            inner,
            stash: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Starts opening one connection to `uri`'s upstream in the background, unless
    /// enough are open or opening already. Failures are silent: the request then
    /// dials as usual and reports the error itself.
    pub fn prewarm(&self, uri: &Uri) {
        let Some(key) = dest(uri) else { return };
        {
            let mut map = self.stash.lock();
            let slot = map.entry(key.clone()).or_default();
            slot.drop_expired(Instant::now());
            if !slot.wants_more(uri.scheme_str() == Some("http")) {
                return;
            }
            slot.opening += 1;
        }
        let (mut inner, stash, uri) = (self.inner.clone(), self.stash.clone(), uri.clone());
        tokio::spawn(async move {
            let opened = tokio::time::timeout(MAX_IDLE, async {
                std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
                inner.call(uri).await
            })
            .await;
            {
                let mut map = stash.lock();
                let slot = map.entry(key.clone()).or_default();
                slot.opening -= 1;
                if let Ok(Ok(conn)) = opened {
                    slot.h2 = Some(conn.connected().is_negotiated_h2());
                    slot.ready.push_back((Instant::now(), conn));
                }
            }
            tokio::time::sleep(MAX_IDLE).await;
            sweep(&stash, &key);
        });
    }
}

/// Closes what expired at `key`. An upstream whose protocol is known keeps its
/// (small) slot: routes and forward-mode hosts are bounded by the configuration.
fn sweep<T>(stash: &Stash<T>, key: &str) {
    let mut map = stash.lock();
    if let Some(slot) = map.get_mut(key) {
        slot.drop_expired(Instant::now());
        if slot.opening == 0 && slot.ready.is_empty() && slot.h2.is_none() {
            map.remove(key);
        }
    }
}

impl<C> Service<Uri> for Prewarm<C>
where
    C: Service<Uri> + Clone + Send + 'static,
    C::Response: Connection + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let key = dest(&uri);
        if let Some(key) = &key {
            let mut map = self.stash.lock();
            if let Some(slot) = map.get_mut(key) {
                slot.drop_expired(Instant::now());
                if let Some((_, conn)) = slot.ready.pop_front() {
                    return Box::pin(std::future::ready(Ok(conn)));
                }
            }
        }
        let fut = self.inner.call(uri);
        let stash = self.stash.clone();
        Box::pin(async move {
            let conn = fut.await.map_err(Into::into)?;
            // Learn the upstream's protocol from every connection hyper opens, so
            // pre-opens for an HTTP/2 upstream stay at one.
            if let Some(key) = key {
                let h2 = conn.connected().is_negotiated_h2();
                stash.lock().entry(key).or_default().h2 = Some(h2);
            }
            Ok(conn)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_protocol() {
        let mut slot = Slot::<()>::default();
        assert!(slot.wants_more(true));
        assert!(slot.wants_more(false));
        slot.opening = 1;
        assert!(slot.wants_more(true), "plain http: one per waiting request");
        assert!(
            !slot.wants_more(false),
            "https, protocol unknown: one to learn"
        );
        slot.h2 = Some(false);
        assert!(
            slot.wants_more(false),
            "https HTTP/1.1: one per waiting request"
        );
        slot.h2 = Some(true);
        assert!(!slot.wants_more(false), "HTTP/2: one is enough");
        slot.opening = MAX_PER_UPSTREAM;
        assert!(!slot.wants_more(true), "bounded");
    }

    #[test]
    fn expired_connections_are_dropped_oldest_first() {
        let mut slot = Slot::<u8>::default();
        let now = Instant::now();
        slot.ready
            .push_back((now - MAX_IDLE - Duration::from_millis(1), 1));
        slot.ready.push_back((now, 2));
        slot.drop_expired(now);
        assert_eq!(slot.ready.iter().map(|(_, c)| *c).collect::<Vec<_>>(), [2]);
    }
}
