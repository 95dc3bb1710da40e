//! The part of a flight that runs while holding the cross-replica lease: exchange
//! the refresh token with the provider, then settle the outcome — compare-and-swap
//! the new tokens in, accept a lost race, or (only after looking again) record a
//! permanent rejection.
//!
//! Every write here is conditional on the refresh token exactly as the flight read
//! it; whenever the row turns out to have changed, the flight re-reads instead of
//! writing, so a loser can never overwrite or break a winner's fresh token.

use std::sync::Arc;

use secrecy::ExposeSecret;
use std::time::Duration;

use super::cache::{self, Entry, Key};
use super::settle::{insert_if_current, serve_row, still_valid, Served, Step};
use super::{AccessToken, Inner, TokenError};
use crate::oauth::{RefreshError, Refreshed};
use crate::store::{Lease, Link, TokenSet};
use crate::telemetry::{ProviderLabels, RefreshOutcome};

/// Re-reads the row under a fresh lease: `None` when it is still the one to
/// exchange, else what to do instead.
pub(super) async fn recheck(inner: &Arc<Inner>, key: Key, row: &Link) -> Option<Step> {
    let provider_id = inner.providers[key.0 as usize].id.as_str();
    match inner.store.get_link(provider_id, key.1).await {
        Ok(Some(now)) if now.refresh_token_stored != row.refresh_token_stored => Some(Step::Reread),
        Ok(Some(now)) if !now.refresh_failure_reason.is_empty() => {
            Some(Step::Done(Err(TokenError::ReauthRequired)))
        }
        Ok(Some(_)) => None,
        Ok(None) => Some(Step::Done(Err(TokenError::LinkMissing))),
        Err(_) => Some(Step::Done(
            still_valid(inner, row).ok_or(TokenError::StoreUnavailable),
        )),
    }
}

/// Exchanges the row's refresh token while we hold the lease (claimed at
/// `claimed`), and settles the outcome. `lease` ends as the lease the caller
/// should release: extended while the write ran, or `None` when it is no longer
/// ours or a background re-save took it over.
pub(super) async fn exchange(
    inner: &Arc<Inner>,
    key: Key,
    row: &Link,
    lease: &mut Option<Lease>,
    claimed: tokio::time::Instant,
) -> Step {
    let provider = &inner.providers[key.0 as usize];
    let paused = provider
        .client_rejected_until
        .lock()
        .is_some_and(|until| tokio::time::Instant::now() < until);
    if paused {
        // Our client was just rejected: asking again for every user and request
        // would only hammer the provider (and may get the app rate-limited).
        return Step::Done(still_valid(inner, row).ok_or(TokenError::IdpUnavailable));
    }
    let budget = inner.exchange_budget(claimed);
    if budget < provider.client.timeout() {
        // A slow claim or re-read ate the lease: an attempt started now might be
        // answered after another replica could claim the row and present the same
        // refresh token. Leave it unspent.
        tracing::warn!(
            provider = %provider.id,
            user = %key.1,
            ?budget,
            "not enough of the refresh lease left for an exchange; the database is slow"
        );
        inner.metrics.refresh_outcome(
            &provider.id,
            key.1,
            RefreshOutcome::TransientError,
            claimed.elapsed(),
        );
        return Step::Done(still_valid(inner, row).ok_or(TokenError::IdpUnavailable));
    }
    if !inner
        .backoff
        .admit(key, &row.refresh_token_stored, inner.clock.now())
    {
        // Backing off this link or the whole provider (see `backoff`).
        return Step::Done(still_valid(inner, row).ok_or(TokenError::IdpUnavailable));
    }
    let started = tokio::time::Instant::now();
    // The new token's lifetime counts from when the request was sent, not from
    // when the answer arrived or was stored: a slow answer must not stretch it.
    let sent = inner.clock.now();
    let result = provider.client.refresh(&row.refresh_token, budget).await;
    inner
        .metrics
        .refresh_duration
        .get_or_create(&ProviderLabels {
            provider: provider.id.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    match &result {
        // The endpoint answered: whatever it said, it is up.
        Ok(_) | Err(RefreshError::Rejected(_)) => inner.backoff.succeeded(key),
        Err(e @ RefreshError::Transient { .. }) => inner.backoff.failed(
            key,
            inner.clock.now(),
            &row.refresh_token_stored,
            AccessToken::new(row.access_token.clone(), row.expiry),
            e.retry_after(),
        ),
        Err(RefreshError::Misconfigured(_)) => inner.backoff.inconclusive(key),
    }
    match result {
        Ok(r) => {
            // A rotated refresh token means the row's one may be spent at the
            // provider: keep the lease ours until the new one is stored, however
            // long the write takes, or another replica would claim the row and
            // present the spent token. A provider that did not rotate left the
            // row's token valid, so another replica may refresh meanwhile.
            let rotated = r
                .refresh_token
                .as_ref()
                .is_some_and(|t| t.expose_secret() != row.refresh_token.expose_secret());
            let persisting = persist(inner, key, row, r, (sent, claimed));
            let (step, unsaved) = if rotated {
                keeping_lease(inner, lease, claimed, persisting).await
            } else {
                persisting.await
            };
            if let Some(new) = unsaved {
                inner.tasks.spawn(keep_persisting(
                    inner.store.clone(),
                    inner.draining.clone(),
                    provider_id_of(inner, key).to_string(),
                    key.1,
                    row.fence(),
                    new,
                    if rotated { lease.take() } else { None },
                    inner.cfg.lease_timeout,
                ));
            }
            step
        }
        Err(RefreshError::Rejected(reason)) => {
            rejected(inner, key, row, lease.as_ref(), &reason, claimed).await
        }
        Err(e) => {
            // Transient (or a client misconfiguration): nothing about the link changes.
            tracing::warn!(provider = %provider.id, user = %key.1, error = %e, "refresh failed");
            if e.is_client_rejected() {
                tracing::error!(
                    provider = %provider.id,
                    pause = ?CLIENT_REJECTED_PAUSE,
                    "the provider rejected the client credentials; check client_id and client_secret"
                );
                *provider.client_rejected_until.lock() =
                    Some(tokio::time::Instant::now() + CLIENT_REJECTED_PAUSE);
            }
            inner.metrics.refresh_outcome(
                &provider.id,
                key.1,
                RefreshOutcome::TransientError,
                claimed.elapsed(),
            );
            Step::Done(still_valid(inner, row).ok_or(TokenError::IdpUnavailable))
        }
    }
}

fn provider_id_of(inner: &Inner, key: Key) -> &str {
    inner.providers[key.0 as usize].id.as_str()
}

/// How often a held lease is extended while a write after an answered exchange
/// is still running, as a fraction of `tokens.lease_timeout`.
const EXTEND_EVERY: u32 = 3;

/// Runs `work` while keeping `lease` (claimed at `claimed`) ours: the first
/// extension comes halfway through what is left of the claimed lease, then one
/// every third of `tokens.lease_timeout`, each fenced by the lease value we hold.
/// A fast write costs no extension. If the lease turns out to be someone else's,
/// `lease` becomes `None` (the write's compare-and-swap still protects the row).
async fn keeping_lease<T>(
    inner: &Inner,
    lease: &mut Option<Lease>,
    claimed: tokio::time::Instant,
    work: impl std::future::Future<Output = T>,
) -> T {
    let lease_timeout = inner.cfg.lease_timeout;
    let period = lease_timeout / EXTEND_EVERY;
    let keeper = async {
        let now = tokio::time::Instant::now();
        let mut next = now + (claimed + lease_timeout).saturating_duration_since(now) / 2;
        loop {
            tokio::time::sleep_until(next).await;
            let Some(held) = lease.as_ref() else {
                return std::future::pending::<()>().await;
            };
            match inner.store.extend_refresh_lease(held, lease_timeout).await {
                Ok(Some(extended)) => {
                    *lease = Some(extended);
                    next = tokio::time::Instant::now() + period;
                }
                Ok(None) => {
                    tracing::warn!(
                        provider = %held.provider_id,
                        user = %held.user_id,
                        "the refresh lease ran out while the refreshed token was being stored; the database is slow"
                    );
                    *lease = None;
                }
                Err(e) => {
                    tracing::warn!(provider = %held.provider_id, user = %held.user_id, error = %e, "cannot extend the refresh lease; retrying");
                    // Sooner than the period: the lease may be about to run out.
                    next =
                        tokio::time::Instant::now() + (period / 4).max(Duration::from_millis(10));
                }
            }
        }
    };
    tokio::select! {
        out = work => out,
        () = keeper => unreachable!("the lease keeper never finishes"),
    }
}

/// How long no refresh is attempted at a provider after it rejected our client.
const CLIENT_REJECTED_PAUSE: Duration = Duration::from_secs(10);

/// Writes a successful refresh (requested at `sent`, its lease claimed at
/// `claimed`) with a compare-and-swap on the refresh token read. Also returns the token set when it could not be stored, for
/// the caller to hand to a background re-save.
async fn persist(
    inner: &Arc<Inner>,
    key: Key,
    row: &Link,
    r: Refreshed,
    (sent, claimed): (chrono::DateTime<chrono::Utc>, tokio::time::Instant),
) -> (Step, Option<TokenSet>) {
    let provider_id = inner.providers[key.0 as usize].id.as_str();
    let (new, lifetime) = refreshed_set(inner, provider_id, row, r, sent);
    let token = AccessToken::new(new.access_token.clone(), new.expiry);
    let mut attempt = 0;
    loop {
        let epoch = inner.epoch(&key);
        match inner
            .store
            .write_refreshed(provider_id, key.1, &row.fence(), &new)
            .await
        {
            Ok(true) => {
                inner.metrics.refresh_outcome(
                    provider_id,
                    key.1,
                    RefreshOutcome::Success,
                    claimed.elapsed(),
                );
                tracing::info!(provider = provider_id, user = %key.1, "refreshed access token");
                return (serve_refreshed(inner, key, token, lifetime, epoch), None);
            }
            Ok(false) => {
                // Someone else's token is in the row: theirs wins, ours is dropped.
                inner.metrics.refresh_outcome(
                    provider_id,
                    key.1,
                    RefreshOutcome::LostRace,
                    claimed.elapsed(),
                );
                tracing::info!(provider = provider_id, user = %key.1, "lost refresh race; serving the winner's token");
                return (lost_race(inner, key, token).await, None);
            }
            Err(e) if attempt < 2 => {
                attempt += 1;
                tracing::warn!(provider = provider_id, user = %key.1, error = %e, "storing refreshed token failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(e) => {
                // The provider rotated the token but we could not store it, and the
                // old refresh token may already be dead: the new one exists only
                // here. Serve (and cache) the new access token, and keep trying to
                // store the set in the background until the database is back. The
                // write stays a compare-and-swap on the token we exchanged, so it
                // can only heal the row, never overwrite a newer one.
                tracing::error!(provider = provider_id, user = %key.1, error = %e, "could not store refreshed token; retrying in the background");
                return (
                    serve_refreshed(inner, key, token, lifetime, epoch),
                    Some(new),
                );
            }
        }
    }
}

/// The token set to store after a refresh requested at `sent`, and the lifetime
/// the provider granted.
fn refreshed_set(
    inner: &Inner,
    provider_id: &str,
    row: &Link,
    r: Refreshed,
    sent: chrono::DateTime<chrono::Utc>,
) -> (TokenSet, Option<chrono::Duration>) {
    let lifetime = r.expires_in.map(cache::to_chrono);
    if r.expires_in.is_some_and(|l| l <= inner.skew()) {
        // Such a token is "expired" the moment it arrives: every request refreshes.
        tracing::warn!(
            provider = provider_id,
            expires_in = ?r.expires_in,
            "the provider's tokens live no longer than tokens.refresh_skew; lower refresh_skew"
        );
    }
    let new = TokenSet {
        access_token: r.access_token,
        // No new refresh token in the response: the old one stays valid.
        refresh_token: r.refresh_token.unwrap_or_else(|| row.refresh_token.clone()),
        // Checked: a lifetime past the calendar's end means "does not expire".
        expiry: lifetime.and_then(|l| sent.checked_add_signed(l)),
        extra: r.extra.or_else(|| row.extra.clone()),
    };
    (new, lifetime)
}

/// Serves a token we just obtained, caching it unless a change was announced
/// since `epoch`.
fn serve_refreshed(
    inner: &Arc<Inner>,
    key: Key,
    token: AccessToken,
    lifetime: Option<chrono::Duration>,
    epoch: u64,
) -> Step {
    let entry = Entry::new(
        token.clone(),
        lifetime,
        inner.cfg.refresh_ahead_remaining,
        inner.skew(),
        inner.clock.now(),
    );
    insert_if_current(inner, key, entry, epoch);
    Step::Done(Ok(Served {
        token,
        exchanged: true,
    }))
}

/// Retry period of a re-save once shutdown began (the drain's deadline bounds it).
const DRAIN_RETRY: Duration = Duration::from_millis(200);

/// How long a refreshed token set that could not be stored is retried.
const PERSIST_RETRY_FOR: Duration = Duration::from_secs(3600);

/// Retries storing a refreshed token set (with backoff) until it is stored, the
/// row turns out to hold something else, or [`PERSIST_RETRY_FOR`] passes. When
/// shutdown begins it stops backing off (the drain bounds how long it may still try).
///
/// Before each attempt it extends `lease` (when still ours) over that attempt and
/// the wait after it: the row still holds the spent refresh token, so no other
/// replica may claim it meanwhile.
#[allow(clippy::too_many_arguments)]
async fn keep_persisting(
    store: Arc<dyn crate::store::LinkStore>,
    draining: tokio_util::sync::CancellationToken,
    provider_id: String,
    user: uuid::Uuid,
    old: crate::store::Fence,
    new: TokenSet,
    mut lease: Option<Lease>,
    lease_timeout: Duration,
) {
    let give_up = tokio::time::Instant::now() + PERSIST_RETRY_FOR;
    let mut wait = Duration::from_millis(200);
    while tokio::time::Instant::now() < give_up {
        if draining.is_cancelled() {
            wait = wait.min(DRAIN_RETRY);
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = draining.cancelled(), if wait > DRAIN_RETRY => {}
        }
        if let Some(held) = &lease {
            // Over this attempt and the (doubled) wait before the next one.
            // An error means the database is still down: the write below fails
            // as well, and the next round tries again.
            if let Ok(extended) = store
                .extend_refresh_lease(held, lease_timeout + wait * 2)
                .await
            {
                lease = extended;
            }
        }
        match store.write_refreshed(&provider_id, user, &old, &new).await {
            Ok(true) => {
                tracing::info!(provider = %provider_id, %user, "stored the refreshed token after the database came back");
                return;
            }
            Ok(false) => {
                tracing::warn!(provider = %provider_id, %user, "the link changed before the refreshed token could be stored");
                return;
            }
            Err(e) => {
                tracing::debug!(provider = %provider_id, %user, error = %e, "still cannot store the refreshed token");
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
    tracing::error!(provider = %provider_id, %user, "gave up storing the refreshed token; the user may need to log in again");
    if let Some(held) = lease {
        let _ = store.release_refresh_lease(&held).await;
    }
}

async fn lost_race(inner: &Arc<Inner>, key: Key, ours: AccessToken) -> Step {
    let provider_id = inner.providers[key.0 as usize].id.as_str();
    let epoch = inner.epoch(&key);
    match inner.store.get_link(provider_id, key.1).await {
        Ok(Some(row)) if cache::usable(row.expiry, inner.clock.now(), inner.skew()) => {
            let mut served = serve_row(inner, key, &row, epoch).await;
            served.exchanged = true;
            Step::Done(Ok(served))
        }
        Ok(Some(_)) => Step::Reread,
        Ok(None) => Step::Done(Err(TokenError::LinkMissing)),
        // Ours is valid at the provider even though the row holds another one.
        Err(_) => Step::Done(Ok(Served {
            token: ours,
            exchanged: true,
        })),
    }
}

/// The provider rejected the refresh token. Before calling it permanent, look again:
/// if the row now holds another refresh token, a winner refreshed it and we use theirs.
async fn rejected(
    inner: &Arc<Inner>,
    key: Key,
    row: &Link,
    lease: Option<&Lease>,
    reason: &str,
    claimed: tokio::time::Instant,
) -> Step {
    let provider_id = inner.providers[key.0 as usize].id.as_str();
    match inner.store.get_link(provider_id, key.1).await {
        Ok(Some(now_row)) if now_row.refresh_token_stored != row.refresh_token_stored => {
            tracing::info!(provider = provider_id, user = %key.1, "refresh token rejected but the link changed; using the new one");
            Step::Reread
        }
        Ok(Some(_)) => {
            match inner
                .store
                .record_refresh_failure(provider_id, key.1, &row.fence(), lease, reason)
                .await
            {
                Ok(true) => {
                    inner.metrics.refresh_outcome(
                        provider_id,
                        key.1,
                        RefreshOutcome::InvalidGrant,
                        claimed.elapsed(),
                    );
                    tracing::info!(provider = provider_id, user = %key.1, reason, "refresh token rejected; re-authentication required");
                    inner.uncache(key);
                    Step::Done(Err(TokenError::ReauthRequired))
                }
                // The row or the lease changed under us: look again.
                Ok(false) => Step::Reread,
                Err(e) => {
                    tracing::warn!(provider = provider_id, user = %key.1, error = %e, "cannot record refresh failure");
                    Step::Done(Err(TokenError::ReauthRequired))
                }
            }
        }
        Ok(None) => Step::Done(Err(TokenError::LinkMissing)),
        Err(_) => Step::Done(Err(TokenError::ReauthRequired)),
    }
}
