//! What the token cache holds per (provider, user), and when an entry stops
//! being servable.
//!
//! The cache is keyed by provider index and user id, never by a token value. An
//! entry carries the access token plus what refresh-ahead needs (the token's
//! lifetime, when to start refreshing, when it was last used). Usability is always
//! decided with the injected [`Clock`](super::Clock); [`tidy`] only keeps memory
//! tidy.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::AccessToken;

/// Cache key: index of the provider in the source's provider list, and the user.
pub(crate) type Key = (u32, uuid::Uuid);

/// Whether a token with this expiry may be served at `now` (DESIGN.md: usable while
/// `expiry - skew > now`, or when it never expires).
pub(crate) fn usable(expiry: Option<DateTime<Utc>>, now: DateTime<Utc>, skew: Duration) -> bool {
    match expiry {
        None => true,
        Some(exp) => exp - to_chrono(skew) > now,
    }
}

/// Whether the token still works at the provider (ignoring skew): served as a last
/// resort while the provider or the store is down.
pub(crate) fn unexpired(expiry: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    expiry.is_none_or(|exp| exp > now)
}

pub(crate) fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Counts the entries a full cache evicts (`tokenproxy_cache_evictions_total`):
/// runs only when an insert overflows a shard, never on a hit.
#[derive(Clone)]
pub(crate) struct CountEvictions(pub prometheus_client::metrics::counter::Counter);

impl quick_cache::Lifecycle<Key, Arc<Entry>> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), _: Key, _: Arc<Entry>) {
        self.0.inc();
    }
}

/// The token cache: links by key, counting evictions.
pub(crate) type TokenCache = quick_cache::sync::Cache<
    Key,
    Arc<Entry>,
    quick_cache::UnitWeighter,
    quick_cache::DefaultHashBuilder,
    CountEvictions,
>;

/// How stale an entry's last use may be recorded (see [`Entry::touch`]).
const TOUCH_GRANULARITY_MS: i64 = 100;

/// One cached link. Times are unix milliseconds rather than `DateTime`s: one
/// entry per cached link, and this way it fits the allocator's 64-byte class
/// (80 before).
pub(crate) struct Entry {
    /// The token served on hits.
    pub token: AccessToken,
    /// When refresh-ahead should replace it, unix milliseconds on the injected
    /// clock (`i64::MAX`: never, e.g. no expiry).
    ahead_at_ms: i64,
    /// Last `get()` that served it, unix milliseconds on the injected clock.
    last_used_ms: AtomicI64,
    /// A refresh-ahead was already started for this version.
    pub ahead_started: AtomicBool,
    /// The change feed's resync generation when cached. Entries from before the
    /// last resync are not served on the hit path (they may have missed a change),
    /// but remain a last resort while the store is unreachable.
    pub generation: u64,
    /// When the token was read from the store or the provider (unix milliseconds,
    /// injected clock). Past `tokens.cache_max_age` the entry is read again once,
    /// so a change whose notification was lost still arrives; it stays the
    /// outage fallback.
    cached_at_ms: i64,
}

impl Entry {
    /// Builds an entry. `lifetime` is how long the token was valid when issued
    /// (None when unknown); `remaining` is `tokens.refresh_ahead_remaining`.
    pub fn new(
        token: AccessToken,
        lifetime: Option<chrono::Duration>,
        remaining: f64,
        skew: Duration,
        now: DateTime<Utc>,
    ) -> Self {
        let ahead_at = match (token.expiry(), lifetime) {
            (Some(exp), Some(life)) if life > chrono::Duration::zero() => {
                ahead_time(exp, life, remaining, skew, rand::random::<f64>())
            }
            _ => None,
        };
        Self {
            token,
            ahead_at_ms: ahead_at.map_or(i64::MAX, |t| t.timestamp_millis()),
            last_used_ms: AtomicI64::new(now.timestamp_millis()),
            ahead_started: AtomicBool::new(false),
            generation: 0,
            cached_at_ms: now.timestamp_millis(),
        }
    }

    /// Records a use (relaxed: hits stay lock-free). Stored at most once per
    /// [`TOUCH_GRANULARITY_MS`]: a hot link is hit from every worker thread, and
    /// a store on each hit would bounce the entry's cache line between cores,
    /// while a load keeps it shared. `used_within` is off by at most that much.
    pub fn touch(&self, now: DateTime<Utc>) {
        let now = now.timestamp_millis();
        if now.saturating_sub(self.last_used_ms.load(Ordering::Relaxed)) >= TOUCH_GRANULARITY_MS {
            self.last_used_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Whether it was cached at least `max_age` before `now`, so the hit path
    /// reads it again.
    pub fn aged(&self, now: DateTime<Utc>, max_age: Duration) -> bool {
        let max_age = i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
        now.timestamp_millis().saturating_sub(self.cached_at_ms) >= max_age
    }

    /// Whether refresh-ahead should replace it at `now`.
    pub fn ahead_due(&self, now: DateTime<Utc>) -> bool {
        now.timestamp_millis() >= self.ahead_at_ms
    }

    /// Whether it was served within `window` of `now`.
    pub fn used_within(&self, now: DateTime<Utc>, window: Duration) -> bool {
        let last = self.last_used_ms.load(Ordering::Relaxed);
        now.timestamp_millis() - last <= i64::try_from(window.as_millis()).unwrap_or(i64::MAX)
    }
}

/// When to refresh ahead: once `remaining` of the lifetime is left, moved earlier by
/// up to a quarter of that by `jitter` (0..1) so replicas and users spread out, and
/// never later than the moment the token stops being usable.
pub(crate) fn ahead_time(
    expiry: DateTime<Utc>,
    lifetime: chrono::Duration,
    remaining: f64,
    skew: Duration,
    jitter: f64,
) -> Option<DateTime<Utc>> {
    if remaining <= 0.0 {
        return None;
    }
    let lead_ms = lifetime.num_milliseconds() as f64 * remaining * (1.0 + 0.25 * jitter);
    let at = expiry - chrono::Duration::milliseconds(lead_ms as i64);
    let unusable_at = expiry - to_chrono(skew);
    Some(at.min(unusable_at))
}

/// Drops every entry whose token has expired at `now` (injected clock) — memory
/// tidying only: the hit path already skips entries past expiry minus skew, and
/// an unexpired one is kept as the outage fallback until it expires.
pub(crate) fn tidy(cache: &TokenCache, now: DateTime<Utc>) {
    cache.retain(|_, e| unexpired(e.token.expiry(), now));
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }

    #[test]
    fn usable_respects_skew_and_never() {
        let skew = Duration::from_secs(60);
        assert!(usable(None, t(0), skew));
        assert!(usable(Some(t(61)), t(0), skew));
        assert!(!usable(Some(t(60)), t(0), skew));
        assert!(!usable(Some(t(-1)), t(0), skew));
        assert!(unexpired(Some(t(1)), t(0)));
        assert!(!unexpired(Some(t(0)), t(0)));
    }

    #[test]
    fn ahead_time_is_at_remaining_fraction_with_jitter_earlier() {
        let life = chrono::Duration::seconds(1000);
        let skew = Duration::from_secs(10);
        assert_eq!(ahead_time(t(1000), life, 0.2, skew, 0.0), Some(t(800)));
        assert_eq!(ahead_time(t(1000), life, 0.2, skew, 1.0), Some(t(750)));
        // Short lifetimes: never later than the moment the token becomes unusable.
        assert_eq!(ahead_time(t(1000), life, 0.001, skew, 0.0), Some(t(990)));
        assert_eq!(ahead_time(t(1000), life, 0.0, skew, 0.0), None);
    }

    #[test]
    fn entries_age_from_when_they_were_cached() {
        let token = AccessToken::new(secrecy::SecretString::from("a"), None);
        let e = Entry::new(token, None, 0.2, Duration::from_secs(60), t(0));
        let max = Duration::from_secs(300);
        assert!(!e.aged(t(299), max));
        assert!(e.aged(t(300), max));
        // A clock that went backwards does not make an entry older.
        assert!(!e.aged(t(-5), max));
    }

    #[test]
    fn refresh_ahead_is_due_from_its_time_and_never_without_one() {
        let skew = Duration::from_secs(10);
        let life = Some(chrono::Duration::seconds(1000));
        let token = AccessToken::new(secrecy::SecretString::from("a"), Some(t(1000)));
        let e = Entry::new(token, life, 0.2, skew, t(0));
        // Jitter moves it earlier by up to a quarter of the lead: 750..=800 s.
        assert!(!e.ahead_due(t(749)));
        assert!(e.ahead_due(t(800)));
        let never = AccessToken::new(secrecy::SecretString::from("a"), None);
        let e = Entry::new(never, life, 0.2, skew, t(0));
        assert!(!e.ahead_due(t(1_000_000)));
    }

    #[test]
    fn an_entry_fits_the_64_byte_class() {
        // An `Arc` adds two counters (16 bytes) to the entry it holds.
        assert!(std::mem::size_of::<Entry>() + 16 <= 64);
    }
}
