//! Caches that heal by themselves (issue 11, must-have 5): a change made by plain
//! SQL (no NOTIFY of ours) reaches every replica through the table's trigger; a
//! LISTEN connection that was killed, or that silently went deaf (a relay that
//! stops delivering), is noticed and every cache resynced; and a
//! cached entry is read again once it is `tokens.cache_max_age` old, while an
//! unreachable store still leaves the cached token serving. Also must-have 6
//! through two token sources: a stale background write for a provider that does
//! not rotate refresh tokens, encryption on, loses to the newer one.

#[path = "tokens_harness/mod.rs"]
mod harness;
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use harness::*;
use sqlx::PgPool;
use support::store_wrapper::{HookedStore, Hooks};
use tokenproxy::config::TokensConfig;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{Link, LinkStore, StoreError};
use tokenproxy::tokens::TokenError;
use uuid::Uuid;

/// Polls `f` every 20 ms until it holds; panics after `limit`. Returns how long it took.
async fn within<F, Fut>(limit: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What `replica` serves for `user` right now: the token text or the error.
async fn served(r: &Replica, user: Uuid) -> Result<String, TokenError> {
    r.source
        .get(P, user)
        .await
        .map(|t| t.expose_secret().to_owned())
}

async fn set_access_by_sql(pool: &PgPool, user: Uuid, token: &str) {
    let n = sqlx::query(
        "UPDATE external_auth_links SET oauth_access_token = $1, updated_at = now() \
         WHERE provider_id = $2 AND user_id = $3",
    )
    .bind(token)
    .bind(P)
    .bind(user)
    .execute(pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(n, 1);
}

async fn set_trigger(pool: &PgPool, on: bool) {
    let verb = if on { "ENABLE" } else { "DISABLE" };
    sqlx::query(&format!(
        "ALTER TABLE external_auth_links {verb} TRIGGER external_auth_links_announce"
    ))
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn plain_sql_update_and_delete_reach_every_replica(pool: PgPool) {
    let (clock, idp, st, updated) = setup(&pool).await;
    let deleted = Uuid::new_v4();
    st.put_link(P, updated, &idp.seed(updated)).await.unwrap();
    st.put_link(P, deleted, &idp.seed(deleted)).await.unwrap();
    let providers = [idp.provider(P)];
    let replicas = [
        replica(&pool, &providers, &tokens_cfg(), clock.clone()).await,
        replica(&pool, &providers, &tokens_cfg(), clock.clone()).await,
    ];
    for r in &replicas {
        for user in [updated, deleted] {
            r.warm(user).await;
        }
    }

    // A DBA's (or Coder's) writes: plain SQL, no pg_notify of ours.
    set_access_by_sql(&pool, updated, "set-by-plain-sql").await;
    sqlx::query("DELETE FROM external_auth_links WHERE provider_id = $1 AND user_id = $2")
        .bind(P)
        .bind(deleted)
        .execute(&pool)
        .await
        .unwrap();

    for (i, r) in replicas.iter().enumerate() {
        let took = within(
            Duration::from_secs(2),
            "replica serves both changes",
            || async {
                served(r, updated).await.as_deref() == Ok("set-by-plain-sql")
                    && served(r, deleted).await == Err(TokenError::LinkMissing)
            },
        )
        .await;
        eprintln!("replica {i} served the plain-SQL changes after {took:?}");
    }
    assert_eq!(idp.refreshes(), 0);
}

/// Finds the backend of the connection that LISTENs on the change channel.
async fn listener_pid(pool: &PgPool) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%' \
           AND pid <> pg_backend_pid()",
    )
    .fetch_optional(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn killed_listen_connection_is_detected_and_resynced(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    st.put_link(P, user, &idp.seed(user)).await.unwrap();
    let store = PgStore::from_pool(own_pool(&pool).await, Keyring::plaintext())
        .with_listen_check_interval(Duration::from_millis(500));
    let r = replica_with(Arc::new(store), &[idp.provider(P)], &tokens_cfg(), clock).await;
    let first = r.warm(user).await.expose_secret().to_owned();

    within(Duration::from_secs(5), "the feed is listening", || async {
        listener_pid(&pool).await.is_some()
    })
    .await;
    let pid = listener_pid(&pool).await.unwrap();

    // A change nobody announces (the trigger is off), then the LISTEN connection
    // dies: only a resync can bring the change to the cache.
    set_trigger(&pool, false).await;
    set_access_by_sql(&pool, user, "changed-while-unannounced").await;
    assert_eq!(served(&r, user).await.unwrap(), first, "still cached");
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(killed);

    let took = within(
        Duration::from_secs(10),
        "resynced after the kill",
        || async { served(&r, user).await.as_deref() == Ok("changed-while-unannounced") },
    )
    .await;
    eprintln!("resynced {took:?} after pg_terminate_backend");
    within(Duration::from_secs(5), "listening again", || async {
        listener_pid(&pool).await.is_some_and(|p| p != pid)
    })
    .await;
}

/// Counts link reads and fails them on demand.
#[derive(Default)]
struct Flaky {
    reads: AtomicU64,
    down: AtomicBool,
}

#[async_trait::async_trait]
impl Hooks for Arc<Flaky> {
    async fn get_link(
        &self,
        inner: &dyn LinkStore,
        p: &str,
        u: Uuid,
    ) -> Result<Option<Link>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("test: database down".into()));
        }
        inner.get_link(p, u).await
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn cached_entry_is_read_again_after_max_age(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    st.put_link(P, user, &idp.seed(user)).await.unwrap();
    let flaky = Arc::new(Flaky::default());
    let store = HookedStore::new(
        PgStore::from_pool(own_pool(&pool).await, Keyring::plaintext()),
        flaky.clone(),
    );
    let cfg = TokensConfig {
        cache_max_age: Duration::from_secs(60),
        ..tokens_cfg()
    };
    let r = replica_with(Arc::new(store), &[idp.provider(P)], &cfg, clock.clone()).await;
    let first = r.warm(user).await.expose_secret().to_owned();
    // Reads from now on; the warm-up's are not counted.
    flaky.reads.store(0, Ordering::SeqCst);

    // A change that no notification announces.
    set_trigger(&pool, false).await;
    set_access_by_sql(&pool, user, "changed-silently").await;

    clock.advance(Duration::from_secs(59));
    assert_eq!(
        served(&r, user).await.unwrap(),
        first,
        "younger than max age"
    );
    assert_eq!(
        flaky.reads.load(Ordering::SeqCst),
        0,
        "no read before max age"
    );

    clock.advance(Duration::from_secs(1));
    assert_eq!(served(&r, user).await.unwrap(), "changed-silently");
    assert_eq!(flaky.reads.load(Ordering::SeqCst), 1, "read again once");
    assert_eq!(served(&r, user).await.unwrap(), "changed-silently");
    assert_eq!(flaky.reads.load(Ordering::SeqCst), 1, "and cached again");

    // Outage: past max age the store is asked, fails, and the cached (unexpired)
    // token still serves.
    flaky.down.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(61));
    assert_eq!(served(&r, user).await.unwrap(), "changed-silently");
    assert_eq!(flaky.reads.load(Ordering::SeqCst), 2);
    assert_eq!(idp.refreshes(), 0);
}

/// A TCP relay to Postgres that can make the connections that issued `LISTEN`
/// deaf: they stay open, but nothing the server sends reaches the client — a
/// connection a NAT or load balancer silently forgot.
struct Relay {
    port: u16,
    conns: Arc<parking_lot::Mutex<Vec<Arc<RelayConn>>>>,
    /// Every relay task; aborted on drop, which closes every relayed socket.
    tasks: Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}

#[derive(Default)]
struct RelayConn {
    listens: AtomicBool,
    deaf: AtomicBool,
}

impl Relay {
    async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<parking_lot::Mutex<Vec<Arc<RelayConn>>>> = Arc::default();
        let list = conns.clone();
        let tasks: Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let spawned = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let conn = Arc::new(RelayConn::default());
                list.lock().push(conn.clone());
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = conn.clone();
                let up_task = tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        if buf[..n]
                            .windows(6)
                            .any(|w| w.eq_ignore_ascii_case(b"LISTEN"))
                        {
                            up.listens.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let down_task = tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = sr.read(&mut buf).await {
                        if conn.deaf.load(Ordering::SeqCst) {
                            continue;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                spawned.lock().extend([up_task, down_task]);
            }
        });
        tasks.lock().push(accept);
        Self { port, conns, tasks }
    }

    /// Makes every connection that has issued `LISTEN` so far deaf; how many.
    fn deafen_listeners(&self) -> usize {
        let conns = self.conns.lock();
        conns
            .iter()
            .filter(|c| c.listens.load(Ordering::SeqCst))
            .inspect(|c| c.deaf.store(true, Ordering::SeqCst))
            .count()
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn deaf_listen_connection_is_detected_and_resynced(pool: PgPool) {
    let (clock, idp, st, user) = setup(&pool).await;
    st.put_link(P, user, &idp.seed(user)).await.unwrap();
    let opts = pool.connect_options();
    let relay = Relay::start(opts.get_port()).await;
    let relayed = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(
            opts.as_ref()
                .clone()
                .host("127.0.0.1")
                .port(relay.port)
                // The relay reads the queries to find the LISTEN connection.
                .ssl_mode(sqlx::postgres::PgSslMode::Disable),
        )
        .await
        .unwrap();
    let store = PgStore::from_pool(relayed, Keyring::plaintext())
        .with_listen_check_interval(Duration::from_millis(300));
    let r = replica_with(Arc::new(store), &[idp.provider(P)], &tokens_cfg(), clock).await;
    r.warm(user).await;
    within(Duration::from_secs(5), "the feed is listening", || async {
        listener_pid(&pool).await.is_some()
    })
    .await;

    // The connection goes deaf; then a change is announced (by the trigger)
    // that it never hears.
    assert_eq!(relay.deafen_listeners(), 1);
    set_access_by_sql(&pool, user, "announced-to-a-deaf-ear").await;

    let took = within(
        Duration::from_secs(10),
        "deafness noticed and resynced",
        || async { served(&r, user).await.as_deref() == Ok("announced-to-a-deaf-ear") },
    )
    .await;
    eprintln!("resynced {took:?} after the LISTEN connection went deaf");
    drop(r);
    drop(relay);
}

/// Fails every refresh write while `down`, and records what the first write
/// after it came back answered.
#[derive(Default)]
struct WritesDown {
    down: AtomicBool,
    after: parking_lot::Mutex<Option<bool>>,
}

#[async_trait::async_trait]
impl Hooks for Arc<WritesDown> {
    async fn write_refreshed(
        &self,
        inner: &dyn LinkStore,
        p: &str,
        u: Uuid,
        read: &tokenproxy::store::Fence,
        new: &tokenproxy::store::TokenSet,
    ) -> Result<bool, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("test: writes refused".into()));
        }
        let applied = inner.write_refreshed(p, u, read, new).await?;
        self.after.lock().get_or_insert(applied);
        Ok(applied)
    }
}

/// Issue 11's acceptance for must-have 6, through two token sources: a provider
/// that keeps its refresh token, encryption on. Replica A refreshes but cannot
/// store the answer and keeps retrying in the background; meanwhile replica B
/// refreshes and stores a newer access token. A's late write must lose.
#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn non_rotating_stale_background_write_does_not_overwrite_newer_token(pool: PgPool) {
    use secrecy::{ExposeSecret, SecretBox};
    use tokenproxy::tokens::Clock;
    let keys = || {
        Keyring::new(
            vec![SecretBox::new(Box::new([0x42u8; 32]))],
            tokenproxy::config::EncryptionFormat::Native,
        )
    };
    let (clock, idp) = idp_with(support::idp::IdpOptions {
        rotate: false,
        ..Default::default()
    })
    .await;
    let user = Uuid::new_v4();
    let plain = PgStore::from_pool(pool.clone(), keys());
    let expired = idp.seed_with_expiry(user, Some(clock.now() - chrono::Duration::seconds(10)));
    plain.put_link(P, user, &expired).await.unwrap();
    let providers = [idp.provider(P)];

    let hooks = Arc::new(WritesDown::default());
    hooks.down.store(true, Ordering::SeqCst);
    let a_store = HookedStore::new(
        PgStore::from_pool(own_pool(&pool).await, keys()),
        hooks.clone(),
    );
    let a = replica_with(Arc::new(a_store), &providers, &tokens_cfg(), clock.clone()).await;
    let b_store = PgStore::from_pool(own_pool(&pool).await, keys());
    let b = replica_with(Arc::new(b_store), &providers, &tokens_cfg(), clock.clone()).await;

    let older = served(&a, user).await.expect("A serves its unstored token");
    let newer = served(&b, user).await.expect("B refreshes and stores");
    assert_ne!(older, newer);
    assert_eq!(idp.refreshes(), 2);
    let row = plain.get_link(P, user).await.unwrap().unwrap();
    assert_eq!(row.access_token.expose_secret(), newer);

    // The database comes back for A: its background retry runs against a row
    // that B changed since A read it.
    hooks.down.store(false, Ordering::SeqCst);
    within(
        Duration::from_secs(5),
        "A's background write ran",
        || async { hooks.after.lock().is_some() },
    )
    .await;
    assert_eq!(
        *hooks.after.lock(),
        Some(false),
        "the stale write must lose"
    );
    let row = plain.get_link(P, user).await.unwrap().unwrap();
    assert_eq!(row.access_token.expose_secret(), newer);
    assert_eq!(idp.reused(), 0);
}
