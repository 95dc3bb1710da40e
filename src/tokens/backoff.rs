//! Remembering transient provider failures, so an IdP outage is not met with a
//! retry storm.
//!
//! Without this every request for an expired link starts a new flight (two store
//! reads and up to four provider attempts) against a provider that is already down.
//! Two memories, both on the injected clock so tests step them:
//!
//! - **Per link**: after a transient failure no exchange is attempted for that link
//!   for 1 s, doubling per consecutive failure up to 60 s — or longer when the
//!   provider's `Retry-After` asked for it (capped at [`MAX_HINT`]). The record keeps the
//!   token that was current, so callers are answered from memory (no store read).
//!   A success forgets it; a change notification makes the next caller re-read the
//!   row once, and a row holding another refresh token (a new login) is tried at
//!   once. (Our own lease release is announced too, so notifications cannot simply
//!   forget the record.)
//! - **Per provider** (a circuit breaker): once [`BREAKER_THRESHOLD`] distinct
//!   links failed transiently at a provider within [`BREAKER_WINDOW`], with no
//!   success there since, its token endpoint is not called at all for 1 s
//!   doubling to 60 s. Distinct links, because one link failing again and again
//!   (its own backoff already paces it) says nothing about the others. Then one
//!   exchange is let through as a probe (half-open): success closes the breaker,
//!   failure opens it for the next step.
//!
//! Meanwhile callers get the still-valid access token, or `idp_unavailable` with the
//! time left as `Retry-After`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::metrics::gauge::Gauge;

use super::cache::{to_chrono, Key};
use super::AccessToken;
use crate::store::StoredSecret;

/// First wait after a transient failure.
const FIRST_STEP: Duration = Duration::from_secs(1);
/// Longest wait between attempts.
const MAX_STEP: Duration = Duration::from_secs(60);
/// Distinct links failing at a provider (no success between) that open its breaker.
pub(crate) const BREAKER_THRESHOLD: usize = 5;
/// Failures older than this no longer count towards opening the breaker.
pub(crate) const BREAKER_WINDOW: Duration = Duration::from_secs(60);
/// Longest wait a provider's `Retry-After` can impose on a link: a provider asking
/// for an hour should not keep a link's callers on `idp_unavailable` that long.
pub(crate) const MAX_HINT: Duration = Duration::from_secs(300);

/// A link's remembered failure.
#[derive(Clone)]
struct LinkFailure {
    step: Duration,
    until: DateTime<Utc>,
    /// The refresh token (as stored) whose exchange failed.
    refresh: StoredSecret,
    /// The access token current then, served while it still works.
    token: AccessToken,
    /// A change was announced since: re-read the row before trusting this.
    recheck: bool,
}

/// Per-link backoff and per-provider breakers.
pub(crate) struct Backoff {
    links: quick_cache::sync::Cache<Key, LinkFailure>,
    breakers: Vec<Breaker>,
    /// A half-open probe that never reported back (its flight ended another way)
    /// stops counting after this long, so the breaker cannot stay stuck.
    probe_timeout: Duration,
}

impl Backoff {
    /// One breaker per provider (with its `tokenproxy_idp_breaker_open` gauge).
    pub(crate) fn new(capacity: u64, gauges: Vec<Gauge>, probe_timeout: Duration) -> Self {
        Self {
            links: super::bounded_cache(capacity),
            breakers: gauges.into_iter().map(Breaker::new).collect(),
            probe_timeout,
        }
    }

    /// How long callers of `key` should wait before an exchange is tried again;
    /// `None` when one may be tried now. Claims nothing.
    pub(crate) fn wait_for(&self, key: Key, now: DateTime<Utc>) -> Option<Duration> {
        let link = self
            .links
            .get(&key)
            .and_then(|f| (f.until - now).to_std().ok())
            .filter(|d| !d.is_zero());
        let breaker = self.breakers[key.0 as usize].wait_for(now, self.probe_timeout);
        link.max(breaker)
    }

    /// The token to answer `key`'s callers with from memory while its backoff
    /// runs (unless a change announced since asks for a re-read).
    pub(crate) fn blocked(&self, key: Key, now: DateTime<Utc>) -> Option<AccessToken> {
        self.links
            .get(&key)
            .filter(|f| now < f.until && !f.recheck)
            .map(|f| f.token)
    }

    /// Whether `key`'s link, whose row holds `refresh`, is still backing off.
    /// Clears a pending re-read: the row was just read. A row with another
    /// refresh token (a new login) ends the backoff.
    pub(crate) fn link_blocked(
        &self,
        key: Key,
        refresh: &StoredSecret,
        now: DateTime<Utc>,
    ) -> bool {
        let Some(mut f) = self.links.get(&key) else {
            return false;
        };
        if f.refresh != *refresh {
            self.links.remove(&key);
            return false;
        }
        if f.recheck {
            f.recheck = false;
            self.links.insert(key, f.clone());
        }
        now < f.until
    }

    /// Whether an exchange for `key` (row holding `refresh`) may call the
    /// provider now. When the provider's breaker is half-open this claims its one
    /// probe.
    pub(crate) fn admit(&self, key: Key, refresh: &StoredSecret, now: DateTime<Utc>) -> bool {
        !self.link_blocked(key, refresh, now)
            && self.breakers[key.0 as usize].admit(now, self.probe_timeout)
    }

    /// Whether the provider's breaker is open (not yet half-open) at `now`.
    pub(crate) fn provider_open(&self, key: Key, now: DateTime<Utc>) -> bool {
        self.breakers[key.0 as usize]
            .state
            .lock()
            .open_until
            .is_some_and(|u| now < u)
    }

    /// Records a transient failure of exchanging `refresh` for `key`; `token` is
    /// the access token that was current, `hint` the provider's `Retry-After`.
    pub(crate) fn failed(
        &self,
        key: Key,
        now: DateTime<Utc>,
        refresh: &StoredSecret,
        token: AccessToken,
        hint: Option<Duration>,
    ) {
        let step = match self.links.get(&key) {
            Some(f) if f.refresh == *refresh => (f.step * 2).min(MAX_STEP),
            _ => FIRST_STEP,
        };
        // The hint lengthens this wait only: the doubling goes on from `step`.
        let wait = step.max(hint.unwrap_or_default().min(MAX_HINT));
        self.links.insert(
            key,
            LinkFailure {
                step,
                until: now + to_chrono(wait),
                refresh: refresh.clone(),
                token,
                recheck: false,
            },
        );
        self.breakers[key.0 as usize].failed(now, key.1, hint.map(|h| h.min(MAX_HINT)));
    }

    /// An exchange for `key` ended neither in an answer about the link nor in a
    /// transient failure (our client is misconfigured): if it was the half-open
    /// probe, the next exchange may probe again instead of waiting for
    /// [`Backoff::new`]'s `probe_timeout`.
    pub(crate) fn inconclusive(&self, key: Key) {
        self.breakers[key.0 as usize].state.lock().probe_since = None;
    }

    /// A change to `key`'s row was announced: re-read it before trusting the record.
    pub(crate) fn notified(&self, key: Key) {
        if let Some(mut f) = self.links.get(&key) {
            f.recheck = true;
            self.links.insert(key, f);
        }
    }

    /// Records a successful exchange for `key`.
    pub(crate) fn succeeded(&self, key: Key) {
        self.links.remove(&key);
        self.breakers[key.0 as usize].succeeded();
    }
}

/// One provider's circuit breaker.
struct Breaker {
    state: parking_lot::Mutex<BreakerState>,
    gauge: Gauge,
}

#[derive(Default)]
struct BreakerState {
    /// Distinct links that failed transiently since the last success, with when
    /// they last did (at most [`BREAKER_THRESHOLD`] kept).
    failing: Vec<(uuid::Uuid, DateTime<Utc>)>,
    /// Set while open (or half-open once it has passed).
    open_until: Option<DateTime<Utc>>,
    step: Duration,
    /// When the half-open probe was let through.
    probe_since: Option<DateTime<Utc>>,
}

impl Breaker {
    fn new(gauge: Gauge) -> Self {
        Self {
            state: parking_lot::Mutex::new(BreakerState::default()),
            gauge,
        }
    }

    fn wait_for(&self, now: DateTime<Utc>, probe_timeout: Duration) -> Option<Duration> {
        let st = self.state.lock();
        let until = st.open_until?;
        if now < until {
            return (until - now).to_std().ok();
        }
        // Half-open: wait for the probe's answer (a second at a time).
        st.probe_since
            .is_some_and(|p| now - p < to_chrono(probe_timeout))
            .then_some(FIRST_STEP)
    }

    fn admit(&self, now: DateTime<Utc>, probe_timeout: Duration) -> bool {
        let mut st = self.state.lock();
        let Some(until) = st.open_until else {
            return true;
        };
        if now < until {
            return false;
        }
        if st
            .probe_since
            .is_some_and(|p| now - p < to_chrono(probe_timeout))
        {
            return false;
        }
        st.probe_since = Some(now);
        true
    }

    fn failed(&self, now: DateTime<Utc>, link: uuid::Uuid, hint: Option<Duration>) {
        let mut st = self.state.lock();
        if let Some(hint) = hint {
            // A `Retry-After` from the token endpoint (a 429 is about our client,
            // a 503 about the endpoint) speaks for every link: hold all of them
            // off that long, without waiting for other links to fail first.
            let until = now + to_chrono(hint);
            if st.open_until.is_none_or(|u| u < until) {
                st.open_until = Some(until);
                st.step = st.step.max(FIRST_STEP);
                st.probe_since = None;
                st.failing.clear();
                self.gauge.set(1);
            }
            return;
        }
        if st.probe_since.is_some() {
            // The half-open probe failed: open for the next step.
            st.step = (st.step * 2).min(MAX_STEP);
            st.open_until = Some(now + to_chrono(st.step));
            st.probe_since = None;
            return;
        }
        if st.open_until.is_some() {
            // A straggler let through before it opened: already counted as open.
            return;
        }
        let window = to_chrono(BREAKER_WINDOW);
        st.failing
            .retain(|(l, at)| *l != link && now - *at < window);
        st.failing.push((link, now));
        if st.failing.len() >= BREAKER_THRESHOLD {
            st.step = FIRST_STEP;
            st.open_until = Some(now + to_chrono(st.step));
            st.failing.clear();
            self.gauge.set(1);
        }
    }

    fn succeeded(&self) {
        *self.state.lock() = BreakerState::default();
        self.gauge.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_800_000_000_000 + ms).unwrap()
    }

    fn backoff() -> (Backoff, Gauge) {
        let g = Gauge::default();
        (
            Backoff::new(100, vec![g.clone()], Duration::from_secs(30)),
            g,
        )
    }

    fn tok() -> AccessToken {
        AccessToken::new(secrecy::SecretString::from("a".to_string()), None)
    }

    #[test]
    fn a_link_backs_off_doubling_to_a_minute_and_success_forgets() {
        let (b, _) = backoff();
        let k = (0, uuid::Uuid::new_v4());
        let r = StoredSecret("r1".into());
        assert!(b.admit(k, &r, t(0)));
        let mut at = 0;
        for step in [1, 2, 4, 8, 16, 32, 60, 60] {
            b.failed(k, t(at), &r, tok(), None);
            b.succeeded((0, uuid::Uuid::new_v4())); // keep the breaker closed
            assert!(!b.admit(k, &r, t(at + step * 1000 - 1)), "step {step}");
            assert!(b.blocked(k, t(at)).is_some());
            assert_eq!(b.wait_for(k, t(at)), Some(Duration::from_secs(step as u64)));
            at += step * 1000;
            assert!(b.admit(k, &r, t(at)), "step {step}");
        }
        b.succeeded(k);
        b.failed(k, t(at), &r, tok(), None);
        assert_eq!(b.wait_for(k, t(at)), Some(Duration::from_secs(1)));
        // A notification asks for one re-read; the same row keeps the backoff...
        b.notified(k);
        assert!(b.blocked(k, t(at)).is_none());
        assert!(b.link_blocked(k, &r, t(at)));
        assert!(b.blocked(k, t(at)).is_some());
        // ... a new refresh token (a new login) ends it.
        assert!(b.admit(k, &StoredSecret("r2".into()), t(at)));
        assert!(b.wait_for(k, t(at)).is_none());
    }

    #[test]
    fn the_breaker_opens_after_consecutive_failures_and_probes_once() {
        let (b, gauge) = backoff();
        let links: Vec<Key> = (0..10).map(|_| (0, uuid::Uuid::new_v4())).collect();
        let r = StoredSecret("r".into());
        for k in &links[..BREAKER_THRESHOLD] {
            assert!(b.admit(*k, &r, t(0)));
            b.failed(*k, t(0), &r, tok(), None);
        }
        assert_eq!(gauge.get(), 1);
        // Open: even a link that never failed is not tried.
        assert!(!b.admit(links[9], &r, t(500)));
        assert!(b.provider_open(links[9], t(500)));
        assert_eq!(
            b.wait_for(links[9], t(500)),
            Some(Duration::from_millis(500))
        );
        // Half-open: exactly one probe.
        assert!(b.admit(links[9], &r, t(1000)));
        assert!(!b.admit(links[8], &r, t(1000)));
        // The probe failed: open for twice as long.
        b.failed(links[9], t(1000), &r, tok(), None);
        assert!(!b.admit(links[8], &r, t(2999)));
        assert!(b.admit(links[8], &r, t(3000)));
        b.succeeded(links[8]);
        assert_eq!(gauge.get(), 0);
        assert!(b.admit(links[7], &r, t(3000)));
    }

    #[test]
    fn one_link_failing_again_and_again_does_not_open_the_breaker() {
        let (b, gauge) = backoff();
        let lone = (0, uuid::Uuid::new_v4());
        let r = StoredSecret("r".into());
        // Twenty failures of one link, each after its backoff: the others stay open.
        let mut at = 0;
        for _ in 0..20 {
            assert!(b.admit(lone, &r, t(at)));
            b.failed(lone, t(at), &r, tok(), None);
            at += 60_000;
        }
        assert_eq!(gauge.get(), 0);
        let other = (0, uuid::Uuid::new_v4());
        assert!(b.admit(other, &r, t(at)));
        // Four distinct links (one of them twice) are not enough either...
        b.succeeded(other);
        let fresh = || (0, uuid::Uuid::new_v4());
        for k in [lone, lone, fresh(), fresh(), fresh()] {
            b.failed(k, t(at), &r, tok(), None);
        }
        assert_eq!(gauge.get(), 0, "four distinct links");
        // ... and failures older than the window stop counting.
        let late = at + BREAKER_WINDOW.as_millis() as i64;
        b.failed(fresh(), t(late), &r, tok(), None);
        assert_eq!(gauge.get(), 0, "the first ones aged out of the window");
        for _ in 0..3 {
            b.failed(fresh(), t(late), &r, tok(), None);
        }
        assert_eq!(gauge.get(), 0);
        b.failed(fresh(), t(late), &r, tok(), None);
        assert_eq!(gauge.get(), 1, "five distinct links within the window");
    }

    #[test]
    fn a_retry_after_holds_off_every_link_of_the_provider() {
        let (b, gauge) = backoff();
        let (limited, other) = ((0, uuid::Uuid::new_v4()), (0, uuid::Uuid::new_v4()));
        let r = StoredSecret("r".into());
        // One 429 with `Retry-After: 30`: the endpoint speaks for our whole client.
        b.failed(limited, t(0), &r, tok(), Some(Duration::from_secs(30)));
        assert_eq!(gauge.get(), 1);
        assert!(
            !b.admit(other, &r, t(29_999)),
            "another link during the hint"
        );
        assert_eq!(b.wait_for(other, t(0)), Some(Duration::from_secs(30)));
        // Then one probe, as after any opening.
        assert!(b.admit(other, &r, t(30_000)));
        assert!(!b.admit(limited, &r, t(30_000)));
        b.succeeded(other);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn an_inconclusive_probe_lets_the_next_exchange_probe() {
        let (b, _) = backoff();
        let links: Vec<Key> = (0..7).map(|_| (0, uuid::Uuid::new_v4())).collect();
        let r = StoredSecret("r".into());
        for k in &links[..BREAKER_THRESHOLD] {
            b.failed(*k, t(0), &r, tok(), None);
        }
        assert!(b.admit(links[5], &r, t(1000)), "the probe");
        assert!(!b.admit(links[6], &r, t(1000)), "one probe at a time");
        // The probe ended misconfigured: no answer about the endpoint either way.
        b.inconclusive(links[5]);
        assert!(
            b.admit(links[6], &r, t(1001)),
            "not stuck until the probe timeout"
        );
    }

    #[test]
    fn retry_after_lengthens_one_wait_up_to_a_cap() {
        let (b, _) = backoff();
        let k = (0, uuid::Uuid::new_v4());
        let r = StoredSecret("r".into());
        b.failed(k, t(0), &r, tok(), Some(Duration::from_secs(20)));
        assert_eq!(b.wait_for(k, t(0)), Some(Duration::from_secs(20)));
        assert!(!b.admit(k, &r, t(19_999)));
        assert!(b.admit(k, &r, t(20_000)));
        // The doubling goes on from its own step (2 s), not from the hint.
        b.failed(k, t(20_000), &r, tok(), None);
        assert_eq!(b.wait_for(k, t(20_000)), Some(Duration::from_secs(2)));
        // A hint shorter than the step changes nothing; an hour is capped.
        b.failed(k, t(30_000), &r, tok(), Some(Duration::from_millis(10)));
        assert_eq!(b.wait_for(k, t(30_000)), Some(Duration::from_secs(4)));
        b.failed(k, t(40_000), &r, tok(), Some(Duration::from_secs(3600)));
        assert_eq!(b.wait_for(k, t(40_000)), Some(MAX_HINT));
    }
}
