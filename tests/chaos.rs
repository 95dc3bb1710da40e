//! The chaos suite: three real `tokenproxy serve` processes on one PostgreSQL, a
//! rotating IdP whose access tokens live 10 s, a verifying upstream and 24 users
//! with concurrent traffic, while replicas are SIGTERMed and SIGKILLed and started
//! again, PostgreSQL is stopped and started, the database connection gets 1–3 s of
//! latency and the IdP fails (5xx, 429, hangs, slow answers) at random.
//!
//! Afterwards, with every fault undone: every link still refreshes (each user is
//! forced through an expired token on every replica and gets 200 from the upstream,
//! which checks the token with the IdP); the IdP saw no refresh token presented
//! twice; no request got `reauth_required`. The one loss a crash is allowed is a
//! SIGKILL between the provider's answer and the write: such a link (its last
//! issued refresh token was never presented or stored, and the replica that got it
//! was SIGKILLed within a lease of it) is reported apart and excused from those
//! checks, but a lost link no SIGKILL explains fails the suite.
//!
//! `CHAOS_MINUTES` (default 2, what CI runs) sets the chaos window; `CHAOS_SEED`
//! replays a fault schedule (the seed is printed at the start and on failure).
//! From 10 minutes on it is a soak: replica 0 is never signalled, every replica's
//! RSS is sampled each minute, and replica 0's may grow at most 10% over its
//! sample at the end of minute 3 (the warm-up: caches, pools and allocator arenas
//! fill in the first minutes).

mod chaos_support;
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chaos_support::cluster::PgCluster;
use chaos_support::faults::{self, FaultEvent, Plan};
use chaos_support::relay::Relay;
use chaos_support::replica::Replica;
use chaos_support::report::{Lost, Report, Traffic};
use chaos_support::{call, client};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use secrecy::ExposeSecret;
use support::idp::{Idp, IdpOptions};
use support::upstream::{CredentialForm, TestUpstream};
use tokenproxy::config::Config;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{LinkStore, NewProxyToken};
use tokio::time::Instant;
use uuid::Uuid;

const USERS: usize = 24;
const REPLICAS: usize = 3;
const WORKERS: usize = 8;
const PROVIDER: &str = "idp";
const TOKEN_LIFETIME: Duration = Duration::from_secs(10);
/// `tokens.lease_timeout` of the replicas: also how long after an answer its write
/// may still be running (the window a SIGKILL can cut).
const LEASE: Duration = Duration::from_secs(30);
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// One request may wait out a whole exchange budget (lease minus reserve) and more.
const REQUEST_BOUND: Duration = Duration::from_secs(40);
/// Soak runs (at least this many minutes) spare replica 0 and assert its RSS.
const SOAK_MINUTES: f64 = 10.0;

struct User {
    id: Uuid,
    token: String,
}

/// Prints the seed again if the test panics, so a failure can be replayed.
struct SeedOnPanic(u64);

impl Drop for SeedOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "chaos: FAILED with CHAOS_SEED={} (replay with that)",
                self.0
            );
        }
    }
}

fn settings() -> (u64, f64) {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .map(|s| s.parse().expect("CHAOS_SEED is a u64"))
        .unwrap_or_else(rand::random);
    let minutes = std::env::var("CHAOS_MINUTES")
        .ok()
        .map(|s| s.parse().expect("CHAOS_MINUTES is a number"))
        .unwrap_or(2.0);
    (seed, minutes)
}

fn replica_config(idx: usize, env: &Env) -> String {
    // Skew 1 s against 10 s tokens: a token is refreshed (ahead, or on the request
    // path) every ~8 s per user. The `replica=N` query tags each grant at the IdP.
    // Port 0: each process announces the ports it bound (see `Replica::start`).
    format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "5s"

[database]
url = "postgres://postgres@127.0.0.1:{db}/postgres"
migrate_on_start = false
max_connections = 8
acquire_timeout = "5s"
listen_check_interval = "2s"

[encryption]
keys = ["env:TOKENPROXY_KEY"]

[tokens]
refresh_skew = "1s"
lease_timeout = "{lease}s"
cache_max_age = "20s"
reject_cooldown = "5s"

[[providers]]
id = "{PROVIDER}"
client_id = "test-client"
client_secret = "test-secret"
token_url = "{idp}?replica={idx}"
timeout = "3s"

[[providers.routes]]
prefix = "/api"
upstream = "{upstream}"
"#,
        db = env.relay.port,
        lease = LEASE.as_secs(),
        idp = env.idp.token_url(),
        upstream = env.upstream.url(),
    )
}

/// Everything the run holds.
struct Env {
    pg: PgCluster,
    relay: Relay,
    idp: Arc<Idp>,
    upstream: TestUpstream,
    store: PgStore,
    users: Arc<Vec<User>>,
}

async fn setup(seed: u64) -> Env {
    let pg = tokio::task::block_in_place(PgCluster::start);
    let relay = Relay::start(pg.port).await;
    let cfg = Config::from_toml_with_env(
        &format!(
            "[database]\nurl = \"{}\"\n[encryption]\nkeys = [\"env:TOKENPROXY_KEY\"]\n",
            pg.url_via(pg.port)
        ),
        &[("TOKENPROXY_KEY".into(), KEY.into())],
    )
    .unwrap();
    let store = PgStore::from_config(&cfg).unwrap();
    store.migrate().await.unwrap();
    let idp = Arc::new(
        Idp::start(IdpOptions {
            expires_in: Some(TOKEN_LIFETIME),
            ..IdpOptions::default()
        })
        .await,
    );
    let check = {
        let idp = idp.clone();
        Arc::new(move |t: &str| idp.is_valid_access_token(t))
    };
    let upstream = TestUpstream::start(CredentialForm::Bearer, check).await;
    let mut users = Vec::new();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7573_6572);
    for _ in 0..USERS {
        let id = Uuid::new_v4();
        // Spread the first expiries over a token's lifetime, as logins would, so
        // the refreshes do not all fall due in the same second.
        let spread = chrono::Duration::milliseconds(rng.random_range(2_000..=10_000));
        let tokens = idp.seed_with_expiry(id, Some(chrono::Utc::now() + spread));
        store.put_link(PROVIDER, id, &tokens).await.unwrap();
        let (token, hash) = tokenproxy::proxy::caller::generate_token();
        store
            .create_proxy_token(&NewProxyToken {
                user_id: id,
                name: "chaos".into(),
                hash,
                providers: vec![],
                expires_at: None,
            })
            .await
            .unwrap();
        let token = token.expose_secret().to_string();
        users.push(User { id, token });
    }
    Env {
        pg,
        relay,
        idp,
        upstream,
        store,
        users: Arc::new(users),
    }
}

fn start_traffic(
    env: &Env,
    addrs: &[chaos_support::replica::Current],
    seed: u64,
) -> (Arc<Traffic>, Vec<tokio::task::JoinHandle<()>>) {
    let traffic = Arc::new(Traffic::default());
    let workers = (0..WORKERS)
        .map(|w| {
            let (traffic, users, addrs) = (traffic.clone(), env.users.clone(), addrs.to_vec());
            let mut rng = StdRng::seed_from_u64(seed ^ (0x7472_6166 + w as u64));
            tokio::spawn(async move {
                let client = client();
                while !traffic.stop.load(Ordering::SeqCst) {
                    let u = rng.random_range(0..users.len());
                    // Read at each request: a restarted replica listens elsewhere.
                    let addr = *addrs[rng.random_range(0..addrs.len())].read();
                    let url = format!("http://{addr}/api/user");
                    let outcome = call(&client, &url, &users[u].token, REQUEST_BOUND).await;
                    if outcome == "403 reauth_required" {
                        *traffic.reauth.lock().entry(u).or_default() += 1;
                    }
                    traffic.outcomes.lock().add(&outcome);
                    let pause = rng.random_range(20..=80);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            })
        })
        .collect();
    (traffic, workers)
}

/// (minute, replica, pid, VmRSS KiB) samples.
type RssSamples = Arc<Mutex<Vec<(u32, usize, u32, u64)>>>;

fn start_rss_sampler(pids: Arc<Vec<AtomicU32>>, stop: Arc<AtomicBool>) -> RssSamples {
    let samples: RssSamples = Arc::default();
    let out = samples.clone();
    tokio::spawn(async move {
        let start = Instant::now();
        for minute in 1.. {
            tokio::time::sleep_until(start + Duration::from_secs(60 * u64::from(minute))).await;
            if stop.load(Ordering::SeqCst) {
                return;
            }
            for (idx, pid) in pids.iter().enumerate() {
                let pid = pid.load(Ordering::SeqCst);
                let status = std::fs::read_to_string(format!("/proc/{pid}/status"));
                let rss = status.ok().and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                });
                if let (true, Some(kib)) = (pid != 0, rss) {
                    out.lock().push((minute, idx, pid, kib));
                }
            }
        }
    });
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn links_survive_restarts_crashes_outages_and_slow_databases() {
    let (seed, minutes) = settings();
    let _seed = SeedOnPanic(seed);
    eprintln!("chaos: CHAOS_SEED={seed} CHAOS_MINUTES={minutes}");
    let env = setup(seed).await;
    let mut dir = tempfile::tempdir().unwrap();
    if std::env::var_os("CHAOS_KEEP").is_some() {
        // The replicas' whole logs, kept for a post-mortem.
        dir.disable_cleanup(true);
        eprintln!("chaos: logs kept in {}", dir.path().display());
    }
    let key_env = vec![("TOKENPROXY_KEY".to_string(), KEY.to_string())];
    let mut replicas: Vec<Replica> = (0..REPLICAS)
        .map(|i| Replica::new(i, dir.path(), key_env.clone(), &replica_config(i, &env)))
        .collect();
    for r in &mut replicas {
        r.start().await;
    }
    let pids: Arc<Vec<AtomicU32>> = Arc::new(
        replicas
            .iter()
            .map(|r| AtomicU32::new(r.pid().unwrap()))
            .collect(),
    );
    let handles: Vec<_> = replicas.iter().map(Replica::proxy_handle).collect();
    let (traffic, workers) = start_traffic(&env, &handles, seed);
    let rss_stop = Arc::new(AtomicBool::new(false));
    let rss = start_rss_sampler(pids.clone(), rss_stop.clone());
    let log = Mutex::new(Vec::new());
    let start = Instant::now();
    let plan = Plan {
        start,
        end: start + Duration::from_secs_f64(minutes * 60.0),
        spare_replica0: minutes >= SOAK_MINUTES,
        drain_bound: Duration::from_secs(5) + LEASE + Duration::from_secs(20),
        log: &log,
    };
    let process_rng = StdRng::seed_from_u64(seed);
    let network_rng = StdRng::seed_from_u64(seed.rotate_left(32) ^ 0x6e65_7477);
    let (lane, ()) = tokio::join!(
        faults::process_lane(process_rng, &mut replicas, &pids, &env.pg, &plan),
        faults::network_lane(network_rng, &env.relay, &env.idp, &plan),
    );
    let dump_logs = |replicas: &[Replica]| {
        for r in replicas {
            eprintln!("{}", r.log_tail(40));
        }
    };
    if let Err(e) = lane {
        dump_logs(&replicas);
        panic!("{e}");
    }
    eprintln!(
        "chaos: t+{:.1}s faults over; waiting for every replica's /readyz",
        plan.at()
    );
    heal(&replicas).await;
    eprintln!("chaos: t+{:.1}s healed; checking every link", plan.at());
    traffic.stop.store(true, Ordering::SeqCst);
    rss_stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let log = log.into_inner();
    let logs: Vec<std::path::PathBuf> = replicas.iter().map(|r| r.log_path().to_owned()).collect();
    let lost = classify(&env, &log, &logs).await;
    // Every replica is running (healed), on the ports its last start announced.
    let addrs: Vec<SocketAddr> = replicas.iter().map(Replica::addr).collect();
    let refreshed = force_refresh_all(&env, &addrs, &lost).await;
    let report = Report {
        seed,
        minutes,
        log: &log,
        traffic: &traffic,
        lost: &lost,
        refreshed: &refreshed,
        rss: &rss.lock(),
        soak: minutes >= SOAK_MINUTES,
        idp: &env.idp,
        users: &env.users.iter().map(|u| u.id).collect::<Vec<_>>(),
        replicas: REPLICAS,
    };
    let failures = report.print_and_check();
    if !failures.is_empty() {
        dump_logs(&replicas);
        panic!(
            "chaos found {} problem(s):\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

/// Waits until every replica's store answers again (bounded: a replica may still
/// be finishing an exchange that hung until its budget ended, ~25 s).
async fn heal(replicas: &[Replica]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    for r in replicas {
        while !r.ready().await {
            assert!(
                Instant::now() < deadline,
                "replica {} not ready 90 s after the faults ended\n{}",
                r.idx,
                r.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Finds the links whose row lost the IdP's newest refresh token. A write still in
/// flight lands within a round trip once the faults are off, so a mismatch must
/// last 10 s to count.
async fn classify(env: &Env, log: &[FaultEvent], logs: &[std::path::PathBuf]) -> Vec<Lost> {
    let mut pending: Vec<usize> = (0..env.users.len()).collect();
    let mut stale = HashMap::new();
    for _ in 0..20 {
        let mut still = Vec::new();
        for u in pending {
            let id = env.users[u].id;
            let link = env.store.get_link(PROVIDER, id).await.unwrap().unwrap();
            let row = link.refresh_token.expose_secret().to_string();
            if env.idp.current_refresh_token(id).as_deref() != Some(row.as_str()) {
                stale.insert(u, row);
                still.push(u);
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    pending
        .into_iter()
        .map(|u| explain(env, log, logs, u, stale.remove(&u).unwrap_or_default()))
        .collect()
}

/// What the IdP and the fault log say about user `u`'s lost link.
fn explain(
    env: &Env,
    log: &[FaultEvent],
    logs: &[std::path::PathBuf],
    u: usize,
    stale: String,
) -> Lost {
    let dropped = env.idp.current_refresh_token(env.users[u].id);
    let issued = dropped.as_deref().and_then(|t| env.idp.issued_at(t));
    let by = dropped.as_deref().and_then(|t| env.idp.issued_by(t));
    let replica = by
        .as_deref()
        .and_then(|q| q.strip_prefix("replica="))
        .and_then(|n| n.parse::<usize>().ok());
    let explained_by = log
        .iter()
        .find(|e| {
            let (Some(issued), Some(r)) = (issued, replica) else {
                return false;
            };
            // The request may be in flight when the kill lands (issued just
            // after it), or the answer waits for its write (within a lease).
            e.kind == "SIGKILL + restart"
                && e.replica == Some(r)
                && e.at + Duration::from_secs(1) >= issued
                && e.at <= issued + LEASE
                // Only the window before the write committed: a kill after the
                // replica logged the token as stored excuses nothing (the row
                // lost an acknowledged write).
                && !stored_before(&logs[r], env.users[u].id, issued, e.at)
        })
        .cloned();
    let presented = dropped.as_deref().map_or(0, |t| env.idp.attempts_with(t));
    // For an unexplained loss: the process fault of that replica nearest the grant.
    let nearest = log
        .iter()
        .filter(|e| e.replica.is_some() && e.replica == replica)
        .filter_map(|e| {
            let issued = issued?;
            let gap = e.at.checked_duration_since(issued);
            let gap = gap.map_or_else(|| format!("-{:?}", issued - e.at), |d| format!("{d:?}"));
            let dist = e.at.max(issued) - e.at.min(issued);
            Some((dist, format!("{} {gap} after the grant", e.kind)))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, what)| what);
    Lost {
        user: u,
        stale,
        explained_by,
        issued,
        detail: format!(
            "newest refresh token issued to {by:?}, presented {presented} time(s), never stored (nearest fault of that replica: {nearest:?})"
        ),
    }
}

/// Whether replica log `path` says the token issued at `issued` to `user` was
/// stored (`refreshed access token`, or a background re-save's `stored the
/// refreshed token`) before `killed`. Log lines carry wall-clock times; the
/// instants are mapped onto the wall clock from now.
fn stored_before(path: &std::path::Path, user: Uuid, issued: Instant, killed: Instant) -> bool {
    let now = (Instant::now(), chrono::Utc::now());
    let wall = |i: Instant| now.1 - chrono::Duration::from_std(now.0 - i).unwrap_or_default();
    // A little slack before the grant: the two clocks are read apart.
    let (from, to) = (
        wall(issued) - chrono::Duration::milliseconds(50),
        wall(killed),
    );
    let user = user.to_string();
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&user))
        .filter(|l| {
            l.contains("refreshed access token") || l.contains("stored the refreshed token")
        })
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .any(|t| (from..=to).contains(&t.with_timezone(&chrono::Utc)))
}

/// Expires every link that was not lost (plain SQL: the trigger announces it) and
/// asks for each user on every replica until all three answer 200 from the upstream
/// and the IdP has issued that user a new refresh token since. Bounded by 30 s a
/// user: a change notification, or at worst `cache_max_age` (20 s), reaches every
/// cache.
async fn force_refresh_all(
    env: &Env,
    addrs: &[SocketAddr],
    lost: &[Lost],
) -> Vec<(usize, Result<(), String>)> {
    let healthy: Vec<usize> = (0..env.users.len())
        .filter(|u| !lost.iter().any(|l| l.user == *u))
        .collect();
    let ids: Vec<Uuid> = healthy.iter().map(|&u| env.users[u].id).collect();
    sqlx::query(
        "UPDATE external_auth_links SET oauth_expiry = now() - interval '1 hour' \
         WHERE provider_id = $1 AND user_id = ANY($2)",
    )
    .bind(PROVIDER)
    .bind(&ids)
    .execute(env.store.pool())
    .await
    .unwrap();
    let checks = healthy.into_iter().map(|u| async move {
        let user = &env.users[u];
        let before = env.idp.current_refresh_token(user.id);
        let client = client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut outcomes = Vec::new();
            for addr in addrs {
                let url = format!("http://{addr}/api/user");
                outcomes.push(call(&client, &url, &user.token, REQUEST_BOUND).await);
            }
            let rotated = env.idp.current_refresh_token(user.id) != before;
            if rotated && outcomes.iter().all(|o| o == "200") {
                return (u, Ok(()));
            }
            if Instant::now() > deadline {
                let why = format!("answers {outcomes:?}, refreshed since expired: {rotated}");
                return (u, Err(why));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    futures_util::future::join_all(checks).await
}
