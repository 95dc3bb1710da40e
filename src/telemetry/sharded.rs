//! A histogram for the request path: observed without a lock, into one of a few
//! cache-line-aligned shards picked by the observing thread, and merged when
//! scraped.
//!
//! prometheus-client's `Histogram` takes a mutex per observation; every proxy
//! worker observes two histograms per request, so the lock's cache line moved
//! between cores on each one. Here a worker thread writes only its own shard's
//! atomics (relaxed: each value is a sum, and a scrape may see one observation
//! half-counted, which Prometheus tolerates as it does for any concurrent scrape).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Shards: more than the worker threads of a typical replica, so each worker
/// (assigned round-robin) usually owns one.
const SHARDS: usize = 16;
/// Most buckets a sharded histogram holds, `+Inf` included.
const MAX_BUCKETS: usize = 24;

/// One thread group's counts, on its own cache lines.
#[repr(align(128))]
struct Shard {
    /// Observations per bucket (not cumulative), the last one `+Inf`.
    buckets: [AtomicU64; MAX_BUCKETS],
    /// The sum of observed values, as `f64` bits.
    sum: AtomicU64,
}

impl Default for Shard {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }
}

/// A classic Prometheus histogram with per-thread shards (see the module docs).
#[derive(Clone)]
pub struct ShardedHistogram {
    inner: Arc<Inner>,
}

struct Inner {
    /// Finite upper bounds, ascending; bucket `bounds.len()` is `+Inf`.
    bounds: Vec<f64>,
    shards: Box<[Shard]>,
}

impl std::fmt::Debug for ShardedHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedHistogram")
            .field("buckets", &(self.inner.bounds.len() + 1))
            .finish()
    }
}

/// Which shard the calling thread writes.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    MINE.with(|i| *i)
}

impl ShardedHistogram {
    /// A histogram with `bounds` (finite ones kept, at most `MAX_BUCKETS - 1`) and
    /// `+Inf`.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let mut bounds: Vec<f64> = bounds.into_iter().filter(|b| b.is_finite()).collect();
        bounds.truncate(MAX_BUCKETS - 1);
        Self {
            inner: Arc::new(Inner {
                bounds,
                shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            }),
        }
    }

    /// Records `v`.
    pub fn observe(&self, v: f64) {
        let inner = &*self.inner;
        let bucket = if v.is_nan() {
            inner.bounds.len()
        } else {
            inner.bounds.partition_point(|b| *b < v)
        };
        let shard = &inner.shards[shard_index()];
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        // Uncontended unless two threads share the shard.
        let _ = shard
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    /// The merged `(sum, count, per-bucket counts)`; count is the buckets' total.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let inner = &*self.inner;
        let mut buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .map(|b| (b, 0))
            .collect();
        let mut sum = 0.0;
        for shard in inner.shards.iter() {
            for (slot, n) in buckets.iter_mut().zip(&shard.buckets) {
                slot.1 += n.load(Ordering::Relaxed);
            }
            sum += f64::from_bits(shard.sum.load(Ordering::Relaxed));
        }
        let count = buckets.iter().map(|(_, n)| n).sum();
        (sum, count, buckets)
    }
}

impl TypedMetric for ShardedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ShardedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::ShardedHistogram;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn encodes_exactly_as_the_mutex_histogram_from_many_threads() {
        let bounds: Vec<f64> =
            prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16).collect();
        let (sharded, plain) = (
            ShardedHistogram::new(bounds.clone()),
            Histogram::new(bounds),
        );
        let values: Vec<f64> = (0..4000)
            .map(|i| match i % 7 {
                0 => 0.0005, // on a bound: counted in that bucket (le is inclusive)
                1 => 100.0,  // past the last bound: +Inf only
                _ => f64::from(i) * 0.00013,
            })
            .collect();
        std::thread::scope(|s| {
            for chunk in values.chunks(500) {
                let sharded = sharded.clone();
                s.spawn(move || chunk.iter().for_each(|v| sharded.observe(*v)));
            }
        });
        values.iter().for_each(|v| plain.observe(*v));
        let mut a = Registry::default();
        a.register("d", "x", sharded);
        let mut b = Registry::default();
        b.register("d", "x", plain);
        let (a, b) = (text(&a), text(&b));
        // Sums are added in another order: compare them apart, to rounding.
        let strip = |t: &str| -> (Vec<String>, f64) {
            let sum = t
                .lines()
                .find_map(|l| l.strip_prefix("d_sum "))
                .unwrap()
                .parse()
                .unwrap();
            let rest = t
                .lines()
                .filter(|l| !l.starts_with("d_sum "))
                .map(String::from)
                .collect();
            (rest, sum)
        };
        let ((ra, sa), (rb, sb)) = (strip(&a), strip(&b));
        assert_eq!(ra, rb, "buckets and count\n{a}\n{b}");
        assert!((sa - sb).abs() < 1e-6 * sb.abs(), "{sa} vs {sb}");
        assert!(a.contains("d_count 4000"), "{a}");
    }
}
