//! One flight per (provider, user) per process: the only code that reads a link
//! from the store, takes the cross-replica lease and talks to the provider.
//!
//! A flight runs in its own spawned task; callers await a shared handle to it, so
//! all concurrent callers get the same result (errors included) and a caller that
//! goes away does not abandon a refresh half-way — which could otherwise exchange a
//! single-use refresh token and never persist the new one.
//!
//! The flight's loop (DESIGN.md, "Refresh semantics"): re-read the row; serve it if
//! usable (another flight or replica may have refreshed); answer `reauth_required`
//! if a permanent failure is recorded; otherwise claim the lease. If someone else
//! holds it, wait for their change notification (or poll) and start over; if we get
//! it, [`exchange`](super::exchange) runs the provider call and settles the outcome.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use secrecy::ExposeSecret;
use tokio::sync::broadcast;

use super::cache::{self, Key};
use super::exchange;
use super::settle::{serve_row, still_valid, FlightResult, Served, Step};
use super::{AccessToken, Inner, TokenError};
use crate::store::{LeaseClaim, Link};
use crate::telemetry::RefreshOutcome;

/// A running flight, shared by everyone waiting for its key.
pub(crate) struct Flight {
    id: u64,
    pub fut: Shared<BoxFuture<'static, FlightResult>>,
}

/// What the caller needs from the flight.
#[derive(Clone)]
pub(crate) enum Want {
    /// Any usable token. `stale`: the cache held an unusable one, so finding a fresh
    /// row means someone else refreshed it (counted as `adopted`).
    Usable { stale: bool },
    /// A token other than this one (refresh-ahead, or an upstream rejected it), even
    /// if it is still usable.
    Replace(AccessToken),
}

/// How often a waiter re-reads while another holder has the lease, when no change
/// notification arrives first.
const POLL: Duration = Duration::from_millis(200);

/// Joins the running flight for `key`, or starts one.
pub(crate) async fn run(inner: &Arc<Inner>, key: Key, want: Want) -> FlightResult {
    let fut = {
        let mut flights = inner.flights.lock();
        if let Some(f) = flights.get(&key) {
            f.fut.clone()
        } else {
            let id = inner.flight_seq.fetch_add(1, Ordering::Relaxed);
            let task_inner = inner.clone();
            let handle = inner.tasks.spawn(async move {
                // Counted while the flight runs (misses only, never a cache hit).
                let in_progress = task_inner.metrics.flights_in_progress.clone();
                in_progress.inc();
                let out = fly(task_inner.clone(), key, want).await;
                in_progress.dec();
                // The result is cached (when cacheable) before the flight leaves the
                // map, so a newcomer finds one or the other.
                let mut flights = task_inner.flights.lock();
                if flights.get(&key).is_some_and(|f| f.id == id) {
                    flights.remove(&key);
                }
                out
            });
            let fut = async move {
                handle.await.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "token flight panicked");
                    Err(TokenError::IdpUnavailable)
                })
            }
            .boxed()
            .shared();
            flights.insert(
                key,
                Flight {
                    id,
                    fut: fut.clone(),
                },
            );
            fut
        }
    };
    fut.await
}

/// The flight, boxed with an owned handle: keeps rustc's `Send` inference for the
/// spawned task local (borrowed futures inside trip "not general enough").
fn fly(inner: Arc<Inner>, key: Key, want: Want) -> BoxFuture<'static, FlightResult> {
    async move { fly_loop(&inner, key, want).await }.boxed()
}

async fn fly_loop(inner: &Arc<Inner>, key: Key, mut want: Want) -> FlightResult {
    let provider_id = inner.providers[key.0 as usize].id.as_str();
    let user = key.1;
    let started = tokio::time::Instant::now();
    // Subscribe before the first read so no wake-up between read and wait is lost.
    let mut changes = inner.changes.subscribe();
    // A holder can keep us waiting at most a lease (plus its own slack); bound the
    // whole flight so a store that keeps answering "held" cannot pin callers.
    let give_up = tokio::time::Instant::now() + inner.cfg.lease_timeout * 3;
    let mut waited = false;
    loop {
        let epoch = inner.epoch(&key);
        let row = match inner.store.get_link(provider_id, user).await {
            Ok(Some(row)) => row,
            Ok(None) => {
                inner.uncache(key);
                remember_broken(inner, key, TokenError::LinkMissing, epoch).await;
                return Err(TokenError::LinkMissing);
            }
            Err(e) => {
                tracing::warn!(provider = provider_id, %user, error = %e, "cannot read link");
                return cached_fallback(inner, &key, TokenError::StoreUnavailable).await;
            }
        };
        match judge(&row, &want, waited, inner.clock.now(), inner.skew()) {
            Verdict::Serve { adopted } => {
                if adopted {
                    inner.metrics.refresh_outcome(
                        provider_id,
                        user,
                        RefreshOutcome::Adopted,
                        started.elapsed(),
                    );
                }
                return Ok(serve_row(inner, key, &row, epoch).await);
            }
            Verdict::Reauth => {
                remember_broken(inner, key, TokenError::ReauthRequired, epoch).await;
                return Err(TokenError::ReauthRequired);
            }
            // Nothing to refresh with: serve what still works, else the user must log in.
            Verdict::Unrefreshable => {
                let served = still_valid(inner, &row);
                if served.is_none() {
                    // Dead until the user links again: remembered, so it costs no
                    // store read per request (a change notification forgets it).
                    remember_broken(inner, key, TokenError::ReauthRequired, epoch).await;
                }
                return served.ok_or(TokenError::ReauthRequired);
            }
            Verdict::Refresh { retarget } => {
                if retarget {
                    // Someone replaced the token we wanted gone, but theirs needs a
                    // refresh too.
                    want = Want::Usable { stale: true };
                }
            }
        }
        if inner.draining.is_cancelled() {
            // Shutting down: an exchange started now might not be stored before
            // the process exits, which would lose a rotated refresh token.
            tracing::info!(provider = provider_id, %user, "shutting down; not starting a refresh");
            return still_valid(inner, &row).ok_or(TokenError::IdpUnavailable);
        }
        if tokio::time::Instant::now() >= give_up {
            tracing::warn!(provider = provider_id, %user, "gave up waiting for the refresh lease");
            return still_valid(inner, &row).ok_or(TokenError::IdpUnavailable);
        }
        let now = inner.clock.now();
        if inner
            .backoff
            .link_blocked(key, &row.refresh_token_stored, now)
            || inner.backoff.provider_open(key, now)
        {
            // Backing off (see `backoff`): not even the lease is claimed.
            return still_valid(inner, &row).ok_or(TokenError::IdpUnavailable);
        }
        match claim_and_refresh(inner, key, &row, &mut changes).await {
            Step::Done(r) => return r,
            Step::Reread => waited = true,
        }
    }
}

/// What to do with a freshly read row.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Serve it; `adopted` when someone else's refresh produced it.
    Serve { adopted: bool },
    /// A permanent failure is recorded: the user must log in again.
    Reauth,
    /// No refresh token stored.
    Unrefreshable,
    /// Refresh it; `retarget` when the row is newer than the token the caller wanted
    /// replaced (so any usable token will do from now on).
    Refresh { retarget: bool },
}

/// Decides on a row (pure: the rules of DESIGN.md "Refresh semantics").
fn judge(
    row: &Link,
    want: &Want,
    waited: bool,
    now: chrono::DateTime<chrono::Utc>,
    skew: Duration,
) -> Verdict {
    let is_usable = cache::usable(row.expiry, now, skew);
    let newer = match want {
        Want::Replace(old) => row.access_token.expose_secret() != old.expose_secret(),
        Want::Usable { .. } => false,
    };
    let any_usable = matches!(want, Want::Usable { .. });
    if is_usable && (newer || any_usable) {
        let adopted = newer || waited || matches!(want, Want::Usable { stale: true });
        return Verdict::Serve { adopted };
    }
    if !row.refresh_failure_reason.is_empty() {
        return Verdict::Reauth;
    }
    if row.refresh_token.expose_secret().is_empty() {
        return Verdict::Unrefreshable;
    }
    Verdict::Refresh { retarget: newer }
}

/// Claims the cross-replica lease for the row's refresh token; exchanges it if we
/// get it, else waits for the holder (change notification or poll).
async fn claim_and_refresh(
    inner: &Arc<Inner>,
    key: Key,
    row: &Link,
    changes: &mut broadcast::Receiver<Option<Key>>,
) -> Step {
    let provider_id = inner.providers[key.0 as usize].id.as_str();
    // The lease runs on the database from about now: everything the holder does
    // (re-read, provider call, write) must fit inside it, so its clock starts here.
    let claimed = tokio::time::Instant::now();
    let claim = inner
        .store
        .claim_refresh_lease(
            provider_id,
            key.1,
            &row.refresh_token_stored,
            inner.cfg.lease_timeout,
        )
        .await;
    match claim {
        Err(e) => {
            tracing::warn!(provider = provider_id, user = %key.1, error = %e, "cannot claim refresh lease");
            Step::Done(still_valid(inner, row).ok_or(TokenError::StoreUnavailable))
        }
        Ok(LeaseClaim::Changed) => Step::Reread,
        Ok(LeaseClaim::Held { until }) => {
            // `until` is on the database clock, so compare with the wall clock (not
            // the injected one, which tests move freely).
            let left = (until - chrono::Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(10));
            wait_for_change(changes, key, left.min(POLL)).await;
            Step::Reread
        }
        Ok(LeaseClaim::Acquired(lease)) => {
            // The row showed a lease already past its end when we read it: its
            // holder neither finished nor released it (crashed, or stalled).
            if row.lease_expires_at.is_some_and(|t| t < chrono::Utc::now()) {
                inner.metrics.lease_taken_over(provider_id, key.1);
            }
            // The claim checks the refresh token, not the failure reason: a holder
            // that just recorded a rejection and let its lease go leaves the same
            // refresh token behind. Look once more before calling the provider, so a
            // dead token is presented only once.
            let mut held = Some(lease);
            let step = match exchange::recheck(inner, key, row).await {
                Some(step) => step,
                None => exchange::exchange(inner, key, row, &mut held, claimed).await,
            };
            // The exchange may have extended the lease, lost it, or handed it to a
            // background re-save; release only what is still ours here.
            if let Some(lease) = held {
                let store = inner.store.clone();
                // Best effort: a failed release only delays others until it expires,
                // and must never turn our result into an error.
                inner.tasks.spawn(async move {
                    if let Err(e) = store.release_refresh_lease(&lease).await {
                        tracing::debug!(error = %e, "releasing refresh lease failed");
                    }
                });
            }
            step
        }
    }
}

/// Remembers that a link is missing or dead (see `Inner::negative`), unless a change
/// was announced since the row was read — with the same insert-then-recheck as
/// [`insert_if_current`](super::settle::insert_if_current).
async fn remember_broken(inner: &Arc<Inner>, key: Key, err: TokenError, epoch: u64) {
    if inner.epoch(&key) != epoch {
        return;
    }
    inner.negative.insert(key, err).await;
    if inner.epoch(&key) != epoch {
        inner.forget_broken(key).await;
    }
}

/// The cached token if it still works (skew ignored), else `err`.
async fn cached_fallback(inner: &Inner, key: &Key, err: TokenError) -> FlightResult {
    match inner.cached(*key) {
        Some(e) if cache::unexpired(e.token.expiry(), inner.clock.now()) => Ok(Served {
            token: e.token.clone(),
            exchanged: false,
        }),
        _ => Err(err),
    }
}

/// Waits until a change for `key` (or a resync) is announced, or `max` passes.
async fn wait_for_change(rx: &mut broadcast::Receiver<Option<Key>>, key: Key, max: Duration) {
    let deadline = tokio::time::sleep(max);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return,
            r = rx.recv() => match r {
                Ok(Some(k)) if k != key => continue,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => {
                    (&mut deadline).await;
                    return;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredSecret;
    use chrono::{TimeZone, Utc};
    use secrecy::SecretString;

    fn t(s: i64) -> chrono::DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }

    fn row(access: &str, refresh: &str, expiry: i64, reason: &str) -> Link {
        Link {
            provider_id: "p".into(),
            user_id: uuid::Uuid::nil(),
            access_token: SecretString::from(access.to_string()),
            refresh_token: SecretString::from(refresh.to_string()),
            refresh_token_stored: StoredSecret(refresh.into()),
            access_token_stored: StoredSecret(access.into()),
            expiry: Some(t(expiry)),
            extra: None,
            refresh_failure_reason: reason.into(),
            lease_expires_at: None,
            created_at: t(-1000),
            updated_at: t(-1000),
        }
    }

    const SKEW: Duration = Duration::from_secs(60);

    #[test]
    fn usable_row_is_served_and_adoption_is_noticed() {
        let fresh = row("a1", "r1", 3600, "");
        let any = Want::Usable { stale: false };
        assert_eq!(
            judge(&fresh, &any, false, t(0), SKEW),
            Verdict::Serve { adopted: false }
        );
        assert_eq!(
            judge(&fresh, &any, true, t(0), SKEW),
            Verdict::Serve { adopted: true }
        );
        let stale = Want::Usable { stale: true };
        assert_eq!(
            judge(&fresh, &stale, false, t(0), SKEW),
            Verdict::Serve { adopted: true }
        );
    }

    #[test]
    fn expired_row_is_refreshed_unless_failed_or_unrefreshable() {
        let any = Want::Usable { stale: false };
        let due = row("a1", "r1", 30, "");
        assert_eq!(
            judge(&due, &any, false, t(0), SKEW),
            Verdict::Refresh { retarget: false }
        );
        let failed = row("a1", "r1", 30, "invalid_grant");
        assert_eq!(judge(&failed, &any, false, t(0), SKEW), Verdict::Reauth);
        let none = row("a1", "", 30, "");
        assert_eq!(
            judge(&none, &any, false, t(0), SKEW),
            Verdict::Unrefreshable
        );
    }

    #[test]
    fn replace_refreshes_a_usable_token_only_while_it_is_the_same() {
        let current = row("a1", "r1", 3600, "");
        let same = Want::Replace(AccessToken::new(SecretString::from("a1".to_string()), None));
        assert_eq!(
            judge(&current, &same, false, t(0), SKEW),
            Verdict::Refresh { retarget: false }
        );
        let other = Want::Replace(AccessToken::new(SecretString::from("a0".to_string()), None));
        assert_eq!(
            judge(&current, &other, false, t(0), SKEW),
            Verdict::Serve { adopted: true }
        );
        let newer_but_due = row("a2", "r2", 30, "");
        assert_eq!(
            judge(&newer_but_due, &other, false, t(0), SKEW),
            Verdict::Refresh { retarget: true }
        );
    }
}
