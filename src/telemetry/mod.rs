//! Logging setup, the metric definitions and the audit trail.
//!
//! Metrics live in one [`Metrics`] value holding its own registry ([`metrics`]).
//! It is passed down explicitly (never a global), so tests can run several
//! "replicas" in one process, each with its own counters. The audit trail
//! ([`audit`]) is a tracing target of its own with one function per event. The
//! subscriber that writes both is set up once per process ([`init_logging`]).

pub mod audit;
mod logging;
pub mod metrics;
pub mod sharded;

pub use audit::AUDIT_TARGET;
pub use logging::{init_logging, init_tracing, log_lines_dropped, LogGuard, BUFFER_ENV};
pub use metrics::*;

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

/// An error and each of its sources, joined by ": " (hyper's and rustls' top-level
/// messages alone rarely say what failed).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
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
        m.refresh_outcome(
            "github",
            uuid::Uuid::nil(),
            RefreshOutcome::Success,
            std::time::Duration::ZERO,
        );
        let text = openmetrics_to_text(&m.encode());
        assert!(text.contains("# TYPE tokenproxy_refresh_total counter\n"));
        assert!(!text.contains("# EOF"));
    }
}
