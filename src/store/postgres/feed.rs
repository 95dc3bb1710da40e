//! The change feed: LISTEN on [`CHANGE_CHANNEL`] and turn notifications into
//! [`ChangeEvent`]s.
//!
//! sqlx's `PgListener` reconnects by itself and silently loses whatever was
//! announced while it was away. A lost invalidation would leave a stale token in
//! some replica's cache, so every (re)connect is reported as
//! [`ChangeEvent::Resync`] — once the new connection is already listening, so
//! nothing announced after the Resync can be missed.

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::map_err;
use crate::store::{ChangeEvent, StoreError, CHANGE_CHANNEL};

/// Events buffered for a slow consumer before the feed waits for it.
const BUFFER: usize = 1024;
/// Pause between reconnection attempts while the database is down.
const RETRY: Duration = Duration::from_secs(1);

/// Parses a `provider_id TAB user_id` payload.
pub(crate) fn parse_payload(payload: &str) -> Option<ChangeEvent> {
    let (provider_id, user) = payload.rsplit_once('\t')?;
    Some(ChangeEvent::Link {
        provider_id: provider_id.to_owned(),
        user_id: Uuid::parse_str(user).ok()?,
    })
}

/// Starts listening; the first event is always `Resync`. The listener task ends
/// when the receiver is dropped or the pool is closed. It holds one pooled
/// connection for as long as it runs.
pub(super) async fn watch(pool: &PgPool) -> Result<mpsc::Receiver<ChangeEvent>, StoreError> {
    let listener = listen(pool).await.map_err(map_err)?;
    let (tx, rx) = mpsc::channel(BUFFER);
    let pool = pool.clone();
    tokio::spawn(async move {
        if tx.send(ChangeEvent::Resync).await.is_err() {
            return;
        }
        run(pool, listener, tx).await;
    });
    Ok(rx)
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANGE_CHANNEL).await?;
    Ok(listener)
}

async fn run(pool: PgPool, mut listener: PgListener, tx: mpsc::Sender<ChangeEvent>) {
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return,
            next = listener.try_recv() => next,
        };
        let event = match next {
            Ok(Some(n)) => match parse_payload(n.payload()) {
                Some(e) => e,
                None => {
                    tracing::warn!("ignoring malformed change notification");
                    continue;
                }
            },
            // Lost the connection; sqlx already reconnected and re-listened.
            Ok(None) => ChangeEvent::Resync,
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                // sqlx keeps some broken connections; start over with a new one.
                tracing::warn!(error = %e, "change feed lost its connection; reconnecting");
                match relisten(&pool, &tx).await {
                    Some(l) => listener = l,
                    None => return,
                }
                ChangeEvent::Resync
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

/// A fresh listener, retried until it works; None when the feed should stop
/// (receiver gone or pool closed).
async fn relisten(pool: &PgPool, tx: &mpsc::Sender<ChangeEvent>) -> Option<PgListener> {
    loop {
        let attempt = tokio::select! {
            _ = tx.closed() => return None,
            r = listen(pool) => r,
        };
        match attempt {
            Ok(l) => return Some(l),
            Err(sqlx::Error::PoolClosed) => return None,
            Err(_) => tokio::select! {
                _ = tx.closed() => return None,
                _ = tokio::time::sleep(RETRY) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        let u = Uuid::new_v4();
        assert_eq!(
            parse_payload(&format!("git\tlab\t{u}")),
            Some(ChangeEvent::Link {
                provider_id: "git\tlab".into(),
                user_id: u
            })
        );
        assert_eq!(parse_payload("nope"), None);
        assert_eq!(parse_payload("p\tnot-a-uuid"), None);
    }
}
