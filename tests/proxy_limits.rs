//! Listener and abuse limits (issue 12): idle connections give way when every
//! slot is taken, the per-source connection limit, HTTP/2 keep-alive pings,
//! idle timeout and stream cap (seen in the frames a raw HTTP/2 client reads),
//! the rate limit on failed authentication, per-route method lists, the total
//! memory budget of 401-retry buffers, and config values that could split a
//! header. The proxy runs in-process over a real Postgres store; upstreams are
//! real loopback servers that count what they were asked.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use harness::{create_token, get, send, FakeTokens, Harness};
use http::Method;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use sqlx::PgPool;
use support::upstream::{tokens, CredentialForm, TestUpstream};
use tokenproxy::crypto::Keyring;
use tokenproxy::store::postgres::PgStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

const GH_TOKEN: &str = "gho_github_access_1";

/// Bound on anything a test waits for that should happen within a second or
/// two; generous so a loaded CI machine does not fail the test.
const WAIT: Duration = Duration::from_secs(10);

struct World {
    api: TestUpstream,
    tokens: Arc<FakeTokens>,
    proxy: Harness,
    token: String,
}

/// One upstream behind `/gh/api` (and `/gh/open`, same upstream, no method
/// list), with `server` and `callers` keys added.
async fn world(pool: PgPool, server: &str, callers: &str, route: &str) -> World {
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let user = Uuid::new_v4();
    let (_, token) = create_token(&*store, user, &[]).await;
    let fake = FakeTokens::new();
    fake.set("github", user, GH_TOKEN);
    let url = api.url();
    let config = harness::config(&format!(
        r#"
[server]
{server}

[callers]
{callers}

[[providers]]
id = "github"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  prefix = "/gh/api"
  upstream = "{url}"
  {route}

  [[providers.routes]]
  prefix = "/gh/open"
  upstream = "{url}"
"#
    ));
    let proxy = Harness::start(config, store, fake.clone()).await;
    World {
        api,
        tokens: fake,
        proxy,
        token,
    }
}

/// An HTTP/1.1 client connection from `source` (a loopback address) to the
/// proxy; the returned task ends when the server closes the connection.
async fn connect_from(
    source: IpAddr,
    proxy: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let stream = support::net::connect_from(source, proxy).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, task)
}

fn request(path: &str, token: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get(path)
        .header("host", "proxy")
        .header("authorization", format!("Bearer {token}"))
        .body(Empty::new())
        .unwrap()
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const LOCAL2: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn when_every_slot_is_taken_the_idlest_connection_goes_first(pool: PgPool) {
    // Idle keep-alive connections would stay 30 s on their own.
    let w = world(
        pool,
        "max_connections = 4\nheader_read_timeout = \"30s\"",
        "",
        "",
    )
    .await;
    let addr = w.proxy.addr;
    // Two connections busy with a request the upstream holds...
    let mut busy = Vec::new();
    for _ in 0..2 {
        let (mut sender, task) = connect_from(LOCAL, addr).await;
        let resp = tokio::spawn(sender.send_request(request("/gh/api/slow", &w.token)));
        busy.push((resp, task, sender));
    }
    w.api.slow_arrived(2).await;
    // ...and two idle ones that have each served a request, older one first.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let (mut sender, task) = connect_from(LOCAL, addr).await;
        let resp = sender
            .send_request(request("/gh/api/user", &w.token))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        idle.push((sender, task));
    }
    // A fifth caller is served at once, not after the idle ones time out.
    let auth = format!("Bearer {}", w.token);
    let normal = tokio::time::timeout(
        WAIT,
        get(&w.proxy.url("/gh/api/user"), &[("authorization", &auth)]),
    )
    .await
    .expect("served within the bound, long before header_read_timeout");
    assert_eq!(normal.status, 200);
    // Exactly one connection made room: the one idle longest.
    let (_older_sender, older) = idle.remove(0);
    tokio::time::timeout(WAIT, older)
        .await
        .expect("the idlest connection was closed")
        .unwrap();
    let (mut newer_sender, newer) = idle.remove(0);
    assert!(!newer.is_finished(), "only one idle connection was closed");
    let again = newer_sender
        .send_request(request("/gh/api/user", &w.token))
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    // The busy connections were never touched.
    w.api.release_slow();
    for (resp, task, _sender) in busy {
        let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
        assert_eq!(resp.unwrap().status(), 200);
        assert!(!task.is_finished());
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_source_at_its_connection_limit_is_refused_and_others_are_served(pool: PgPool) {
    let w = world(pool, "max_connections_per_ip = 2", "", "").await;
    let addr = w.proxy.addr;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let (mut sender, task) = connect_from(LOCAL, addr).await;
        let resp = tokio::spawn(sender.send_request(request("/gh/api/slow", &w.token)));
        busy.push((resp, task, sender));
    }
    w.api.slow_arrived(2).await;
    // A third connection from the same address is closed unanswered.
    let mut third = TcpStream::connect(addr).await.unwrap();
    let _ = third
        .write_all(b"GET /gh/api/user HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, third.read_to_end(&mut got))
        .await
        .expect("the refused connection is closed");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    // Another source address is not affected.
    let (mut other, _task) = connect_from(LOCAL2, addr).await;
    let resp = tokio::time::timeout(WAIT, other.send_request(request("/gh/api/user", &w.token)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    w.api.release_slow();
    for (resp, _task, _sender) in busy {
        let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
        assert_eq!(resp.unwrap().status(), 200);
    }
    // The upstream saw the two slow requests and the other source's, nothing else.
    assert_eq!(w.api.count(), 3);
}

/// A minimal HTTP/2 client on a raw socket, so a test can see (and choose not to
/// answer) every frame.
struct RawH2 {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Answer the server's pings, as a live client does.
    ack_pings: bool,
}

/// One frame as read: type, flags, stream id, payload.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;

impl RawH2 {
    async fn connect(addr: SocketAddr) -> Self {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut me = Self {
            stream,
            buf: Vec::new(),
            ack_pings: true,
        };
        me.write_frame(SETTINGS, 0, 0, &[]).await;
        me
    }

    async fn write_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).await.unwrap();
    }

    /// A GET of `path` on `stream` (odd), with the caller's token, no body.
    async fn get(&mut self, stream: u32, path: &str, token: &str) {
        let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
        literal(&mut block, 0x44, path); // :path, indexed name 4
        literal(&mut block, 0x41, "proxy"); // :authority, indexed name 1
        block.extend_from_slice(&[0x0f, 0x08]); // authorization (23), not indexed
        let value = format!("Bearer {token}");
        assert!(value.len() < 127);
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value.as_bytes());
        // END_STREAM | END_HEADERS
        self.write_frame(HEADERS, 0x5, stream, &block).await;
    }

    /// The next frame, answering SETTINGS (and PING, if `ack_pings`) with an
    /// ACK; `None` once the server
    /// closed the connection.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = usize::from(self.buf[0]) << 16
                    | usize::from(self.buf[1]) << 8
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let head: Vec<u8> = self.buf.drain(..9).collect();
                    let payload = self.buf.drain(..len).collect();
                    let frame = Frame {
                        kind: head[3],
                        flags: head[4],
                        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]])
                            & 0x7fff_ffff,
                        payload,
                    };
                    if frame.kind == SETTINGS && frame.flags & 1 == 0 {
                        self.write_frame(SETTINGS, 1, 0, &[]).await;
                    }
                    if frame.kind == PING && frame.flags & 1 == 0 && self.ack_pings {
                        self.write_frame(PING, 1, 0, &frame.payload).await;
                    }
                    return Some(frame);
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// An HPACK literal with incremental indexing of an indexed name (`prefix`
/// already holds the 0x40 bit and the name's index); values under 127 bytes.
fn literal(block: &mut Vec<u8>, prefix: u8, value: &str) {
    block.push(prefix);
    block.push(u8::try_from(value.len()).unwrap());
    block.extend_from_slice(value.as_bytes());
}

/// The value of setting `id` in a SETTINGS payload.
fn setting(payload: &[u8], id: u16) -> Option<u32> {
    payload.chunks_exact(6).find_map(|s| {
        (u16::from_be_bytes([s[0], s[1]]) == id)
            .then(|| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
    })
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn http2_pings_a_silent_connection_and_closes_it_when_pings_go_unanswered(pool: PgPool) {
    let w = world(
        pool,
        "http2_keepalive_interval = \"300ms\"\nhttp2_keepalive_timeout = \"300ms\"",
        "",
        "",
    )
    .await;
    let mut h2 = RawH2::connect(w.proxy.addr).await;
    h2.ack_pings = false;
    h2.get(1, "/gh/api/user", &w.token).await;
    let (mut answered, mut pings) = (false, 0);
    let closed = tokio::time::timeout(WAIT, async {
        while let Some(f) = h2.next().await {
            answered |= f.kind == HEADERS && f.stream == 1;
            // Pings are never acknowledged: this client has gone silent.
            pings += usize::from(f.kind == PING && f.flags & 1 == 0);
        }
    })
    .await;
    assert!(answered, "the request was served first");
    assert!(pings >= 1, "the silent connection was pinged");
    closed.expect("the connection closed once its ping went unanswered");
    assert_eq!(w.api.count(), 1);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn http2_streams_are_capped_and_a_connection_without_any_is_closed_when_idle(pool: PgPool) {
    let w = world(
        pool,
        "http2_max_concurrent_streams = 2\nidle_timeout = \"500ms\"",
        "",
        "",
    )
    .await;
    let mut h2 = RawH2::connect(w.proxy.addr).await;
    let first = h2.next().await.expect("server settings");
    assert_eq!(first.kind, SETTINGS);
    // SETTINGS_MAX_CONCURRENT_STREAMS
    assert_eq!(setting(&first.payload, 0x3), Some(2));
    for id in [1, 3, 5] {
        h2.get(id, "/gh/api/slow", &w.token).await;
    }
    // The third concurrent stream is refused (REFUSED_STREAM), the two others
    // reach the upstream.
    let refused = tokio::time::timeout(WAIT, async {
        loop {
            let f = h2.next().await.expect("connection open");
            if f.kind == RST_STREAM {
                return (
                    f.stream,
                    u32::from_be_bytes(f.payload[..4].try_into().unwrap()),
                );
            }
        }
    })
    .await
    .expect("a stream over the cap is reset");
    assert_eq!(refused, (5, 0x7));
    w.api.slow_arrived(2).await;
    w.api.release_slow();
    let (mut done, mut goaways) = (0, 0);
    let started = tokio::time::Instant::now();
    let mut idle_from = None;
    tokio::time::timeout(WAIT, async {
        while let Some(f) = h2.next().await {
            if f.kind == DATA && f.flags & 1 == 1 {
                done += 1;
                idle_from = Some(tokio::time::Instant::now());
            }
            goaways += usize::from(f.kind == GOAWAY);
        }
    })
    .await
    .expect("the idle connection was closed");
    assert_eq!(done, 2, "both admitted streams were answered");
    // hyper's graceful close: a GOAWAY, a PING to measure the round trip, then
    // the final GOAWAY naming the last stream it took.
    assert!((1..=2).contains(&goaways), "closed with GOAWAY: {goaways}");
    // Not before idle_timeout had passed without a stream.
    let idle_from = idle_from.unwrap_or(started);
    assert!(idle_from.elapsed() >= Duration::from_millis(450));
    assert_eq!(w.api.count(), 2);
}

/// A raw HTTP/1.1 GET from `source`, read to the end (`Connection: close`).
async fn get_from(source: IpAddr, addr: SocketAddr, auth: Option<&str>) -> String {
    get_path_from(source, addr, "/gh/api/user", auth).await
}

/// [`get_from`] for another path.
async fn get_path_from(source: IpAddr, addr: SocketAddr, path: &str, auth: Option<&str>) -> String {
    let mut stream = support::net::connect_from(source, addr).await;
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    resp.lines().take_while(|l| !l.is_empty()).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// A proxy allowing 3 failed authentications a minute, with a caller's good
/// `Authorization` value and a well-formed forged one.
async fn limited_world(pool: PgPool) -> (World, String, String) {
    let w = world(
        pool,
        "",
        "auth_failure_limit = 3\nauth_failure_window = \"1m\"",
        "",
    )
    .await;
    let good = format!("Bearer {}", w.token);
    let (forged, _) = tokenproxy::proxy::caller::generate_token();
    let bad = format!("Bearer {}", secrecy::ExposeSecret::expose_secret(&forged));
    (w, good, bad)
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn failed_authentication_is_rate_limited_per_source_and_per_credential(pool: PgPool) {
    let (w, good, bad) = limited_world(pool).await;
    let addr = w.proxy.addr;
    // No credential at all is the protocol (git asks after a 401): never limited.
    for _ in 0..5 {
        let r = get_from(LOCAL2, addr, None).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    }
    for _ in 0..3 {
        let r = get_from(LOCAL, addr, Some(&bad)).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    }
    // The fourth failure in the window is answered 429 with Retry-After...
    let r = get_from(LOCAL, addr, Some(&bad)).await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    assert_eq!(header(&r, "tokenproxy-error"), Some("rate_limited"));
    let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // ...and so is every request from that source until the window ends.
    let r = get_from(LOCAL, addr, Some(&good)).await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    // Another source is served, but the same bad credential is limited anywhere.
    let r = get_from(LOCAL2, addr, Some(&good)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = get_from(LOCAL2, addr, Some(&bad)).await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    // Only the one good request from the other source reached the upstream.
    assert_eq!(w.api.count(), 1);
}

/// tokenproxy's own endpoints verify caller tokens as well: guessing there
/// counts against the same limit.
#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn failed_authentication_on_tokenproxys_own_endpoints_is_rate_limited(pool: PgPool) {
    let (w, good, bad) = limited_world(pool).await;
    let addr = w.proxy.addr;
    let links = "/_tokenproxy/links";
    for _ in 0..3 {
        let r = get_path_from(LOCAL, addr, links, Some(&bad)).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    }
    let r = get_path_from(LOCAL, addr, links, Some(&bad)).await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    assert_eq!(header(&r, "tokenproxy-error"), Some("rate_limited"));
    // The limited source is refused on the proxied paths too; another is served.
    let r = get_from(LOCAL, addr, Some(&good)).await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    let r = get_path_from(LOCAL2, addr, links, Some(&good)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_route_forwards_only_its_methods(pool: PgPool) {
    let w = world(pool, "", "", "methods = [\"GET\", \"PUT\"]").await;
    let auth = format!("Bearer {}", w.token);
    let h = [("authorization", auth.as_str())];
    let url = w.proxy.url("/gh/api/user");
    assert_eq!(get(&url, &h).await.status, 200);
    assert_eq!(send(Method::HEAD, &url, &h, Bytes::new()).await.status, 200);
    assert_eq!(send(Method::PUT, &url, &h, "x").await.status, 200);
    for m in [Method::POST, Method::DELETE, Method::PATCH] {
        let a = send(m, &url, &h, "x").await;
        a.assert_error(405, "bad_request");
        assert_eq!(a.headers["allow"], "GET, PUT, HEAD");
    }
    assert_eq!(
        w.api.count(),
        3,
        "refused methods never reached the upstream"
    );
    // A route without a list forwards them.
    let a = send(Method::POST, &w.proxy.url("/gh/open/user"), &h, "x").await;
    assert_eq!(a.status, 200);
    assert_eq!(w.api.count(), 4);
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn retry_buffers_share_one_memory_budget(pool: PgPool) {
    // Room for one 1000-byte body at a time.
    let w = world(pool, "retry_buffer_budget = 1500", "", "").await;
    let auth = format!("Bearer {}", w.token);
    let h = [("authorization", auth.as_str())];
    let hits = |path: &str| {
        w.api
            .requests()
            .iter()
            .filter(|r| r.target.ends_with(path))
            .count()
    };
    // One request holds its buffered body while the upstream holds it.
    let held = tokio::spawn({
        let (url, auth) = (w.proxy.url("/gh/api/slow"), auth.clone());
        async move {
            send(
                Method::POST,
                &url,
                &[("authorization", &auth)],
                vec![1u8; 1000],
            )
            .await
        }
    });
    w.api.slow_arrived(1).await;
    // Meanwhile a 401 cannot be retried: its body was not buffered.
    let a = send(
        Method::POST,
        &w.proxy.url("/gh/api/always401"),
        &h,
        vec![2u8; 1000],
    )
    .await;
    assert_eq!(a.status, 401);
    assert_eq!(hits("/always401"), 1, "sent once, not retried");
    assert_eq!(w.tokens.refresh_count(), 1, "the token was still replaced");
    w.api.release_slow();
    assert_eq!(held.await.unwrap().status, 200);
    // With the budget back, the same request is retried once with a new token.
    let a = send(
        Method::POST,
        &w.proxy.url("/gh/api/always401"),
        &h,
        vec![3u8; 1000],
    )
    .await;
    assert_eq!(a.status, 401);
    assert_eq!(hits("/always401"), 3, "first attempt and one retry");
    let last = w.api.requests().pop().unwrap();
    assert_eq!(last.body_len, 1000, "the retry carried the whole body");
}

#[test]
fn config_values_that_could_split_a_header_are_refused_naming_the_key() {
    let route = |extra: &str| {
        format!(
            "[[providers]]\nid = \"p\"\nclient_id = \"c\"\ntoken_url = \"https://idp.example/t\"\n\
             [[providers.routes]]\n{extra}\n"
        )
    };
    let cases = [
        (
            route("prefix = \"/p\"\nupstream = \"https://a.example\"\ninject = { basic_username = \"x\\r\\nX-Evil: 1\" }"),
            "providers[0].routes[0].inject.basic_username",
        ),
        (
            route("prefix = \"/p\\r\\nX-Evil: 1\"\nupstream = \"https://a.example\""),
            "providers[0].routes[0].prefix",
        ),
        (
            route("prefix = \"/p\"\nupstream = \"https://a.example\"\ninject = { header = \"X-A\\r\\nX-Evil\" }"),
            "providers[0].routes[0].inject.header",
        ),
        (
            route("prefix = \"/p\"\nupstream = \"https://a.example\\r\\n.com\""),
            "providers[0].routes[0].upstream",
        ),
        (
            route("prefix = \"/p\"\nupstream = \"https://a.example\"\nmethods = [\"GET\\r\\n\"]"),
            "providers[0].routes[0].methods[0]",
        ),
        (
            route("prefix = \"/p\"\nupstream = \"https://a.example\"\nmethods = [\"TRACE\"]"),
            "providers[0].routes[0].methods",
        ),
        (
            "[callers]\nauth_failure_window = \"0s\"\n".to_string(),
            "callers.auth_failure_window",
        ),
        (
            "[server]\nhttp2_max_concurrent_streams = 0\n".to_string(),
            "server.http2_max_concurrent_streams",
        ),
        (
            "[server]\nidle_timeout = \"0s\"\n".to_string(),
            "server.idle_timeout",
        ),
    ];
    for (toml, key) in cases {
        let err = tokenproxy::config::Config::from_toml_with_env(&toml, &[])
            .expect_err(&toml)
            .to_string();
        assert!(err.starts_with(&format!("{key}:")), "{key}: {err}");
        assert!(!err.contains(['\r', '\n']), "one line: {err:?}");
        assert!(!err.contains("X-Evil"), "the value is not echoed: {err}");
    }
}

/// Sends raw bytes and reads until the server closes (bounded by [`WAIT`]).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("hyper closes the connection after its own error answer");
    String::from_utf8_lossy(&out).into_owned()
}

/// What hyper itself answers before any tokenproxy code runs (README: "Errors
/// hyper produces itself"): a bare status, no JSON and no `tokenproxy-error`,
/// and the connection is closed. hyper gives no hook to replace these.
#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn hypers_own_errors_are_bare_statuses_and_close_the_connection(pool: PgPool) {
    let w = world(pool, "max_header_bytes = 16384", "", "").await;
    let addr = w.proxy.addr;
    let huge = format!(
        "GET /gh/api/user HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    for (what, bytes, status) in [
        ("unparseable request line", b"GARBAGE\r\n\r\n".to_vec(), 400),
        (
            "bad version",
            b"GET /gh/api/user HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        ("oversized head", huge.into_bytes(), 431),
        (
            "bad header name",
            b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n".to_vec(),
            400,
        ),
    ] {
        let resp = raw_exchange(addr, &bytes).await;
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {resp:?}"
        );
        assert!(
            header(&resp, "tokenproxy-error").is_none(),
            "{what}: {resp}"
        );
        assert_eq!(header(&resp, "content-length"), Some("0"), "{what}: {resp}");
        assert!(resp.ends_with("\r\n\r\n"), "{what}: no body: {resp:?}");
    }
    // A request line without a version is HTTP/0.9 to nobody: closed unanswered
    // or a 400, never forwarded.
    let resp = raw_exchange(addr, b"GET /gh/api/user\r\n\r\n").await;
    assert!(
        resp.is_empty() || resp.starts_with("HTTP/1.1 400 "),
        "{resp:?}"
    );
    assert_eq!(w.api.count(), 0, "nothing reached the upstream");
}
