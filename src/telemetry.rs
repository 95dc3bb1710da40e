//! Logging setup and the metric definitions.
//!
//! Metrics live in one [`Metrics`] value holding its own registry. It is passed
//! down explicitly (never a global), so tests can run several "replicas" in one
//! process, each with its own counters.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::config::LogFormat;

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

/// Every metric tokenproxy exports, with the registry that serves them.
pub struct Metrics {
    registry: Registry,
    /// `tokenproxy_requests_total{provider,route,status}`.
    pub requests: Family<RequestLabels, Counter>,
    /// `tokenproxy_request_duration_seconds`.
    pub request_duration: Histogram,
    /// `tokenproxy_upstream_duration_seconds`: time until the upstream's response head.
    pub upstream_duration: Histogram,
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
    /// `tokenproxy_upstream_rejections_total{provider}`: upstream 401s to a token
    /// we injected (whether or not they forced a refresh).
    pub upstream_rejections: Family<ProviderLabels, Counter>,
    /// `tokenproxy_idp_breaker_open{provider}`: 1 while the provider's circuit
    /// breaker keeps its token endpoint from being called, else 0.
    pub idp_breaker_open: Family<ProviderLabels, Gauge>,
}

impl Metrics {
    /// Creates every metric in a fresh registry.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("tokenproxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by provider, route and status",
            requests.clone(),
        );
        let request_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head",
            request_duration.clone(),
        );
        let upstream_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
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
        Arc::new(Self {
            registry,
            requests,
            request_duration,
            upstream_duration,
            token_lookups,
            refresh,
            refresh_duration,
            refresh_ahead,
            cache_invalidations,
            open_connections,
            leaves_minted,
            upstream_rejections,
            idp_breaker_open,
        })
    }

    /// Counts one refresh outcome.
    pub fn refresh_outcome(&self, provider: &str, outcome: RefreshOutcome) {
        self.refresh
            .get_or_create(&RefreshLabels {
                provider: provider.to_string(),
                outcome,
            })
            .inc();
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Installs the global tracing subscriber: filter from `RUST_LOG` (default `info`),
/// text or JSON lines on stderr. Safe to call twice (the second call does nothing).
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// A short, non-reversible fingerprint of a secret for logs (first 8 hex chars of
/// its SHA-256), so operators can tell tokens apart without seeing them.
pub fn fingerprint(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(secret.as_bytes());
    hex::encode(&digest[..4])
}
