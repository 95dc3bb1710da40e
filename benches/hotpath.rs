//! Hot-path micro-benchmark: what tokenproxy does per request on a cache hit —
//! caller verification, routing, token lookup and credential injection — measured
//! in-process with criterion, without sockets or the upstream.
//!
//! It runs against a real Postgres store (a database of its own, created and dropped
//! here) wrapped in a counting decorator, so it can also say how many store calls
//! the hot path made: the target is zero. Run with `cargo bench --bench hotpath`;
//! `BENCH_PG` names the server (default `postgres://postgres@127.0.0.1:5432`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use criterion::Criterion;
use http::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretString};
use tokenproxy::config::Config;
use tokenproxy::proxy::caller::{generate_token, CallerIdentity};
use tokenproxy::proxy::inject::inject_credential;
use tokenproxy::proxy::route::Router;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::{
    ChangeEvent, Fence, Lease, LeaseClaim, Link, LinkStore, LinkSummary, NewProxyToken,
    ProxyTokenInfo, RotateReport, StoreError, StoredSecret, TokenSet,
};
use tokenproxy::telemetry::Metrics;
use tokenproxy::tokens::{SystemClock, TokenSource};
use uuid::Uuid;

const DB: &str = "tokenproxy_hotpath";
const USER: Uuid = Uuid::from_u128(0x6f9619ff_8b86_d011_b42d_00cf4fc964ff);

/// A [`LinkStore`] that counts every call by method name and delegates.
struct Counting {
    inner: Arc<dyn LinkStore>,
    calls: Mutex<BTreeMap<&'static str, u64>>,
}

impl Counting {
    fn count(&self, method: &'static str) {
        *self.calls.lock().entry(method).or_default() += 1;
    }
    fn take(&self) -> BTreeMap<&'static str, u64> {
        std::mem::take(&mut *self.calls.lock())
    }
}

#[async_trait::async_trait]
impl LinkStore for Counting {
    async fn get_link(&self, p: &str, u: Uuid) -> Result<Option<Link>, StoreError> {
        self.count("get_link");
        self.inner.get_link(p, u).await
    }
    async fn put_link(&self, p: &str, u: Uuid, t: &TokenSet) -> Result<(), StoreError> {
        self.count("put_link");
        self.inner.put_link(p, u, t).await
    }
    async fn delete_link(&self, p: &str, u: Uuid) -> Result<bool, StoreError> {
        self.count("delete_link");
        self.inner.delete_link(p, u).await
    }
    async fn list_links(&self, u: Option<Uuid>) -> Result<Vec<LinkSummary>, StoreError> {
        self.count("list_links");
        self.inner.list_links(u).await
    }
    async fn claim_refresh_lease(
        &self,
        p: &str,
        u: Uuid,
        old: &StoredSecret,
        lease: Duration,
    ) -> Result<LeaseClaim, StoreError> {
        self.count("claim_refresh_lease");
        self.inner.claim_refresh_lease(p, u, old, lease).await
    }
    async fn release_refresh_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        self.count("release_refresh_lease");
        self.inner.release_refresh_lease(lease).await
    }
    async fn extend_refresh_lease(
        &self,
        lease: &Lease,
        by: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.count("extend_refresh_lease");
        self.inner.extend_refresh_lease(lease, by).await
    }
    async fn write_refreshed(
        &self,
        p: &str,
        u: Uuid,
        old: &Fence,
        new: &TokenSet,
    ) -> Result<bool, StoreError> {
        self.count("write_refreshed");
        self.inner.write_refreshed(p, u, old, new).await
    }
    async fn record_refresh_failure(
        &self,
        p: &str,
        u: Uuid,
        old: &Fence,
        lease: Option<&Lease>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        self.count("record_refresh_failure");
        self.inner
            .record_refresh_failure(p, u, old, lease, reason)
            .await
    }
    async fn create_proxy_token(&self, t: &NewProxyToken) -> Result<ProxyTokenInfo, StoreError> {
        self.count("create_proxy_token");
        self.inner.create_proxy_token(t).await
    }
    async fn find_proxy_token(&self, h: &[u8; 32]) -> Result<Option<ProxyTokenInfo>, StoreError> {
        self.count("find_proxy_token");
        self.inner.find_proxy_token(h).await
    }
    async fn list_proxy_tokens(&self, u: Option<Uuid>) -> Result<Vec<ProxyTokenInfo>, StoreError> {
        self.count("list_proxy_tokens");
        self.inner.list_proxy_tokens(u).await
    }
    async fn revoke_proxy_token(&self, id: Uuid) -> Result<bool, StoreError> {
        self.count("revoke_proxy_token");
        self.inner.revoke_proxy_token(id).await
    }
    async fn touch_proxy_token(&self, id: Uuid) -> Result<(), StoreError> {
        self.count("touch_proxy_token");
        self.inner.touch_proxy_token(id).await
    }
    async fn rotate_keys(&self) -> Result<RotateReport, StoreError> {
        self.count("rotate_keys");
        self.inner.rotate_keys().await
    }
    async fn ready(&self) -> Result<(), StoreError> {
        self.count("ready");
        self.inner.ready().await
    }
    async fn watch_changes(&self) -> Result<tokio::sync::mpsc::Receiver<ChangeEvent>, StoreError> {
        self.count("watch_changes");
        self.inner.watch_changes().await
    }
}

/// Everything one request's hot path touches, built like `serve` builds it.
struct Fixture {
    store: Arc<Counting>,
    callers: CallerIdentity,
    router: Router,
    tokens: Arc<TokenSource>,
    headers: HeaderMap,
}

fn config(server: &str) -> Config {
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    // cache_ttl is long so that the whole run is one caller-cache hit after another;
    // `bench/run queries` measures the server with the default 10 s.
    let text = format!(
        r#"
[database]
url = "{server}/{DB}"
[encryption]
keys = ["{key}"]
[callers]
cache_ttl = "1h"
touch_interval = "1h"
[[providers]]
id = "github"
client_id = "bench"
token_url = "http://127.0.0.1:9/token"
  [[providers.routes]]
  prefix = "/github/api"
  upstream = "https://api.github.com"
  inject = "bearer"
"#
    );
    Config::from_toml_with_env(&text, &[]).expect("bench config is valid")
}

async fn setup(server: &str) -> Fixture {
    let admin = sqlx::PgPool::connect(&format!("{server}/postgres"))
        .await
        .expect("Postgres at BENCH_PG");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)"))
        .execute(&admin)
        .await
        .expect("drop");
    sqlx::query(&format!("CREATE DATABASE {DB}"))
        .execute(&admin)
        .await
        .expect("create");
    let cfg = config(server);
    let pg = PgStore::from_config(&cfg).expect("store");
    pg.migrate().await.expect("migrate");
    pg.put_link(
        "github",
        USER,
        &TokenSet {
            access_token: SecretString::from("gho_0123456789abcdefghijklmnopqrstuvwxyz"),
            refresh_token: SecretString::from("ghr_refresh"),
            expiry: Some(chrono::Utc::now() + chrono::Duration::days(3650)),
            extra: None,
        },
    )
    .await
    .expect("put link");
    let (token, hash) = generate_token();
    pg.create_proxy_token(&NewProxyToken {
        user_id: USER,
        name: "hotpath".into(),
        hash,
        providers: Vec::new(),
        expires_at: None,
    })
    .await
    .expect("token");
    let store = Arc::new(Counting {
        inner: Arc::new(pg),
        calls: Mutex::new(BTreeMap::new()),
    });
    let tokens = TokenSource::new(
        store.clone(),
        &cfg.providers,
        &cfg.tokens,
        Metrics::new(),
        Arc::new(SystemClock),
    )
    .expect("token source");
    let mut headers = HeaderMap::new();
    let bearer = format!("Bearer {}", token.expose_secret());
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&bearer).expect("ascii"),
    );
    headers.insert("user-agent", HeaderValue::from_static("git/2.47.0"));
    headers.insert("accept", HeaderValue::from_static("application/json"));
    Fixture {
        callers: CallerIdentity::new(&cfg.callers, store.clone()),
        router: Router::from_config(&cfg).expect("routes"),
        tokens,
        headers,
        store,
    }
}

/// One request's hot path; returns the header map as it would go upstream.
async fn hot_path(f: &Fixture, path: &str) -> HeaderMap {
    let caller = f.callers.identify(&f.headers).await.expect("caller");
    let route = f.router.find(path).expect("route");
    let uri = route.upstream_uri(path, None).expect("uri");
    assert!(caller.may_use(&route.provider));
    let token = f
        .tokens
        .get(&route.provider, caller.user_id)
        .await
        .expect("token");
    let mut out = f.headers.clone();
    inject_credential(&mut out, &route.inject, &token).expect("inject");
    std::hint::black_box(uri);
    out
}

fn main() {
    let server = std::env::var("BENCH_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let f = rt.block_on(setup(&server));
    let path = "/github/api/repos/octo/hello/pulls?state=open";
    let path = path.split('?').next().unwrap_or(path);
    // Warm both caches (one caller lookup, one link read), then count from zero.
    rt.block_on(hot_path(&f, path));
    let warmup_calls = f.store.take();

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("hit");
    g.bench_function("identify_caller", |b| {
        b.to_async(&rt).iter(|| f.callers.identify(&f.headers))
    });
    g.bench_function("token_lookup", |b| {
        b.to_async(&rt).iter(|| f.tokens.get("github", USER))
    });
    let token = rt.block_on(f.tokens.get("github", USER)).expect("token");
    let route = f.router.find(path).expect("route").clone();
    g.bench_function("inject", |b| {
        b.iter(|| {
            let mut h = f.headers.clone();
            inject_credential(&mut h, &route.inject, &token).expect("inject");
            h
        })
    });
    g.bench_function("identify+route+lookup+inject", |b| {
        b.to_async(&rt).iter(|| hot_path(&f, path))
    });
    g.finish();
    c.final_summary();

    let calls = f.store.take();
    let total: u64 = calls.values().sum();
    println!("store calls while warming (expected: 1 find_proxy_token, 1 get_link, 1 touch): {warmup_calls:?}");
    println!("store calls during all hit benchmarks: {total} {calls:?}");
    rt.block_on(async {
        drop(f);
        if let Ok(admin) = sqlx::PgPool::connect(&format!("{server}/postgres")).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)"))
                .execute(&admin)
                .await;
        }
    });
}
