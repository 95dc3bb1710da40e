//! Refresh-ahead: links in use are refreshed in the background shortly before
//! they expire, so a busy user's requests do not wait for the provider.
//!
//! A pass looks at the cache once, starts a background flight — the same flight
//! and lease path as the request path, tracked by the drain — for every recently
//! used entry whose jittered refresh point has passed, and returns without waiting
//! for any of them. So one link whose provider answer hangs delays neither the
//! other links nor the next pass. At most `tokens.refresh_ahead_concurrency`
//! flights run at once (a semaphore; a pass that finds none free leaves the rest
//! for the next pass), so a burst of due links cannot exhaust the pool or hammer
//! the provider.
//!
//! Spread: every entry's refresh point is moved earlier by a random part of its
//! lead ([`cache::ahead_time`]), independently on every replica, and the loop's
//! period is jittered, so replicas and links do not all refresh at once.
//!
//! Retry: a background refresh that failed transiently is remembered with the
//! token it meant to replace, and started again once the link's backoff
//! ([`super::backoff`]) has passed (plus jitter) — without waiting for a caller —
//! while that token is still unexpired. (Its cache entry may be gone by then: the
//! failed flight's lease release is announced like any change.)

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::cache::{self, to_chrono, Key};
use super::flight::{self, Want};
use super::settle::FlightResult;
use super::{AccessToken, Inner, TokenError};
use crate::telemetry::ProviderLabels;

/// Wait before retrying a failed background refresh that left no backoff record
/// (the store, not the provider, failed).
const RETRY_FLOOR: Duration = Duration::from_secs(1);

/// A background refresh to try again.
#[derive(Clone)]
struct Retry {
    /// The token the failed refresh meant to replace.
    token: AccessToken,
    /// Not before this (injected clock): the link's backoff plus jitter.
    not_before: DateTime<Utc>,
}

/// Refresh-ahead's state: the concurrency bound and the links to retry.
pub(crate) struct Ahead {
    permits: Arc<Semaphore>,
    retries: quick_cache::sync::Cache<Key, Retry>,
}

impl Ahead {
    /// At most `concurrency` background flights at once; remembers up to
    /// `capacity` links to retry.
    pub(crate) fn new(concurrency: usize, capacity: u64) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(concurrency)),
            retries: super::bounded_cache(capacity),
        }
    }

    /// Waits until a background flight slot is free (for the loop, after a pass
    /// that found none: the links it left are due now).
    pub(crate) async fn slot_freed(&self) {
        // Never closed, so acquiring only fails if it were; either way, return.
        let _ = self.permits.acquire().await;
    }
}

/// What one pass did.
pub(crate) struct Pass {
    /// The flights it started (tracked by the drain whether awaited or not).
    pub started: Vec<JoinHandle<()>>,
    /// It stopped for want of a free slot with due links left.
    pub saturated: bool,
}

/// Starts a background flight for every link due (retries first), as long as
/// slots are free; never waits.
pub(crate) fn pass(inner: &Arc<Inner>) -> Pass {
    let mut out = Pass {
        started: Vec::new(),
        saturated: false,
    };
    if inner.draining.is_cancelled() {
        return out;
    }
    let now = inner.clock.now();
    for (key, retry) in inner.ahead.retries.iter() {
        if !cache::unexpired(retry.token.expiry(), now) {
            // No longer "ahead": the request path refreshes it when it is used.
            inner.ahead.retries.remove(&key);
            continue;
        }
        if now < retry.not_before || inner.backoff.wait_for(key, now).is_some() {
            continue;
        }
        let Ok(permit) = inner.ahead.permits.clone().try_acquire_owned() else {
            out.saturated = true;
            return out;
        };
        inner.ahead.retries.remove(&key);
        out.started.push(start(inner, key, retry.token, permit));
    }
    let window = inner.cfg.refresh_ahead_used_within;
    for (key, entry) in inner.cache.iter() {
        if entry.generation != inner.generation() || entry.ahead_started.load(Ordering::Acquire) {
            continue;
        }
        let due = entry.ahead_due(now);
        if !due || !entry.used_within(now, window) {
            continue;
        }
        if inner.backoff.wait_for(key, now).is_some() {
            // Backing off: a failed background refresh is retried from the list
            // above; otherwise the next caller after the backoff refreshes.
            continue;
        }
        let Ok(permit) = inner.ahead.permits.clone().try_acquire_owned() else {
            out.saturated = true;
            return out;
        };
        if entry.ahead_started.swap(true, Ordering::AcqRel) {
            continue;
        }
        out.started
            .push(start(inner, key, entry.token.clone(), permit));
    }
    out
}

/// Runs one background flight replacing `token`, holding `permit` until it ends.
fn start(
    inner: &Arc<Inner>,
    key: Key,
    token: AccessToken,
    permit: OwnedSemaphorePermit,
) -> JoinHandle<()> {
    let provider = &inner.providers[key.0 as usize].id;
    inner
        .metrics
        .refresh_ahead
        .get_or_create(&ProviderLabels {
            provider: provider.clone(),
        })
        .inc();
    tracing::debug!(provider = %provider, user = %key.1, "refreshing ahead of expiry");
    let task_inner = inner.clone();
    // Tracked, so a shutdown waits for it rather than dropping it between the
    // provider's answer and the write (the flight inside is tracked too).
    inner.tasks.spawn(async move {
        let _permit = permit;
        let out = flight::run(&task_inner, key, Want::Replace(token.clone())).await;
        if needs_retry(&out, &token) {
            remember_retry(&task_inner, key, token);
        }
    })
}

/// Whether a background flight for `old` ended without replacing it in a way
/// worth retrying: a rejected or missing link is not.
fn needs_retry(out: &FlightResult, old: &AccessToken) -> bool {
    match out {
        Ok(served) => served.token.same_version(old),
        Err(TokenError::ReauthRequired | TokenError::LinkMissing) => false,
        Err(TokenError::IdpUnavailable | TokenError::StoreUnavailable) => true,
    }
}

fn remember_retry(inner: &Inner, key: Key, token: AccessToken) {
    if inner.draining.is_cancelled() {
        return;
    }
    let now = inner.clock.now();
    let wait = inner.backoff.wait_for(key, now).unwrap_or(RETRY_FLOOR);
    // Up to a quarter more, so links that failed together retry apart.
    let wait = wait.mul_f64(1.0 + rand::random::<f64>() * 0.25);
    inner.ahead.retries.insert(
        key,
        Retry {
            token,
            not_before: now + to_chrono(wait),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::settle::Served;

    fn tok(s: &str) -> AccessToken {
        AccessToken::new(secrecy::SecretString::from(s.to_string()), None)
    }

    #[test]
    fn only_a_flight_that_left_the_token_in_place_transiently_is_retried() {
        let old = tok("a1");
        let served = |t: AccessToken| {
            Ok(Served {
                token: t,
                exchanged: false,
            })
        };
        assert!(!needs_retry(&served(tok("a2")), &old), "replaced");
        assert!(needs_retry(&served(old.clone()), &old), "still the old one");
        assert!(needs_retry(&Err(TokenError::IdpUnavailable), &old));
        assert!(needs_retry(&Err(TokenError::StoreUnavailable), &old));
        assert!(!needs_retry(&Err(TokenError::ReauthRequired), &old));
        assert!(!needs_retry(&Err(TokenError::LinkMissing), &old));
    }
}
