//! Refreshes nobody's request asked for: an operator's "refresh now" (the admin
//! API) and the keep-alive pass.
//!
//! Some refresh tokens die when unused (Google's, GitHub Apps' after six
//! months). With `tokens.keepalive_refresh` set, a periodic pass refreshes every
//! link whose last refresh (`updated_at`) is older than that. Both go through the
//! ordinary flight with `Want::Replace(<the token just read>)`: the flight
//! re-reads the row, so a link another flight, pass or replica refreshed
//! meanwhile is adopted, never exchanged twice, and the cross-replica lease
//! applies as on the request path. The same pass sets the
//! `tokenproxy_links_refresh_expiring` gauge.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::cache::Key;
use super::flight::{self, Want};
use super::{AccessToken, Inner, TokenError, TokenSource};
use crate::store::LinkSummary;
use crate::telemetry::ProviderLabels;

/// A refresh token expiring within this window counts as expiring soon.
pub fn expiring_window() -> chrono::Duration {
    chrono::Duration::days(7)
}

/// Whether a link's refresh token expires within [`expiring_window`] of `now`
/// (a link already broken or without a refresh token does not count).
pub fn refresh_expiring(s: &LinkSummary, now: DateTime<Utc>) -> bool {
    s.has_refresh_token
        && s.refresh_failure_reason.is_empty()
        && s.refresh_expiry
            .is_some_and(|t| t <= now + expiring_window())
}

/// Longest time between two keep-alive passes (also the gauge's refresh period).
const MAX_TICK: Duration = Duration::from_secs(3600);

/// What one keep-alive pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveReport {
    /// Links due (last refresh older than `tokens.keepalive_refresh`).
    pub due: usize,
    /// Of those, refreshes this pass's flights exchanged themselves.
    pub exchanged: usize,
    /// Links whose refresh token expires within 7 days.
    pub expiring: usize,
}

impl TokenSource {
    /// Refreshes `user`'s link at `provider` now, through the flight (joining a
    /// running one; adopting a refresh that happened since the row was read).
    /// Returns the token now served and whether this call's flight exchanged.
    pub async fn refresh_now(
        &self,
        provider: &str,
        user: Uuid,
    ) -> Result<(AccessToken, bool), TokenError> {
        let &pidx = self
            .inner
            .index
            .get(provider)
            .ok_or(TokenError::LinkMissing)?;
        replace_current(&self.inner, (pidx, user)).await
    }

    /// Runs one keep-alive pass now (the background loop runs it periodically).
    pub async fn keepalive_now(&self) -> KeepaliveReport {
        pass(&self.inner).await
    }

    /// The tracker background link work must run on and the token cancelled
    /// when shutdown begins, so [`TokenSource::drain`] waits for that work too.
    pub fn shutdown_handles(&self) -> (tokio_util::task::TaskTracker, CancellationToken) {
        (self.inner.tasks.clone(), self.inner.draining.clone())
    }
}

/// Reads the row and asks the flight to replace the token it holds.
async fn replace_current(inner: &Arc<Inner>, key: Key) -> Result<(AccessToken, bool), TokenError> {
    let provider = inner.providers[key.0 as usize].id.as_str();
    let row = inner
        .store
        .get_link(provider, key.1)
        .await
        .map_err(|_| TokenError::StoreUnavailable)?
        .ok_or(TokenError::LinkMissing)?;
    let current = AccessToken::new(row.access_token.clone(), row.expiry);
    let served = flight::run(inner, key, Want::Replace(current)).await?;
    Ok((served.token, served.exchanged))
}

/// One pass: the gauge, then (when configured) the due links, one at a time.
pub(super) async fn pass(inner: &Arc<Inner>) -> KeepaliveReport {
    let links = match inner.store.list_links(None).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "keep-alive: cannot list links");
            return KeepaliveReport::default();
        }
    };
    let now = inner.clock.now();
    let mut report = KeepaliveReport::default();
    for p in &inner.providers {
        let n = links
            .iter()
            .filter(|l| l.provider_id == p.id && refresh_expiring(l, now))
            .count();
        report.expiring += n;
        inner
            .metrics
            .links_refresh_expiring
            .get_or_create(&ProviderLabels {
                provider: p.id.clone(),
            })
            .set(n as i64);
    }
    let Some(age) = inner.cfg.keepalive_refresh else {
        return report;
    };
    let cutoff = chrono::Duration::from_std(age)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    for l in &links {
        let Some(&pidx) = inner.index.get(&l.provider_id) else {
            continue;
        };
        if !l.has_refresh_token || !l.refresh_failure_reason.is_empty() || l.updated_at >= cutoff {
            continue;
        }
        if inner.draining.is_cancelled() {
            break;
        }
        report.due += 1;
        tracing::debug!(provider = %l.provider_id, user = %l.user_id, "keep-alive refresh");
        match replace_current(inner, (pidx, l.user_id)).await {
            Ok((_, exchanged)) => report.exchanged += usize::from(exchanged),
            Err(e) => {
                tracing::info!(provider = %l.provider_id, user = %l.user_id, error = %e, "keep-alive refresh failed")
            }
        }
    }
    report
}

/// The background loop: a pass every `keepalive_refresh / 24` (between a minute
/// and an hour; hourly when keep-alive is off, for the gauge).
pub(super) async fn run(inner: Arc<Inner>, shutdown: CancellationToken) {
    let tick = inner
        .cfg
        .keepalive_refresh
        .map(|k| (k / 24).clamp(Duration::from_secs(60), MAX_TICK))
        .unwrap_or(MAX_TICK);
    // The first pass soon after start (jittered, so replicas started together
    // spread out), then every tick.
    let mut wait = Duration::from_secs(10).mul_f64(1.0 + rand::random::<f64>());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = pass(&inner) => {}
        }
        wait = tick.mul_f64(0.9 + rand::random::<f64>() * 0.2);
    }
}
