//! Every metric tokenproxy exports (README, "Metrics"), in one [`Metrics`] value
//! with its own registry.
//!
//! Hot-path metrics are plain counters and histograms handed to their users once
//! (no label lookup per request); everything added for operators — link states,
//! cache size, flights, lease takeovers, store latency, the LISTEN connection — is
//! updated off the cache-hit path: in the background, at scrape time, or on a miss.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use uuid::Uuid;

use super::audit::Trail;
use super::sharded::ShardedHistogram;

/// Labels of `tokenproxy_requests_total`. Shared strings (the route's own), so
/// counting a request allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Provider id, or empty when no route matched.
    pub provider: Arc<str>,
    /// Route prefix (or host in forward mode), or empty.
    pub route: Arc<str>,
    /// HTTP status sent to the caller.
    pub status: u16,
}

/// Labels of `tokenproxy_token_lookups_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// `hit` or `miss`.
    pub result: LookupResult,
}

/// Whether a lookup was served from the cache.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum LookupResult {
    /// Served from memory.
    Hit,
    /// Needed the store or a refresh.
    Miss,
}

/// Labels of `tokenproxy_refresh_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    /// Provider id.
    pub provider: String,
    /// What happened.
    pub outcome: RefreshOutcome,
}

/// Outcome of one refresh attempt (DESIGN.md, "Metrics").
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// We exchanged the refresh token and stored the result.
    Success,
    /// The provider rejected the refresh token.
    InvalidGrant,
    /// Timeout, connection error, 5xx or 429.
    TransientError,
    /// Our compare-and-swap lost; the winner's token was served.
    LostRace,
    /// Another flight or replica had already refreshed; its token was served.
    Adopted,
}

impl LookupResult {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
        }
    }
}

impl RefreshOutcome {
    /// The label value (DESIGN.md spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::InvalidGrant => "invalid_grant",
            Self::TransientError => "transient_error",
            Self::LostRace => "lost_race",
            Self::Adopted => "adopted",
        }
    }
}

impl EncodeLabelValue for LookupResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

impl EncodeLabelValue for RefreshOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Labels carrying only a provider id.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// Provider id.
    pub provider: String,
}

/// Labels of `tokenproxy_links`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkStateLabels {
    /// `ok`, `expiring_soon` or `reauth_required`.
    pub state: &'static str,
}

/// Labels of `tokenproxy_store_query_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOpLabels {
    /// The store operation (`get_link`, `claim_refresh_lease`, ...).
    pub op: &'static str,
}

/// How many `tokenproxy_requests_total` counters each thread remembers (by
/// [`Metrics`] instance and label set), so a request finds its counter without
/// the family's lock and a hash of two strings.
const RECENT_LABELS: usize = 8;

/// One remembered counter: the [`Metrics`] instance, its labels, the counter.
type Recent = (u64, RequestLabels, Counter);

thread_local! {
    /// This thread's [`RECENT_LABELS`] counters, newest written in turn.
    static RECENT: std::cell::RefCell<(usize, Vec<Recent>)> =
        const { std::cell::RefCell::new((0, Vec::new())) };
}

/// Reads a cache's current number of entries.
pub type CacheProbe = Box<dyn Fn() -> u64 + Send + Sync>;

/// Every metric tokenproxy exports, with the registry that serves them.
pub struct Metrics {
    registry: Registry,
    /// Tells this value's counters from another's in the per-thread memo (tests
    /// run many servers in one process).
    instance: u64,
    /// `tokenproxy_requests_total{provider,route,status}`.
    pub requests: Family<RequestLabels, Counter>,
    /// `tokenproxy_request_duration_seconds` (sharded: observed on every request).
    pub request_duration: ShardedHistogram,
    /// `tokenproxy_upstream_duration_seconds`: time until the upstream's response head.
    pub upstream_duration: ShardedHistogram,
    /// `tokenproxy_token_lookups_total{result}`.
    pub token_lookups: Family<LookupLabels, Counter>,
    /// `tokenproxy_refresh_total{provider,outcome}`.
    pub refresh: Family<RefreshLabels, Counter>,
    /// `tokenproxy_refresh_duration_seconds{provider}`: one exchange with the provider.
    pub refresh_duration: Family<ProviderLabels, Histogram>,
    /// `tokenproxy_refresh_ahead_total{provider}`: background refreshes started.
    pub refresh_ahead: Family<ProviderLabels, Counter>,
    /// `tokenproxy_cache_invalidations_total`: keys dropped on change notifications.
    pub cache_invalidations: Counter,
    /// `tokenproxy_open_connections`: client connections on the proxy listener.
    pub open_connections: Gauge,
    /// `tokenproxy_forward_leaves_minted_total`: leaf certificates minted for
    /// intercepted hosts (cached ones are not counted again).
    pub leaves_minted: Counter,
    /// `tokenproxy_store_up`: 1 when the link store answered the last probe (made
    /// once per `/metrics` scrape, off the request path), else 0.
    pub store_up: Gauge,
    /// `tokenproxy_upstream_rejections_total{provider}`: upstream 401s to a token
    /// we injected (whether or not they forced a refresh).
    pub upstream_rejections: Family<ProviderLabels, Counter>,
    /// `tokenproxy_idp_breaker_open{provider}`: 1 while the provider's circuit
    /// breaker keeps its token endpoint from being called, else 0.
    pub idp_breaker_open: Family<ProviderLabels, Gauge>,
    /// `tokenproxy_links_refresh_expiring{provider}`: links whose refresh token
    /// expires within 7 days (set by the keep-alive pass, hourly or more often).
    pub links_refresh_expiring: Family<ProviderLabels, Gauge>,
    /// `tokenproxy_links{state}`: links by state, counted in the background
    /// (one store query per interval, never per scrape).
    pub links: Family<LinkStateLabels, Gauge>,
    /// `tokenproxy_lease_takeovers_total{provider}`: refresh leases this replica
    /// claimed after another holder let them run out unreleased.
    pub lease_takeovers: Family<ProviderLabels, Counter>,
    /// `tokenproxy_flights_in_progress`: token flights (store read, lease,
    /// exchange) running now.
    pub flights_in_progress: Gauge,
    /// `tokenproxy_cache_entries`: links in the token cache (set at scrape time).
    pub cache_entries: Gauge,
    /// `tokenproxy_cache_evictions_total`: links evicted from the full token cache.
    pub cache_evictions: Counter,
    /// `tokenproxy_store_query_duration_seconds{op}`: one store call.
    pub store_query_duration: Family<StoreOpLabels, Histogram>,
    /// `tokenproxy_store_listen_up`: 1 while the change feed is listening, else 0.
    pub store_listen_up: Gauge,
    /// The audit trail of this replica.
    pub audit: Trail,
    /// Reads the token cache's size for `cache_entries` at each encode.
    cache_probe: parking_lot::Mutex<Option<CacheProbe>>,
}

impl Metrics {
    /// Counts one request in `tokenproxy_requests_total`. The family's counter
    /// for these labels is remembered per thread, keyed by the route's own
    /// strings (pointer-equal while the route lives; the memo holds them).
    pub fn count_request(&self, provider: &Arc<str>, route: &Arc<str>, status: u16) {
        let same = |id: u64, l: &RequestLabels| {
            id == self.instance
                && l.status == status
                && Arc::ptr_eq(&l.provider, provider)
                && Arc::ptr_eq(&l.route, route)
        };
        RECENT.with(|recent| {
            let mut recent = recent.borrow_mut();
            if let Some((_, _, counter)) = recent.1.iter().find(|(id, l, _)| same(*id, l)) {
                counter.inc();
                return;
            }
            let labels = RequestLabels {
                provider: provider.clone(),
                route: route.clone(),
                status,
            };
            let counter = self.requests.get_or_create(&labels).clone();
            counter.inc();
            let (next, list) = &mut *recent;
            if list.len() < RECENT_LABELS {
                list.push((self.instance, labels, counter));
            } else {
                list[*next] = (self.instance, labels, counter);
                *next = (*next + 1) % RECENT_LABELS;
            }
        });
    }

    /// Creates every metric in a fresh registry, for the replica named after
    /// this machine ([`default_replica_id`](super::audit::default_replica_id)).
    pub fn new() -> Arc<Self> {
        Self::for_replica(&super::audit::default_replica_id())
    }

    /// Creates every metric in a fresh registry; audit events name `replica`.
    pub fn for_replica(replica: &str) -> Arc<Self> {
        let mut registry = Registry::with_prefix("tokenproxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by provider, route and status",
            requests.clone(),
        );
        let request_duration = ShardedHistogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head",
            request_duration.clone(),
        );
        let upstream_duration = ShardedHistogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "upstream_duration_seconds",
            "Time the upstream took to send its response head",
            upstream_duration.clone(),
        );
        let token_lookups = Family::<LookupLabels, Counter>::default();
        registry.register(
            "token_lookups",
            "Token lookups by cache result",
            token_lookups.clone(),
        );
        let refresh = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "refresh",
            "Refresh attempts by provider and outcome",
            refresh.clone(),
        );
        let refresh_duration = Family::<ProviderLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        registry.register(
            "refresh_duration_seconds",
            "Duration of one exchange with a provider's token endpoint",
            refresh_duration.clone(),
        );
        let refresh_ahead = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "refresh_ahead",
            "Background refreshes started before expiry",
            refresh_ahead.clone(),
        );
        let cache_invalidations = Counter::default();
        registry.register(
            "cache_invalidations",
            "Cached links dropped because another writer changed them",
            cache_invalidations.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Open client connections",
            open_connections.clone(),
        );
        let leaves_minted = Counter::default();
        registry.register(
            "forward_leaves_minted",
            "Leaf certificates minted by the forward-mode CA",
            leaves_minted.clone(),
        );
        let store_up = Gauge::default();
        registry.register(
            "store_up",
            "Whether the link store answered the readiness probe made at the last scrape",
            store_up.clone(),
        );
        let upstream_rejections = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "upstream_rejections",
            "Upstream 401 answers to an injected access token",
            upstream_rejections.clone(),
        );
        let idp_breaker_open = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "idp_breaker_open",
            "1 while a provider's token endpoint is not called after repeated transient failures",
            idp_breaker_open.clone(),
        );
        let links_refresh_expiring = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "links_refresh_expiring",
            "Links whose refresh token expires within 7 days",
            links_refresh_expiring.clone(),
        );
        let ops = OpsMetrics::register(&mut registry);
        registry.register_collector(Box::new(super::logging::DroppedLines));
        Arc::new(Self {
            links_refresh_expiring,
            registry,
            requests,
            instance: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
            request_duration,
            upstream_duration,
            token_lookups,
            refresh,
            refresh_duration,
            refresh_ahead,
            cache_invalidations,
            open_connections,
            leaves_minted,
            store_up,
            upstream_rejections,
            idp_breaker_open,
            links: ops.links,
            lease_takeovers: ops.lease_takeovers,
            flights_in_progress: ops.flights_in_progress,
            cache_entries: ops.cache_entries,
            cache_evictions: ops.cache_evictions,
            store_query_duration: ops.store_query_duration,
            store_listen_up: ops.store_listen_up,
            audit: Trail::new(replica),
            cache_probe: parking_lot::Mutex::new(None),
        })
    }

    /// Counts one refresh outcome of `user`'s `provider` link and records it in
    /// the audit trail, `duration` after the refresh began.
    pub fn refresh_outcome(
        &self,
        provider: &str,
        user: Uuid,
        outcome: RefreshOutcome,
        duration: Duration,
    ) {
        self.audit.refresh(provider, user, outcome, duration);
        self.refresh
            .get_or_create(&RefreshLabels {
                provider: provider.to_string(),
                outcome,
            })
            .inc();
    }

    /// Counts a refresh lease taken over after it ran out, and records it.
    pub fn lease_taken_over(&self, provider: &str, user: Uuid) {
        self.audit.lease_taken_over(provider, user);
        self.lease_takeovers
            .get_or_create(&ProviderLabels {
                provider: provider.to_string(),
            })
            .inc();
    }

    /// Sets `tokenproxy_links` from one count of the store's links.
    pub fn set_link_states(&self, ok: u64, expiring_soon: u64, reauth_required: u64) {
        for (state, n) in [
            ("ok", ok),
            ("expiring_soon", expiring_soon),
            ("reauth_required", reauth_required),
        ] {
            self.links
                .get_or_create(&LinkStateLabels { state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Records how long one store call (`op`) took.
    pub fn store_query(&self, op: &'static str, took: Duration) {
        self.store_query_duration
            .get_or_create(&StoreOpLabels { op })
            .observe(took.as_secs_f64());
    }

    /// Makes each [`encode`](Self::encode) set `cache_entries` from `probe`
    /// (the token source registers its cache; a later call replaces it).
    pub fn set_cache_probe(&self, probe: CacheProbe) {
        *self.cache_probe.lock() = Some(probe);
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        if let Some(probe) = &*self.cache_probe.lock() {
            self.cache_entries
                .set(i64::try_from(probe()).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The operators' metrics (issue 16), registered apart from the request metrics
/// so `Metrics::for_replica` stays short.
struct OpsMetrics {
    links: Family<LinkStateLabels, Gauge>,
    lease_takeovers: Family<ProviderLabels, Counter>,
    flights_in_progress: Gauge,
    cache_entries: Gauge,
    cache_evictions: Counter,
    store_query_duration: Family<StoreOpLabels, Histogram>,
    store_listen_up: Gauge,
}

impl OpsMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            links: Family::default(),
            lease_takeovers: Family::default(),
            flights_in_progress: Gauge::default(),
            cache_entries: Gauge::default(),
            cache_evictions: Counter::default(),
            // 100 µs to about 3 s: a local query to a database in trouble.
            store_query_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 16))
            }),
            store_listen_up: Gauge::default(),
        };
        registry.register(
            "links",
            "Links by state (ok, expiring_soon, reauth_required), counted in the background",
            m.links.clone(),
        );
        registry.register(
            "lease_takeovers",
            "Refresh leases claimed after another holder let them run out unreleased",
            m.lease_takeovers.clone(),
        );
        registry.register(
            "flights_in_progress",
            "Token flights (store read, lease, provider exchange) running now",
            m.flights_in_progress.clone(),
        );
        registry.register(
            "cache_entries",
            "Links held in the token cache",
            m.cache_entries.clone(),
        );
        registry.register(
            "cache_evictions",
            "Links evicted from the full token cache",
            m.cache_evictions.clone(),
        );
        registry.register(
            "store_query_duration_seconds",
            "Duration of one call to the link store, by operation",
            m.store_query_duration.clone(),
        );
        registry.register(
            "store_listen_up",
            "1 while the link change feed is listening, else 0",
            m.store_listen_up.clone(),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counts_add_up_across_threads_instances_and_label_sets() {
        // Two instances sharing label strings (as the process-wide empty label
        // is), more statuses than the per-thread memo holds, several threads.
        let (a, b) = (Metrics::new(), Metrics::new());
        let shared: Arc<str> = Arc::from("");
        let route: Arc<str> = Arc::from("/gh");
        let statuses: Vec<u16> = (200..200 + 2 * RECENT_LABELS as u16).collect();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..1000 {
                        let status = statuses[i % statuses.len()];
                        a.count_request(&shared, &route, status);
                        if i % 2 == 0 {
                            b.count_request(&shared, &route, status);
                        }
                    }
                });
            }
        });
        let total = |m: &Metrics| -> u64 {
            statuses
                .iter()
                .map(|&status| {
                    m.requests
                        .get_or_create(&RequestLabels {
                            provider: shared.clone(),
                            route: route.clone(),
                            status,
                        })
                        .get()
                })
                .sum()
        };
        assert_eq!(total(&a), 4000);
        assert_eq!(total(&b), 2000);
    }
}
