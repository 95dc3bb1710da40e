//! Memory probe for `BENCHMARKS.md`: how much resident memory 100k entries cost in
//! each kind of cache `tokenproxy serve` keeps per link or caller, built the same
//! way (`quick_cache`, same key/value shapes), next to a plain `HashMap` holding the
//! same data and the moka caches they replaced (issue 7), kept as the "before"
//! reference. It explains where the RSS of the 100k-link measurement goes.
//! The `quick_cache` rows are built by `tokens::bounded_cache`, as the server's
//! are. Run: `cargo bench --bench memprobe` (`N=...` to change 100k).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Stand-in for the token cache's entry: a shared token string plus bookkeeping.
#[allow(dead_code)]
struct Entry {
    token: Arc<(String, Option<i64>)>,
    ahead_at_ms: i64,
    last_used_ms: i64,
    flags: [bool; 2],
    generation: u64,
    cached_at_ms: i64,
}

/// Stand-in for a verified caller as cached now: what the request path reads (the
/// hash is the key), two monotonic ticks and the last-use throttle's timestamp.
#[allow(dead_code)]
struct Verified {
    token_id: Uuid,
    user_id: Uuid,
    providers: Arc<[String]>,
    expires_at: Option<i64>,
    revoked: bool,
    loaded: u64,
    fresh_until: u64,
    touched_ms: std::sync::atomic::AtomicI64,
    first_source: Option<std::net::IpAddr>,
}

/// Stand-in for a verified caller as cached before: hash plus the whole record.
#[allow(dead_code)]
struct VerifiedBefore {
    hash: [u8; 32],
    id: Uuid,
    user_id: Uuid,
    name: String,
    providers: Vec<String>,
    times: [Option<i64>; 4],
}

fn entry(i: u64) -> Arc<Entry> {
    Arc::new(Entry {
        token: Arc::new((format!("gho_{i:036}"), Some(0))),
        ahead_at_ms: i64::MAX,
        last_used_ms: 0,
        flags: [false; 2],
        generation: 0,
        cached_at_ms: 0,
    })
}

fn verified(i: u64, empty: &Arc<[String]>) -> Arc<Verified> {
    Arc::new(Verified {
        token_id: Uuid::from_u128(i as u128),
        user_id: Uuid::from_u128(i as u128),
        providers: empty.clone(),
        expires_at: None,
        revoked: false,
        loaded: 0,
        fresh_until: 0,
        touched_ms: std::sync::atomic::AtomicI64::new(0),
        first_source: None,
    })
}

fn verified_before(i: u64) -> Arc<VerifiedBefore> {
    Arc::new(VerifiedBefore {
        hash: [i as u8; 32],
        id: Uuid::from_u128(i as u128),
        user_id: Uuid::from_u128(i as u128),
        name: "mem".into(),
        providers: Vec::new(),
        times: [None; 4],
    })
}

fn key32(i: u64) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_le_bytes());
    k
}

struct Expiry;
impl moka::Expiry<(u32, Uuid), Arc<Entry>> for Expiry {
    fn expire_after_create(
        &self,
        _k: &(u32, Uuid),
        _v: &Arc<Entry>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(3600))
    }
}

fn report(what: &str, n: u64, before: u64) {
    let after = rss_kib();
    let grew = after.saturating_sub(before);
    println!(
        "{what:<58} {:>7.1} MiB  {:>5} B/entry",
        grew as f64 / 1024.0,
        grew * 1024 / n
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: u64 = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    println!("{n} entries each; growth of VmRSS");

    let b = rss_kib();
    let m: HashMap<(u32, Uuid), Arc<Entry>> = (0..n)
        .map(|i| ((0, Uuid::from_u128(i as u128)), entry(i)))
        .collect();
    report(
        "HashMap<(u32, Uuid), Arc<Entry>> (same data, no cache)",
        n,
        b,
    );

    let b = rss_kib();
    let tokens: quick_cache::sync::Cache<(u32, Uuid), Arc<Entry>> =
        tokenproxy::tokens::bounded_cache(n);
    for i in 0..n {
        tokens.insert((0, Uuid::from_u128(i as u128)), entry(i));
    }
    report("token cache: quick_cache::sync (now)", n, b);

    let b = rss_kib();
    let empty: Arc<[String]> = Arc::from(Vec::new());
    let callers: quick_cache::sync::Cache<[u8; 32], Arc<Verified>> =
        tokenproxy::tokens::bounded_cache(n);
    for i in 0..n {
        callers.insert(key32(i), verified(i, &empty));
    }
    report(
        "verified-caller cache: quick_cache::sync, slim entry (now)",
        n,
        b,
    );

    println!("before (issue 7):");
    let b = rss_kib();
    let moka_tokens: moka::future::Cache<(u32, Uuid), Arc<Entry>> = moka::future::Cache::builder()
        .max_capacity(n)
        .expire_after(Expiry)
        .build();
    for i in 0..n {
        moka_tokens
            .insert((0, Uuid::from_u128(i as u128)), entry(i))
            .await;
    }
    moka_tokens.run_pending_tasks().await;
    report("token cache: moka::future, expire_after", n, b);

    let b = rss_kib();
    let moka_callers: moka::future::Cache<[u8; 32], Arc<VerifiedBefore>> =
        moka::future::Cache::builder()
            .max_capacity(n)
            .time_to_live(Duration::from_secs(3600))
            .build();
    for i in 0..n {
        moka_callers.insert(key32(i), verified_before(i)).await;
    }
    moka_callers.run_pending_tasks().await;
    report("verified-caller cache: moka::future, time_to_live", n, b);

    let b = rss_kib();
    let touched: moka::sync::Cache<Uuid, ()> = moka::sync::Cache::builder()
        .max_capacity(n)
        .time_to_live(Duration::from_secs(3600))
        .build();
    for i in 0..n {
        touched.insert(Uuid::from_u128(i as u128), ());
    }
    touched.run_pending_tasks();
    report(
        "last-use throttle: moka::sync<Uuid, ()> (now in the entry)",
        n,
        b,
    );

    println!(
        "(entries held: {} {} {} {} {} {})",
        m.len(),
        tokens.len(),
        callers.len(),
        moka_tokens.entry_count(),
        moka_callers.entry_count(),
        touched.entry_count()
    );
}
