//! The fault schedule of the chaos suite: two lanes run side by side until the
//! chaos window ends, each drawing its next fault and pause from its own seeded RNG
//! (so `CHAOS_SEED` replays the schedule; the interleaving with traffic is still
//! up to the machine).
//!
//! - the process lane: SIGTERM + restart of a replica, SIGKILL + restart, a
//!   PostgreSQL stop (immediate, as a crash) and start after 1–4 s, and a SIGTERM
//!   while PostgreSQL is down (a deploy during a database failover: the drain must
//!   still store what its exchanges got);
//! - the network lane: 1–3 s of latency on every database round trip for 4–10 s,
//!   and IdP outages for 3–8 s: 5xx, 429 with `Retry-After`, answers that hang past
//!   the exchange's deadline, failures after 5 s, and slow but good answers.
//!
//! Every fault is undone before its lane draws the next, and both lanes leave
//! everything healed when they return.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::Rng;
use tokio::time::Instant;

use super::cluster::PgCluster;
use super::relay::Relay;
use super::replica::Replica;
use crate::support::idp::{Fault, Idp};

/// One injected fault, for the summary and for telling which exchange a SIGKILL cut.
#[derive(Debug, Clone)]
pub struct FaultEvent {
    /// When it was injected.
    pub at: Instant,
    /// Its kind (the summary's row).
    pub kind: &'static str,
    /// The replica signalled, for process faults.
    pub replica: Option<usize>,
}

/// What the lanes share.
pub struct Plan<'a> {
    /// When the run started (the timeline's zero).
    pub start: Instant,
    /// When the chaos window closes (no fault starts after it).
    pub end: Instant,
    /// Replica 0 is never signalled (the soak's RSS witness).
    pub spare_replica0: bool,
    /// Longest a SIGTERM drain may take: `server.shutdown_grace` +
    /// `tokens.lease_timeout` + slack for a loaded machine.
    pub drain_bound: Duration,
    /// The log of injected faults.
    pub log: &'a Mutex<Vec<FaultEvent>>,
}

impl Plan<'_> {
    fn record(&self, kind: &'static str, replica: Option<usize>) {
        let on = replica
            .map(|r| format!(" (replica {r})"))
            .unwrap_or_default();
        eprintln!("chaos: t+{:.1}s {kind}{on}", self.at());
        self.log.lock().push(FaultEvent {
            at: Instant::now(),
            kind,
            replica,
        });
    }
}

impl Plan<'_> {
    /// Seconds since the start.
    pub fn at(&self) -> f64 {
        (Instant::now() - self.start).as_secs_f64()
    }
}

async fn pause(rng: &mut StdRng, plan: &Plan<'_>, min_ms: u64, max_ms: u64) -> bool {
    let d = Duration::from_millis(rng.random_range(min_ms..=max_ms));
    let until = (Instant::now() + d).min(plan.end);
    tokio::time::sleep_until(until).await;
    Instant::now() < plan.end
}

/// Runs the process lane; `pids` mirrors each replica's current process id (0 =
/// not running) for the RSS sampler.
pub async fn process_lane(
    mut rng: StdRng,
    replicas: &mut [Replica],
    pids: &[AtomicU32],
    pg: &PgCluster,
    plan: &Plan<'_>,
) -> Result<(), String> {
    while pause(&mut rng, plan, 2_000, 6_000).await {
        let first = usize::from(plan.spare_replica0);
        let r = rng.random_range(first..replicas.len());
        let began = Instant::now();
        match rng.random_range(0..12) {
            0..=3 => {
                plan.record("SIGTERM + restart", Some(r));
                pids[r].store(0, Ordering::SeqCst);
                let status = replicas[r].stop("TERM", plan.drain_bound).await?;
                // A drained replica exits 0; anything else is a failed drain.
                if status != "exit status: 0" {
                    return Err(format!("replica {r} ended its SIGTERM drain with {status}"));
                }
                restart(&mut replicas[r], &pids[r]).await;
            }
            4..=7 => {
                plan.record("SIGKILL + restart", Some(r));
                pids[r].store(0, Ordering::SeqCst);
                replicas[r].stop("KILL", Duration::from_secs(10)).await?;
                let down = Duration::from_millis(rng.random_range(0..=2_000));
                tokio::time::sleep(down).await;
                restart(&mut replicas[r], &pids[r]).await;
            }
            8..=9 => {
                plan.record("PostgreSQL restart", None);
                tokio::task::block_in_place(|| pg.stop());
                let down = Duration::from_millis(rng.random_range(1_000..=4_000));
                tokio::time::sleep(down).await;
                tokio::task::block_in_place(|| pg.start_again());
            }
            _ => {
                plan.record("SIGTERM during PostgreSQL restart", Some(r));
                tokio::task::block_in_place(|| pg.stop());
                pids[r].store(0, Ordering::SeqCst);
                let replica = &mut replicas[r];
                let down = Duration::from_millis(rng.random_range(1_000..=4_000));
                // The database comes back while the replica drains.
                let (status, ()) = tokio::join!(replica.stop("TERM", plan.drain_bound), async {
                    tokio::time::sleep(down).await;
                    tokio::task::block_in_place(|| pg.start_again());
                });
                let status = status?;
                if status != "exit status: 0" {
                    return Err(format!("replica {r} ended its SIGTERM drain with {status}"));
                }
                restart(&mut replicas[r], &pids[r]).await;
            }
        }
        let took = (Instant::now() - began).as_secs_f64();
        eprintln!("chaos: t+{:.1}s   ... back after {took:.1}s", plan.at());
    }
    Ok(())
}

async fn restart(replica: &mut Replica, pid: &AtomicU32) {
    replica.start().await;
    pid.store(replica.pid().unwrap_or(0), Ordering::SeqCst);
}

/// Runs the network lane.
pub async fn network_lane(mut rng: StdRng, relay: &Relay, idp: &Idp, plan: &Plan<'_>) {
    while pause(&mut rng, plan, 2_000, 6_000).await {
        let hold = Duration::from_millis(rng.random_range(3_000..=8_000));
        match rng.random_range(0..6) {
            0 => {
                plan.record("DB latency 1-3 s", None);
                relay.set_latency(Duration::from_millis(rng.random_range(1_000..=3_000)));
                tokio::time::sleep(hold + Duration::from_secs(2)).await;
                relay.set_latency(Duration::ZERO);
            }
            1 => {
                plan.record("IdP 500", None);
                outage(idp, Fault::ServerError, hold).await;
            }
            2 => {
                plan.record("IdP 429 + Retry-After", None);
                let retry_after_secs = rng.random_range(1..=3);
                outage(idp, Fault::TooManyRequests { retry_after_secs }, hold).await;
            }
            3 => {
                // Longer than any exchange's budget: the client gives up.
                plan.record("IdP hang (timeout)", None);
                outage(idp, Fault::Hang(Duration::from_secs(40)), hold).await;
            }
            4 => {
                plan.record("IdP 503 after 5 s", None);
                outage(idp, Fault::Hang(Duration::from_secs(5)), hold).await;
            }
            _ => {
                // Slow but good answers, inside every provider timeout.
                plan.record("IdP slow answers", None);
                idp.set_latency(Duration::from_millis(rng.random_range(500..=1_500)));
                tokio::time::sleep(hold).await;
                idp.set_latency(Duration::ZERO);
            }
        }
    }
}

async fn outage(idp: &Idp, fault: Fault, hold: Duration) {
    idp.set_standing_fault(Some(fault));
    tokio::time::sleep(hold).await;
    idp.set_standing_fault(None);
}

/// Faults injected, by kind.
pub fn counts(log: &[FaultEvent]) -> super::Counts {
    let mut c = super::Counts::default();
    for e in log {
        c.add(e.kind);
    }
    c
}
