//! The change feed on SQLite: poll `link_changes` (filled by triggers, see
//! `migrations-sqlite/0002_link_changes.sql`) and turn its rows into
//! [`ChangeEvent`]s, so a `link put` or `link delete` in one process, or a
//! refresh in another `serve`, reaches every process's cache as NOTIFY does on
//! Postgres — within one poll interval.
//!
//! The first event is always `Resync`. Another follows whenever the feed may
//! have missed something: after the database was unreachable, or when the rows
//! after the last one seen were already pruned.

use std::time::Duration;

use sqlx::SqlitePool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::map_err;
use crate::store::{ChangeEvent, StoreError};

/// How often the feed asks for new changes.
const POLL: Duration = Duration::from_millis(200);
/// Events buffered for a slow consumer before the feed waits for it.
const BUFFER: usize = 1024;
/// Most rows read per poll; the rest come with the next one.
const PAGE: i64 = 1000;
/// How often old rows are deleted, and how old they must be.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const KEEP: &str = "-10 minutes";

/// Starts the feed. The polling task ends when the receiver is dropped.
pub(super) async fn watch(pool: &SqlitePool) -> Result<mpsc::Receiver<ChangeEvent>, StoreError> {
    let last: i64 = sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM link_changes")
        .fetch_one(pool)
        .await
        .map_err(map_err)?;
    let (tx, rx) = mpsc::channel(BUFFER);
    let _ = tx.try_send(ChangeEvent::Resync);
    tokio::spawn(run(pool.clone(), tx, last));
    Ok(rx)
}

async fn run(pool: SqlitePool, tx: mpsc::Sender<ChangeEvent>, mut last: i64) {
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_prune = tokio::time::Instant::now() + PRUNE_EVERY;
    let mut healthy = true;
    loop {
        tokio::select! {
            () = tx.closed() => return,
            _ = ticker.tick() => {}
        }
        let rows = match poll(&pool, last).await {
            Ok(rows) => rows,
            Err(e) => {
                if healthy {
                    tracing::warn!(error = %e, "link change feed cannot read the database");
                }
                healthy = false;
                continue;
            }
        };
        let mut events = Vec::with_capacity(rows.len() + 1);
        // Down meanwhile, or the rows we needed are gone: anything may have changed.
        let gap = rows.first().is_some_and(|(seq, _, _)| *seq != last + 1);
        if !healthy || gap {
            events.push(ChangeEvent::Resync);
            healthy = true;
        }
        if let Some((seq, _, _)) = rows.last() {
            last = *seq;
        }
        if !gap {
            events.extend(rows.into_iter().filter_map(|(_, provider_id, user)| {
                Some(ChangeEvent::Link {
                    provider_id,
                    user_id: Uuid::parse_str(&user).ok()?,
                })
            }));
        }
        for event in events {
            if tx.send(event).await.is_err() {
                return;
            }
        }
        if tokio::time::Instant::now() >= next_prune {
            next_prune += PRUNE_EVERY;
            prune(&pool).await;
        }
    }
}

async fn poll(pool: &SqlitePool, after: i64) -> Result<Vec<(i64, String, String)>, StoreError> {
    sqlx::query_as(
        "SELECT seq, provider_id, user_id FROM link_changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )
    .bind(after)
    .bind(PAGE)
    .fetch_all(pool)
    .await
    .map_err(map_err)
}

/// Deletes announcements every feed has long seen. Best effort.
async fn prune(pool: &SqlitePool) {
    // AUTOINCREMENT never reuses a pruned seq, so feeds keep counting on.
    let done = sqlx::query(
        "DELETE FROM link_changes \
         WHERE changed_at < strftime('%Y-%m-%dT%H:%M:%f000Z', 'now', ?1)",
    )
    .bind(KEEP)
    .execute(pool)
    .await;
    if let Err(e) = done {
        tracing::debug!(error = %e, "pruning link_changes failed; will retry");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DatabaseConfig;
    use crate::crypto::Keyring;
    use secrecy::SecretString;

    #[tokio::test]
    async fn prune_drops_only_old_announcements() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DatabaseConfig {
            url: SecretString::from(format!("sqlite://{}", dir.path().join("t.db").display())),
            ..Default::default()
        };
        let store = super::super::SqliteStore::connect(&cfg, Keyring::plaintext()).unwrap();
        store.migrate().await.unwrap();
        let pool = store.pool();
        sqlx::query(
            "INSERT INTO link_changes (provider_id, user_id, changed_at) VALUES \
             ('a', 'u', '2020-01-01T00:00:00.000000Z'), ('b', 'u', '2020-01-01T00:00:00.000000Z')",
        )
        .execute(pool)
        .await
        .unwrap();
        sqlx::query("INSERT INTO link_changes (provider_id, user_id) VALUES ('c', 'u')")
            .execute(pool)
            .await
            .unwrap();
        prune(pool).await;
        let left: Vec<(i64, String)> =
            sqlx::query_as("SELECT seq, provider_id FROM link_changes ORDER BY seq")
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(left, vec![(3, "c".to_owned())]);
        // A feed that had seen only the first row now sees a gap.
        let rows = poll(pool, 1).await.unwrap();
        assert_eq!(rows.first().map(|r| r.0), Some(3));
    }
}
