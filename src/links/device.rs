//! Device-flow logins started over HTTP (`POST /_tokenproxy/device/{provider}`):
//! tokenproxy asks the provider for a code, answers it to the caller, and polls
//! in the background until the user approved (the link is stored), denied, or
//! the code expired.
//!
//! Flows live in this replica's memory: at most one pending flow per (provider,
//! user) here — a second start while one is pending answers the same code. The
//! polling task runs on the token source's tracker, so a shutdown drain stops it
//! between polls (the flow fails with `shutdown`) but waits for a poll in flight
//! and for storing the tokens it brought. Another replica knows nothing of the
//! flow; asked about it, it answers from the stored link alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::ProviderConfig;
use crate::oauth::device::{DeviceCode, DeviceError, DeviceFlow};
use crate::oauth::Refreshed;
use crate::store::{LinkStore, TokenSet};
use crate::telemetry::audit::{self, Actor};

/// How long a finished flow's outcome stays available to `GET`.
const KEEP_FINISHED: Duration = Duration::from_secs(3600);

/// Attempts at storing the tokens of an approved flow (the provider issued them
/// once; a brief database outage should not lose them).
const STORE_ATTEMPTS: u32 = 5;

/// The tokens of an approved device flow as a link stores them.
pub fn token_set(r: Refreshed, now: DateTime<Utc>) -> TokenSet {
    use secrecy::SecretString;
    TokenSet {
        access_token: r.access_token,
        refresh_token: r
            .refresh_token
            .unwrap_or_else(|| SecretString::from(String::new())),
        expiry: r
            .expires_in
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .and_then(|d| now.checked_add_signed(d)),
        extra: r.extra,
    }
}

/// Where a flow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowStatus {
    /// Waiting for the user.
    Pending,
    /// Approved; the link is stored.
    Linked,
    /// Denied, expired, or failed (see `reason`).
    Failed,
    /// Nothing known of a flow here (only with a stored link: `linked`).
    None,
}

/// A flow as `POST`/`GET /_tokenproxy/device/{provider}` answer it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FlowView {
    /// Provider id.
    pub provider: String,
    /// Where the flow stands.
    pub status: FlowStatus,
    /// The code the user enters (while the flow is known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_code: Option<String>,
    /// Where the user enters it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verification_uri: Option<String>,
    /// The same with the code filled in, when the provider offers it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verification_uri_complete: Option<String>,
    /// When the code stops working.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Seconds between polls the provider asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<u64>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

/// Why a flow could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// The provider has no `device_authorization_url`.
    #[error("this provider has no device authorization endpoint")]
    Unsupported,
    /// The provider refused or failed.
    #[error(transparent)]
    Provider(#[from] DeviceError),
}

/// Called with (provider, user) once a device-flow link is stored: the wiring
/// hands it to the token source, so this replica's next request reads the new
/// link instead of a "no link" remembered from before.
pub type OnLinked =
    Arc<dyn Fn(String, Uuid) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// The device-flow logins of this replica.
pub struct DeviceLogins {
    store: Arc<dyn LinkStore>,
    flows: HashMap<String, Arc<DeviceFlow>>,
    state: parking_lot::Mutex<HashMap<(String, Uuid), FlowView>>,
    /// Serialises starts, so two concurrent `POST`s get one code.
    starting: tokio::sync::Mutex<()>,
    tasks: TaskTracker,
    stop: CancellationToken,
    on_linked: Option<OnLinked>,
}

impl DeviceLogins {
    /// Calls `f` after every link a device flow stores.
    pub fn with_on_linked(mut self, f: OnLinked) -> Self {
        self.on_linked = Some(f);
        self
    }

    /// Device logins for the providers that have a device endpoint. Polls run on
    /// `tasks` and stop between polls once `stop` is cancelled.
    pub fn new(
        store: Arc<dyn LinkStore>,
        providers: &[ProviderConfig],
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        let mut flows = HashMap::new();
        for p in providers {
            match DeviceFlow::new(p) {
                Ok(Some(f)) => {
                    flows.insert(p.id.clone(), Arc::new(f));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(provider = %p.id, error = %e, "device flow unavailable"),
            }
        }
        Self {
            store,
            flows,
            state: parking_lot::Mutex::new(HashMap::new()),
            starting: tokio::sync::Mutex::new(()),
            on_linked: None,
            tasks,
            stop,
        }
    }

    /// Whether `provider` has a device flow.
    pub fn supports(&self, provider: &str) -> bool {
        self.flows.contains_key(provider)
    }

    /// Starts a flow for `user` at `provider`, or answers the pending one.
    pub async fn start(
        self: &Arc<Self>,
        provider: &str,
        user: Uuid,
    ) -> Result<FlowView, StartError> {
        let flow = self
            .flows
            .get(provider)
            .ok_or(StartError::Unsupported)?
            .clone();
        let _one = self.starting.lock().await;
        let key = (provider.to_string(), user);
        let now = Utc::now();
        {
            let mut state = self.state.lock();
            state.retain(|_, v| {
                v.finished_at
                    .is_none_or(|t| now - t < chrono::Duration::from_std(KEEP_FINISHED).unwrap())
            });
            if let Some(v) = state.get(&key) {
                let live = v.expires_at.is_some_and(|e| e > now);
                if v.status == FlowStatus::Pending && live {
                    return Ok(v.clone());
                }
            }
        }
        let code = flow.start().await.inspect_err(|e| {
            audit::device_login_failed(Actor::Device, provider, user, "start", e.code());
        })?;
        let view = pending_view(provider, &code, now);
        self.state.lock().insert(key.clone(), view.clone());
        let this = self.clone();
        self.tasks.spawn(async move {
            let outcome = flow.poll(&code, &this.stop).await;
            this.finish(key, outcome).await;
        });
        Ok(view)
    }

    /// What this replica knows of the flow for `user` at `provider`: its own
    /// record, else `linked` when a link is stored, else `none`.
    pub async fn status(
        &self,
        provider: &str,
        user: Uuid,
    ) -> Result<FlowView, crate::store::StoreError> {
        if let Some(v) = self.state.lock().get(&(provider.to_string(), user)) {
            return Ok(v.clone());
        }
        let linked = self.store.get_link(provider, user).await?.is_some();
        Ok(FlowView {
            provider: provider.to_string(),
            status: if linked {
                FlowStatus::Linked
            } else {
                FlowStatus::None
            },
            user_code: None,
            verification_uri: None,
            verification_uri_complete: None,
            expires_at: None,
            interval: None,
            reason: None,
            finished_at: None,
        })
    }

    /// Records a flow's outcome, storing the link on approval.
    async fn finish(&self, key: (String, Uuid), outcome: Result<Refreshed, DeviceError>) {
        let (provider, user) = (&key.0, key.1);
        let result = match outcome {
            Ok(tokens) => self
                .store_tokens(provider, user, tokens)
                .await
                .inspect_err(|r| {
                    audit::device_login_failed(Actor::Device, provider, user, "store", r);
                }),
            Err(e) => {
                tracing::info!(provider = %provider, %user, reason = %e.reason(), "device flow ended without a link");
                audit::device_login_failed(Actor::Device, provider, user, "poll", e.code());
                Err(e.reason())
            }
        };
        let mut state = self.state.lock();
        if let Some(v) = state.get_mut(&key) {
            v.finished_at = Some(Utc::now());
            match result {
                Ok(()) => v.status = FlowStatus::Linked,
                Err(reason) => {
                    v.status = FlowStatus::Failed;
                    v.reason = Some(reason);
                }
            }
        }
    }

    async fn store_tokens(&self, provider: &str, user: Uuid, r: Refreshed) -> Result<(), String> {
        let tokens = token_set(r, Utc::now());
        let mut wait = Duration::from_millis(200);
        for attempt in 1..=STORE_ATTEMPTS {
            match super::store_login(self.store.as_ref(), provider, user, &tokens, Actor::Device)
                .await
            {
                Ok(()) => {
                    if let Some(f) = &self.on_linked {
                        f(provider.to_string(), user).await;
                    }
                    return Ok(());
                }
                Err(e) if attempt < STORE_ATTEMPTS => {
                    tracing::warn!(provider, %user, error = %e, "cannot store the device-flow link yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(e) => {
                    tracing::error!(provider, %user, error = %e, "device flow approved but the link could not be stored");
                }
            }
        }
        Err("store_unavailable".into())
    }
}

fn pending_view(provider: &str, code: &DeviceCode, now: DateTime<Utc>) -> FlowView {
    FlowView {
        provider: provider.to_string(),
        status: FlowStatus::Pending,
        user_code: Some(code.user_code.clone()),
        verification_uri: Some(code.verification_uri.clone()),
        verification_uri_complete: code.verification_uri_complete.clone(),
        expires_at: chrono::Duration::from_std(code.expires_in)
            .ok()
            .and_then(|d| now.checked_add_signed(d)),
        interval: Some(code.interval.as_secs()),
        reason: None,
        finished_at: None,
    }
}
