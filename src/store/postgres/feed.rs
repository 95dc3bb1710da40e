//! The change feed: LISTEN on [`CHANGE_CHANNEL`] and turn notifications into
//! [`ChangeEvent`]s.
//!
//! sqlx's `PgListener` reconnects by itself and silently loses whatever was
//! announced while it was away. A lost invalidation would leave a stale token in
//! some replica's cache, so every (re)connect is reported as
//! [`ChangeEvent::Resync`] — once the new connection is already listening, so
//! nothing announced after the Resync can be missed.
//!
//! A connection can also die without either side noticing (a NAT or load
//! balancer forgets it): the socket stays open and simply stops delivering. So
//! the feed checks itself: every `check` interval it sends a ping
//! notification through the pool on the same channel and expects to hear it on
//! its own connection before the next check. A ping not heard back means the
//! connection is deaf: the feed drops it, listens on a new one and reports a
//! `Resync`.

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
/// Payloads of health-check pings start with this. It holds no tab, so no
/// link payload can be mistaken for a ping or the other way round.
const PING_PREFIX: &str = "tokenproxy-ping:";

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
/// connection for as long as it runs, and checks it every `check` (see the
/// module comment).
pub(super) async fn watch(
    pool: &PgPool,
    check: Duration,
) -> Result<mpsc::Receiver<ChangeEvent>, StoreError> {
    let listener = listen(pool).await.map_err(map_err)?;
    let (tx, rx) = mpsc::channel(BUFFER);
    let feed = Feed {
        pool: pool.clone(),
        tx,
        check,
        // Tells this feed's pings from those of other processes on the channel.
        id: Uuid::new_v4(),
    };
    tokio::spawn(async move {
        if feed.tx.send(ChangeEvent::Resync).await.is_err() {
            return;
        }
        feed.run(listener).await;
    });
    Ok(rx)
}

/// One running feed.
struct Feed {
    pool: PgPool,
    tx: mpsc::Sender<ChangeEvent>,
    check: Duration,
    id: Uuid,
}

/// What a notification payload is.
#[derive(Debug, PartialEq, Eq)]
enum Payload {
    /// A link changed.
    Change(ChangeEvent),
    /// A health-check ping: of this feed (`Some(seq)`) or of another one.
    Ping(Option<u64>),
    /// Neither.
    Malformed,
}

fn classify(payload: &str, own: Uuid) -> Payload {
    if let Some(ping) = payload.strip_prefix(PING_PREFIX) {
        let seq = ping
            .split_once(':')
            .filter(|(id, _)| Uuid::parse_str(id).ok() == Some(own))
            .and_then(|(_, seq)| seq.parse().ok());
        return Payload::Ping(seq);
    }
    parse_payload(payload).map_or(Payload::Malformed, Payload::Change)
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANGE_CHANNEL).await?;
    Ok(listener)
}

impl Feed {
    async fn run(self, mut listener: PgListener) {
        let mut ticker = tokio::time::interval(self.check);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        // The ping sent at the last check and not heard back yet.
        let mut outstanding: Option<u64> = None;
        let mut seq: u64 = 0;
        loop {
            let next = tokio::select! {
                _ = self.tx.closed() => return,
                _ = ticker.tick() => {
                    if outstanding.is_some() {
                        tracing::warn!(
                            interval = ?self.check,
                            "change feed did not hear its own ping; reconnecting"
                        );
                        drop(listener);
                        if self.tx.send(ChangeEvent::Lost).await.is_err() {
                            return;
                        }
                        match self.relisten().await {
                            Some(l) => listener = l,
                            None => return,
                        }
                        outstanding = None;
                        if self.tx.send(ChangeEvent::Resync).await.is_err() {
                            return;
                        }
                        ticker.reset();
                        continue;
                    }
                    seq += 1;
                    // A failed send (database down) leaves nothing to wait for;
                    // the listener itself notices an outage.
                    if self.ping(seq).await {
                        outstanding = Some(seq);
                    }
                    continue;
                }
                next = listener.try_recv() => next,
            };
            let event = match next {
                Ok(Some(n)) => match classify(n.payload(), self.id) {
                    Payload::Change(e) => e,
                    Payload::Ping(Some(s)) => {
                        if outstanding == Some(s) {
                            outstanding = None;
                        }
                        continue;
                    }
                    Payload::Ping(None) => continue,
                    Payload::Malformed => {
                        tracing::warn!("ignoring malformed change notification");
                        continue;
                    }
                },
                // Lost the connection; sqlx already reconnected and re-listened.
                Ok(None) => {
                    outstanding = None;
                    ChangeEvent::Resync
                }
                Err(sqlx::Error::PoolClosed) => return,
                Err(e) => {
                    // sqlx keeps some broken connections; start over with a new one.
                    tracing::warn!(error = %e, "change feed lost its connection; reconnecting");
                    if self.tx.send(ChangeEvent::Lost).await.is_err() {
                        return;
                    }
                    match self.relisten().await {
                        Some(l) => listener = l,
                        None => return,
                    }
                    outstanding = None;
                    ChangeEvent::Resync
                }
            };
            if self.tx.send(event).await.is_err() {
                return;
            }
        }
    }

    /// Sends ping `seq` through the pool (not the listening connection, which
    /// is the one under test); whether it was sent. Bounded by the check
    /// interval so a hung pool cannot stall the feed.
    async fn ping(&self, seq: u64) -> bool {
        let payload = format!("{PING_PREFIX}{}:{seq}", self.id);
        let send = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGE_CHANNEL)
            .bind(payload)
            .execute(&self.pool);
        match tokio::time::timeout(self.check, send).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "change feed cannot send its health-check ping");
                false
            }
            Err(_) => false,
        }
    }

    /// A fresh listener, retried until it works; None when the feed should stop
    /// (receiver gone or pool closed).
    async fn relisten(&self) -> Option<PgListener> {
        loop {
            let attempt = tokio::select! {
                _ = self.tx.closed() => return None,
                r = listen(&self.pool) => r,
            };
            match attempt {
                Ok(l) => return Some(l),
                Err(sqlx::Error::PoolClosed) => return None,
                Err(_) => tokio::select! {
                    _ = self.tx.closed() => return None,
                    _ = tokio::time::sleep(RETRY) => {}
                },
            }
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

    #[test]
    fn pings_are_told_from_changes() {
        let own = Uuid::new_v4();
        let other = Uuid::new_v4();
        assert_eq!(
            classify(&format!("{PING_PREFIX}{own}:7"), own),
            Payload::Ping(Some(7))
        );
        assert_eq!(
            classify(&format!("{PING_PREFIX}{other}:7"), own),
            Payload::Ping(None)
        );
        assert_eq!(
            classify(&format!("{PING_PREFIX}junk"), own),
            Payload::Ping(None)
        );
        assert_eq!(classify("nope", own), Payload::Malformed);
        let u = Uuid::new_v4();
        assert_eq!(
            classify(&format!("github\t{u}"), own),
            Payload::Change(ChangeEvent::Link {
                provider_id: "github".into(),
                user_id: u
            })
        );
    }
}
