//! A world for the browser sign-in tests: the test IdP (with its login page),
//! an upstream that accepts only the IdP's live access tokens, and proxy
//! replicas whose `server.public_url` is their own address, each with its own
//! pool, token source and change feed over one database.
//!
//! Included by `tests/login*.rs` with `#[path]`, next to `support` and the
//! proxy harness.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use sqlx::PgPool;
use tokenproxy::config::Config;
use tokenproxy::crypto::Keyring;
use tokenproxy::proxy::Deps;
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::LinkStore;
use tokenproxy::telemetry::Metrics;
use tokenproxy::tokens::{SystemClock, TokenSource};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::support::idp::Idp;
use super::support::upstream::{CredentialForm, TestUpstream};

/// A base64 32-byte key for `encryption.keys` (login URLs are signed with a key
/// derived from it).
pub const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// One running proxy replica.
pub struct Replica {
    /// Proxy listener.
    pub addr: SocketAddr,
    /// Its store (own pool).
    pub store: Arc<dyn LinkStore>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Replica {
    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

/// Provider TOML for a plain OAuth2 provider `id` at `idp`, routed `/ID/api` → `api`.
pub fn oauth_provider(id: &str, idp: &Idp, api: &str) -> String {
    let base = idp.base_url();
    format!(
        r#"
[[providers]]
id = "{id}"
client_id = "test-client"
client_secret = "test-secret"
token_url = "{base}/oauth/token"
authorize_url = "{base}/oauth/authorize"
scopes = ["repo", "read:user"]
timeout = "2s"
  [[providers.routes]]
  prefix = "/{id}/api"
  upstream = "{api}"
"#
    )
}

/// Provider TOML for an `oidc` provider `id` whose issuer is `idp`.
pub fn oidc_provider(id: &str, idp: &Idp, api: &str) -> String {
    format!(
        r#"
[[providers]]
id = "{id}"
preset = "oidc"
issuer = "{}"
client_id = "test-client"
client_secret = "test-secret"
timeout = "2s"
  [[providers.routes]]
  prefix = "/{id}/api"
  upstream = "{api}"
"#,
        idp.base_url()
    )
}

/// An upstream that accepts exactly the IdP's live access tokens.
pub async fn api_for(idp: &Arc<Idp>) -> TestUpstream {
    let idp = idp.clone();
    TestUpstream::start(
        CredentialForm::Bearer,
        Arc::new(move |t: &str| idp.is_valid_access_token(t)),
    )
    .await
}

/// Starts a replica over its own pool on `pool`'s database, with `providers`
/// (TOML) and `server.public_url` set to its own address.
pub async fn replica(pool: &PgPool, providers: &str, extra: &str) -> Replica {
    replica_behind(pool, providers, extra, None).await
}

/// [`replica`] whose `server.public_url` is `public` (the address every
/// replica behind one load balancer shares) when given.
pub async fn replica_behind(
    pool: &PgPool,
    providers: &str,
    extra: &str,
    public: Option<SocketAddr>,
) -> Replica {
    replica_with(pool, providers, extra, public, true).await
}

/// [`replica`] without the token source's background work (no change feed):
/// what it knows of a link changes only through its own code paths.
#[allow(dead_code)]
pub async fn replica_without_feed(pool: &PgPool, providers: &str, extra: &str) -> Replica {
    replica_with(pool, providers, extra, None, false).await
}

async fn replica_with(
    pool: &PgPool,
    providers: &str,
    extra: &str,
    public: Option<SocketAddr>,
    feed: bool,
) -> Replica {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let public = public.unwrap_or(addr);
    let text = format!(
        "[server]\npublic_url = \"http://{public}\"\n{extra}\n[encryption]\nkeys = [\"{KEY}\"]\n\
         [callers]\ncache_ttl = \"5s\"\n{providers}"
    );
    let mut config = Config::from_toml_with_env(&text, &[]).expect("test config is valid");
    tokenproxy::oauth::presets::discover(&mut config)
        .await
        .expect("discovery");
    let own_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(5)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let keyring = Keyring::new(config.encryption_keys(), config.encryption_format());
    let store: Arc<dyn LinkStore> = Arc::new(PgStore::from_pool(own_pool, keyring));
    let tokens = TokenSource::new(
        store.clone(),
        &config.providers,
        &config.tokens,
        Metrics::new(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let stop = CancellationToken::new();
    if feed {
        tokens.spawn_background(stop.clone());
    }
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let deps = Deps {
        config: Arc::new(config),
        store: store.clone(),
        tokens,
        metrics: Metrics::new(),
    };
    let shutdown = stop.clone();
    let task = tokio::spawn(tokenproxy::app::run(listener, admin, deps, async move {
        shutdown.cancelled().await
    }));
    Replica {
        addr,
        store,
        stop,
        task,
    }
}

/// Rows in `external_auth_links`.
pub async fn link_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM external_auth_links")
        .fetch_one(pool)
        .await
        .unwrap()
}
