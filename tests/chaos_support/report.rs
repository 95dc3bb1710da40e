//! The chaos suite's verdict: the summary table it prints (faults, requests by
//! outcome, the IdP's grants and reuses, lost links, RSS per minute) and the
//! promises it checks against what the run recorded.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;

use parking_lot::Mutex;
use tokio::time::Instant;
use uuid::Uuid;

use super::faults::FaultEvent;
use super::Counts;
use crate::support::idp::Idp;

/// The end of the warm-up: a soak's RSS baseline is the sample at this minute.
pub const WARMUP_MINUTES: u32 = 3;

/// What the traffic saw.
#[derive(Default)]
pub struct Traffic {
    /// Set to stop the workers.
    pub stop: AtomicBool,
    /// Requests by outcome.
    pub outcomes: Mutex<Counts>,
    /// `reauth_required` answers by user index.
    pub reauth: Mutex<HashMap<usize, u64>>,
}

/// A link whose newest refresh token the IdP issued but nobody ever stored.
pub struct Lost {
    /// The user's index.
    pub user: usize,
    /// The refresh token the row still holds (already spent at the IdP).
    pub stale: String,
    /// Which SIGKILL explains it, if one does.
    pub explained_by: Option<FaultEvent>,
    /// When the IdP issued the refresh token nobody stored.
    pub issued: Option<Instant>,
    /// What the IdP knows of the lost token.
    pub detail: String,
}

/// The summary and the verdict.
pub struct Report<'a> {
    /// The run's seed.
    pub seed: u64,
    /// `CHAOS_MINUTES`.
    pub minutes: f64,
    /// Whether this is a soak (RSS asserted).
    pub soak: bool,
    /// Every fault injected.
    pub log: &'a [FaultEvent],
    /// What the traffic saw.
    pub traffic: &'a Traffic,
    /// Links lost between an answer and its write.
    pub lost: &'a [Lost],
    /// The forced refresh of every other link, by user index.
    pub refreshed: &'a [(usize, Result<(), String>)],
    /// (minute, replica, pid, VmRSS KiB) samples.
    pub rss: &'a [(u32, usize, u32, u64)],
    /// The IdP.
    pub idp: &'a Idp,
    /// The users' ids, by index.
    pub users: &'a [Uuid],
    /// How many replicas ran.
    pub replicas: usize,
}

impl Report<'_> {
    /// Prints the summary table; returns every broken promise.
    pub fn print_and_check(&self) -> Vec<String> {
        let mut failures = Vec::new();
        let mut out = format!(
            "\n===== chaos summary: CHAOS_SEED={} CHAOS_MINUTES={}, {} users, {} replicas =====\n",
            self.seed,
            self.minutes,
            self.users.len(),
            self.replicas
        );
        out += &super::faults::counts(self.log).table("faults injected");
        out += &self
            .traffic
            .outcomes
            .lock()
            .table("requests by outcome (during chaos)");
        let g = self.idp.grants();
        out += &format!(
            "IdP grants\n  attempts {} · successes {} · rejections {} · reuse {}\n",
            g.attempts, g.successes, g.rejections, g.reuse
        );
        self.check_losses(&mut out, &mut failures);
        let ok = self.refreshed.iter().filter(|(_, r)| r.is_ok()).count();
        out += &format!(
            "forced refresh after healing: {ok} of {} links answered 200 on every replica\n",
            self.refreshed.len()
        );
        for (u, r) in self.refreshed {
            if let Err(e) = r {
                failures.push(format!("user {u}'s link no longer refreshes: {e}"));
            }
        }
        self.check_rss(&mut out, &mut failures);
        eprintln!("{out}");
        failures
    }

    /// Reuse, `reauth_required` and lost links: excused only on a link a SIGKILL
    /// between answer and write explains.
    fn check_losses(&self, out: &mut String, failures: &mut Vec<String>) {
        let lost_stale = |user: Uuid, token: &str| {
            self.lost
                .iter()
                .any(|l| self.users[l.user] == user && l.stale == token)
        };
        let reuses = self.idp.reuses();
        let excused = reuses
            .iter()
            .filter(|r| lost_stale(r.user, &r.refresh_token))
            .count();
        *out += &format!(
            "refresh-token reuse: {} ({excused} on links lost to a SIGKILL)\n",
            reuses.len()
        );
        for r in reuses
            .iter()
            .filter(|r| !lost_stale(r.user, &r.refresh_token))
        {
            let user = self.users.iter().position(|u| *u == r.user);
            failures.push(format!(
                "a spent refresh token of user {user:?} was presented again (by {:?})",
                r.by
            ));
        }
        *out += &format!(
            "links lost between a provider answer and its write: {}\n",
            self.lost.len()
        );
        for l in self.lost {
            match (&l.explained_by, l.issued) {
                (Some(e), Some(issued)) => {
                    let after =
                        e.at.checked_duration_since(issued)
                            .map_or_else(|| format!("-{:?}", issued - e.at), |d| format!("{d:?}"));
                    *out += &format!(
                        "  user {}: {}; replica {:?} was SIGKILLed {after} after the grant (allowed)\n",
                        l.user, l.detail, e.replica
                    )
                }
                _ => failures.push(format!(
                    "user {}'s link was lost with no SIGKILL in its window: {}",
                    l.user, l.detail
                )),
            }
        }
        for (u, n) in self.traffic.reauth.lock().iter() {
            if !self.lost.iter().any(|l| l.user == *u) {
                failures.push(format!("user {u} got reauth_required {n} time(s)"));
            }
        }
    }

    /// The RSS table; in a soak, replica 0 (never signalled) may grow at most 10%
    /// over its sample at the end of the warm-up.
    fn check_rss(&self, out: &mut String, failures: &mut Vec<String>) {
        if self.rss.is_empty() {
            return;
        }
        *out += "VmRSS (MiB) per minute; * = a new process since the last sample\n  minute";
        for r in 0..self.replicas {
            *out += &format!("  replica{r}");
        }
        *out += "\n";
        let last_minute = self.rss.iter().map(|s| s.0).max().unwrap_or(0);
        let mut last_pid = vec![0u32; self.replicas];
        for m in 1..=last_minute {
            *out += &format!("  {m:>6}");
            for (r, last) in last_pid.iter_mut().enumerate() {
                match self.rss.iter().find(|s| s.0 == m && s.1 == r) {
                    Some(&(_, _, pid, kib)) => {
                        let mark = if *last != 0 && *last != pid { "*" } else { " " };
                        *last = pid;
                        *out += &format!("  {:>7.1}{mark}", kib as f64 / 1024.0);
                    }
                    None => *out += "        -",
                }
            }
            *out += "\n";
        }
        if !self.soak {
            return;
        }
        let witness: Vec<u64> = self.rss.iter().filter(|s| s.1 == 0).map(|s| s.3).collect();
        let Some(&base) = witness.get(WARMUP_MINUTES as usize - 1) else {
            failures.push("no RSS sample of replica 0 at the end of the warm-up".into());
            return;
        };
        let peak = witness[WARMUP_MINUTES as usize..]
            .iter()
            .copied()
            .max()
            .unwrap_or(base);
        let growth = (peak as f64 / base as f64 - 1.0) * 100.0;
        *out += &format!(
            "replica 0 RSS after warm-up (minute {WARMUP_MINUTES}): {:.1} MiB, peak later {:.1} MiB ({growth:+.1}%)\n",
            base as f64 / 1024.0,
            peak as f64 / 1024.0
        );
        if growth > 10.0 {
            failures.push(format!(
                "replica 0's RSS grew {growth:.1}% after warm-up (> 10%)"
            ));
        }
    }
}
