//! Load generator for `bench/run`: the parts wrk cannot do.
//!
//! wrk measures closed-loop throughput well, but the benchmark also needs (a) a
//! fixed *open-loop* rate whose latencies are measured from the moment each request
//! was due (wrk2-style, so a stall is not hidden by the generator waiting for it),
//! (b) a refresh storm: N requests fired at the same instant over N already-open
//! connections, spread across several replicas, counting non-200 answers and the
//! wall time from the first send to the last answer, and (c) a warm-up that sends
//! one request per caller token from a file. It is a `harness = false` bench target
//! so it is built with the release profile and never by `cargo test`; `bench/run`
//! finds the executable with `cargo bench --bench loadgen --no-run`.
//!
//! Usage (prints one JSON object on stdout):
//!   loadgen rate  --rate R --duration SECS --connections C [-H 'Name: value']...
//!                 [--tokens FILE] [--source IP] URL
//!                 (--tokens: request k sends token k mod n of FILE as Bearer;
//!                 --source: connect from that local address, e.g. 127.0.0.2, so a
//!                 flood is another client to per-source limits)
//!   loadgen storm --n N [-H 'Name: value']... URL [URL...]
//!   loadgen warm  --tokens FILE --concurrency C URL
//!   loadgen sink  --listen ADDR      (an upstream that reads and discards bodies)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

type Headers = Vec<(String, String)>;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some((mode, rest)) = args.split_first() else {
        eprintln!("usage: loadgen rate|storm|warm|sink ... (see bench/loadgen.rs)");
        return;
    };
    let opts = Opts::parse(rest);
    match mode.as_str() {
        "rate" => rate(&opts).await,
        "storm" => storm(&opts).await,
        "warm" => warm(&opts).await,
        "sink" => sink(&opts).await,
        other => {
            eprintln!("loadgen: unknown mode {other}");
            std::process::exit(64);
        }
    }
}

/// Parsed command line: named options, repeated headers, positional URLs.
struct Opts {
    named: Vec<(String, String)>,
    headers: Headers,
    urls: Vec<Uri>,
}

impl Opts {
    fn parse(args: &[String]) -> Self {
        let mut named = Vec::new();
        let mut headers = Vec::new();
        let mut urls = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "-H" {
                let h = it.next().expect("-H needs a value");
                let (n, v) = h.split_once(':').expect("header is Name: value");
                headers.push((n.trim().to_string(), v.trim().to_string()));
            } else if let Some(name) = a.strip_prefix("--") {
                let v = it
                    .next()
                    .unwrap_or_else(|| panic!("--{name} needs a value"));
                named.push((name.to_string(), v.clone()));
            } else {
                urls.push(a.parse().expect("a URL like http://127.0.0.1:8080/path"));
            }
        }
        Self {
            named,
            headers,
            urls,
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.named
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn num(&self, name: &str, default: f64) -> f64 {
        self.get(name)
            .map(|v| v.parse().expect("a number"))
            .unwrap_or(default)
    }
}

/// One HTTP/1.1 keep-alive connection to `uri`'s authority.
async fn connect(uri: &Uri) -> std::io::Result<SendRequest<Empty<Bytes>>> {
    connect_from(uri, None).await
}

/// [`connect`] from the local address `source` when given.
async fn connect_from(
    uri: &Uri,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<SendRequest<Empty<Bytes>>> {
    let authority = uri.authority().expect("URL has host:port").as_str();
    let stream = match source {
        None => TcpStream::connect(authority).await?,
        Some(ip) => {
            let addr = tokio::net::lookup_host(authority)
                .await?
                .next()
                .ok_or_else(|| std::io::Error::other("no address"))?;
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(std::net::SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

fn request(uri: &Uri, headers: &Headers) -> Request<Empty<Bytes>> {
    let mut b = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, uri.authority().expect("host").as_str());
    for (n, v) in headers {
        b = b.header(n.as_str(), v.as_str());
    }
    b.body(Empty::new()).expect("valid request")
}

/// Sends one request and reads the whole answer; the status, or 0 on a transport error.
async fn send(sender: &mut SendRequest<Empty<Bytes>>, req: Request<Empty<Bytes>>) -> u16 {
    if sender.ready().await.is_err() {
        return 0;
    }
    match sender.send_request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match resp.into_body().collect().await {
                Ok(_) => status,
                Err(_) => 0,
            }
        }
        Err(_) => 0,
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Open-loop fixed rate: connection `c` of `C` sends request `k` at
/// `start + (k*C + c)/rate`; a request held back by a slow previous answer is
/// measured from its due time, as wrk2 does.
async fn rate(o: &Opts) {
    let rate = o.num("rate", 1000.0);
    let duration = Duration::from_secs_f64(o.num("duration", 10.0));
    let conns = o.num("connections", 16.0) as usize;
    let uri = o.urls.first().expect("a URL").clone();
    let headers = Arc::new(o.headers.clone());
    let tokens: Arc<Vec<String>> = Arc::new(match o.get("tokens") {
        Some(file) => std::fs::read_to_string(file)
            .expect("read --tokens")
            .lines()
            .map(str::to_string)
            .collect(),
        None => Vec::new(),
    });
    let source = o.get("source").map(|s| s.parse().expect("--source IP"));
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let start = Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let mut sender = connect_from(&uri, source).await.expect("connect");
        let (uri, headers, tokens) = (uri.clone(), headers.clone(), tokens.clone());
        let offset = Duration::from_secs_f64(c as f64 / rate);
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut non2xx, mut errors) = (Vec::new(), 0u64, 0u64);
            let mut due = start + offset;
            let mut k = c;
            while due < start + duration {
                let mut req = request(&uri, &headers);
                if !tokens.is_empty() {
                    let bearer = format!("Bearer {}", tokens[k % tokens.len()]);
                    req.headers_mut()
                        .insert(http::header::AUTHORIZATION, bearer.parse().expect("token"));
                    k += conns;
                }
                // If the previous answer came after this request was due, the wait
                // counts (no coordinated omission): measure from `due`. Otherwise
                // measure from the actual send, so the timer's ~1 ms granularity is
                // not charged to the server.
                let late = Instant::now() >= due;
                tokio::time::sleep_until(due).await;
                let t0 = if late { due } else { Instant::now() };
                let status = send(&mut sender, req).await;
                lat.push(t0.elapsed().as_micros() as u64);
                if status == 0 {
                    // A closed connection (a flood answered and dropped): reopen it,
                    // so the offered rate holds.
                    if let Ok(s) = connect_from(&uri, source).await {
                        sender = s;
                    }
                }
                match status {
                    0 => errors += 1,
                    200..=299 => {}
                    _ => non2xx += 1,
                }
                due += interval;
            }
            (lat, non2xx, errors)
        }));
    }
    let (mut lat, mut non2xx, mut errors) = (Vec::new(), 0, 0);
    for t in tasks {
        let (l, n, e) = t.await.expect("task");
        lat.extend(l);
        non2xx += n;
        errors += e;
    }
    lat.sort_unstable();
    println!(
        "{{\"target_rps\":{rate},\"sent\":{},\"non2xx\":{non2xx},\"errors\":{errors},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}",
        lat.len(),
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        percentile(&lat, 99.9),
        lat.last().copied().unwrap_or(0)
    );
}

/// `n` connections opened first (round-robin over the URLs), then one request on
/// each, all released at the same instant.
async fn storm(o: &Opts) {
    let n = o.num("n", 1000.0) as usize;
    let headers = Arc::new(o.headers.clone());
    let mut senders = Vec::with_capacity(n);
    for i in 0..n {
        let uri = o.urls[i % o.urls.len()].clone();
        senders.push((connect(&uri).await.expect("connect"), uri));
    }
    let gate = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for (mut sender, uri) in senders {
        let (gate, headers) = (gate.clone(), headers.clone());
        tasks.push(tokio::spawn(async move {
            let req = request(&uri, &headers);
            gate.wait().await;
            let status = send(&mut sender, req).await;
            (status, Instant::now())
        }));
    }
    gate.wait().await;
    let start = Instant::now();
    let (mut non200, mut last, mut lat) = (0u64, start, Vec::with_capacity(n));
    for t in tasks {
        let (status, done) = t.await.expect("task");
        if status != 200 {
            non200 += 1;
        }
        last = last.max(done);
        lat.push(done.saturating_duration_since(start).as_micros() as u64);
    }
    lat.sort_unstable();
    println!(
        "{{\"n\":{n},\"non200\":{non200},\"wall_ms\":{:.1},\"p50_ms\":{:.1}}}",
        (last - start).as_secs_f64() * 1e3,
        percentile(&lat, 50.0) as f64 / 1e3
    );
}

/// One request per token in `--tokens` (one per line), `--concurrency` at a time,
/// each token sent as `Authorization: Bearer <token>`.
async fn warm(o: &Opts) {
    let file = o.get("tokens").expect("--tokens FILE");
    let text = std::fs::read_to_string(file).expect("read tokens");
    let tokens: Arc<Vec<String>> = Arc::new(text.lines().map(str::to_string).collect());
    let conc = o.num("concurrency", 64.0) as usize;
    let uri = o.urls.first().expect("a URL").clone();
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (tokens, next, uri) = (tokens.clone(), next.clone(), uri.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&uri).await.expect("connect");
            let (mut ok, mut bad) = (0u64, 0u64);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(tok) = tokens.get(i) else { break };
                let auth = vec![("Authorization".to_string(), format!("Bearer {tok}"))];
                if send(&mut sender, request(&uri, &auth)).await == 200 {
                    ok += 1;
                } else {
                    bad += 1;
                    sender = connect(&uri).await.expect("reconnect");
                }
            }
            (ok, bad)
        }));
    }
    let (mut ok, mut bad) = (0, 0);
    for t in tasks {
        let (a, b) = t.await.expect("task");
        ok += a;
        bad += b;
    }
    println!(
        "{{\"requests\":{},\"ok\":{ok},\"non200\":{bad},\"secs\":{:.1}}}",
        tokens.len(),
        started.elapsed().as_secs_f64()
    );
}

/// An upstream that reads every request body to the end, discards it, and answers
/// 200 with the number of bytes it received.
async fn sink(o: &Opts) {
    let addr = o.get("listen").unwrap_or("127.0.0.1:18085");
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let mut body = req.into_body();
                    let mut n = 0u64;
                    while let Some(frame) = body.frame().await {
                        if let Ok(data) = frame?.into_data() {
                            n += data.len() as u64;
                        }
                    }
                    Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                        Bytes::from(format!("{n}\n")),
                    )))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
