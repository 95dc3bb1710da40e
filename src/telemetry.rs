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

use crate::config::{AuditDestination, LogFormat, LoggingConfig};

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
        Arc::new(Self {
            links_refresh_expiring,
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
            store_up,
            upstream_rejections,
            idp_breaker_open,
        })
    }

    /// Counts one refresh outcome and records it in the audit trail.
    pub fn refresh_outcome(&self, provider: &str, outcome: RefreshOutcome) {
        tracing::info!(
            target: AUDIT_TARGET,
            event = "refresh",
            provider,
            outcome = outcome.as_str()
        );
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

/// Rewrites OpenMetrics text (what `prometheus-client` writes) as the Prometheus
/// text format 0.0.4, for clients that did not ask for OpenMetrics (`curl`,
/// `promtool check metrics`). The differences that matter: a counter's HELP and
/// TYPE lines name the sample (`x_total`, where OpenMetrics names the family `x`),
/// and there are no `# UNIT` or `# EOF` lines.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(kind);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Target of the audit trail's events (README, "Audit trail"): one JSON line per
/// event, to the `[logging] audit` destination, never to the ordinary log.
pub const AUDIT_TARGET: &str = "tokenproxy::audit";

/// Installs the global tracing subscriber: filter from `RUST_LOG` (default `info`),
/// text or JSON lines on stderr, no audit trail. Safe to call twice (the second
/// call does nothing).
pub fn init_tracing(format: LogFormat) {
    let _ = init_logging(
        &LoggingConfig {
            format,
            audit: AuditDestination::Off,
        },
        true,
    );
}

/// Installs the global subscriber for `cfg`: the ordinary log on stderr (when
/// `with_log`; the short CLI commands keep their stderr for their own messages)
/// and the audit trail at its destination, at `info` whatever `RUST_LOG` says.
/// Fails only when the audit file cannot be opened. A second call does nothing.
pub fn init_logging(cfg: &LoggingConfig, with_log: bool) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;

    let log = with_log.then(|| {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        // Colour codes only for a person at a terminal: a log file, a pipe or
        // `kubectl logs` would otherwise get raw escape sequences.
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr);
        let layer = match cfg.format {
            LogFormat::Json => layer.json().flatten_event(true).boxed(),
            LogFormat::Text => layer.boxed(),
        };
        layer
            .with_filter(filter_fn(|m| m.target() != AUDIT_TARGET))
            .with_filter(filter)
    });
    let writer = match &cfg.audit {
        AuditDestination::Off => None,
        AuditDestination::Stderr => Some(BoxMakeWriter::new(std::io::stderr)),
        AuditDestination::File(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "logging.audit: cannot open {}: {}",
                        path.display(),
                        e.kind()
                    )
                })?;
            Some(BoxMakeWriter::new(Arc::new(file)))
        }
    };
    let audit = writer.map(|w| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(w)
            .with_filter(filter_fn(|m| {
                m.target() == AUDIT_TARGET && *m.level() <= tracing::Level::INFO
            }))
    });
    let _ = tracing_subscriber::registry()
        .with(log)
        .with(audit)
        .try_init();
    Ok(())
}

/// A short, non-reversible fingerprint of a secret for logs (first 8 hex chars of
/// its SHA-256), so operators can tell tokens apart without seeing them.
pub fn fingerprint(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(secret.as_bytes());
    hex::encode(&digest[..4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_names_counters_by_their_samples_and_drops_openmetrics_lines() {
        let om = "# HELP tp_requests Requests.\n# TYPE tp_requests counter\ntp_requests_total{a=\"b\"} 1\n# HELP tp_up Up.\n# TYPE tp_up gauge\n# UNIT tp_up x\ntp_up 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP tp_requests_total Requests.\n# TYPE tp_requests_total counter\ntp_requests_total{a=\"b\"} 1\n# HELP tp_up Up.\n# TYPE tp_up gauge\ntp_up 1\n"
        );
    }

    #[test]
    fn the_real_registry_converts_without_openmetrics_lines() {
        let m = Metrics::new();
        m.refresh_outcome("github", RefreshOutcome::Success);
        let text = openmetrics_to_text(&m.encode());
        assert!(text.contains("# TYPE tokenproxy_refresh_total counter\n"));
        assert!(!text.contains("# EOF"));
    }
}
