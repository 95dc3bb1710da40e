//! The global tracing subscriber: the ordinary log (access lines included) and the
//! audit trail, each on its own writer.
//!
//! The ordinary log goes through a bounded, lossy, non-blocking writer
//! (`tracing-appender`): a proxy worker formats its line and hands it to a
//! background thread that does the `write(2)`, so a slow or full stderr (a
//! terminal, a pipe nobody drains, a stalled log shipper) never holds up a
//! request. When the buffer is full the line is dropped and counted
//! ([`log_lines_dropped`], exported as `tokenproxy_log_lines_dropped_total`).
//!
//! The audit trail stays synchronous: its events are few (changes, first uses,
//! refreshes — never one per cache hit) and one it dropped would be a hole in the
//! record. A non-lossy non-blocking writer would block a worker when full just as
//! a synchronous one does, and could still lose its tail at exit, so it buys
//! nothing here.

use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

use super::AUDIT_TARGET;
use crate::config::{AuditDestination, LogFormat, LoggingConfig};

/// Lines the ordinary log holds while stderr is slower than the proxy; a full
/// buffer drops new lines rather than wait. The channel allocates and touches
/// every slot at start (32 bytes each): 65,536 lines cost an idle sidecar
/// 2.5 MiB of its 16; 8,192 hold ~0.3 s of access lines at 25,000 req/s.
const BUFFERED_LINES: usize = 8 * 1024;

/// The writer thread writes what it drained in one go, at most this many bytes
/// per `write(2)`: one syscall per ~13 access lines instead of one per line, and
/// never more than `PIPE_BUF`, so each write to a pipe stays atomic and a line
/// is never split by another writer's (the audit trail on stderr).
const WRITE_BYTES: usize = 4096;

/// Overrides the default of 8,192 lines (a positive integer): for tests that need the
/// buffer to fill, and for operators who would rather spend memory than lines.
pub const BUFFER_ENV: &str = "TOKENPROXY_LOG_BUFFER_LINES";

/// The dropped-lines count of the installed log writer. Process-wide because the
/// subscriber is: every [`Metrics`](super::Metrics) in the process reports it.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Keeps the ordinary log's writer thread alive; dropping it writes out what is
/// still buffered (waiting at most about a second) and stops the thread. Hold it
/// until the process is about to exit: lines logged after it is dropped are lost.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard(#[allow(dead_code)] Option<WorkerGuard>);

/// Lines the ordinary log dropped because its buffer was full (0 before
/// [`init_logging`] installs it).
pub fn log_lines_dropped() -> u64 {
    DROPPED
        .get()
        .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX))
}

/// Installs the global tracing subscriber: filter from `RUST_LOG` (default `info`),
/// text or JSON lines on stderr, no audit trail. Safe to call twice (the second
/// call does nothing).
pub fn init_tracing(format: LogFormat) -> LogGuard {
    init_logging(
        &LoggingConfig {
            format,
            audit: AuditDestination::Off,
        },
        true,
    )
    .expect("without an audit file nothing can fail")
}

/// Installs the global subscriber for `cfg`: the ordinary log on stderr (when
/// `with_log`; the short CLI commands keep their stderr for their own messages)
/// and the audit trail at its destination, at `info` whatever `RUST_LOG` says.
/// Fails only when the audit file cannot be opened. A second call does nothing.
pub fn init_logging(cfg: &LoggingConfig, with_log: bool) -> anyhow::Result<LogGuard> {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;

    let audit = audit_layer(&cfg.audit)?;
    if tracing::dispatcher::has_been_set() {
        return Ok(LogGuard(None));
    }
    let mut guard = None;
    let log = with_log.then(|| {
        let (writer, worker) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(buffered_lines())
            .thread_name("tokenproxy-log")
            // The worker flushes whenever the channel runs empty, so no line
            // waits in the buffer for more to come.
            .finish(std::io::BufWriter::with_capacity(
                WRITE_BYTES,
                std::io::stderr(),
            ));
        let _ = DROPPED.set(writer.error_counter());
        guard = Some(worker);
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        // Colour codes only for a person at a terminal: a log file, a pipe or
        // `kubectl logs` would otherwise get raw escape sequences.
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(writer);
        let layer = match cfg.format {
            LogFormat::Json => layer.json().flatten_event(true).boxed(),
            LogFormat::Text => layer.boxed(),
        };
        layer
            .with_filter(filter_fn(|m| m.target() != AUDIT_TARGET))
            .with_filter(filter)
    });
    let _ = tracing_subscriber::registry()
        .with(log)
        .with(audit)
        .try_init();
    Ok(LogGuard(guard))
}

/// The audit trail's layer (JSON lines, synchronous), or `None` when it is off.
fn audit_layer<S>(
    destination: &AuditDestination,
) -> anyhow::Result<Option<impl tracing_subscriber::Layer<S>>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::Layer;

    let writer = match destination {
        AuditDestination::Off => return Ok(None),
        AuditDestination::Stderr => BoxMakeWriter::new(std::io::stderr),
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
            BoxMakeWriter::new(Arc::new(file))
        }
    };
    Ok(Some(
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .with_filter(filter_fn(|m| {
                m.target() == AUDIT_TARGET && *m.level() <= tracing::Level::INFO
            })),
    ))
}

/// [`BUFFERED_LINES`], or the positive integer in [`BUFFER_ENV`].
fn buffered_lines() -> usize {
    std::env::var(BUFFER_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(BUFFERED_LINES)
}

/// Exports [`log_lines_dropped`] as `tokenproxy_log_lines_dropped_total`, read at
/// each scrape.
#[derive(Debug)]
pub(super) struct DroppedLines;

impl Collector for DroppedLines {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(log_lines_dropped());
        let metric = encoder.encode_descriptor(
            "log_lines_dropped",
            "Log lines dropped because stderr did not keep up and the log buffer was full",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}
