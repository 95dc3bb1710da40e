//! A [`LinkStore`] that times every call of the store it wraps and reports the
//! duration to an observer (the server feeds
//! `tokenproxy_store_query_duration_seconds{op}`). The store knows nothing of
//! metrics: the observer is a plain function handed in by the wiring above it.
//!
//! Only store calls pay for it (a clock read before and after); a cache hit makes
//! none.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{
    ChangeEvent, Fence, Lease, LeaseClaim, Link, LinkStates, LinkStore, LinkSummary, NewProxyToken,
    ProxyTokenInfo, RotateReport, StoreError, StoredSecret, TokenSet,
};

/// Receives the name of a store operation and how long it took.
pub type Observer = Arc<dyn Fn(&'static str, Duration) + Send + Sync>;

/// Wraps a store, timing each call.
pub struct Timed {
    inner: Arc<dyn LinkStore>,
    observe: Observer,
}

impl Timed {
    /// Times every call of `inner`, reporting to `observe`.
    pub fn new(inner: Arc<dyn LinkStore>, observe: Observer) -> Self {
        Self { inner, observe }
    }

    async fn time<T>(&self, op: &'static str, call: impl std::future::Future<Output = T>) -> T {
        let started = Instant::now();
        let out = call.await;
        (self.observe)(op, started.elapsed());
        out
    }
}

#[async_trait::async_trait]
impl LinkStore for Timed {
    async fn get_link(&self, provider_id: &str, user_id: Uuid) -> Result<Option<Link>, StoreError> {
        self.time("get_link", self.inner.get_link(provider_id, user_id))
            .await
    }

    async fn put_link(
        &self,
        provider_id: &str,
        user_id: Uuid,
        tokens: &TokenSet,
    ) -> Result<(), StoreError> {
        self.time(
            "put_link",
            self.inner.put_link(provider_id, user_id, tokens),
        )
        .await
    }

    async fn delete_link(&self, provider_id: &str, user_id: Uuid) -> Result<bool, StoreError> {
        self.time("delete_link", self.inner.delete_link(provider_id, user_id))
            .await
    }

    async fn list_links(&self, user_id: Option<Uuid>) -> Result<Vec<LinkSummary>, StoreError> {
        self.time("list_links", self.inner.list_links(user_id))
            .await
    }

    async fn claim_refresh_lease(
        &self,
        provider_id: &str,
        user_id: Uuid,
        old_refresh: &StoredSecret,
        lease: Duration,
    ) -> Result<LeaseClaim, StoreError> {
        let call = self
            .inner
            .claim_refresh_lease(provider_id, user_id, old_refresh, lease);
        self.time("claim_refresh_lease", call).await
    }

    async fn release_refresh_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        self.time(
            "release_refresh_lease",
            self.inner.release_refresh_lease(lease),
        )
        .await
    }

    async fn extend_refresh_lease(
        &self,
        lease: &Lease,
        by: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.time(
            "extend_refresh_lease",
            self.inner.extend_refresh_lease(lease, by),
        )
        .await
    }

    async fn write_refreshed(
        &self,
        provider_id: &str,
        user_id: Uuid,
        read: &Fence,
        new: &TokenSet,
    ) -> Result<bool, StoreError> {
        let call = self.inner.write_refreshed(provider_id, user_id, read, new);
        self.time("write_refreshed", call).await
    }

    async fn record_refresh_failure(
        &self,
        provider_id: &str,
        user_id: Uuid,
        read: &Fence,
        lease: Option<&Lease>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let call = self
            .inner
            .record_refresh_failure(provider_id, user_id, read, lease, reason);
        self.time("record_refresh_failure", call).await
    }

    async fn create_proxy_token(
        &self,
        token: &NewProxyToken,
    ) -> Result<ProxyTokenInfo, StoreError> {
        self.time("create_proxy_token", self.inner.create_proxy_token(token))
            .await
    }

    async fn find_proxy_token(
        &self,
        hash: &[u8; 32],
    ) -> Result<Option<ProxyTokenInfo>, StoreError> {
        self.time("find_proxy_token", self.inner.find_proxy_token(hash))
            .await
    }

    async fn list_proxy_tokens(
        &self,
        user_id: Option<Uuid>,
    ) -> Result<Vec<ProxyTokenInfo>, StoreError> {
        self.time("list_proxy_tokens", self.inner.list_proxy_tokens(user_id))
            .await
    }

    async fn revoke_proxy_token(&self, id: Uuid) -> Result<bool, StoreError> {
        self.time("revoke_proxy_token", self.inner.revoke_proxy_token(id))
            .await
    }

    async fn touch_proxy_token(&self, id: Uuid) -> Result<(), StoreError> {
        self.time("touch_proxy_token", self.inner.touch_proxy_token(id))
            .await
    }

    async fn check_coder_database(&self) -> Result<(), StoreError> {
        self.inner.check_coder_database().await
    }

    async fn find_coder_agent_owner(&self, auth_token: Uuid) -> Result<Option<Uuid>, StoreError> {
        self.time(
            "find_coder_agent_owner",
            self.inner.find_coder_agent_owner(auth_token),
        )
        .await
    }

    async fn rotate_keys(&self) -> Result<RotateReport, StoreError> {
        self.inner.rotate_keys().await
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        self.inner.migrate().await
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.time("ready", self.inner.ready()).await
    }

    async fn count_link_states(&self, now: DateTime<Utc>) -> Result<LinkStates, StoreError> {
        self.time("count_link_states", self.inner.count_link_states(now))
            .await
    }

    async fn watch_changes(&self) -> Result<tokio::sync::mpsc::Receiver<ChangeEvent>, StoreError> {
        self.inner.watch_changes().await
    }
}
