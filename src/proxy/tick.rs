//! Moments on the monotonic clock in 8 bytes: nanoseconds since the process
//! first asked. Half an `Instant`, and storable in an `AtomicU64`, which
//! matters in an entry per cached caller and in a connection's activity.

use std::sync::LazyLock;
use std::time::Duration;

/// A moment, as nanoseconds since [`EPOCH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tick(u64);

/// What [`Tick`]s count from.
static EPOCH: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);

impl Tick {
    /// Now.
    pub fn now() -> Self {
        Self(saturating_nanos(EPOCH.elapsed()))
    }

    /// This moment as the `Instant` tokio's timers take.
    pub fn instant(self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(*EPOCH + Duration::from_nanos(self.0))
    }

    /// `d` later (saturating: a `Duration::MAX` TTL means never).
    pub fn after(self, d: Duration) -> Self {
        Self(self.0.saturating_add(saturating_nanos(d)))
    }

    /// The raw count, for an atomic.
    pub fn nanos(self) -> u64 {
        self.0
    }

    /// A raw count read back from an atomic.
    pub fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }
}

fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_order_like_the_clock_and_saturate() {
        let a = Tick::now();
        let b = a.after(Duration::from_millis(5));
        assert!(a < b && b.0 - a.0 == 5_000_000);
        assert_eq!(a.after(Duration::MAX), Tick(u64::MAX));
        assert!(Tick::now() >= a);
    }

    #[test]
    fn a_tick_reads_back_as_the_instant_it_was() {
        let before = tokio::time::Instant::now();
        let tick = Tick::now();
        let after = tokio::time::Instant::now();
        assert!(before <= tick.instant() && tick.instant() <= after);
        assert_eq!(Tick::from_nanos(tick.nanos()), tick);
    }
}
