//! Seeing coderd's writes without a notification from coderd.
//!
//! coderd announces nothing on tokenproxy's channel, and tokenproxy adds no
//! trigger to Coder's tables unless `coder.install_trigger` allows it. So the
//! store remembers the `updated_at` of every link it has read (and of every
//! link it found missing) and, every `coder.poll_interval`, reads those keys'
//! `updated_at` back in batches through Coder's unique index on
//! `(provider_id, user_id)`. A key whose value changed, appeared or vanished is
//! announced as a [`ChangeEvent::Link`], which makes every cache forget it.
//! coderd sets `updated_at` on every refresh, failure, re-link and update, and
//! leaves it alone on a lease claim or release, so only real changes count.
//!
//! The set is bounded: a key not read for `coder.watch_idle` (or pushed out
//! when the set is full) is dropped *and announced*, so no cache keeps a token
//! the poller no longer watches; the next request reads it again and re-enters it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

use super::postgres::map_err;
use super::{ChangeEvent, StoreError};

/// Keys per poll statement.
pub(super) const BATCH: usize = 500;

type Key = (String, Uuid);

/// What was seen of a key: its `updated_at` (`None`: no row) and when it was last read.
#[derive(Clone, Copy)]
struct Seen {
    updated_at: Option<DateTime<Utc>>,
    read_at: Instant,
}

/// The keys whose rows are watched.
pub(super) struct Watched {
    keys: Mutex<HashMap<Key, Seen>>,
    /// Keys pushed out of a full set, announced by the next poll.
    evicted: Mutex<Vec<Key>>,
    capacity: usize,
    idle: Duration,
}

impl Watched {
    /// An empty set holding at most `capacity` keys, each for `idle` after its last read.
    pub(super) fn new(capacity: usize, idle: Duration) -> Self {
        Self {
            keys: Mutex::new(HashMap::new()),
            evicted: Mutex::new(Vec::new()),
            capacity: capacity.max(1),
            idle,
        }
    }

    /// Records a read of `key` that found `updated_at` (`None`: no row). A key
    /// pushed out to make room is announced by the next poll.
    pub(super) fn saw(&self, key: Key, updated_at: Option<DateTime<Utc>>) {
        let now = Instant::now();
        let mut keys = self.keys.lock();
        let seen = Seen {
            updated_at,
            read_at: now,
        };
        if keys.insert(key, seen).is_some() || keys.len() <= self.capacity {
            return;
        }
        // Full: push out the least recently read key (rare; O(n) is fine).
        if let Some(oldest) = keys
            .iter()
            .min_by_key(|(_, s)| s.read_at)
            .map(|(k, _)| k.clone())
        {
            keys.remove(&oldest);
            self.evicted.lock().push(oldest);
        }
    }

    /// Number of keys watched.
    pub(super) fn len(&self) -> usize {
        self.keys.lock().len()
    }

    /// Drops keys idle for longer than `idle` and returns them, with those
    /// pushed out since the last call.
    fn expire(&self) -> Vec<Key> {
        let now = Instant::now();
        let mut gone = std::mem::take(&mut *self.evicted.lock());
        self.keys.lock().retain(|k, s| {
            let keep = now.duration_since(s.read_at) < self.idle;
            if !keep {
                gone.push(k.clone());
            }
            keep
        });
        gone
    }

    fn snapshot(&self) -> Vec<(Key, Option<DateTime<Utc>>)> {
        let keys = self.keys.lock();
        keys.iter()
            .map(|(k, s)| (k.clone(), s.updated_at))
            .collect()
    }

    /// Stores the value a poll found, unless a read since the snapshot already
    /// recorded a newer one; whether the key was still watched with `was`.
    fn update(&self, key: &Key, was: Option<DateTime<Utc>>, now: Option<DateTime<Utc>>) -> bool {
        let mut keys = self.keys.lock();
        match keys.get_mut(key) {
            Some(s) if s.updated_at == was => {
                s.updated_at = now;
                true
            }
            _ => false,
        }
    }
}

/// One poll: reads the `updated_at` of every watched key and returns the keys
/// whose value differs from what was seen.
pub(super) async fn poll_once(pool: &PgPool, watched: &Watched) -> Result<Vec<Key>, StoreError> {
    let snapshot = watched.snapshot();
    let mut changed = Vec::new();
    for batch in snapshot.chunks(BATCH) {
        let providers: Vec<&str> = batch.iter().map(|((p, _), _)| p.as_str()).collect();
        let users: Vec<Uuid> = batch.iter().map(|((_, u), _)| *u).collect();
        let rows: Vec<(String, Uuid, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT k.provider_id, k.user_id, l.updated_at \
             FROM unnest($1::text[], $2::uuid[]) AS k(provider_id, user_id) \
             LEFT JOIN external_auth_links l \
               ON l.provider_id = k.provider_id AND l.user_id = k.user_id",
        )
        .bind(&providers)
        .bind(&users)
        .fetch_all(pool)
        .await
        .map_err(map_err)?;
        let now: HashMap<Key, Option<DateTime<Utc>>> =
            rows.into_iter().map(|(p, u, t)| ((p, u), t)).collect();
        for (key, was) in batch {
            let found = now.get(key).copied().flatten();
            if found != *was && watched.update(key, *was, found) {
                changed.push(key.clone());
            }
        }
    }
    Ok(changed)
}

/// Polls every `every` until `tx` closes: announces changed, expired and (after
/// a failed poll, since changes may have been missed) all keys via `Resync`.
pub(super) fn spawn(
    pool: PgPool,
    watched: Arc<Watched>,
    every: Duration,
    tx: mpsc::Sender<ChangeEvent>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = tx.closed() => return,
            }
            let mut events: Vec<ChangeEvent> = watched
                .expire()
                .into_iter()
                .map(|(provider_id, user_id)| ChangeEvent::Link {
                    provider_id,
                    user_id,
                })
                .collect();
            match poll_once(&pool, &watched).await {
                Ok(changed) => {
                    if std::mem::take(&mut failing) {
                        events.push(ChangeEvent::Resync);
                    }
                    events.extend(changed.into_iter().map(|(provider_id, user_id)| {
                        ChangeEvent::Link {
                            provider_id,
                            user_id,
                        }
                    }));
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot poll Coder's links for changes");
                    }
                    failing = true;
                }
            }
            for e in events {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
        }
    });
}
