//! The audit trail: who used whose token where, as one JSON line per event on the
//! `tokenproxy::audit` target (README, "Audit trail", lists the stable fields).
//!
//! One function per event, so every feature records its events the same way:
//! stateless ones are free functions ([`link_changed`], [`proxy_token_created`],
//! [`proxy_token_revoked`]) callable from the CLI as well as the server; the ones
//! that need memory — first use of a proxy token from a new address, a token
//! seen expired, a host intercepted for the first time, authentication failures
//! counted per source address — are methods of the server's [`Trail`], which also
//! knows the replica's name. Nothing here ever takes a secret: events carry ids,
//! provider names, addresses and outcomes only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::RefreshOutcome;

/// Target of the audit trail's events: one JSON line per event, to the
/// `[logging] audit` destination, never to the ordinary log.
pub const AUDIT_TARGET: &str = "tokenproxy::audit";

/// Who made a change (the `source` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Actor {
    /// The `tokenproxy` command line.
    Cli,
    /// The admin link API.
    Api,
    /// The browser sign-in flow (`/_tokenproxy/oauth/...`).
    Browser,
    /// The device flow (`link login`, `/_tokenproxy/device/...`).
    Device,
    /// Coder (its external-auth rows, or a link made through Coder).
    Coder,
}

impl Actor {
    /// The field value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cli => "cli",
            Self::Api => "api",
            Self::Browser => "browser",
            Self::Device => "device",
            Self::Coder => "coder",
        }
    }
}

/// What happened to a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// A new link.
    Created,
    /// An existing link got new tokens (a fresh login, not a refresh).
    Replaced,
    /// The link was removed.
    Deleted,
}

impl LinkChange {
    fn event(self) -> &'static str {
        match self {
            Self::Created => "link_created",
            Self::Replaced => "link_replaced",
            Self::Deleted => "link_deleted",
        }
    }
}

/// Records a link created, replaced or deleted by `actor`.
pub fn link_changed(actor: Actor, change: LinkChange, provider: &str, user: Uuid) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = change.event(),
        source = actor.as_str(),
        provider,
        user = %user
    );
}

/// Records a link deleted by `actor`, with what became of its grant at the
/// provider (`revoked`, `kept`, `unsupported`, `failed`) and why a revocation
/// failed (empty otherwise).
pub fn link_deleted(
    actor: Actor,
    provider: &str,
    user: Uuid,
    revocation: &str,
    revocation_error: Option<&str>,
) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = LinkChange::Deleted.event(),
        source = actor.as_str(),
        provider,
        user = %user,
        revocation,
        revocation_error = revocation_error.unwrap_or("")
    );
}

/// Records a refused browser sign-in: the `step` (`login` or `callback`) and the
/// refusal's code; `user` when the state or ticket named one. Nothing was stored.
pub fn link_login_failed(provider: &str, user: Option<Uuid>, step: &str, reason: &str) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "link_login_failed",
        source = Actor::Browser.as_str(),
        flow = "browser",
        provider,
        user = user.map(|u| u.to_string()),
        step,
        reason
    );
}

/// Records a device-flow login that ended without a link, started by `actor`
/// (`cli` for `link login`, `device` for `POST /_tokenproxy/device/...`): the
/// `step` (`start`, `poll` or `store`) and a short reason code
/// (`access_denied`, `expired_token`, …). Nothing was stored.
pub fn device_login_failed(actor: Actor, provider: &str, user: Uuid, step: &str, reason: &str) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "link_login_failed",
        source = actor.as_str(),
        flow = "device",
        provider,
        user = %user,
        step,
        reason
    );
}

/// Records a proxy token created by `actor` (its id, never its value).
pub fn proxy_token_created(actor: Actor, token_id: Uuid, user: Uuid) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "proxy_token_created",
        source = actor.as_str(),
        token_id = %token_id,
        user = %user
    );
}

/// Records a proxy token revoked by `actor`.
pub fn proxy_token_revoked(actor: Actor, token_id: Uuid) {
    tracing::info!(
        target: AUDIT_TARGET,
        event = "proxy_token_revoked",
        source = actor.as_str(),
        token_id = %token_id
    );
}

/// Most (token, address) pairs, expired tokens and intercepted hosts remembered;
/// past it the oldest are forgotten and may be recorded once more.
const SEEN_CAPACITY: u64 = 100_000;
/// How long a (token, address) pair counts as seen: a token back at an address
/// after a day is worth another line.
const SEEN_FOR: Duration = Duration::from_secs(24 * 3600);
/// Most source addresses counted per window; failures from further addresses are
/// counted together under `address = "*"` so a spoofed flood cannot grow memory.
const MAX_FAILURE_SOURCES: usize = 10_000;
/// How often [`Trail::flush_auth_failures`] should run (the aggregation window).
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Authentication failures counted since `since`.
struct Failures {
    since: DateTime<Utc>,
    by_source: HashMap<IpAddr, u64>,
    overflow: u64,
}

/// The server's audit state: its replica name and what it has already recorded.
pub struct Trail {
    replica: Arc<str>,
    /// (token, address) pairs by a keyed 64-bit fingerprint: one per caller in
    /// use, and 8 bytes instead of 33 per key (~2.4 MiB per 100,000 callers). Two
    /// pairs sharing one fingerprint (odds ~10^-9 at 100,000 pairs) lose one line.
    seen_sources: Seen<u64>,
    /// The fingerprint's key, random per process.
    fingerprint: quick_cache::DefaultHashBuilder,
    seen_expired: Seen<Uuid>,
    seen_hosts: Seen<String>,
    failures: parking_lot::Mutex<Failures>,
}

impl Trail {
    /// A trail for the replica named `replica`.
    pub fn new(replica: &str) -> Self {
        Self {
            replica: Arc::from(replica),
            seen_sources: Seen::new(),
            fingerprint: quick_cache::DefaultHashBuilder::default(),
            seen_expired: Seen::new(),
            seen_hosts: Seen::new(),
            failures: parking_lot::Mutex::new(Failures {
                since: Utc::now(),
                by_source: HashMap::new(),
                overflow: 0,
            }),
        }
    }

    /// The replica name every event of this trail carries.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Records a refresh outcome for `user`'s `provider` link, `duration` after
    /// the refresh began.
    pub fn refresh(&self, provider: &str, user: Uuid, outcome: RefreshOutcome, duration: Duration) {
        tracing::info!(
            target: AUDIT_TARGET,
            event = "refresh",
            replica = &*self.replica,
            provider,
            user = %user,
            outcome = outcome.as_str(),
            duration_ms = duration.as_millis() as u64
        );
    }

    /// Records that this replica took over a refresh lease that another holder
    /// let run out without releasing it (crashed, or too slow).
    pub fn lease_taken_over(&self, provider: &str, user: Uuid) {
        tracing::info!(
            target: AUDIT_TARGET,
            event = "lease_taken_over",
            replica = &*self.replica,
            provider,
            user = %user
        );
    }

    /// Records a proxy token's use from `address` the first time this replica
    /// sees that pair (within `SEEN_FOR`, 24 h).
    pub fn proxy_token_used(&self, token_id: Uuid, user: Uuid, address: IpAddr) {
        let key = std::hash::BuildHasher::hash_one(&self.fingerprint, (token_id, address));
        if !self.seen_sources.first(&key) {
            return;
        }
        tracing::info!(
            target: AUDIT_TARGET,
            event = "proxy_token_first_use",
            replica = &*self.replica,
            token_id = %token_id,
            user = %user,
            address = %address
        );
    }

    /// Records that an expired proxy token was presented (once per token).
    pub fn proxy_token_expired(&self, token_id: Uuid, user: Uuid) {
        if !self.seen_expired.first(&token_id) {
            return;
        }
        tracing::info!(
            target: AUDIT_TARGET,
            event = "proxy_token_expired",
            replica = &*self.replica,
            token_id = %token_id,
            user = %user
        );
    }

    /// Records forward mode intercepting `host` for the first time (for `user`).
    pub fn host_intercepted(&self, host: &str, user: Uuid) {
        if !self.seen_hosts.first(host) {
            return;
        }
        tracing::info!(
            target: AUDIT_TARGET,
            event = "forward_host_intercepted",
            replica = &*self.replica,
            host,
            user = %user
        );
    }

    /// Counts a refused credential from `address`. Nothing is written here: the
    /// counts go out as one line per address at the next
    /// [`flush_auth_failures`](Self::flush_auth_failures).
    pub fn auth_failed(&self, address: IpAddr) {
        let mut f = self.failures.lock();
        let full = f.by_source.len() >= MAX_FAILURE_SOURCES;
        match f.by_source.get_mut(&address) {
            Some(n) => *n += 1,
            None if full => f.overflow += 1,
            None => {
                f.by_source.insert(address, 1);
            }
        }
    }

    /// Writes one `auth_failures` line per address that failed since the last
    /// flush (with the count and the window), and starts a new window. Run every
    /// [`AUTH_FAILURE_WINDOW`] and once at shutdown.
    pub fn flush_auth_failures(&self) {
        let now = Utc::now();
        let (since, by_source, overflow) = {
            let mut f = self.failures.lock();
            let since = std::mem::replace(&mut f.since, now);
            (
                since,
                std::mem::take(&mut f.by_source),
                std::mem::take(&mut f.overflow),
            )
        };
        let window_s = (now - since).num_seconds().max(0) as u64;
        let mut rows: Vec<(String, u64)> = by_source
            .into_iter()
            .map(|(a, n)| (a.to_string(), n))
            .collect();
        if overflow > 0 {
            rows.push(("*".to_string(), overflow));
        }
        for (address, count) in rows {
            tracing::info!(
                target: AUDIT_TARGET,
                event = "auth_failures",
                replica = &*self.replica,
                address,
                count,
                since = %since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                window_s
            );
        }
    }
}

/// A bounded memory of what was recorded already.
/// Keys recorded within the last [`SEEN_FOR`], about [`SEEN_CAPACITY`] at most.
/// On `quick_cache` like the token and caller caches: every proxy token in use
/// has an entry, and moka's per-entry bookkeeping (~340 B) cost 34 MiB per
/// 100,000 callers.
struct Seen<K> {
    entries: quick_cache::sync::Cache<K, u32>,
    epoch: std::time::Instant,
}

impl<K: std::hash::Hash + Eq + Clone> Seen<K> {
    fn new() -> Self {
        Self {
            entries: quick_cache::sync::Cache::new(SEEN_CAPACITY as usize),
            epoch: std::time::Instant::now(),
        }
    }

    /// Whether `key` is new (never recorded, or longer than [`SEEN_FOR`] ago),
    /// recording it if so. Two threads may both see a key as new: one extra line.
    fn first<Q>(&self, key: &Q) -> bool
    where
        Q: std::hash::Hash + quick_cache::Equivalent<K> + ToOwned<Owned = K> + ?Sized,
    {
        let now = self.epoch.elapsed().as_secs() as u32;
        match self.entries.get(key) {
            Some(at) if now.saturating_sub(at) < SEEN_FOR.as_secs() as u32 => false,
            _ => {
                self.entries.insert(key.to_owned(), now);
                true
            }
        }
    }
}

/// This machine's name, for `server.replica_id`'s default: `$HOSTNAME` (a
/// Kubernetes pod's name), else the kernel's host name, else `tokenproxy`.
pub fn default_replica_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tokenproxy".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects what a JSON subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<parking_lot::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The audit events `f` records, as JSON lines.
    fn events(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(out.0.lock().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn first_uses_expiries_and_hosts_are_recorded_once_each() {
        let t = Trail::new("r1");
        let (token, user) = (Uuid::new_v4(), Uuid::new_v4());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let got = events(|| {
            t.proxy_token_used(token, user, a);
            t.proxy_token_used(token, user, a);
            t.proxy_token_used(token, user, b);
            t.proxy_token_expired(token, user);
            t.proxy_token_expired(token, user);
            t.host_intercepted("api.github.com", user);
            t.host_intercepted("api.github.com", user);
        });
        let names: Vec<_> = got.iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "proxy_token_first_use",
                "proxy_token_first_use",
                "proxy_token_expired",
                "forward_host_intercepted"
            ]
        );
        assert_eq!(got[1]["address"], "10.0.0.2");
        assert!(got.iter().all(|e| e["replica"] == "r1"));
    }

    #[test]
    fn failures_are_written_per_address_per_window() {
        let t = Trail::new("r1");
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let got = events(|| {
            for _ in 0..3 {
                t.auth_failed(a);
            }
            t.auth_failed(b);
            t.flush_auth_failures();
            // An empty window writes nothing.
            t.flush_auth_failures();
        });
        let mut counts: Vec<_> = got
            .iter()
            .map(|e| {
                (
                    e["address"].as_str().unwrap().to_string(),
                    e["count"].as_u64().unwrap(),
                )
            })
            .collect();
        counts.sort();
        assert_eq!(
            counts,
            [("10.0.0.1".to_string(), 3), ("2001:db8::1".to_string(), 1)]
        );
    }

    #[test]
    fn failures_beyond_the_source_limit_are_counted_together() {
        let t = Trail::new("r");
        for i in 0..(MAX_FAILURE_SOURCES as u32 + 5) {
            t.auth_failed(IpAddr::from(i.to_be_bytes()));
        }
        let f = t.failures.lock();
        assert_eq!(f.by_source.len(), MAX_FAILURE_SOURCES);
        assert_eq!(f.overflow, 5);
    }
}
