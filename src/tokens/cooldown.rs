//! How often an upstream's 401 may force a refresh of one link.
//!
//! A forced refresh costs a provider grant and, with rotating refresh tokens, opens
//! another race window. Bounding it per token version is not enough: every forced
//! refresh makes a new version, so an upstream path that always answers 401 would
//! cost one grant per request and let any caller burn the OAuth app's rate limit.
//! So the bound is per link and per time: at most one forced refresh per
//! `tokens.reject_cooldown`, whichever request or token version asks.

use std::convert::Infallible;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::cache::Key;

/// Marks a slot that never granted a forced refresh.
const NEVER: i64 = i64::MIN;

/// When each link last had a forced refresh granted (unix ms, injected clock).
pub(crate) struct RejectCooldown {
    /// Bounded like the token cache; an evicted slot only forgets a cooldown early.
    last: quick_cache::sync::Cache<Key, Arc<AtomicI64>>,
    cooldown_ms: i64,
}

impl RejectCooldown {
    /// A cooldown of `cooldown` for up to `capacity` links.
    pub(crate) fn new(capacity: u64, cooldown: Duration) -> Self {
        Self {
            last: super::bounded_cache(capacity),
            cooldown_ms: i64::try_from(cooldown.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// Claims the one forced refresh of `key` allowed per cooldown at `now`: true
    /// for exactly one of any number of concurrent callers, false for everyone
    /// until the cooldown has passed since the last successful claim.
    pub(crate) fn try_claim(&self, key: Key, now: DateTime<Utc>) -> bool {
        let slot = self
            .last
            .get_or_insert_with(&key, || {
                Ok::<_, Infallible>(Arc::new(AtomicI64::new(NEVER)))
            })
            .unwrap_or_else(|never| match never {});
        let now_ms = now.timestamp_millis();
        let mut prev = slot.load(Ordering::Acquire);
        loop {
            if prev != NEVER && now_ms.saturating_sub(prev) < self.cooldown_ms {
                return false;
            }
            match slot.compare_exchange(prev, now_ms, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(current) => prev = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_800_000_000_000 + ms).unwrap()
    }

    #[test]
    fn one_claim_per_cooldown_per_link() {
        let c = RejectCooldown::new(100, Duration::from_secs(30));
        let a = (0, uuid::Uuid::new_v4());
        let b = (0, uuid::Uuid::new_v4());
        assert!(c.try_claim(a, t(0)));
        assert!(!c.try_claim(a, t(1)));
        assert!(!c.try_claim(a, t(29_999)));
        // Another link has its own cooldown.
        assert!(c.try_claim(b, t(1)));
        assert!(c.try_claim(a, t(30_000)));
        assert!(!c.try_claim(a, t(30_001)));
    }

    #[test]
    fn concurrent_claims_grant_exactly_one() {
        let c = Arc::new(RejectCooldown::new(100, Duration::from_secs(30)));
        let key = (0, uuid::Uuid::new_v4());
        let granted: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let c = c.clone();
                    s.spawn(move || (0..100).filter(|_| c.try_claim(key, t(5))).count())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(granted, 1);
    }
}
