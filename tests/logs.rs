//! The real `tokenproxy serve` binary's log (issue 15): every request's access
//! line reaches stderr, the lines written just before exit are not lost in the
//! non-blocking writer's buffer, and a stderr nobody reads costs log lines
//! (counted in `tokenproxy_log_lines_dropped_total`), never requests.

#[path = "support/child.rs"]
#[allow(dead_code)] // only `listening_addrs` and the start timeout are used here
mod child;
#[path = "support/db.rs"]
mod db;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use sqlx::PgPool;

const BIN: &str = env!("CARGO_BIN_EXE_tokenproxy");

/// How long one request may take: far more than a loaded machine needs, far
/// less than "blocked until somebody reads stderr".
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A config with both listeners on port 0 and JSON logs. The tests' requests
/// carry no credential: each answers 401 `unauthenticated`, which is logged like
/// any other and never counts towards the failed-authentication limit.
fn config(dir: &Path, db: &str) -> std::path::PathBuf {
    let path = dir.join("tokenproxy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n[database]\nurl = \"{db}\"\nacquire_timeout = \"1s\"\n\n[logging]\nformat = \"json\"\n"
        ),
    )
    .unwrap();
    path
}

/// A `serve` child that a failing test kills, so it never outlives the test
/// (and keeps the test database, which `sqlx::test` then cannot drop).
struct Serve(Option<Child>);

impl Serve {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("not yet waited for")
    }

    /// Waits for the exit, at most 20 s.
    async fn wait(&mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().expect("not yet waited for");
        tokio::time::timeout(
            Duration::from_secs(20),
            tokio::task::spawn_blocking(move || child.wait().unwrap()),
        )
        .await
        .expect("serve exits within 20 s")
        .unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `tokenproxy serve` with a cleared environment plus `env`, stderr piped.
fn spawn(config: &Path, env: &[(&str, &str)]) -> Child {
    Command::new(BIN)
        .env_clear()
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .arg("--config")
        .arg(config)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Reads `stderr` until the `listening` line and returns its addresses with the
/// reader, which is then left alone (nobody reads the pipe any more).
fn read_until_listening(stderr: ChildStderr) -> ((SocketAddr, SocketAddr), BufReader<ChildStderr>) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stderr);
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                panic!("serve closed stderr without a `listening` line");
            }
            if let Some(addrs) = child::listening_addrs(&line) {
                let _ = tx.send((addrs, reader));
                return;
            }
        }
    });
    rx.recv_timeout(child::START_TIMEOUT)
        .expect("a `listening` line")
}

/// Every line of the rest of `reader`, read on a thread until the child closes it.
fn collect_rest(reader: BufReader<ChildStderr>) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || reader.lines().map_while(Result::ok).collect())
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GETs `url` and returns the status and body, failing after [`ANSWER_TIMEOUT`].
async fn get(client: &HttpClient, url: &str) -> (u16, String) {
    let exchange = async {
        let resp = client.get(url.parse().unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer from {url} within {ANSWER_TIMEOUT:?}"))
}

/// The value of the unlabelled sample `name` in a `/metrics` text.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn terminate(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// The JSON objects among `lines` (the log is JSON; anything else fails the test).
fn parse(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON line: {l}")))
        .collect()
}

#[sqlx::test(migrations = false)]
async fn every_request_is_logged_and_the_shut_down_line_survives_the_exit(pool: PgPool) {
    // Nobody reads stderr until after SIGTERM, so the pipe (64 KiB) fills and
    // the last few hundred lines, `shut down` among them, are still in the log's
    // buffer when `serve` returns: they reach stderr only if the exit waits for
    // the writer to drain (a leaked or forgotten guard loses them every time).
    const N: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve(Some(spawn(&config(dir.path(), &db::db_url(&pool)), &[])));
    let ((addr, admin), unread) = read_until_listening(serve.child().stderr.take().unwrap());

    let client = client();
    for i in 0..N {
        let (status, _) = get(&client, &format!("http://{addr}/nowhere/{i}")).await;
        assert_eq!(status, 401);
    }
    let (status, metrics) = get(&client, &format!("http://{admin}/metrics")).await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(&metrics, "tokenproxy_log_lines_dropped_total"),
        Some(0.0),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE tokenproxy_log_lines_dropped_total counter\n"));

    terminate(serve.child());
    // Well within the second the writer is given to drain at exit, and well
    // after a drain with nothing in flight has finished.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rest = collect_rest(unread);
    let exit = serve.wait().await;
    let lines = parse(&rest.join().unwrap());
    let tail = &lines[lines.len().saturating_sub(3)..];
    assert!(exit.success(), "serve exited with {exit}: {tail:?}");
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "tokenproxy::access")
        .collect();
    assert_eq!(
        access.len(),
        N,
        "one access line per request; last: {tail:?}"
    );
    for (i, line) in access.iter().enumerate() {
        assert_eq!(line["status"], 401);
        assert_eq!(line["error"], "unauthenticated", "line {i}: {line}");
    }
    assert_eq!(
        lines.last().map(|l| &l["message"]),
        Some(&serde_json::json!("shut down")),
        "the last line written before exit is there: {tail:?}"
    );
}

#[test]
fn an_error_exit_after_logging_began_keeps_the_log_and_its_one_line_reason() {
    let dir = tempfile::tempdir().unwrap();
    // No database answers there: `serve` has warned (through the log) about the
    // empty config, then fails on the store and exits 69 with one line.
    let config = config(dir.path(), "postgres://postgres@127.0.0.1:1/nothing");
    let out = spawn(&config, &[]).wait_with_output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(69), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    let (reason, log) = lines.split_last().expect("serve said something");
    assert!(
        reason.starts_with("tokenproxy: ") && reason.contains("database unavailable"),
        "the one-line reason comes last: {err}"
    );
    let log = parse(&log.iter().map(|l| l.to_string()).collect::<Vec<_>>());
    let messages: Vec<&str> = log.iter().filter_map(|l| l["message"].as_str()).collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("encryption.keys is empty")),
        "the log written before the failure is flushed first: {err}"
    );
}

#[sqlx::test(migrations = false)]
async fn a_stderr_nobody_reads_drops_log_lines_and_never_holds_up_a_request(pool: PgPool) {
    // A pipe holds 64 KiB (a few hundred access lines) and the log buffer 8
    // lines; everything past that must be dropped and counted, not waited for.
    const N: usize = 1500;
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve(Some(spawn(
        &config(dir.path(), &db::db_url(&pool)),
        &[("TOKENPROXY_LOG_BUFFER_LINES", "8")],
    )));
    let ((addr, admin), unread) = read_until_listening(serve.child().stderr.take().unwrap());

    let client = client();
    for i in 0..N {
        let (status, _) = get(&client, &format!("http://{addr}/nowhere/{i}")).await;
        assert_eq!(status, 401, "request {i}");
    }
    let (_, metrics) = get(&client, &format!("http://{admin}/metrics")).await;
    let dropped = sample(&metrics, "tokenproxy_log_lines_dropped_total").expect("exported");
    // At most a pipe's worth plus the buffer got through; the rest was dropped.
    assert!(
        dropped >= (N - 600) as f64,
        "dropped {dropped} of {N} lines"
    );
    assert!(dropped <= (N + 20) as f64, "dropped {dropped} of {N} lines");

    // Stopping does not hang on the full pipe either (the flush gives up).
    terminate(serve.child());
    let exit = serve.wait().await;
    drop(unread);
    assert!(exit.success(), "serve exited with {exit}");
}
