//! The per-worker HTTP/1.1 upstream connections (`proxy::h1pool`), against a
//! hand-written HTTP/1.1 upstream that counts its connections and records each
//! request head as it arrived on the wire: requests go in origin form with the
//! route's `Host`, one keep-alive connection serves sequential requests, and an
//! upstream that closes idle connections (as every server's keep-alive timeout
//! does) costs no request.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use harness::{create_token, get, FakeTokens, Harness};
use parking_lot::Mutex;
use sqlx::PgPool;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

const GH_TOKEN: &str = "gho_pool_token";

/// A minimal HTTP/1.1 upstream: bodiless requests, `200 ok` answers.
struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl RawUpstream {
    /// Answers on keep-alive connections; with `close_after`, closes each
    /// connection that long after its first answer without saying so first.
    async fn start(close_after: Option<Duration>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (c, h) = (connections.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, h.clone(), close_after));
            }
        });
        Self {
            addr,
            connections,
            heads,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut stream: TcpStream,
    heads: Arc<Mutex<Vec<String>>>,
    close_after: Option<Duration>,
) {
    let mut buf = Vec::new();
    let mut answered = false;
    loop {
        let mut chunk = [0u8; 4096];
        let read = match close_after.filter(|_| answered) {
            Some(after) => match tokio::time::timeout(after, stream.read(&mut chunk)).await {
                Ok(read) => read,
                Err(_) => return, // the idle close, unannounced
            },
            None => stream.read(&mut chunk).await,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            heads.lock().push(head);
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if stream.write_all(answer).await.is_err() {
                return;
            }
            answered = true;
        }
    }
}

async fn world(pool: PgPool, upstream: &RawUpstream) -> (Harness, String) {
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let config = harness::config(&format!(
        r#"
[[providers]]
id = "github"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  prefix = "/gh"
  upstream = "http://{addr}/base"
"#,
        addr = upstream.addr
    ));
    (Harness::start(config, store, fake).await, token)
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn sequential_requests_share_one_connection_in_origin_form(pool: PgPool) {
    let upstream = RawUpstream::start(None).await;
    let (proxy, token) = world(pool, &upstream).await;
    let auth = format!("Bearer {token}");
    for i in 0..20 {
        // Each on a new caller connection: the upstream connection is the
        // worker's, not the caller connection's.
        let url = format!("http://{}/gh/repos/{i}?page=2", proxy.addr);
        let answer = get(&url, &[("authorization", &auth)]).await;
        assert_eq!(answer.status, 200, "request {i}: {:?}", answer.body);
    }
    assert_eq!(
        upstream.connections(),
        1,
        "one keep-alive connection for all 20"
    );
    let heads = upstream.heads.lock().clone();
    assert_eq!(heads.len(), 20);
    for (i, head) in heads.iter().enumerate() {
        let line = head.lines().next().unwrap();
        assert_eq!(
            line,
            format!("GET /base/repos/{i}?page=2 HTTP/1.1"),
            "origin form"
        );
        let host = head
            .lines()
            .find_map(|l| l.strip_prefix("host: "))
            .expect("a Host header");
        assert_eq!(host, upstream.addr.to_string());
        assert!(
            head.contains(&format!("authorization: Bearer {GH_TOKEN}")),
            "the link's credential, not the caller's: {head}"
        );
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn an_upstream_closing_idle_connections_costs_no_request(pool: PgPool) {
    let upstream = RawUpstream::start(Some(Duration::from_millis(50))).await;
    let (proxy, token) = world(pool, &upstream).await;
    let auth = format!("Bearer {token}");
    let url = format!("http://{}/gh/user", proxy.addr);
    for i in 0..5 {
        let answer = get(&url, &[("authorization", &auth)]).await;
        assert_eq!(answer.status, 200, "request {i}: {:?}", answer.body);
        // Longer than the upstream keeps an idle connection.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(upstream.heads.lock().len(), 5);
    assert_eq!(
        upstream.connections(),
        5,
        "a new connection after each idle close"
    );
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn concurrent_requests_each_get_a_connection_and_then_reuse_them(pool: PgPool) {
    let upstream = RawUpstream::start(None).await;
    let (proxy, token) = world(pool, &upstream).await;
    let auth = format!("Bearer {token}");
    let url = format!("http://{}/gh/user", proxy.addr);
    let headers = [("authorization", auth.as_str())];
    for round in 0..3 {
        let answers = futures_util::future::join_all((0..16).map(|_| get(&url, &headers))).await;
        for a in &answers {
            assert_eq!(a.status, 200, "round {round}: {:?}", a.body);
        }
    }
    assert_eq!(upstream.heads.lock().len(), 48);
    let opened = upstream.connections();
    assert!(
        (1..=16).contains(&opened),
        "at most one connection per concurrent request, reused across rounds: {opened}"
    );
}
