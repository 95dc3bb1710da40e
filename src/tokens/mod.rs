//! The token source: cache → store → refresh.
//!
//! [`TokenSource::get`] returns a usable access token for (provider, user) or a typed
//! error. This is where the product's promise is kept: a link is never broken by a
//! race, in one process or across replicas, and the request path rarely waits for a
//! provider.
//!
//! - **Hits** come from a `quick_cache` keyed by (provider, user) — never a token
//!   value — with no database query and no lock but a shard's shared read lock
//!   (`cache`). Links known to be
//!   missing or to need a new login are remembered too, so a caller hammering a
//!   broken link costs no database read.
//! - **Misses** run one flight per key per process, in a spawned task so a caller
//!   that goes away does not abandon it; concurrent callers share its result, errors
//!   included (`flight`). The flight re-reads the row, takes the cross-replica
//!   lease on the database clock, and (`exchange`) refreshes through
//!   [`crate::oauth`] and writes the result with a compare-and-swap on the refresh
//!   token exactly as it was read.
//! - **Coherence and refresh-ahead** run in background tasks (`background`): every
//!   change notification drops that key; a resync retires every entry (kept only as
//!   a fallback while the store is unreachable); links in use are refreshed shortly
//!   before they expire.
//! - Store trouble: an unexpired cached token is served rather than
//!   `store_unavailable`; provider trouble: the current token while unexpired rather
//!   than `idp_unavailable`. Only `invalid_grant` (and equivalents) is ever recorded.
//!
//! Wiring (what `serve` does):
//!
//! ```ignore
//! let source = TokenSource::new(store, &cfg.providers, &cfg.tokens, metrics, Arc::new(SystemClock))?;
//! let bg = source.spawn_background(shutdown.clone()); // CancellationToken
//! // ... serve requests with source.get(provider, user) ...
//! shutdown.cancel(); bg.await;
//! ```

mod ahead;
mod background;
mod backoff;
mod cache;
mod cooldown;
mod exchange;
mod flight;
mod keepalive;
mod settle;

pub use keepalive::{expiring_window, refresh_expiring, KeepaliveReport};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::{ConfigError, ProviderConfig, TokensConfig};
use crate::oauth::ProviderClient;
use crate::store::LinkStore;
use crate::telemetry::{LookupLabels, LookupResult, Metrics};

use self::cache::{Entry, Key};

/// Why no token could be served. Maps 1:1 onto DESIGN.md error codes.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// The user has no link for this provider (`link_missing`).
    #[error("no link for this provider")]
    LinkMissing,
    /// The provider rejected the refresh token; the user must log in again (`reauth_required`).
    #[error("the provider rejected the refresh token; log in again")]
    ReauthRequired,
    /// The token endpoint failed transiently (`idp_unavailable`).
    #[error("the provider's token endpoint is unavailable")]
    IdpUnavailable,
    /// The database is unreachable and nothing usable is cached (`store_unavailable`).
    #[error("the link store is unavailable")]
    StoreUnavailable,
}

/// A usable access token. Cheap to clone (shared), redacted in `Debug`.
#[derive(Clone)]
pub struct AccessToken(Arc<TokenValue>);

struct TokenValue {
    secret: Secret,
    expiry: Option<DateTime<Utc>>,
}

/// How a token is held. Most are visible ASCII and most routes inject
/// `Authorization: Bearer <token>`, so such a token is held as that header
/// value (marked sensitive, redacted in `Debug`) and the token is its tail: one
/// allocation per cached link instead of a secret plus a header built from it
/// (~6 MiB per 100,000 links). Neither form is printed by `Debug`.
enum Secret {
    /// `Bearer <token>`.
    Bearer(http::HeaderValue),
    /// A token that cannot be a header value: nothing can be injected from it
    /// as such, but the other forms may still encode it.
    Raw(SecretString),
}

/// What precedes the token in [`Secret::Bearer`].
const BEARER: &str = "Bearer ";

impl AccessToken {
    /// Wraps a token value.
    pub fn new(secret: SecretString, expiry: Option<DateTime<Utc>>) -> Self {
        // A secret itself, so the copy is cleared when dropped.
        let text = SecretString::from(format!("{BEARER}{}", secret.expose_secret()));
        let secret = match http::HeaderValue::from_str(text.expose_secret()) {
            // `to_str` holds for every visible-ASCII value, so the tail is the
            // token itself whenever it is read back.
            Ok(mut value) if value.to_str().is_ok() => {
                value.set_sensitive(true);
                Secret::Bearer(value)
            }
            _ => Secret::Raw(secret),
        };
        Self(Arc::new(TokenValue { secret, expiry }))
    }
    /// `Bearer <token>` as a sensitive header value, built once per token
    /// version. `None`: the token cannot be a header value.
    pub fn bearer_header(&self) -> Option<http::HeaderValue> {
        match &self.0.secret {
            Secret::Bearer(value) => Some(value.clone()),
            Secret::Raw(_) => None,
        }
    }
    /// The token itself, for injection only.
    pub fn expose_secret(&self) -> &str {
        match &self.0.secret {
            // `new` made sure `to_str` holds and the value starts with `BEARER`.
            Secret::Bearer(value) => value
                .to_str()
                .map_or("", |text| text.get(BEARER.len()..).unwrap_or_default()),
            Secret::Raw(secret) => secret.expose_secret(),
        }
    }
    /// When it expires; `None` = never.
    pub fn expiry(&self) -> Option<DateTime<Utc>> {
        self.0.expiry
    }
    /// Whether two handles are the same token version (same cache entry).
    pub fn same_version(&self, other: &AccessToken) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || crate::crypto::same_text(self.expose_secret(), other.expose_secret())
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"[redacted]")
            .field("expiry", &self.0.expiry)
            .finish()
    }
}

/// Source of time for expiry decisions, injectable so tests control it.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A bounded cache that holds `capacity` entries. `quick_cache` splits its capacity
/// evenly over shards and evicts per shard, while keys land on shards unevenly
/// (binomially): sized at exactly `capacity`, a full 100k cache evicted 1.6% early.
/// Each shard gets six standard deviations of room on top of its share.
pub fn bounded_cache<K, V>(capacity: u64) -> quick_cache::sync::Cache<K, V>
where
    K: Eq + std::hash::Hash,
    V: Clone,
{
    quick_cache::sync::Cache::new(room_for(capacity))
}

/// What [`bounded_cache`] sizes a cache of `capacity` at.
fn room_for(capacity: u64) -> usize {
    let parallelism = std::thread::available_parallelism().map_or(1, |p| p.get());
    // quick_cache's default shard count (it only ever uses fewer).
    let shards = (parallelism * 4).next_power_of_two() as f64;
    let share = capacity as f64 / shards;
    let room = shards * (6.0 * share.sqrt() + 8.0);
    (capacity as f64 + room).ceil() as usize
}

/// The token cache: [`bounded_cache`] that counts its evictions in `evictions`.
fn token_cache(
    capacity: u64,
    evictions: prometheus_client::metrics::counter::Counter,
) -> cache::TokenCache {
    let items = room_for(capacity);
    quick_cache::sync::Cache::with(
        items,
        items as u64,
        quick_cache::UnitWeighter,
        quick_cache::DefaultHashBuilder::default(),
        cache::CountEvictions(evictions),
    )
}

/// Finds, caches and refreshes access tokens. Build it with [`TokenSource::new`] and
/// start its background work with [`TokenSource::spawn_background`].
pub struct TokenSource {
    inner: Arc<Inner>,
}

/// One configured provider as the token source sees it.
struct Provider {
    id: String,
    client: ProviderClient,
    /// While set and in the future, the provider rejected our client itself
    /// (`invalid_client`): no user's refresh can succeed, so none is attempted.
    client_rejected_until: parking_lot::Mutex<Option<tokio::time::Instant>>,
}

/// Longest a remembered `link_missing` / `reauth_required` answer is trusted
/// without a change notification.
const NEGATIVE_TTL: Duration = Duration::from_secs(30);

/// Number of invalidation epoch shards (see [`Inner::epoch`]).
const EPOCH_SHARDS: usize = 256;

/// State shared by the public handle, flights and background tasks.
pub(crate) struct Inner {
    store: Arc<dyn LinkStore>,
    providers: Vec<Provider>,
    index: HashMap<String, u32, foldhash::fast::RandomState>,
    cfg: TokensConfig,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    /// Cached links. A `quick_cache` rather than moka: about half the memory per
    /// entry (issue 7). Entries that can no longer be served are skipped on the
    /// hit path and dropped by the background tidy pass, or evicted when full.
    cache: cache::TokenCache,
    /// Links known to be missing or to need a new login, so a caller hammering a
    /// broken link costs no database read. Cleared by that link's change
    /// notification; the TTL bounds staleness should a notification be lost.
    negative: moka::future::Cache<Key, TokenError>,
    flights: parking_lot::Mutex<HashMap<Key, flight::Flight>>,
    flight_seq: AtomicU64,
    /// Wakes flights waiting on another holder's lease: `Some(key)` for one link,
    /// `None` after a resync.
    changes: tokio::sync::broadcast::Sender<Option<Key>>,
    /// Bumped (per shard of keys) on every invalidation, so a flight that read a row
    /// before a change notification does not cache that stale row after it.
    epochs: Vec<AtomicU64>,
    /// Bumped on every change-feed resync; see [`Entry::generation`].
    generation: AtomicU64,
    hit: prometheus_client::metrics::counter::Counter,
    miss: prometheus_client::metrics::counter::Counter,
    sync_refreshes: AtomicU64,
    /// Every task that may hold a lease or a rotated token not yet stored
    /// (flights, background re-saves, lease releases), so shutdown can wait for
    /// them instead of dropping them half-way (see [`TokenSource::drain`]).
    tasks: TaskTracker,
    /// Cancelled when shutdown begins: no new exchange starts after it.
    draining: CancellationToken,
    /// Bounds refreshes forced by upstream 401s (`tokens.reject_cooldown`).
    reject_cooldown: cooldown::RejectCooldown,
    /// Remembered transient failures: per-link backoff, per-provider breakers.
    backoff: backoff::Backoff,
    /// Refresh-ahead's concurrency bound and retries.
    ahead: ahead::Ahead,
}

impl Inner {
    fn epoch_slot(&self, key: &Key) -> &AtomicU64 {
        let h = key.1.as_u128() as usize ^ key.0 as usize;
        &self.epochs[h % EPOCH_SHARDS]
    }

    /// The invalidation epoch covering `key`.
    fn epoch(&self, key: &Key) -> u64 {
        self.epoch_slot(key).load(Ordering::Acquire)
    }

    /// The cached entry for `key`, servable or not.
    fn cached(&self, key: Key) -> Option<Arc<Entry>> {
        self.cache.get(&key)
    }

    /// The remembered error for a missing or dead link, if any.
    fn known_broken(&self, key: Key) -> futures_util::future::BoxFuture<'_, Option<TokenError>> {
        Box::pin(async move { self.negative.get(&key).await })
    }

    /// Forgets a remembered missing/dead link. Boxed: moka's generic-borrow futures
    /// trip rustc's `Send` inference inside spawned tasks ("not general enough").
    fn forget_broken(&self, key: Key) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(async move { self.negative.invalidate(&key).await })
    }

    /// Drops one key from the cache.
    fn uncache(&self, key: Key) -> Option<Arc<Entry>> {
        self.cache.remove(&key).map(|(_, e)| e)
    }

    /// The current resync generation.
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a cached entry may be served on the hit path at `now`.
    fn servable(&self, e: &Entry, now: DateTime<Utc>) -> bool {
        self.current(e, now) && !e.aged(now, self.cfg.cache_max_age)
    }

    /// Whether a cached entry is usable and from the current resync generation
    /// (it may still be due for its `cache_max_age` re-read).
    fn current(&self, e: &Entry, now: DateTime<Utc>) -> bool {
        e.generation == self.generation() && cache::usable(e.token.expiry(), now, self.skew())
    }

    fn skew(&self) -> Duration {
        self.cfg.refresh_skew
    }

    /// The provider's deadline budget for a lease claimed at `claimed`: what is
    /// left of the lease, measured from just before the claim was sent, minus the
    /// time reserved to persist a rotated token before the lease could pass to
    /// another replica.
    fn exchange_budget(&self, claimed: tokio::time::Instant) -> Duration {
        let deadline = claimed
            + self
                .cfg
                .lease_timeout
                .saturating_sub(self.cfg.write_reserve());
        deadline.saturating_duration_since(tokio::time::Instant::now())
    }
}

impl TokenSource {
    /// Builds a token source over `store` for the configured providers.
    ///
    /// Fails when a provider's HTTP client cannot be built (bad CA file) or its
    /// deadline does not fit inside the lease.
    pub fn new(
        store: Arc<dyn LinkStore>,
        providers: &[ProviderConfig],
        cfg: &TokensConfig,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, ConfigError> {
        if cfg.lease_timeout.is_zero() {
            return Err(ConfigError::new(
                "tokens.lease_timeout",
                "must be above zero",
            ));
        }
        if cfg.refresh_ahead_concurrency == 0 {
            return Err(ConfigError::new(
                "tokens.refresh_ahead_concurrency",
                "must be at least 1",
            ));
        }
        if !(0.0..1.0).contains(&cfg.refresh_ahead_remaining) {
            return Err(ConfigError::new(
                "tokens.refresh_ahead_remaining",
                "must be at least 0 and below 1",
            ));
        }
        let mut list = Vec::with_capacity(providers.len());
        let mut index = HashMap::with_hasher(foldhash::fast::RandomState::default());
        for (i, p) in providers.iter().enumerate() {
            // One attempt must fit in the lease before its write reserve, or no
            // exchange could ever start (see `Inner::exchange_budget`).
            if p.timeout.is_zero() || p.timeout > cfg.lease_timeout - cfg.write_reserve() {
                return Err(ConfigError::new(
                    format!("providers[{i}].timeout"),
                    "must be above zero and fit in tokens.lease_timeout minus its write reserve \
                     (a quarter of it, at most 5s); lower it or raise tokens.lease_timeout",
                ));
            }
            let client = ProviderClient::new(p)
                .map_err(|m| ConfigError::new(format!("providers[{i}].token_ca"), m))?;
            index.insert(p.id.clone(), i as u32);
            list.push(Provider {
                id: p.id.clone(),
                client,
                client_rejected_until: parking_lot::Mutex::new(None),
            });
        }
        let cache = token_cache(cfg.cache_capacity, metrics.cache_evictions.clone());
        let negative = moka::future::Cache::builder()
            .max_capacity(cfg.cache_capacity)
            .time_to_live(NEGATIVE_TTL)
            .build();
        let hit = metrics
            .token_lookups
            .get_or_create(&LookupLabels {
                result: LookupResult::Hit,
            })
            .clone();
        let miss = metrics
            .token_lookups
            .get_or_create(&LookupLabels {
                result: LookupResult::Miss,
            })
            .clone();
        let (changes, _) = tokio::sync::broadcast::channel(1024);
        for p in &list {
            // Exported at 0 from the start, so `increase()` sees the first takeover.
            let _ = metrics
                .lease_takeovers
                .get_or_create(&crate::telemetry::ProviderLabels {
                    provider: p.id.clone(),
                });
        }
        let breaker_gauges = list
            .iter()
            .map(|p| {
                let g = metrics
                    .idp_breaker_open
                    .get_or_create(&crate::telemetry::ProviderLabels {
                        provider: p.id.clone(),
                    })
                    .clone();
                g.set(0);
                g
            })
            .collect();
        let inner = Arc::new(Inner {
            store,
            providers: list,
            index,
            cfg: cfg.clone(),
            metrics,
            clock,
            cache,
            negative,
            flights: parking_lot::Mutex::new(HashMap::new()),
            flight_seq: AtomicU64::new(0),
            changes,
            epochs: (0..EPOCH_SHARDS).map(|_| AtomicU64::new(0)).collect(),
            generation: AtomicU64::new(0),
            hit,
            miss,
            sync_refreshes: AtomicU64::new(0),
            tasks: TaskTracker::new(),
            draining: CancellationToken::new(),
            reject_cooldown: cooldown::RejectCooldown::new(cfg.cache_capacity, cfg.reject_cooldown),
            backoff: backoff::Backoff::new(cfg.cache_capacity, breaker_gauges, cfg.lease_timeout),
            ahead: ahead::Ahead::new(cfg.refresh_ahead_concurrency, cfg.cache_capacity),
        });
        // Read at scrape time; weak, so the metrics never keep a dropped source alive.
        let weak = Arc::downgrade(&inner);
        inner.metrics.set_cache_probe(Box::new(move || {
            weak.upgrade().map_or(0, |i| i.cache.len() as u64)
        }));
        Ok(Arc::new(Self { inner }))
    }

    /// Starts the background work — the change listener (cache coherence across
    /// replicas) and, when `tokens.refresh_ahead` is on, the refresh-ahead loop. Both
    /// stop when `shutdown` is cancelled; the returned handle completes then.
    pub fn spawn_background(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        background::spawn(self.inner.clone(), shutdown)
    }

    /// The cached token for `user` at `provider` when it can be served as is:
    /// the cache-hit path of [`TokenSource::get`], synchronous, so a caller on the
    /// hot path needs no future for it. `None`: call `get`.
    pub fn get_cached(&self, provider: &str, user: Uuid) -> Option<AccessToken> {
        let inner = &self.inner;
        let &pidx = inner.index.get(provider)?;
        let now = inner.clock.now();
        let e = inner.cached((pidx, user))?;
        if !inner.servable(&e, now) {
            return None;
        }
        e.touch(now);
        inner.hit.inc();
        Some(e.token.clone())
    }

    /// A usable access token for `user` at `provider`.
    pub async fn get(&self, provider: &str, user: Uuid) -> Result<AccessToken, TokenError> {
        let inner = &self.inner;
        let Some(&pidx) = inner.index.get(provider) else {
            return Err(TokenError::LinkMissing);
        };
        let key = (pidx, user);
        let now = inner.clock.now();
        let stale = match inner.cached(key) {
            Some(e) if inner.servable(&e, now) => {
                e.touch(now);
                inner.hit.inc();
                return Ok(e.token.clone());
            }
            // Only aged: a re-read that finds the same row adopted nothing.
            Some(e) => !inner.current(&e, now),
            None => {
                // Answered from memory too (a known-broken link), so counted as a hit.
                if let Some(err) = inner.known_broken(key).await {
                    inner.hit.inc();
                    return Err(err);
                }
                false
            }
        };
        if let Some(token) = inner.backoff.blocked(key, now) {
            // The provider failed transiently for this link: no flight until the
            // backoff passes — the token while it still works, else
            // `idp_unavailable` (with Retry-After). Answered from memory.
            inner.hit.inc();
            return if cache::unexpired(token.expiry(), now) {
                Ok(token)
            } else {
                Err(TokenError::IdpUnavailable)
            };
        }
        inner.miss.inc();
        self.wait(key, flight::Want::Usable { stale }).await
    }

    /// After an upstream answered 401 to `rejected`: replace it through the same
    /// flight — at most once per link per `tokens.reject_cooldown`, across all
    /// requests and token versions, so an upstream that always answers 401 cannot
    /// cause a refresh storm. Returns the same token when no refresh is allowed
    /// (the caller then passes the 401 through).
    pub async fn refresh_rejected(
        &self,
        provider: &str,
        user: Uuid,
        rejected: &AccessToken,
    ) -> Result<AccessToken, TokenError> {
        let inner = &self.inner;
        let Some(&pidx) = inner.index.get(provider) else {
            return Err(TokenError::LinkMissing);
        };
        let key = (pidx, user);
        let now = inner.clock.now();
        if let Some(e) = inner.cached(key) {
            // Already replaced (by another request's refresh): costs no grant.
            if !e.token.same_version(rejected) && inner.servable(&e, now) {
                return Ok(e.token.clone());
            }
        }
        if !inner.reject_cooldown.try_claim(key, now) {
            // Within the cooldown: whatever is current (joining a running flight,
            // which may be the forced refresh itself, or re-reading an entry our own
            // write's notification dropped) — never a forced refresh. When that is
            // the rejected token, the upstream's 401 stands.
            return self.get(provider, user).await;
        }
        self.wait(key, flight::Want::Replace(rejected.clone()))
            .await
    }

    /// How long a caller answered `idp_unavailable` for `user` at `provider` should
    /// wait before trying again (for `Retry-After`); `None` when unknown.
    pub fn retry_after(&self, provider: &str, user: Uuid) -> Option<Duration> {
        let &pidx = self.inner.index.get(provider)?;
        self.inner
            .backoff
            .wait_for((pidx, user), self.inner.clock.now())
    }

    /// Runs one refresh-ahead pass now and waits for the refreshes it started;
    /// returns how many it started. Tests call it to step refresh-ahead
    /// deterministically (the background loop never waits for its flights).
    pub async fn refresh_ahead_now(&self) -> usize {
        let started = ahead::pass(&self.inner).started;
        let n = started.len();
        for t in started {
            let _ = t.await;
        }
        n
    }

    /// Runs one refresh-ahead pass as the background loop does: starts flights
    /// (at most `tokens.refresh_ahead_concurrency` running) and returns how many
    /// it started, without waiting for any.
    pub fn refresh_ahead_pass(&self) -> usize {
        ahead::pass(&self.inner).started.len()
    }

    /// How many `get()`/`refresh_rejected()` calls waited for an exchange with a
    /// provider (a synchronous refresh on the request path). Refresh-ahead keeps
    /// this near zero for links in steady use.
    pub fn sync_refresh_count(&self) -> u64 {
        self.inner.sync_refreshes.load(Ordering::Relaxed)
    }

    /// How many change-feed resyncs this source has applied (the first comes when
    /// the feed connects): lets tests wait for it instead of sleeping.
    pub fn resyncs(&self) -> u64 {
        self.inner.generation()
    }

    /// Shutdown: stops new exchanges from starting (a lookup that would need one
    /// gets the still-valid token or `idp_unavailable`), then waits up to
    /// `timeout` for running exchanges, their writes and background re-saves.
    /// Returns whether all of them finished. The runtime must outlive this wait:
    /// a task dropped between the provider's answer and its write loses the
    /// rotated refresh token.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let inner = &self.inner;
        inner.draining.cancel();
        inner.tasks.close();
        let left = inner.tasks.len();
        if left > 0 {
            tracing::info!(
                tasks = left,
                ?timeout,
                "waiting for token exchanges and writes to finish"
            );
        }
        let done = tokio::time::timeout(timeout, inner.tasks.wait())
            .await
            .is_ok();
        if !done {
            tracing::warn!(
                tasks = inner.tasks.len(),
                "token exchanges still running at the end of the drain; stopping anyway"
            );
        }
        done
    }

    /// Applies a change this process just wrote to `provider`/`user`'s link
    /// (a sign-in), as its change notification will: the next lookup reads the
    /// new row instead of a remembered "no link" from before it.
    pub async fn link_changed(&self, provider_id: &str, user: Uuid) {
        background::apply(
            &self.inner,
            crate::store::ChangeEvent::Link {
                provider_id: provider_id.to_string(),
                user_id: user,
            },
        )
        .await;
    }

    async fn wait(&self, key: Key, want: flight::Want) -> Result<AccessToken, TokenError> {
        let served = flight::run(&self.inner, key, want).await?;
        if served.exchanged {
            self.inner.sync_refreshes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(served.token)
    }
}

#[cfg(test)]
mod tests {
    use super::{bounded_cache, AccessToken};
    use secrecy::SecretString;

    #[test]
    fn a_token_is_held_as_its_bearer_header_and_read_back_whole() {
        let token = AccessToken::new(SecretString::from("gho_abc.DEF-123"), None);
        assert_eq!(token.expose_secret(), "gho_abc.DEF-123");
        let header = token.bearer_header().unwrap();
        assert_eq!(header.as_bytes(), b"Bearer gho_abc.DEF-123");
        assert!(header.is_sensitive());
        assert!(!format!("{token:?}").contains("gho_abc"));
        // An empty token reads back empty, not as part of the prefix.
        assert_eq!(
            AccessToken::new(SecretString::from(""), None).expose_secret(),
            ""
        );
    }

    #[test]
    fn a_token_that_cannot_be_a_header_is_kept_raw() {
        for raw in ["t\u{f6}ken", "line\nbreak", "nul\0"] {
            let token = AccessToken::new(SecretString::from(raw), None);
            assert_eq!(token.expose_secret(), raw);
            assert!(token.bearer_header().is_none());
            assert!(!format!("{token:?}").contains(raw));
        }
    }

    #[test]
    fn a_bounded_cache_holds_its_capacity() {
        // quick_cache divides its capacity over shards; a cache sized for N links
        // must keep N links, or a full cache makes avoidable store reads.
        for n in [1_000u64, 100_000] {
            let cache = bounded_cache::<u64, u64>(n);
            for k in 0..n {
                cache.insert(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), k);
            }
            let held = (0..n)
                .filter(|k| cache.get(&k.wrapping_mul(0x9e37_79b9_7f4a_7c15)).is_some())
                .count() as u64;
            assert_eq!(held, n, "a cache of capacity {n} evicted early");
        }
    }
}
