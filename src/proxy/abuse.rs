//! Abuse limits: how often a source may fail to authenticate, and how often a
//! caller may make tokenproxy mint a new leaf certificate.
//!
//! Both are fixed-window counters kept in bounded caches (an attacker spraying
//! source addresses or credentials evicts old windows rather than growing
//! memory). A failed authentication counts only when a credential was
//! presented: a client's first request without one (git asks for credentials
//! only after a 401) is the protocol, not an attack. Once a source IP is over
//! `callers.auth_failure_limit` within `callers.auth_failure_window`, every
//! request from it is answered 429 `rate_limited` with `Retry-After` before any
//! lookup; a credential over the limit gets 429 instead of 401 wherever it
//! comes from.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::caller::PRIVATE_TOKEN;
use super::error::ProxyError;
use super::tick::Tick;

/// Most windows remembered per kind of key.
const CAPACITY: u64 = 100_000;

/// One key's count within its window.
struct Window {
    started: Instant,
    count: AtomicU32,
}

/// Fixed-window counters by key: at most `limit` events per `window`.
struct Counter<K: std::hash::Hash + Eq + Send + Sync + 'static> {
    limit: u32,
    window: Duration,
    windows: moka::sync::Cache<K, Arc<Window>>,
    /// When a key last reached the limit, as [`Tick`] nanoseconds + 1 (0: never).
    /// A key over the limit reached it within its window, so once a window has
    /// passed since, none is, and [`check`](Self::check) needs no lookup: the
    /// common request (no source anywhere near its limit) reads one atomic that
    /// no request writes, instead of a cache shared by every worker.
    last_over: AtomicU64,
}

impl<K: std::hash::Hash + Eq + Clone + Send + Sync + 'static> Counter<K> {
    fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            windows: moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(window)
                .build(),
            last_over: AtomicU64::new(0),
        }
    }

    /// `Err(retry_after)` when `key` has used up its window.
    fn check(&self, key: &K) -> Result<(), Duration> {
        if self.limit == 0 {
            return Ok(());
        }
        let last = self.last_over.load(Ordering::Relaxed);
        if last == 0 || Tick::now() >= Tick::from_nanos(last - 1).after(self.window) {
            return Ok(());
        }
        match self.windows.get(key) {
            Some(w) if w.count.load(Ordering::Relaxed) >= self.limit => Err(self.left(&w)),
            _ => Ok(()),
        }
    }

    /// Counts one event for `key`; `Err(retry_after)` when that went over.
    fn count(&self, key: K) -> Result<(), Duration> {
        if self.limit == 0 {
            return Ok(());
        }
        let w = self.windows.get_with(key, || {
            Arc::new(Window {
                started: Instant::now(),
                count: AtomicU32::new(0),
            })
        });
        let prior = w.count.fetch_add(1, Ordering::Relaxed);
        if prior.saturating_add(1) >= self.limit {
            self.last_over
                .fetch_max(Tick::now().nanos() + 1, Ordering::Relaxed);
        }
        if prior >= self.limit {
            return Err(self.left(&w));
        }
        Ok(())
    }

    fn left(&self, w: &Window) -> Duration {
        (w.started + self.window).saturating_duration_since(Instant::now())
    }
}

/// `ProxyError::RateLimited` for a wait of `left`, in whole seconds rounded up.
fn limited(left: Duration) -> ProxyError {
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    ProxyError::RateLimited(secs.max(1))
}

/// Failed authentications per source IP and per presented credential.
pub struct AuthFailures {
    by_ip: Counter<IpAddr>,
    by_credential: Counter<[u8; 32]>,
}

impl AuthFailures {
    /// At most `limit` failures (0 = no limit) per `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            by_ip: Counter::new(limit, window),
            by_credential: Counter::new(limit, window),
        }
    }

    /// Before identifying the caller: a source over its limit gets 429.
    pub fn check(&self, ip: IpAddr) -> Result<(), ProxyError> {
        self.by_ip.check(&ip).map_err(limited)
    }

    /// After identification failed with `err`: counts the failure when a
    /// credential was presented, and turns the answer into 429 once the source
    /// or the credential is over its limit.
    pub fn failed(&self, ip: IpAddr, headers: &HeaderMap, err: ProxyError) -> ProxyError {
        if !matches!(
            err,
            ProxyError::Unauthenticated | ProxyError::ProxyAuthRequired
        ) {
            return err;
        }
        let Some(credential) = credential_digest(headers) else {
            return err;
        };
        let by_ip = self.by_ip.count(ip);
        let by_credential = self.by_credential.count(credential);
        match (by_ip, by_credential) {
            (Err(a), Err(b)) => limited(a.max(b)),
            (Err(left), _) | (_, Err(left)) => limited(left),
            _ => err,
        }
    }
}

/// SHA-256 of every credential header the request carries (none: `None`), so
/// the same presented credential maps to the same key without keeping it.
fn credential_digest(headers: &HeaderMap) -> Option<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut any = false;
    for name in [
        header::AUTHORIZATION,
        header::PROXY_AUTHORIZATION,
        PRIVATE_TOKEN,
        super::caller_coder::CODER_SESSION_TOKEN,
    ] {
        for v in headers.get_all(&name) {
            any = true;
            hasher.update(name.as_str().as_bytes());
            hasher.update([0]);
            hasher.update(v.as_bytes());
            hasher.update([0]);
        }
    }
    any.then(|| hasher.finalize().into())
}

/// New leaf certificates per caller (user): forward mode mints one per new
/// host, and a wildcard route names unboundedly many hosts.
pub struct LeafMints(Counter<uuid::Uuid>);

impl LeafMints {
    /// At most `limit` new leaves (0 = no limit) per caller per `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self(Counter::new(limit, window))
    }

    /// Counts one new leaf for `user`; 429 once over the limit.
    pub fn mint(&self, user: uuid::Uuid) -> Result<(), ProxyError> {
        self.0.count(user).map_err(limited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with_auth(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static(v));
        h
    }

    #[tokio::test]
    async fn failures_with_a_credential_count_per_ip_and_per_credential() {
        let f = AuthFailures::new(2, Duration::from_secs(60));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let bad = with_auth("Bearer tpx_wrong");
        let unauth = || ProxyError::Unauthenticated;
        // No credential presented: not counted, however often.
        for _ in 0..5 {
            assert_eq!(f.failed(a, &HeaderMap::new(), unauth()), unauth());
        }
        assert!(f.check(a).is_ok());
        assert_eq!(f.failed(a, &bad, unauth()), unauth());
        assert_eq!(f.failed(a, &bad, unauth()), unauth());
        // The third failure within the window is over the limit.
        assert!(matches!(
            f.failed(a, &bad, unauth()),
            ProxyError::RateLimited(60)
        ));
        assert!(matches!(f.check(a), Err(ProxyError::RateLimited(_))));
        // The same credential from another source is limited too; that source
        // itself is not.
        assert!(matches!(
            f.failed(b, &bad, unauth()),
            ProxyError::RateLimited(_)
        ));
        assert!(f.check(b).is_ok());
        // Other errors are not authentication failures.
        assert_eq!(
            f.failed(b, &bad, ProxyError::StoreUnavailable),
            ProxyError::StoreUnavailable
        );
    }

    #[tokio::test]
    async fn a_limit_lifts_once_its_window_has_passed() {
        let f = AuthFailures::new(1, Duration::from_millis(200));
        let a: IpAddr = [10, 0, 0, 1].into();
        assert!(f.check(a).is_ok());
        f.failed(
            a,
            &with_auth("Bearer tpx_wrong"),
            ProxyError::Unauthenticated,
        );
        assert!(matches!(f.check(a), Err(ProxyError::RateLimited(1))));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(f.check(a).is_ok());
        // Counting starts over: one more failure is at the limit again.
        f.failed(
            a,
            &with_auth("Bearer tpx_wrong"),
            ProxyError::Unauthenticated,
        );
        assert!(matches!(f.check(a), Err(ProxyError::RateLimited(_))));
    }

    #[test]
    fn zero_means_no_limit() {
        let f = AuthFailures::new(0, Duration::from_secs(60));
        let a: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..100 {
            f.failed(a, &with_auth("Bearer x"), ProxyError::Unauthenticated);
        }
        assert!(f.check(a).is_ok());
    }
}
