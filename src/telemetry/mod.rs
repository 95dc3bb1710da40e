//! Logging setup, the metric definitions and the audit trail.
//!
//! Metrics live in one [`Metrics`] value holding its own registry ([`metrics`]).
//! It is passed down explicitly (never a global), so tests can run several
//! "replicas" in one process, each with its own counters. The audit trail
//! ([`audit`]) is a tracing target of its own with one function per event.

use std::sync::Arc;

use crate::config::{AuditDestination, LogFormat, LoggingConfig};

pub mod audit;
pub mod metrics;
pub mod sharded;

pub use audit::AUDIT_TARGET;
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
