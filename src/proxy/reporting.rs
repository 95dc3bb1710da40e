//! Background work for operators, started by `serve` beside the token source's:
//! counting links by state for `tokenproxy_links` (one store listing per
//! [`LINK_STATES_EVERY`], never per scrape or per request) and writing the audit
//! trail's aggregated authentication failures once per window
//! ([`AUTH_FAILURE_WINDOW`]), and once more when the server stops.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::LinkStore;
use crate::telemetry::audit::AUTH_FAILURE_WINDOW;
use crate::telemetry::Metrics;

/// How often links are counted by state.
pub const LINK_STATES_EVERY: Duration = Duration::from_secs(60);

/// Runs both loops until `stop` is cancelled, then flushes the failures counted
/// since the last window.
pub async fn run(store: Arc<dyn LinkStore>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut states = tokio::time::interval(LINK_STATES_EVERY);
    let mut failures = tokio::time::interval(AUTH_FAILURE_WINDOW);
    // The first tick of an interval is immediate: skip it for the failures, so a
    // window is a whole window.
    failures.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = states.tick() => count_links(&*store, &metrics).await,
            _ = failures.tick() => metrics.audit.flush_auth_failures(),
        }
    }
    metrics.audit.flush_auth_failures();
}

async fn count_links(store: &dyn LinkStore, metrics: &Metrics) {
    match store.count_link_states(chrono::Utc::now()).await {
        Ok(s) => metrics.set_link_states(s.ok, s.expiring_soon, s.reauth_required),
        // The gauges keep their last values; `tokenproxy_store_up` says why.
        Err(e) => tracing::debug!(error = %e, "cannot count links by state"),
    }
}
