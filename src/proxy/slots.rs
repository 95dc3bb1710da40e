//! Connection slots: how many connections a listener holds open, how many one
//! source address may hold, and which connection gives way when the limit is
//! reached.
//!
//! Every accepted connection takes a [`Slot`] (a permit of `max_connections`
//! and one of its source IP's `max_connections_per_ip`) for as long as it, or a
//! CONNECT tunnel made from it, lives. While its task runs it is also listed
//! with its [`Activity`] (requests in flight, and since when), so that when
//! every slot is taken the accept loop closes the connection that has been idle
//! longest — a keep-alive connection between requests, or one that never sent a
//! request — instead of making a new caller wait behind connections doing
//! nothing. Connections with a request in flight are never closed for a
//! newcomer; a source IP at its own limit is refused (the new connection is
//! closed unanswered), since its idle connections are its own to close.
//!
//! A connection admitted a moment ago has not had its request read yet, so it
//! looks idle: it is spared for [`ADMITTED_GRACE`], or a burst beyond the
//! limit would have every newcomer close (reset, unanswered) the one admitted
//! just before it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::tick::Tick;

/// How long a connection that has not begun a request yet is spared when a
/// newcomer needs its slot: far above the time a client that sent its request
/// with the connection needs to have it read, far below `header_read_timeout`
/// (which closes a connection that sends nothing anyway).
pub const ADMITTED_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// A connection's requests in flight, and when that number last changed.
#[derive(Debug, Clone, Copy)]
pub struct Activity {
    /// Requests whose response has not been fully sent yet.
    pub active: usize,
    /// When `active` last changed (or the connection was accepted).
    pub since: Instant,
    /// Whether any request has begun on the connection.
    pub used: bool,
}

/// The slots of one listener, shared by every worker serving its port.
pub struct Slots {
    total: Arc<Semaphore>,
    max: usize,
    per_ip: usize,
    table: Mutex<Table>,
    /// Woken when a connection's last request in flight finishes while
    /// [`Slots::make_room`] waits (`waiting` > 0).
    became_idle: Notify,
    /// Accept loops waiting in [`Slots::make_room`]: a finished request only
    /// touches the shared `became_idle` when somebody waits for it.
    waiting: AtomicUsize,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    /// Connections whose task runs, by id.
    conns: HashMap<u64, Listed>,
    /// Slots held per source IP (tunnels included).
    by_ip: HashMap<IpAddr, usize>,
}

struct Listed {
    activity: Arc<ActivityTx>,
    evict: CancellationToken,
}

/// One connection's place in the limits; dropping it gives the place back.
pub struct Slot {
    _ip: IpPlace,
    _permit: OwnedSemaphorePermit,
}

/// A connection as the slot table lists it while its task runs.
pub struct Listing {
    slots: Arc<Slots>,
    id: u64,
    /// Fires when the accept loop wants this connection closed to make room.
    pub evict: CancellationToken,
    /// The connection's activity, updated through [`ActivityTx::start_request`].
    pub activity: Arc<ActivityTx>,
}

/// A connection's [`Activity`], kept in atomics: starting and finishing a
/// request are a few stores on the connection's own cache lines, with no
/// wake-up of any task (the idle timer and the eviction scan read them when
/// they need to).
pub struct ActivityTx {
    active: AtomicUsize,
    /// When `active` last fell to 0 (or the connection was accepted), a
    /// [`Tick`].
    since: AtomicU64,
    used: AtomicBool,
    slots: Arc<Slots>,
}

/// Counts one request as in flight until dropped (with its response body).
pub struct InFlight(Arc<ActivityTx>);

/// Why no slot was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The source IP holds `max_connections_per_ip` already.
    PerIp,
}

impl Slots {
    /// Slots for `max` connections, at most `per_ip` of them (0 = any number)
    /// from one source IP.
    pub fn new(max: usize, per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(max)),
            max,
            per_ip,
            table: Mutex::new(Table::default()),
            became_idle: Notify::new(),
            waiting: AtomicUsize::new(0),
        })
    }

    /// How many slots are taken now.
    pub fn taken(&self) -> usize {
        self.max - self.total.available_permits()
    }

    /// Waits until every slot is back (every connection and tunnel is done).
    pub async fn all_returned(&self) {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        let _ = self.total.acquire_many(all).await;
    }

    /// A slot for a connection from `ip`. When all are taken, the connection
    /// idle longest is told to close and its slot is taken once it has; with
    /// none idle, this waits for any connection to end or go idle.
    pub async fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<(Slot, Listing), Refused> {
        let ip_place = self.reserve_ip(ip)?;
        let permit = match self.total.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => self.make_room().await,
        };
        let slot = Slot {
            _ip: ip_place,
            _permit: permit,
        };
        Ok((slot, self.list()))
    }

    /// Counts a connection against its IP's limit until the guard drops (with
    /// the slot, or at once if the accept loop gives up on shutdown).
    fn reserve_ip(self: &Arc<Self>, ip: IpAddr) -> Result<IpPlace, Refused> {
        let mut table = self.table.lock();
        let held = table.by_ip.entry(ip).or_insert(0);
        if self.per_ip > 0 && *held >= self.per_ip {
            return Err(Refused::PerIp);
        }
        *held += 1;
        Ok(IpPlace {
            slots: self.clone(),
            ip,
        })
    }

    /// Evicts idle connections, one at a time, until a permit is free.
    async fn make_room(&self) -> OwnedSemaphorePermit {
        // Announced before the first scan: a request finishing after the scan
        // read its connection as busy sees `waiting` and wakes this loop
        // (both sides use SeqCst, so one of them sees the other).
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = WaitingGuard(&self.waiting);
        let mut pending: Option<u64> = None;
        loop {
            let idle = self.became_idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            // One eviction at a time: the evicted connection gives its slot back
            // as soon as it has closed, and that slot is ours unless another
            // worker's accept loop takes it first.
            let mut spared_until = None;
            if pending.is_none_or(|id| !self.table.lock().conns.contains_key(&id)) {
                pending = match self.evict_idlest(Instant::now()) {
                    Eviction::Evicted(id) => Some(id),
                    Eviction::SparedUntil(at) => {
                        spared_until = Some(at);
                        None
                    }
                    Eviction::NoneIdle => None,
                };
            }
            let spared = async {
                match spared_until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                p = self.total.clone().acquire_owned() => {
                    return p.expect("the slot semaphore is never closed");
                }
                () = idle => {}
                () = spared => {}
            }
        }
    }

    /// Tells the connection idle longest to close, sparing those admitted
    /// less than [`ADMITTED_GRACE`] before `now` that have not begun a request.
    fn evict_idlest(&self, now: Instant) -> Eviction {
        let table = self.table.lock();
        let mut spared_until: Option<Instant> = None;
        let idlest = table
            .conns
            .iter()
            .filter(|(_, l)| !l.evict.is_cancelled())
            .filter_map(|(id, l)| {
                let a = l.activity.snapshot();
                if a.active > 0 {
                    return None;
                }
                if !a.used && now < a.since + ADMITTED_GRACE {
                    let at = a.since + ADMITTED_GRACE;
                    spared_until = Some(spared_until.map_or(at, |s| s.min(at)));
                    return None;
                }
                Some((id, l, a.since))
            })
            .min_by_key(|(_, _, since)| *since)
            .map(|(id, l, _)| (*id, l));
        let Some((id, listed)) = idlest else {
            return spared_until.map_or(Eviction::NoneIdle, Eviction::SparedUntil);
        };
        tracing::debug!(
            connection = id,
            "all connection slots taken; closing the idlest"
        );
        listed.evict.cancel();
        Eviction::Evicted(id)
    }

    fn list(self: &Arc<Self>) -> Listing {
        let activity = Arc::new(ActivityTx {
            active: AtomicUsize::new(0),
            since: AtomicU64::new(Tick::now().nanos()),
            used: AtomicBool::new(false),
            slots: self.clone(),
        });
        let evict = CancellationToken::new();
        let mut table = self.table.lock();
        let id = table.next_id;
        table.next_id += 1;
        table.conns.insert(
            id,
            Listed {
                activity: activity.clone(),
                evict: evict.clone(),
            },
        );
        Listing {
            slots: self.clone(),
            id,
            evict,
            activity,
        }
    }

    fn release_ip(&self, ip: IpAddr) {
        let mut table = self.table.lock();
        if let Some(held) = table.by_ip.get_mut(&ip) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                table.by_ip.remove(&ip);
            }
        }
    }
}

/// What [`Slots::evict_idlest`] did.
enum Eviction {
    /// Told this connection to close.
    Evicted(u64),
    /// Every idle connection was admitted just now; the first can go then.
    SparedUntil(Instant),
    /// Every connection has a request in flight.
    NoneIdle,
}

/// One connection counted against its source IP's limit, until dropped.
struct IpPlace {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Drop for IpPlace {
    fn drop(&mut self) {
        self.slots.release_ip(self.ip);
    }
}

impl Drop for Listing {
    fn drop(&mut self) {
        self.slots.table.lock().conns.remove(&self.id);
    }
}

/// Decrements [`Slots::waiting`] when a [`Slots::make_room`] ends (or is dropped).
struct WaitingGuard<'a>(&'a AtomicUsize);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ActivityTx {
    /// Counts a request as in flight until the returned guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.used.store(true, Ordering::Relaxed);
        // `since` only matters while nothing is in flight: set when the count
        // falls back to 0.
        self.active.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// The activity now.
    pub fn snapshot(&self) -> Activity {
        let active = self.active.load(Ordering::SeqCst);
        let since = Tick::from_nanos(self.since.load(Ordering::Acquire)).instant();
        Activity {
            active,
            since,
            used: self.used.load(Ordering::Relaxed),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let slots = &self.0.slots;
        // `since` first: whoever reads `active` == 0 then reads this request's end.
        self.0.since.store(Tick::now().nanos(), Ordering::Release);
        let was = self.0.active.fetch_sub(1, Ordering::SeqCst);
        if was == 1 && slots.waiting.load(Ordering::SeqCst) > 0 {
            slots.became_idle.notify_waiters();
        }
    }
}

/// Resolves once the connection has had no request in flight for `idle`.
///
/// It sleeps rather than watching every request: when the timer fires with a
/// request in flight, the connection cannot become idle for long enough before
/// `idle` from now, so that is when it looks again; with none in flight, the
/// deadline is exactly the last request's end + `idle`.
pub async fn idle_for(activity: Arc<ActivityTx>, idle: std::time::Duration) {
    let mut deadline = activity.snapshot().since + idle;
    loop {
        tokio::time::sleep_until(deadline).await;
        let now = Instant::now();
        let a = activity.snapshot();
        deadline = a.since + idle;
        if a.active > 0 {
            deadline = now + idle;
        } else if now >= deadline {
            // A request may have begun between the two loads of the snapshot.
            if activity.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            deadline = now + idle;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[tokio::test]
    async fn an_ip_at_its_limit_is_refused_and_others_are_not() {
        let slots = Slots::new(10, 2);
        let a1 = slots.acquire(A).await.unwrap();
        let _a2 = slots.acquire(A).await.unwrap();
        assert_eq!(slots.acquire(A).await.err(), Some(Refused::PerIp));
        let _b = slots.acquire(B).await.unwrap();
        drop(a1);
        let _a3 = slots.acquire(A).await.unwrap();
        assert_eq!(slots.taken(), 3);
    }

    #[tokio::test]
    async fn when_full_the_idlest_connection_goes_and_busy_ones_stay() {
        let slots = Slots::new(3, 0);
        let (busy_slot, busy) = slots.acquire(A).await.unwrap();
        let _req = busy.activity.start_request();
        let (old_slot, old_idle) = slots.acquire(A).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (new_slot, new_idle) = slots.acquire(A).await.unwrap();
        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(B).await.map(drop) }
        });
        // The idle connection listed first is told to go; the others are not.
        old_idle.evict.cancelled().await;
        assert!(!new_idle.evict.is_cancelled());
        assert!(!busy.evict.is_cancelled());
        assert!(!waiting.is_finished());
        drop((old_slot, old_idle));
        waiting.await.unwrap().unwrap();
        drop((busy_slot, new_slot));
    }

    #[tokio::test]
    async fn idle_for_counts_from_the_last_request_end_and_never_while_one_runs() {
        let slots = Slots::new(3, 0);
        let (_slot, listing) = slots.acquire(A).await.unwrap();
        let idle = Duration::from_millis(200);
        let timer = tokio::spawn(idle_for(listing.activity.clone(), idle));
        tokio::time::sleep(Duration::from_millis(80)).await;
        // A request longer than `idle`: the timer fires while it runs (at 200
        // and 400 ms) and must not resolve.
        let req = listing.activity.start_request();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!timer.is_finished(), "resolved with a request in flight");
        drop(req);
        let ended = Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !timer.is_finished(),
            "resolved before the request's end + idle"
        );
        timer.await.unwrap();
        let after = ended.elapsed();
        assert!(after >= idle, "resolved {after:?} after the end");
        assert!(
            after < idle * 2,
            "resolved {after:?} after the end, not at end + idle"
        );
    }
}
