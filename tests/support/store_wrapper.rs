//! A store that delegates every call to another one, except the few a test
//! wants to intercept: count, fail, or answer differently. Tests implement
//! [`Hooks`] (whose defaults delegate) instead of hand-writing the whole
//! [`LinkStore`] trait again.

use std::sync::Arc;
use std::time::Duration;

use tokenproxy::store::{
    ChangeEvent, Fence, Lease, LeaseClaim, Link, LinkStore, LinkSummary, NewProxyToken,
    ProxyTokenInfo, RotateReport, StoreError, StoredSecret, TokenSet,
};
use uuid::Uuid;

/// The calls a test may intercept. Each receives the inner store; the
/// defaults just delegate to it.
#[async_trait::async_trait]
pub trait Hooks: Send + Sync + 'static {
    async fn get_link(
        &self,
        inner: &dyn LinkStore,
        p: &str,
        u: Uuid,
    ) -> Result<Option<Link>, StoreError> {
        inner.get_link(p, u).await
    }
    async fn claim_refresh_lease(
        &self,
        inner: &dyn LinkStore,
        p: &str,
        u: Uuid,
        old: &StoredSecret,
        lease: Duration,
    ) -> Result<LeaseClaim, StoreError> {
        inner.claim_refresh_lease(p, u, old, lease).await
    }
    async fn write_refreshed(
        &self,
        inner: &dyn LinkStore,
        p: &str,
        u: Uuid,
        old: &Fence,
        new: &TokenSet,
    ) -> Result<bool, StoreError> {
        inner.write_refreshed(p, u, old, new).await
    }
    async fn find_proxy_token(
        &self,
        inner: &dyn LinkStore,
        h: &[u8; 32],
    ) -> Result<Option<ProxyTokenInfo>, StoreError> {
        inner.find_proxy_token(h).await
    }
    async fn touch_proxy_token(&self, inner: &dyn LinkStore, id: Uuid) -> Result<(), StoreError> {
        inner.touch_proxy_token(id).await
    }
}

/// `inner`, with the calls `hooks` overrides intercepted.
pub struct HookedStore<H> {
    pub inner: Arc<dyn LinkStore>,
    pub hooks: H,
}

impl<H: Hooks> HookedStore<H> {
    pub fn new(inner: impl LinkStore, hooks: H) -> Self {
        Self {
            inner: Arc::new(inner),
            hooks,
        }
    }
}

#[async_trait::async_trait]
impl<H: Hooks> LinkStore for HookedStore<H> {
    async fn get_link(&self, p: &str, u: Uuid) -> Result<Option<Link>, StoreError> {
        self.hooks.get_link(&*self.inner, p, u).await
    }
    async fn put_link(&self, p: &str, u: Uuid, t: &TokenSet) -> Result<(), StoreError> {
        self.inner.put_link(p, u, t).await
    }
    async fn delete_link(&self, p: &str, u: Uuid) -> Result<bool, StoreError> {
        self.inner.delete_link(p, u).await
    }
    async fn list_links(&self, u: Option<Uuid>) -> Result<Vec<LinkSummary>, StoreError> {
        self.inner.list_links(u).await
    }
    async fn claim_refresh_lease(
        &self,
        p: &str,
        u: Uuid,
        old: &StoredSecret,
        lease: Duration,
    ) -> Result<LeaseClaim, StoreError> {
        self.hooks
            .claim_refresh_lease(&*self.inner, p, u, old, lease)
            .await
    }
    async fn release_refresh_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.release_refresh_lease(lease).await
    }
    async fn extend_refresh_lease(
        &self,
        lease: &Lease,
        by: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.inner.extend_refresh_lease(lease, by).await
    }
    async fn write_refreshed(
        &self,
        p: &str,
        u: Uuid,
        old: &Fence,
        new: &TokenSet,
    ) -> Result<bool, StoreError> {
        self.hooks
            .write_refreshed(&*self.inner, p, u, old, new)
            .await
    }
    async fn record_refresh_failure(
        &self,
        p: &str,
        u: Uuid,
        old: &Fence,
        lease: Option<&Lease>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        self.inner
            .record_refresh_failure(p, u, old, lease, reason)
            .await
    }
    async fn create_proxy_token(&self, t: &NewProxyToken) -> Result<ProxyTokenInfo, StoreError> {
        self.inner.create_proxy_token(t).await
    }
    async fn find_proxy_token(&self, h: &[u8; 32]) -> Result<Option<ProxyTokenInfo>, StoreError> {
        self.hooks.find_proxy_token(&*self.inner, h).await
    }
    async fn list_proxy_tokens(&self, u: Option<Uuid>) -> Result<Vec<ProxyTokenInfo>, StoreError> {
        self.inner.list_proxy_tokens(u).await
    }
    async fn revoke_proxy_token(&self, id: Uuid) -> Result<bool, StoreError> {
        self.inner.revoke_proxy_token(id).await
    }
    async fn touch_proxy_token(&self, id: Uuid) -> Result<(), StoreError> {
        self.hooks.touch_proxy_token(&*self.inner, id).await
    }
    async fn rotate_keys(&self) -> Result<RotateReport, StoreError> {
        self.inner.rotate_keys().await
    }
    async fn ready(&self) -> Result<(), StoreError> {
        self.inner.ready().await
    }
    async fn watch_changes(&self) -> Result<tokio::sync::mpsc::Receiver<ChangeEvent>, StoreError> {
        self.inner.watch_changes().await
    }
}
