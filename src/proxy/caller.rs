//! Caller identity phase: who is making this request.
//!
//! In `token` mode callers present a `tpx_` proxy token, as a Bearer token or as
//! the password of Basic credentials, in `Proxy-Authorization` or `Authorization`.
//! The store holds only SHA-256 hashes of those tokens. Verified tokens are kept
//! in a short-lived cache so a busy caller costs no database query; the cache's
//! time-to-live bounds how long a revoked token keeps working. Tokens carry a
//! CRC-32 so forged ones are refused before any lookup; while the store is
//! unreachable a verified token keeps serving for `callers.outage_grace`, and
//! lookups of unverified tokens are capped. In `static` mode
//! (a sidecar on loopback) every request is one configured user.

use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, Utc};
use http::header::{self, HeaderMap};
use quick_cache::sync::{EntryAction, EntryResult};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::error::ProxyError;
use super::tick::Tick;
use crate::config::{CallerMode, CallersConfig};
use crate::crypto::{same_bytes, same_text};
use crate::store::{LinkStore, ProxyTokenInfo, StoreError};

/// Prefix of every proxy token.
pub const TOKEN_PREFIX: &str = "tpx_";
/// Longest proxy token accepted; anything longer is not one of ours.
const MAX_TOKEN_LEN: usize = 256;
/// Most verified tokens kept in memory.
const CACHE_CAPACITY: u64 = 100_000;
/// Most unknown tokens remembered (a client retrying with a deleted or mistyped
/// token costs one lookup per cache lifetime, not one per request).
const UNKNOWN_CAPACITY: u64 = 10_000;

/// How long a failed lookup is remembered for callers that waited on it.
const FAILURE_MEMORY: Duration = Duration::from_secs(5);

/// The identified caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user the request acts for.
    pub user_id: Uuid,
    /// The proxy token used (`None` in static mode).
    pub token_id: Option<Uuid>,
    /// Providers the token is limited to; empty = all.
    providers: Arc<[String]>,
}

impl Caller {
    /// Whether this caller may use `provider`.
    pub fn may_use(&self, provider: &str) -> bool {
        self.providers.is_empty() || self.providers.iter().any(|p| p == provider)
    }
}

/// GitLab's token header; GitLab clients (glab, python-gitlab) send their token
/// here rather than in `Authorization`.
pub const PRIVATE_TOKEN: header::HeaderName = header::HeaderName::from_static("private-token");

/// The proxy token a request presents, read in one pass: `Proxy-Authorization`
/// first, then `Authorization` — Bearer, GitHub's `token` scheme (what `gh` and
/// most GitHub clients send), or the password (or, failing that, the user name)
/// of Basic credentials — then a bare token in `PRIVATE-TOKEN`. Headers that
/// hold something else are ignored.
/// Two different tokens (say user A's in `Authorization` and user B's in
/// `Proxy-Authorization`) are [`TwoTokens`]: which one is meant is ambiguous, so
/// neither is used.
pub fn presented_proxy_token(headers: &HeaderMap) -> Result<Option<SecretString>, TwoTokens> {
    let in_credentials = [header::PROXY_AUTHORIZATION, header::AUTHORIZATION]
        .iter()
        .flat_map(|name| headers.get_all(name))
        .filter_map(|v| v.to_str().ok())
        .filter_map(parse_credential);
    let in_private = headers
        .get_all(PRIVATE_TOKEN)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| is_proxy_token(v))
        .map(|v| SecretString::from(v.to_string()));
    let mut found = in_credentials.chain(in_private);
    let Some(first) = found.next() else {
        return Ok(None);
    };
    if found.any(|t| !same_text(t.expose_secret(), first.expose_secret())) {
        return Err(TwoTokens);
    }
    Ok(Some(first))
}

/// A request that presents two different proxy tokens.
#[derive(Debug, PartialEq, Eq)]
pub struct TwoTokens;

/// Removes every header that carries a proxy token (a caller credential) from a
/// request about to go upstream: `Authorization` and `Proxy-Authorization` go
/// anyway; `PRIVATE-TOKEN` goes when it holds one of ours.
pub fn remove_caller_credentials(headers: &mut HeaderMap) {
    // One look at the names first: removing a header that is not there costs a
    // hash and a probe each, and most requests carry only `Authorization`.
    let (mut auth, mut proxy, mut coder, mut private) = (false, false, false, false);
    for name in headers.keys() {
        if name == header::AUTHORIZATION {
            auth = true;
        } else if name == header::PROXY_AUTHORIZATION {
            proxy = true;
        } else if name == super::caller_coder::CODER_SESSION_TOKEN {
            // A Coder agent token is a caller credential too (coder_agent mode).
            coder = true;
        } else if name == PRIVATE_TOKEN {
            private = true;
        }
    }
    if auth {
        headers.remove(header::AUTHORIZATION);
    }
    if proxy {
        headers.remove(header::PROXY_AUTHORIZATION);
    }
    if coder {
        headers.remove(super::caller_coder::CODER_SESSION_TOKEN);
    }
    let ours = private
        && headers
            .get_all(PRIVATE_TOKEN)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.trim().starts_with(TOKEN_PREFIX)));
    if ours {
        headers.remove(PRIVATE_TOKEN);
    }
}

/// Parses one credential header value for a proxy token.
fn parse_credential(value: &str) -> Option<SecretString> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token") {
        return is_proxy_token(rest).then(|| SecretString::from(rest.to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let decoded = SecretString::from(String::from_utf8(decoded).ok()?);
        let (user, pass) = decoded.expose_secret().split_once(':')?;
        return [pass, user]
            .into_iter()
            .find(|c| is_proxy_token(c))
            .map(|c| SecretString::from(c.to_string()));
    }
    None
}

fn is_proxy_token(s: &str) -> bool {
    s.len() > TOKEN_PREFIX.len()
        && s.len() <= MAX_TOKEN_LEN
        && s.starts_with(TOKEN_PREFIX)
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Base62 alphabet of new proxy tokens (digits, upper, lower case).
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Random base62 characters in a new token: 43 × log2(62) ≈ 256 bits.
const RANDOM_LEN: usize = 43;
/// Base62 characters of the CRC-32 (62^6 > 2^32), zero-padded.
const CHECKSUM_LEN: usize = 6;
/// Length of a new (checksummed) token: `tpx_` + 43 random + 6 checksum.
pub const CHECKSUMMED_LEN: usize = TOKEN_PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN;
/// Length of a token of the first format: `tpx_` + 32 bytes in base64url.
const LEGACY_LEN: usize = TOKEN_PREFIX.len() + 43;

/// The CRC-32 of the checksum, its table built once at compile time (built per
/// call, the table cost more than the rest of a cache-hit's caller check).
static CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// CRC-32 (ISO-HDLC, the zlib/GitHub one) of the random part, in fixed-width base62.
fn checksum(random: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = CRC32.checksum(random);
    let mut out = [b'0'; CHECKSUM_LEN];
    for c in out.iter_mut().rev() {
        *c = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Whether `token` can be a proxy token we issued, decided offline so a forged
/// or mistyped token costs no database query: a checksummed token whose CRC
/// matches, or a token of the first format (32 bytes in canonical base64url).
pub fn is_well_formed(token: &str) -> bool {
    let Some(body) = token.strip_prefix(TOKEN_PREFIX) else {
        return false;
    };
    match token.len() {
        CHECKSUMMED_LEN => {
            let (random, sum) = body.as_bytes().split_at(RANDOM_LEN);
            random.iter().all(u8::is_ascii_alphanumeric) && same_bytes(sum, &checksum(random))
        }
        // Tokens issued before the checksum existed keep working. The decoder
        // refuses non-canonical trailing bits, so only 2^256 strings pass.
        LEGACY_LEN => base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .is_ok_and(|raw| raw.len() == 32),
        _ => false,
    }
}

/// A new random proxy token (`tpx_` + 43 random base62 characters + their
/// CRC-32 in 6 base62 characters) and the hash to store. The token is shown to
/// its owner once and never stored.
pub fn generate_token() -> (SecretString, [u8; 32]) {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    let mut token = String::with_capacity(CHECKSUMMED_LEN);
    token.push_str(TOKEN_PREFIX);
    let mut random = Vec::with_capacity(RANDOM_LEN);
    while random.len() < RANDOM_LEN {
        let mut bytes = [0u8; 64];
        rng.fill(&mut bytes).expect("the OS random source works");
        // Rejection sampling: 248 = 4 × 62, so every character is equally likely.
        random.extend(
            bytes
                .iter()
                .filter(|b| **b < 248)
                .map(|b| BASE62[usize::from(*b % 62)])
                .take(RANDOM_LEN - random.len()),
        );
    }
    let sum = checksum(&random);
    token.extend(random.iter().chain(sum.iter()).map(|b| char::from(*b)));
    let token = SecretString::from(token);
    let hash = hash_token(&token);
    (token, hash)
}

/// SHA-256 of a proxy token, the form the store keeps.
pub fn hash_token(token: &SecretString) -> [u8; 32] {
    Sha256::digest(token.expose_secret().as_bytes()).into()
}

/// A verified token as cached: what the request path needs from its record. The
/// name and the creation and last-use times are left out — nothing on the request
/// path reads them — and so is the hash, which is the cache key: every cached
/// caller costs memory (issue 7: 100k cached callers; 128 bytes each with the
/// allocator's rounding, 192 with the hash and two `Instant`s).
struct Verified {
    token_id: Uuid,
    user_id: Uuid,
    /// Shared with every [`Caller`] built from this entry: no allocation per request.
    providers: Arc<[String]>,
    expires_at: Option<DateTime<Utc>>,
    revoked: bool,
    /// When the record was read from the store ([`Tick`]).
    loaded: Tick,
    /// Served from the cache without asking the store until then: `loaded` +
    /// `callers.cache_ttl`, or, while the store is unreachable, the next retry.
    fresh_until: Tick,
    /// The last-use throttle: unix milliseconds of the last `last_used_at` write
    /// (this process's, or the store's value when the record was read).
    touched_ms: AtomicI64,
    /// The address of the request that made this record read: requests from it
    /// need no audit check, so the usual caller costs nothing more per request.
    first_source: Option<IpAddr>,
}

impl Verified {
    fn new(info: ProxyTokenInfo, ttl: Duration, first_source: Option<IpAddr>) -> Self {
        let providers: Arc<[String]> = if info.providers.is_empty() {
            ALL_PROVIDERS.clone()
        } else {
            Arc::from(info.providers)
        };
        let now = Tick::now();
        Self {
            token_id: info.id,
            user_id: info.user_id,
            providers,
            expires_at: info.expires_at,
            revoked: info.revoked_at.is_some(),
            loaded: now,
            fresh_until: now.after(ttl),
            touched_ms: AtomicI64::new(
                info.last_used_at.map_or(i64::MIN, |t| t.timestamp_millis()),
            ),
            first_source,
        }
    }
}

impl Verified {
    /// The same record, kept through a store outage and asked for again at
    /// `until` (its `loaded` time stays: the outage grace counts from it).
    fn kept_until(&self, until: Tick) -> Self {
        Self {
            token_id: self.token_id,
            user_id: self.user_id,
            providers: self.providers.clone(),
            expires_at: self.expires_at,
            revoked: self.revoked,
            loaded: self.loaded,
            fresh_until: until,
            touched_ms: AtomicI64::new(self.touched_ms.load(Ordering::Relaxed)),
            first_source: self.first_source,
        }
    }
}

/// The empty provider list (= all providers), shared by every unrestricted caller.
static ALL_PROVIDERS: LazyLock<Arc<[String]>> = LazyLock::new(|| Arc::from(Vec::new()));

/// Identifies callers; cheap to share.
pub struct CallerIdentity {
    mode: CallerMode,
    static_user: Option<Uuid>,
    store: Arc<dyn LinkStore>,
    /// Verified tokens by hash. A `quick_cache` rather than moka: about a third of
    /// the memory per entry; entries older than `ttl` are not served and are
    /// replaced on the next lookup (or evicted when the cache is full).
    verified: quick_cache::sync::Cache<[u8; 32], Arc<Verified>>,
    ttl: Duration,
    touch_every_ms: i64,
    /// Hashes the store did not know. Safe to remember: a token is random and
    /// only presented after it was created, so "unknown" does not turn into
    /// "known" for the same value.
    unknown: moka::sync::Cache<[u8; 32], ()>,
    /// When a lookup of a token last failed, by hash: callers that waited on a
    /// lookup of the same token share its failure instead of retrying one after
    /// another. Per token, so one token's failure never fails another's lookup.
    failed: moka::sync::Cache<[u8; 32], Tick>,
    /// How long past `ttl` a verified record is served while the store fails.
    outage_grace: Duration,
    /// Slots for store lookups of tokens not verified yet: a flood of unknown
    /// tokens cannot take every database connection.
    lookup_slots: tokio::sync::Semaphore,
    /// How long a lookup waits for a slot before answering 503.
    lookup_wait: Duration,
    /// `coder_agent` mode: `tpx_` proxy tokens are accepted beside agent tokens.
    proxy_tokens_beside_agents: bool,
    /// The audit trail (first use from an address, expired tokens, refused
    /// credentials), when the server has one.
    metrics: Option<Arc<crate::telemetry::Metrics>>,
}

impl CallerIdentity {
    /// Builds the identity phase for `config` over `store`.
    pub fn new(config: &CallersConfig, store: Arc<dyn LinkStore>) -> Self {
        let touch_every = config.touch_interval.max(Duration::from_secs(1));
        Self {
            mode: config.mode,
            static_user: config.static_user,
            store: store.clone(),
            verified: crate::tokens::bounded_cache(CACHE_CAPACITY),
            ttl: config.cache_ttl,
            touch_every_ms: i64::try_from(touch_every.as_millis()).unwrap_or(i64::MAX),
            unknown: moka::sync::Cache::builder()
                .max_capacity(UNKNOWN_CAPACITY)
                .time_to_live(config.cache_ttl)
                .build(),
            failed: moka::sync::Cache::builder()
                .max_capacity(UNKNOWN_CAPACITY)
                .time_to_live(FAILURE_MEMORY)
                .build(),
            outage_grace: config.outage_grace,
            lookup_slots: tokio::sync::Semaphore::new(config.max_concurrent_lookups),
            lookup_wait: config.lookup_wait,
            proxy_tokens_beside_agents: false,
            metrics: None,
        }
    }

    /// In `coder_agent` mode, also accept `tpx_` proxy tokens (`coder.proxy_tokens`).
    pub fn with_proxy_tokens_beside_agents(mut self, on: bool) -> Self {
        self.proxy_tokens_beside_agents = on;
        self
    }

    /// Records this phase's audit events in `metrics`' trail.
    pub fn with_audit(mut self, metrics: Arc<crate::telemetry::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Who is calling. Expiry and revocation are checked on every request against
    /// the cached record, which is at most `cache_ttl` old.
    pub async fn identify(&self, headers: &HeaderMap) -> Result<Caller, ProxyError> {
        self.identify_from(headers, None).await
    }

    /// [`identify`](Self::identify) for a request from `remote` (audited).
    pub async fn identify_from(
        &self,
        headers: &HeaderMap,
        remote: Option<IpAddr>,
    ) -> Result<Caller, ProxyError> {
        if self.mode == CallerMode::CoderAgent {
            if let Some(found) = self.identify_agent(headers, false).await {
                return found;
            }
        }
        // Static mode looks at no credential at all.
        let token = if self.mode == CallerMode::Static {
            None
        } else {
            presented_proxy_token(headers).map_err(|TwoTokens| {
                ProxyError::BadRequest("two different proxy tokens in one request")
            })?
        };
        self.identify_token(|| token, remote).await
    }

    /// Who is calling, in forward mode: only `Proxy-Authorization` counts
    /// (`Authorization` belongs to the client's conversation with the origin), and
    /// a missing or bad credential is a 407.
    pub async fn identify_proxy(&self, headers: &HeaderMap) -> Result<Caller, ProxyError> {
        self.identify_proxy_from(headers, None).await
    }

    /// [`identify_proxy`](Self::identify_proxy) for a request from `remote` (audited).
    pub async fn identify_proxy_from(
        &self,
        headers: &HeaderMap,
        remote: Option<IpAddr>,
    ) -> Result<Caller, ProxyError> {
        if self.mode == CallerMode::CoderAgent {
            if let Some(found) = self.identify_agent(headers, true).await {
                return found.map_err(|e| match e {
                    ProxyError::Unauthenticated => ProxyError::ProxyAuthRequired,
                    other => other,
                });
            }
        }
        let found = || {
            headers
                .get_all(header::PROXY_AUTHORIZATION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(parse_credential)
        };
        self.identify_token(found, remote)
            .await
            .map_err(|e| match e {
                ProxyError::Unauthenticated => ProxyError::ProxyAuthRequired,
                other => other,
            })
    }

    async fn identify_token(
        &self,
        extract: impl FnOnce() -> Option<SecretString>,
        remote: Option<IpAddr>,
    ) -> Result<Caller, ProxyError> {
        if self.mode == CallerMode::Static {
            let user_id = self.static_user.ok_or(ProxyError::Unauthenticated)?;
            return Ok(Caller {
                user_id,
                token_id: None,
                providers: ALL_PROVIDERS.clone(),
            });
        }
        if self.mode == CallerMode::CoderAgent && !self.proxy_tokens_beside_agents {
            return Err(ProxyError::Unauthenticated);
        }
        // No credential at all is not a failure to audit: git and others ask
        // without one first and retry with it after the 401/407.
        let token = extract().ok_or(ProxyError::Unauthenticated)?;
        let out = self.verify_token(token, remote).await;
        if let (Err(ProxyError::Unauthenticated), Some(m), Some(ip)) = (&out, &self.metrics, remote)
        {
            m.audit.auth_failed(ip);
        }
        out
    }

    /// Checks a presented proxy token: well-formed, known, not revoked or expired.
    async fn verify_token(
        &self,
        token: SecretString,
        remote: Option<IpAddr>,
    ) -> Result<Caller, ProxyError> {
        // A forged, truncated or mistyped token is refused here, before any
        // cache or database lookup (issue 12: floods of random tokens).
        if !is_well_formed(token.expose_secret()) {
            return Err(ProxyError::Unauthenticated);
        }
        let hash = hash_token(&token);
        drop(token);
        self.verify(hash, Credential::Proxy, remote).await
    }

    /// Checks a caller credential by its SHA-256 — the same cache, outage grace,
    /// negative cache and lookup cap for every kind of credential.
    pub(super) async fn verify(
        &self,
        hash: [u8; 32],
        credential: Credential,
        remote: Option<IpAddr>,
    ) -> Result<Caller, ProxyError> {
        let verified = match self.verified.get(&hash) {
            Some(v) if Tick::now() < v.fresh_until => v,
            _ => self.lookup(hash, credential, remote).await?,
        };
        if verified.revoked {
            return Err(ProxyError::Unauthenticated);
        }
        let now = Utc::now();
        if verified.expires_at.is_some_and(|t| t <= now) {
            if let Some(m) = &self.metrics {
                m.audit
                    .proxy_token_expired(verified.token_id, verified.user_id);
            }
            return Err(ProxyError::Unauthenticated);
        }
        // Only a request from another address than the one that loaded the
        // record asks the trail (a shared set): the common caller never does.
        if let (Some(m), Some(ip)) = (&self.metrics, remote) {
            if verified.first_source != Some(ip) {
                m.audit
                    .proxy_token_used(verified.token_id, verified.user_id, ip);
            }
        }
        self.touch(&verified, now.timestamp_millis());
        Ok(Caller {
            user_id: verified.user_id,
            // Agent tokens have no proxy-token record.
            token_id: Some(verified.token_id).filter(|id| !id.is_nil()),
            providers: verified.providers.clone(),
        })
    }

    /// Reads the token's record from the store, once for all concurrent callers
    /// presenting the same token (the others wait for the first one's answer).
    /// If the store fails and the token was verified at most `cache_ttl` +
    /// `outage_grace` ago, the record last read keeps serving, and the store is
    /// asked again one `cache_ttl` later (so a revocation applies within
    /// `cache_ttl` of the store answering again).
    async fn lookup(
        &self,
        hash: [u8; 32],
        credential: Credential,
        remote: Option<IpAddr>,
    ) -> Result<Arc<Verified>, ProxyError> {
        let started = Tick::now();
        let (guard, stale) = match self
            .verified
            .entry_async(&hash, |_, v| {
                if Tick::now() < v.fresh_until {
                    EntryAction::Retain(v.clone())
                } else {
                    EntryAction::ReplaceWithGuard
                }
            })
            .await
        {
            EntryResult::Retained(v) => return Ok(v),
            EntryResult::Vacant(g) => (g, None),
            EntryResult::Replaced(g, old) => (g, Some(old)),
            // Neither happens: the callback never removes, and the async form has
            // no timeout.
            EntryResult::Removed(..) | EntryResult::Timeout => {
                return Err(ProxyError::StoreUnavailable)
            }
        };
        // Another caller's lookup of this token may have just failed while we
        // waited for it: share its answer rather than asking the store again.
        if self.unknown.contains_key(&hash) {
            return Err(ProxyError::Unauthenticated);
        }
        if self.failed.get(&hash).is_some_and(|t| t >= started) {
            return Err(ProxyError::StoreUnavailable);
        }
        // Re-reading a known token is not limited: there are only as many as
        // real callers, and a flood of unknown ones must not lock them out.
        let _slot = match stale {
            Some(_) => None,
            None => match tokio::time::timeout(self.lookup_wait, self.lookup_slots.acquire()).await
            {
                Ok(Ok(slot)) => Some(slot),
                _ => {
                    tracing::debug!("proxy token lookups at their limit");
                    self.failed.insert(hash, Tick::now());
                    return Err(ProxyError::StoreUnavailable);
                }
            },
        };
        match credential.find(&*self.store, &hash).await {
            Ok(Some(info)) => {
                let usable =
                    info.revoked_at.is_none() && info.expires_at.is_none_or(|t| t > Utc::now());
                if let (Some(m), Some(ip), true) = (&self.metrics, remote, usable) {
                    m.audit.proxy_token_used(info.id, info.user_id, ip);
                }
                let v = Arc::new(Verified::new(info, self.ttl, remote));
                let _ = guard.insert(v.clone());
                Ok(v)
            }
            Ok(None) => {
                self.unknown.insert(hash, ());
                Err(ProxyError::Unauthenticated)
            }
            Err(e) => {
                log_store_error(&e);
                let now = Tick::now();
                let grace_ends = stale
                    .as_ref()
                    .map(|old| old.loaded.after(self.ttl + self.outage_grace));
                if let (Some(old), Some(ends)) = (stale, grace_ends) {
                    if now < ends {
                        let v = Arc::new(old.kept_until(now.after(self.ttl).min(ends)));
                        let _ = guard.insert(v.clone());
                        return Ok(v);
                    }
                }
                self.failed.insert(hash, now);
                Err(ProxyError::StoreUnavailable)
            }
        }
    }

    /// Records the token's last use at most once per touch interval, off the
    /// request path. The throttle is the cached entry's timestamp (a relaxed
    /// compare-and-swap), so only one of many concurrent requests writes.
    fn touch(&self, v: &Verified, now_ms: i64) {
        if v.token_id.is_nil() {
            return;
        }
        let last = v.touched_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < self.touch_every_ms {
            return;
        }
        if v.touched_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let store = self.store.clone();
        let id = v.token_id;
        tokio::spawn(async move {
            if let Err(e) = store.touch_proxy_token(id).await {
                tracing::debug!(token_id = %id, error = %e, "could not record proxy token use");
            }
        });
    }
}

/// What kind of caller credential is being verified, and so how the store is asked.
#[derive(Debug, Clone, Copy)]
pub(super) enum Credential {
    /// A `tpx_` proxy token, found by its hash.
    Proxy,
    /// A Coder agent token (see [`super::caller_coder`]).
    Agent(Uuid),
}

impl Credential {
    async fn find(
        self,
        store: &dyn LinkStore,
        hash: &[u8; 32],
    ) -> Result<Option<ProxyTokenInfo>, StoreError> {
        match self {
            Self::Proxy => store.find_proxy_token(hash).await,
            Self::Agent(token) => super::caller_coder::find_agent(store, token).await,
        }
    }
}

fn log_store_error(e: &StoreError) {
    tracing::warn!(error = %e, "proxy token lookup failed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn a_verified_caller_fits_the_128_byte_class() {
        // An `Arc` adds two counters (16 bytes) to the record it holds.
        assert!(std::mem::size_of::<Verified>() + 16 <= 128);
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn basic(user: &str, pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    }

    fn found(h: &HeaderMap) -> Option<String> {
        presented_proxy_token(h)
            .unwrap()
            .map(|s| s.expose_secret().to_string())
    }

    #[test]
    fn two_different_tokens_are_ambiguous() {
        let (a, b) = ("tpx_user_a", "tpx_user_b");
        let two = |pairs: &[(&str, &str)]| presented_proxy_token(&headers(pairs)).is_err();
        assert!(two(&[
            ("authorization", &format!("Bearer {a}")),
            ("proxy-authorization", &format!("Bearer {b}")),
        ]));
        assert!(two(&[
            ("authorization", &basic("x", a)),
            ("private-token", b),
        ]));
        // The same token twice, or one token beside a non-proxy credential, is fine.
        assert!(!two(&[
            ("authorization", &format!("Bearer {a}")),
            ("proxy-authorization", &basic("x", a)),
        ]));
        assert!(!two(&[
            ("authorization", "Bearer ghp_not_ours"),
            ("proxy-authorization", &format!("Bearer {a}")),
        ]));
        assert!(!two(&[]));
    }

    #[test]
    fn bearer_in_either_header() {
        let t = "tpx_abc123";
        for name in ["authorization", "proxy-authorization"] {
            let h = headers(&[(name, &format!("Bearer {t}"))]);
            assert_eq!(found(&h).as_deref(), Some(t));
            let h = headers(&[(name, &format!("bearer   {t} "))]);
            assert_eq!(found(&h).as_deref(), Some(t));
        }
    }

    #[test]
    fn github_token_scheme_and_gitlab_private_token() {
        let h = headers(&[("authorization", "token tpx_gh")]);
        assert_eq!(found(&h).as_deref(), Some("tpx_gh"));
        let h = headers(&[("private-token", "tpx_gl")]);
        assert_eq!(found(&h).as_deref(), Some("tpx_gl"));
        let h = headers(&[("private-token", "glpat-theirs")]);
        assert_eq!(found(&h), None);
        let mut h = headers(&[
            ("authorization", "Bearer x"),
            ("proxy-authorization", "Bearer y"),
            ("private-token", "tpx_gl"),
        ]);
        remove_caller_credentials(&mut h);
        assert!(h.is_empty());
        let mut h = headers(&[("private-token", "glpat-theirs")]);
        remove_caller_credentials(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn basic_password_or_user() {
        let h = headers(&[("authorization", &basic("x", "tpx_pw"))]);
        assert_eq!(found(&h).as_deref(), Some("tpx_pw"));
        let h = headers(&[("authorization", &basic("tpx_user", ""))]);
        assert_eq!(found(&h).as_deref(), Some("tpx_user"));
        let h = headers(&[("authorization", &basic("x", "ghp_notours"))]);
        assert_eq!(found(&h), None);
    }

    #[test]
    fn proxy_authorization_wins_and_foreign_credentials_are_skipped() {
        // Two different ones: neither (the request is answered 400).
        let h = headers(&[
            ("authorization", "Bearer tpx_second"),
            ("proxy-authorization", "Bearer tpx_first"),
        ]);
        assert_eq!(presented_proxy_token(&h).err(), Some(TwoTokens));
        let h = headers(&[
            ("authorization", "Bearer tpx_same"),
            ("proxy-authorization", &basic("x", "tpx_same")),
        ]);
        assert_eq!(found(&h).as_deref(), Some("tpx_same"));
        let h = headers(&[
            ("authorization", "Bearer ghp_caller_own"),
            ("proxy-authorization", "Basic !!notbase64"),
        ]);
        assert_eq!(found(&h), None);
        let h = headers(&[
            ("proxy-authorization", "Bearer ghp_other"),
            ("authorization", "Bearer tpx_ok"),
        ]);
        assert_eq!(found(&h).as_deref(), Some("tpx_ok"));
    }

    #[test]
    fn malformed_tokens_are_not_tokens() {
        for bad in [
            "Bearer tpx_",
            "Bearer tpx_a b",
            "Bearer tpx_a$b",
            "Bearer",
            "Digest tpx_abc",
            "tpx_abc",
        ] {
            assert_eq!(found(&headers(&[("authorization", bad)])), None, "{bad}");
        }
        let long = format!("Bearer tpx_{}", "a".repeat(300));
        assert_eq!(found(&headers(&[("authorization", &long)])), None);
    }

    #[test]
    fn generated_tokens_parse_and_differ() {
        let (a, ha) = generate_token();
        let (b, hb) = generate_token();
        assert_ne!(ha, hb);
        assert_eq!(hash_token(&a), ha);
        let h = headers(&[("authorization", &format!("Bearer {}", a.expose_secret()))]);
        assert_eq!(found(&h).as_deref(), Some(a.expose_secret()));
        let h = headers(&[("authorization", &basic("x", b.expose_secret()))]);
        assert_eq!(found(&h).as_deref(), Some(b.expose_secret()));
    }

    #[test]
    fn checksummed_tokens_are_checked_offline() {
        let (t, _) = generate_token();
        let t = t.expose_secret();
        assert_eq!(t.len(), CHECKSUMMED_LEN);
        assert!(t[TOKEN_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric()));
        assert!(is_well_formed(t));
        // One changed character in the random part or the checksum is caught.
        for i in [TOKEN_PREFIX.len(), CHECKSUMMED_LEN - 1] {
            let mut forged = t.as_bytes().to_vec();
            forged[i] = if forged[i] == b'a' { b'b' } else { b'a' };
            assert!(!is_well_formed(std::str::from_utf8(&forged).unwrap()));
        }
        // The checksum is the CRC-32 of the random part in fixed-width base62.
        assert_eq!(&checksum(b"0"), b"4U0xWL"); // crc32("0") = 0xf4dbdf21
        assert_eq!(&checksum(b""), b"000000");
        for bad in [
            "tpx_",
            "tpx_abc123",
            &t[..t.len() - 1],
            &format!("{t}0"),
            &format!("tpx_{}", "-".repeat(RANDOM_LEN + CHECKSUM_LEN)),
            &format!("TPX_{}", &t[4..]),
        ] {
            assert!(!is_well_formed(bad), "{bad}");
        }
    }

    #[test]
    fn first_format_tokens_stay_valid() {
        let old = format!(
            "tpx_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xfbu8; 32])
        );
        assert_eq!(old.len(), LEGACY_LEN);
        assert!(is_well_formed(&old));
        // Same length but not canonical base64url of 32 bytes.
        let mut noncanonical = old.clone();
        noncanonical.pop();
        noncanonical.push('_');
        assert!(!is_well_formed(&noncanonical));
    }

    #[test]
    fn hash_is_sha256_of_the_whole_token() {
        let h = hash_token(&SecretString::from("tpx_abc".to_string()));
        assert_eq!(hex::encode(h), hex::encode(Sha256::digest(b"tpx_abc")));
    }
}
