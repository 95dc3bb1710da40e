//! The token source's background work: keeping the cache coherent across replicas,
//! and refreshing links in use before they expire.
//!
//! Coherence: every write to a link is announced by the store ([`ChangeEvent`]); on
//! each announcement we drop that key here and wake flights waiting on another
//! replica's lease. When the feed (re)connects, notifications may have been lost,
//! so every cached entry is retired (kept only as a fallback for outages).
//!
//! Refresh-ahead ([`super::ahead`]) runs a pass about every second, and sooner
//! when the last one ran out of slots while links were due.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Inner;
use crate::store::ChangeEvent;

/// Period of the refresh-ahead scan.
const AHEAD_TICK: Duration = Duration::from_secs(1);
/// Least gap between a freed refresh-ahead slot and the scan that uses it.
const RESCAN_GAP: Duration = Duration::from_millis(50);
/// Period of the pass that drops entries no longer servable (memory only).
const TIDY_TICK: Duration = Duration::from_secs(30);

/// Starts the listener and (when enabled) the refresh-ahead loop.
pub(super) fn spawn(inner: Arc<Inner>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    let listener = tokio::spawn(listen(inner.clone(), shutdown.clone()));
    let tidy = tokio::spawn(tidy_loop(inner.clone(), shutdown.clone()));
    let keepalive = tokio::spawn(super::keepalive::run(inner.clone(), shutdown.clone()));
    let ahead = inner
        .cfg
        .refresh_ahead
        .then(|| tokio::spawn(ahead_loop(inner, shutdown)));
    tokio::spawn(async move {
        let _ = listener.await;
        let _ = tidy.await;
        let _ = keepalive.await;
        if let Some(a) = ahead {
            let _ = a.await;
        }
    })
}

async fn listen(inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut rx = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = inner.store.watch_changes() => match r {
                Ok(rx) => rx,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the link change feed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(100);
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = rx.recv() => e,
            };
            match event {
                Some(e) => apply(&inner, e).await,
                None => break,
            }
        }
        inner.metrics.store_listen_up.set(0);
        // The feed ended (database unreachable?). Keep the cache: during an outage
        // it is what still serves requests. The next feed starts with a Resync,
        // which drops everything announced meanwhile.
        tracing::warn!("link change feed ended; reconnecting");
    }
}

/// Applies one change announcement to the cache.
pub(super) async fn apply(inner: &Inner, event: ChangeEvent) {
    match event {
        ChangeEvent::Link {
            provider_id,
            user_id,
        } => {
            let Some(&pidx) = inner.index.get(&provider_id) else {
                return;
            };
            let key = (pidx, user_id);
            inner.epoch_slot(&key).fetch_add(1, Ordering::AcqRel);
            inner.forget_broken(key).await;
            inner.backoff.notified(key);
            if inner.uncache(key).is_some() {
                inner.metrics.cache_invalidations.inc();
            }
            let _ = inner.changes.send(Some(key));
        }
        ChangeEvent::Lost => {
            inner.metrics.store_listen_up.set(0);
        }
        ChangeEvent::Resync => {
            // The feed listens (again).
            inner.metrics.store_listen_up.set(1);
            // Retire every entry rather than delete it: while the store is
            // unreachable (the usual reason for a reconnect) an unexpired token from
            // before is still better than `store_unavailable`.
            inner.generation.fetch_add(1, Ordering::AcqRel);
            for e in &inner.epochs {
                e.fetch_add(1, Ordering::AcqRel);
            }
            inner.negative.invalidate_all();
            inner
                .metrics
                .cache_invalidations
                .inc_by(inner.cache.len() as u64);
            let _ = inner.changes.send(None);
        }
    }
}

async fn tidy_loop(inner: Arc<Inner>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TIDY_TICK) => {}
        }
        super::cache::tidy(&inner.cache, inner.clock.now());
    }
}

async fn ahead_loop(inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut saturated = false;
    loop {
        // Jitter the period so replicas started together do not scan in lockstep.
        let tick = AHEAD_TICK.mul_f64(0.75 + rand::random::<f64>() * 0.5);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
            // The last pass left due links for want of a slot: scan again as soon
            // as one frees (after a short gap, so slots freed together are used by
            // one scan rather than one scan each).
            _ = async {
                inner.ahead.slot_freed().await;
                tokio::time::sleep(RESCAN_GAP).await;
            }, if saturated => {}
        }
        // Starts flights and returns: it never waits for one (see `ahead`).
        saturated = super::ahead::pass(&inner).saturated;
    }
}
