//! Connection-level behaviour of the proxy listener: graceful shutdown with a
//! request in flight, `Expect: 100-continue`, HTTP/2 (h2c) callers, and the
//! request-head limits.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::sync::Arc;

use harness::{create_token, get, raw, raw_status, FakeTokens, Harness};
use sqlx::PgPool;
use support::gate::Gate;
use support::upstream::{tokens, CredentialForm, TestUpstream};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use uuid::Uuid;

const GH_TOKEN: &str = "gho_lifecycle";

struct World {
    api: TestUpstream,
    proxy: Harness,
    token: String,
    fake: Arc<FakeTokens>,
}

async fn world(pool: PgPool, server_toml: &str) -> World {
    world_on(pool, server_toml, 0).await
}

/// [`world`], with the proxy on `workers` worker threads (0: the test's runtime).
async fn world_on(pool: PgPool, server_toml: &str, workers: usize) -> World {
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let config = harness::config(&format!(
        r#"
[server]
{server_toml}

[[providers]]
id = "github"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  prefix = "/gh/api"
  upstream = "{}"
"#,
        api.url()
    ));
    let proxy = match workers {
        0 => Harness::start(config, store, fake.clone()).await,
        n => Harness::start_workers(config, store, fake.clone(), n).await,
    };
    World {
        api,
        proxy,
        token,
        fake,
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn shutdown_lets_the_in_flight_request_finish_and_refuses_new_connections(pool: PgPool) {
    let mut w = world(pool, r#"shutdown_grace = "30s""#).await;
    let url = w.proxy.url("/gh/api/slow");
    let auth = format!("Bearer {}", w.token);
    let in_flight = tokio::spawn(async move { get(&url, &[("authorization", &auth)]).await });
    w.api.slow_arrived(1).await;

    let server = w.proxy.begin_shutdown();
    // The listener closes promptly; wait (bounded) until connecting is refused.
    assert!(
        wait_refused(w.proxy.addr).await,
        "new connections are still accepted after shutdown"
    );
    assert!(!in_flight.is_finished());

    w.api.release_slow();
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["target"], "/slow");
    server.await.unwrap().unwrap();
}

/// Sends a request head with `Expect: 100-continue`, waits for the interim
/// response, then sends the body; returns the final status line.
async fn expect_continue(w: &World, len: usize) -> String {
    let mut stream = TcpStream::connect(w.proxy.addr).await.unwrap();
    let head = format!(
        "POST /gh/api/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {len}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        w.token
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim_end(), "HTTP/1.1 100 Continue");
    let mut blank = String::new();
    reader.read_line(&mut blank).await.unwrap();
    assert_eq!(blank, "\r\n");
    reader.get_mut().write_all(&vec![b'x'; len]).await.unwrap();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).await.unwrap();
    rest
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn expect_100_continue_works_for_small_and_streamed_bodies(pool: PgPool) {
    let w = world(pool, "").await;
    for len in [10, 200 * 1024] {
        let resp = expect_continue(&w, len).await;
        assert_eq!(raw_status(&resp), 200, "{resp}");
        assert_eq!(w.api.requests().pop().unwrap().body_len, len as u64);
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn h2c_callers_are_served(pool: PgPool) {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    let w = world(pool, "").await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let req = http::Request::get(w.proxy.url("/gh/api/h2?x=1"))
        .header("authorization", format!("Bearer {}", w.token))
        .body(Empty::new())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["target"], "/h2?x=1");
    let seen = w.api.requests().pop().unwrap();
    assert_eq!(seen.headers["host"], w.api.addr.to_string());
    assert_eq!(seen.token.as_deref(), Some(GH_TOKEN));
    // forwarded_headers is off by default: nothing about the caller is added.
    for name in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "via",
    ] {
        assert!(seen.headers.get(name).is_none(), "{name} was added");
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn oversized_request_heads_are_refused(pool: PgPool) {
    let w = world(pool, "max_header_bytes = 8192").await;
    let big = "a".repeat(16 * 1024);
    let resp = raw(
        w.proxy.addr,
        &format!(
            "GET /gh/api/user HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nX-Big: {big}\r\nConnection: close\r\n\r\n",
            w.token
        ),
    )
    .await;
    assert_eq!(raw_status(&resp), 431, "{resp}");
    assert_eq!(w.api.count(), 0);
}

/// Polls (bounded) until connecting to `addr` is refused.
async fn wait_refused(addr: std::net::SocketAddr) -> bool {
    for _ in 0..500 {
        if let Err(e) = TcpStream::connect(addr).await {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    false
}

/// The built binary serving one route on `pool`'s database, with a request held
/// at the upstream (`api.release_slow()` lets it finish).
async fn binary_with_request_in_flight(
    pool: PgPool,
) -> (
    TestUpstream,
    harness::Spawned,
    JoinHandle<Result<harness::Answer, String>>,
) {
    use tokenproxy::store::{LinkStore, TokenSet};
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let store = PgStore::from_pool(pool.clone(), Keyring::plaintext());
    let user = Uuid::new_v4();
    let link = TokenSet {
        access_token: GH_TOKEN.to_string().into(),
        refresh_token: String::new().into(),
        expiry: None,
        extra: None,
    };
    store.put_link("github", user, &link).await.unwrap();
    let (_, token) = create_token(&store, user, &[]).await;
    let proxy = harness::Spawned::start(
        &harness::db_url(&pool),
        &format!(
            "[[providers]]\nid = \"github\"\nclient_id = \"cid\"\ntoken_url = \"http://127.0.0.1:9/token\"\n[[providers.routes]]\nprefix = \"/gh/api\"\nupstream = \"{}\"\n",
            api.url()
        ),
    )
    .await;
    let url = proxy.url("/gh/api/slow");
    let auth = format!("Bearer {token}");
    let in_flight = tokio::spawn(async move {
        harness::try_send(http::Method::GET, &url, &[("authorization", &auth)], "").await
    });
    api.slow_arrived(1).await;
    (api, proxy, in_flight)
}

/// Asserts a connection ended by the server's own timer: no earlier than the
/// `configured` timeout (less timer granularity) and well before the 10 s default
/// (the upper slack absorbs a loaded 2-core machine).
#[track_caller]
fn assert_cut_after(elapsed: std::time::Duration, configured: std::time::Duration) {
    let early = std::time::Duration::from_millis(20);
    let slack = std::time::Duration::from_millis(2500);
    assert!(
        elapsed + early >= configured,
        "cut off after {elapsed:?}, before the configured {configured:?}"
    );
    assert!(
        elapsed < configured + slack,
        "cut off after {elapsed:?}, not the configured {configured:?}"
    );
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn sigterm_to_the_binary_drains_the_in_flight_request(pool: PgPool) {
    let (api, mut proxy, in_flight) = binary_with_request_in_flight(pool).await;

    proxy.terminate();
    assert!(
        wait_refused(proxy.addr).await,
        "still accepting after SIGTERM"
    );
    assert!(!in_flight.is_finished());
    api.release_slow();
    let answer = in_flight
        .await
        .unwrap()
        .expect("the held request was drained");
    assert_eq!(answer.status, 200);
    let status = tokio::task::spawn_blocking(move || proxy.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "serve exited with {status}");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_second_sigterm_stops_without_waiting_out_the_drain(pool: PgPool) {
    let (api, proxy, in_flight) = binary_with_request_in_flight(pool).await;

    proxy.terminate();
    assert!(
        wait_refused(proxy.addr).await,
        "still accepting after SIGTERM"
    );
    // The drain (30 s grace) is under way and the request is held upstream.
    proxy.terminate();
    let mut proxy = proxy;
    let status = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::task::spawn_blocking(move || proxy.child.wait().unwrap()),
    )
    .await
    .expect("a second SIGTERM stops the process without waiting out the grace period")
    .unwrap();
    assert!(!status.success(), "a cut-short drain is not a clean exit");
    // The exchange itself failed (the process died under it), and only that: a
    // panic in the client task is a broken test, not a cut-off.
    let cut = in_flight.await.expect("the client task ran to its end");
    assert!(cut.is_err(), "the held request was cut off, got {cut:?}");
    api.release_slow();
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_declared_body_that_never_arrives_is_cut_off(pool: PgPool) {
    let w = world(pool, r#"header_read_timeout = "300ms""#).await;
    let mut stream = TcpStream::connect(w.proxy.addr).await.unwrap();
    stream
        .write_all(
            format!(
                "POST /gh/api/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 10\r\n\r\nabc",
                w.token
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // The rest of the body never comes; the connection is kept open.
    let sent = tokio::time::Instant::now();
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(20), stream.read(&mut out))
        .await
        .expect("tokenproxy answers a stalled body instead of waiting forever")
        .unwrap();
    assert_cut_after(sent.elapsed(), std::time::Duration::from_millis(300));
    let head = String::from_utf8_lossy(&out[..n]);
    assert_eq!(raw_status(&head), 400, "{head}");
    assert!(head.contains("tokenproxy-error: bad_request"), "{head}");
    assert_eq!(w.api.count(), 0);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn slow_or_silent_clients_are_cut_off(pool: PgPool) {
    let w = world(pool, r#"header_read_timeout = "200ms""#).await;
    for partial in ["", "GET /gh/api/user HTTP/1.1\r\nHost: x\r\n"] {
        let mut stream = TcpStream::connect(w.proxy.addr).await.unwrap();
        let connected = tokio::time::Instant::now();
        stream.write_all(partial.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        // The server must end the connection by itself; the outer bound only
        // keeps a broken server from hanging the test.
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            stream.read_to_end(&mut out),
        )
        .await;
        assert!(
            ended.is_ok(),
            "connection with head {partial:?} stayed open"
        );
        assert_cut_after(connected.elapsed(), std::time::Duration::from_millis(200));
    }
    assert_eq!(w.api.count(), 0);
}

/// A proxy (`workers` worker threads, 0: the test's runtime) with one route to a
/// [`Gate`], and a caller token for it.
async fn gated(pool: PgPool, server_toml: &str, workers: usize) -> (Gate, Harness, String) {
    let gate = Gate::start().await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let config = harness::config(&format!(
        "[server]\n{server_toml}\n\n[[providers]]\nid = \"github\"\nclient_id = \"cid\"\ntoken_url = \"http://127.0.0.1:9/token\"\n  [[providers.routes]]\n  prefix = \"/gh/api\"\n  upstream = \"{}\"\n",
        gate.url()
    ));
    let proxy = match workers {
        0 => Harness::start(config, store, fake).await,
        n => Harness::start_workers(config, store, fake, n).await,
    };
    (gate, proxy, token)
}

/// One caller on its own HTTP/2 (h2c) keep-alive connection: idle h2
/// connections stay open until `idle_timeout` (300 s), so only an eviction for a
/// newcomer closes one during a test.
struct KeptConn {
    /// The request's answer.
    answer: JoinHandle<http::StatusCode>,
    /// Ends when the proxy closes the connection.
    conn: JoinHandle<()>,
    _sender: hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
}

/// Opens `n` h2c connections to `proxy` at once, each sending one request to
/// the gate, and lets the requests through one at a time, each release only
/// after the next waiting request has reached the gate. The first `limit`
/// are held `hold` first (longer than `header_read_timeout`: a busy connection
/// closed for a newcomer would be cut off then). Returns the connections once
/// every request was answered 200 (the clients keep them open).
async fn keep_alive_burst(
    gate: &Gate,
    proxy: &Harness,
    token: &str,
    n: usize,
    limit: usize,
    hold: std::time::Duration,
) -> Vec<KeptConn> {
    let mut conns = Vec::new();
    for _ in 0..n {
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get(proxy.url("/gh/api/held"))
            .header("authorization", format!("Bearer {token}"))
            .body(http_body_util::Empty::new())
            .unwrap();
        let answer = sender.send_request(req);
        let answer = tokio::spawn(async move {
            let resp = answer.await.expect("the proxy answers, never resets");
            let status = resp.status();
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap();
            status
        });
        conns.push(KeptConn {
            answer,
            conn,
            _sender: sender,
        });
    }
    gate.arrived(limit).await;
    tokio::time::sleep(hold).await;
    assert_eq!(
        gate.held(),
        limit,
        "every slot is busy, none was given away"
    );
    assert!(
        conns.iter().take(limit).all(|c| !c.answer.is_finished()),
        "a busy connection was cut for a newcomer"
    );
    for released in 0..n {
        gate.arrived((released + limit).min(n)).await;
        assert!(
            gate.held() <= limit,
            "{} held with {limit} slots",
            gate.held()
        );
        gate.release(1);
    }
    for c in &mut conns {
        assert_eq!((&mut c.answer).await.unwrap(), 200);
    }
    assert_eq!(gate.high_water(), limit, "exactly max_connections at once");
    conns
}

/// After a burst: exactly one connection was closed per newcomer beyond the
/// limit, `limit` stay open, and every slot comes back once the clients go.
async fn every_slot_comes_back(proxy: &Harness, conns: Vec<KeptConn>, limit: usize) {
    let open = || proxy.metrics.open_connections.get();
    // A connection closed by the proxy ends its client task soon after.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let closed = |conns: &[KeptConn]| conns.iter().filter(|c| c.conn.is_finished()).count();
    while closed(&conns) < conns.len() - limit && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        closed(&conns),
        conns.len() - limit,
        "one idle connection closed per newcomer, no more"
    );
    assert_eq!(open(), limit as i64, "the proxy holds max_connections");
    drop(conns);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while open() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(open(), 0, "every slot came back after the burst");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn at_the_limit_idle_connections_make_room_and_busy_ones_are_never_cut(pool: PgPool) {
    // Six callers on keep-alive connections, two slots: each newcomer is served
    // by closing a connection whose request is done, never one still busy
    // (held past header_read_timeout, when a closed busy one would be cut off),
    // and never another newcomer whose request has not been read yet.
    let (gate, proxy, token) =
        gated(pool, "max_connections = 2\nheader_read_timeout = \"1s\"", 0).await;
    let hold = std::time::Duration::from_millis(1500);
    let conns = keep_alive_burst(&gate, &proxy, &token, 6, 2, hold).await;
    every_slot_comes_back(&proxy, conns, 2).await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn worker_threads_share_the_connection_limit_without_stranding_connections(pool: PgPool) {
    // Two workers, one slot, 40 keep-alive callers: whichever worker's accept
    // loop holds the next newcomer must close the other's idle connection once
    // its request is done. The kernel spreads the connections over the two
    // workers' sockets by a hash; a newcomer left waiting while the slot's
    // holder is idle is stranded, and its request never arrives.
    let (gate, proxy, token) =
        gated(pool, "max_connections = 1\nheader_read_timeout = \"1s\"", 2).await;
    let conns = keep_alive_burst(&gate, &proxy, &token, 40, 1, std::time::Duration::ZERO).await;
    every_slot_comes_back(&proxy, conns, 1).await;
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn shutdown_grace_expiry_cuts_off_what_is_still_running(pool: PgPool) {
    let grace = std::time::Duration::from_millis(500);
    let mut w = world(pool, r#"shutdown_grace = "500ms""#).await;
    let (url, auth) = (w.proxy.url("/gh/api/slow"), format!("Bearer {}", w.token));
    let in_flight = tokio::spawn(async move {
        harness::try_send(http::Method::GET, &url, &[("authorization", &auth)], "").await
    });
    w.api.slow_arrived(1).await;
    let began = tokio::time::Instant::now();
    let server = w.proxy.begin_shutdown();
    // The request is never released: only the grace period can end the drain.
    tokio::time::timeout(std::time::Duration::from_secs(20), server)
        .await
        .expect("the drain ends when shutdown_grace runs out")
        .unwrap()
        .unwrap();
    assert_cut_after(began.elapsed(), grace);
    let cut = in_flight.await.expect("the client task ran to its end");
    assert!(cut.is_err(), "the held request was cut off, got {cut:?}");
    w.api.release_slow();
}

#[test]
fn listening_lines_of_both_log_formats_name_the_addresses() {
    let text = "2026-01-01T00:00:00Z  INFO tokenproxy::proxy: listening addr=127.0.0.1:41000 admin=127.0.0.1:41001 tls=false workers=2";
    let json = r#"{"timestamp":"x","level":"INFO","addr":"127.0.0.1:41000","admin":"127.0.0.1:41001","tls":false,"workers":2,"message":"listening","target":"tokenproxy::proxy"}"#;
    let want = (
        "127.0.0.1:41000".parse().unwrap(),
        "127.0.0.1:41001".parse().unwrap(),
    );
    assert_eq!(support::child::listening_addrs(text), Some(want));
    assert_eq!(support::child::listening_addrs(json), Some(want));
    assert_eq!(
        support::child::listening_addrs("INFO stopped accepting; draining"),
        None
    );
}

/// The sum of every sample of `name` whose labels contain each of `labels`.
fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let base = series.split('{').next()?;
            (base == name && labels.iter().all(|want| series.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn metrics_from_every_worker_add_up_exactly(pool: PgPool) {
    // Callers, each on its own connection: the kernel spreads connections over
    // the workers' `SO_REUSEPORT` sockets by a hash of the addresses, so 64 of
    // them reach every worker (the chance that all land on fewer is negligible).
    const WORKERS: usize = 4;
    const CALLERS: usize = 64;
    const ROUTED: usize = 5;
    const UNROUTED: usize = 2;
    let w = world_on(pool, "", WORKERS).await;
    let (api, fake, token) = (&w.api, &w.fake, &w.token);
    let addr = w.proxy.addr;
    let auth = Arc::new(format!("Bearer {token}"));

    let callers: Vec<_> = (0..CALLERS)
        .map(|i| {
            let auth = auth.clone();
            tokio::spawn(async move {
                for j in 0..ROUTED + UNROUTED {
                    // Each `get` is a fresh connection, so a caller's requests
                    // land on several workers too.
                    let path = if j < ROUTED {
                        format!("/gh/api/user/{i}/{j}")
                    } else {
                        format!("/nowhere/{i}/{j}")
                    };
                    let a = get(&format!("http://{addr}{path}"), &[("authorization", &auth)]).await;
                    let want = if j < ROUTED { 200 } else { 404 };
                    assert_eq!(a.status, want, "{path}");
                }
            })
        })
        .collect();
    for c in callers {
        c.await.unwrap();
    }

    let routed = (CALLERS * ROUTED) as f64;
    let unrouted = (CALLERS * UNROUTED) as f64;
    assert_eq!(
        api.count(),
        CALLERS * ROUTED,
        "the upstream saw every routed request"
    );
    let m = get(&format!("http://{}/metrics", w.proxy.admin), &[]).await;
    assert_eq!(m.status, 200);
    let text = String::from_utf8_lossy(&m.body);
    assert_eq!(
        sum(
            &text,
            "tokenproxy_requests_total",
            &[
                r#"provider="github""#,
                r#"route="/gh/api""#,
                r#"status="200""#
            ]
        ),
        routed,
        "{text}"
    );
    assert_eq!(
        sum(&text, "tokenproxy_requests_total", &[r#"status="404""#]),
        unrouted
    );
    assert_eq!(
        sum(&text, "tokenproxy_requests_total", &[]),
        routed + unrouted,
        "no request counted twice or in another series"
    );
    assert_eq!(
        sum(&text, "tokenproxy_request_duration_seconds_count", &[]),
        routed + unrouted
    );
    assert_eq!(
        sum(&text, "tokenproxy_upstream_duration_seconds_count", &[]),
        routed,
        "one upstream attempt per routed request"
    );
    let le_inf = sum(
        &text,
        "tokenproxy_request_duration_seconds_bucket",
        &[r#"le="+Inf""#],
    );
    assert_eq!(
        le_inf,
        routed + unrouted,
        "the +Inf bucket holds every request"
    );
    assert_eq!(
        fake.gets.load(std::sync::atomic::Ordering::SeqCst),
        CALLERS * ROUTED,
        "one token lookup per routed request"
    );
}
