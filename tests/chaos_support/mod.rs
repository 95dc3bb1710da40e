//! Parts of the chaos suite (`tests/chaos.rs`): a PostgreSQL cluster it may stop,
//! a latency relay in front of it, `tokenproxy serve` replicas as child processes,
//! the traffic client and the tallies printed in the summary.
#![allow(dead_code)]

pub mod cluster;
pub mod faults;
pub mod relay;
pub mod replica;
pub mod report;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// The HTTP client of the traffic: pooled keep-alive connections, as a real
/// caller would hold them (a replica's restart cuts them).
pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A new traffic client.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http()
}

/// The status of a GET to `url` (no credentials), `None` if it failed.
pub async fn http_status(url: &str) -> Option<u16> {
    let req = http::Request::get(url).body(Empty::new()).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), client().request(req)).await;
    Some(answer.ok()?.ok()?.status().as_u16())
}

/// How one proxied request ended, as the summary counts it: `"200"`,
/// `"502 idp_unavailable"` (status and `tokenproxy-error`), `"connect"`
/// (the replica was down), `"cut"` (connection lost mid-request), `"timeout"`.
pub async fn call(client: &HttpClient, url: &str, proxy_token: &str, bound: Duration) -> String {
    let req = http::Request::get(url)
        .header("authorization", format!("Bearer {proxy_token}"))
        .body(Empty::new())
        .unwrap();
    let sent = async {
        let resp = client.request(req).await.map_err(|e| {
            if e.is_connect() {
                "connect".to_string()
            } else {
                "cut".to_string()
            }
        })?;
        let status = resp.status().as_u16();
        let code = resp
            .headers()
            .get("tokenproxy-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // Read the body: the upstream's answer is only complete with it.
        resp.into_body()
            .collect()
            .await
            .map_err(|_| "cut".to_string())?;
        Ok::<_, String>(match code {
            Some(code) => format!("{status} {code}"),
            None => status.to_string(),
        })
    };
    match tokio::time::timeout(bound, sent).await {
        Ok(Ok(outcome)) | Ok(Err(outcome)) => outcome,
        Err(_) => "timeout".into(),
    }
}

/// Counts by name, printed sorted.
#[derive(Default, Debug, Clone)]
pub struct Counts(pub BTreeMap<String, u64>);

impl Counts {
    /// Adds one to `key`.
    pub fn add(&mut self, key: &str) {
        *self.0.entry(key.to_string()).or_default() += 1;
    }

    /// The count of `key`.
    pub fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }

    /// All counts together.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// `  key  count` lines under `title`.
    pub fn table(&self, title: &str) -> String {
        let mut out = format!("{title}\n");
        for (k, v) in &self.0 {
            out.push_str(&format!("  {k:<32} {v:>8}\n"));
        }
        out.push_str(&format!("  {:<32} {:>8}\n", "total", self.total()));
        out
    }
}
