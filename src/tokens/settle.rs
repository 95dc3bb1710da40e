//! What a flight and the exchange it runs share: the result they produce, the
//! step that tells the flight loop what to do next, and how a row or a refreshed
//! token becomes a served (and, when still current, cached) token. Kept apart so
//! `flight` (the loop) uses `exchange` (the lease holder's work) and `exchange`
//! needs nothing from `flight`: no import cycle.

use std::sync::Arc;

use super::cache::{self, Entry, Key};
use super::{AccessToken, Inner, TokenError};
use crate::store::Link;

/// What a flight produced: the token, and whether getting it took a provider exchange.
#[derive(Clone)]
pub(crate) struct Served {
    pub token: AccessToken,
    pub exchanged: bool,
}

pub(crate) type FlightResult = Result<Served, TokenError>;

/// Control flow of one step of the flight loop.
pub(crate) enum Step {
    /// Finished with this result.
    Done(FlightResult),
    /// The row changed under us (or a holder finished): read it again.
    Reread,
}

/// Serves a row's token, caching it unless a change notification for its key
/// arrived since the row was read (then the row may already be stale).
pub(crate) async fn serve_row(inner: &Arc<Inner>, key: Key, row: &Link, epoch: u64) -> Served {
    let token = AccessToken::new(row.access_token.clone(), row.expiry);
    // The lifetime the provider granted is not stored; the time since the last write
    // approximates it (a refresh writes the row as it stores the token).
    let lifetime = row.expiry.map(|e| e - row.updated_at);
    let entry = Entry::new(
        token.clone(),
        lifetime,
        inner.cfg.refresh_ahead_remaining,
        inner.skew(),
        inner.clock.now(),
    );
    insert_if_current(inner, key, entry, epoch);
    Served {
        token,
        exchanged: false,
    }
}

pub(crate) fn insert_if_current(inner: &Arc<Inner>, key: Key, mut entry: Entry, epoch: u64) {
    if inner.epoch(&key) != epoch {
        return;
    }
    // A resync bumps every epoch, so an unchanged epoch means the current
    // generation is the one the row was read in.
    entry.generation = inner.generation();
    let entry = Arc::new(entry);
    inner.cache.insert(key, entry.clone());
    // The listener bumps the epoch *then* drops the key; we insert *then* look
    // again. Whichever order they interleave in, a change announced after our read
    // never leaves our entry behind.
    if inner.epoch(&key) != epoch {
        inner
            .cache
            .remove_if(&key, |current| Arc::ptr_eq(current, &entry));
    }
}

/// The row's token if it still works at the provider (skew ignored): better than an
/// error while the provider is down.
pub(crate) fn still_valid(inner: &Inner, row: &Link) -> Option<Served> {
    cache::unexpired(row.expiry, inner.clock.now()).then(|| Served {
        token: AccessToken::new(row.access_token.clone(), row.expiry),
        exchanged: false,
    })
}
