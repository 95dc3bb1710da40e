//! Managing users' links — what the CLI, the admin API and the proxy's own
//! endpoints share: the status of a link as an operator or user sees it (never
//! a token value), storing a link a login produced, unlinking with revocation at
//! the provider, and device-flow logins ([`device`]).
//!
//! It sits above `tokens`, `oauth` and `store` and below `cli`, `admin` and
//! `proxy`, so those three agree on the fields and on what an unlink does.

pub mod device;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use uuid::Uuid;

use crate::config::ProviderConfig;
use crate::oauth::revoke::Revoker;
use crate::store::{LinkStore, LinkSummary, StoreError, TokenSet};
use crate::telemetry::audit::{self, Actor, LinkChange};

/// One link as `link status` and the admin API show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LinkStatus {
    /// Provider id.
    pub provider: String,
    /// User id.
    pub user: Uuid,
    /// Whether a link is stored.
    pub linked: bool,
    /// When it was made.
    pub linked_at: Option<DateTime<Utc>>,
    /// Access-token expiry; `None` = never (or not linked).
    pub access_expiry: Option<DateTime<Utc>>,
    /// Refresh-token expiry, when the provider said (GitHub Apps).
    pub refresh_expiry: Option<DateTime<Utc>>,
    /// The refresh token expires within 7 days.
    pub refresh_expiring_soon: bool,
    /// Last write of the tokens (a refresh, a login, `link put`).
    pub last_refresh: Option<DateTime<Utc>>,
    /// Whether a refresh token is stored.
    pub has_refresh_token: bool,
    /// Why the provider rejected the refresh token; the user must log in again.
    pub failure_reason: Option<String>,
}

impl LinkStatus {
    /// The status of a stored link at `now`.
    pub fn of(s: &LinkSummary, now: DateTime<Utc>) -> Self {
        Self {
            provider: s.provider_id.clone(),
            user: s.user_id,
            linked: true,
            linked_at: Some(s.created_at),
            access_expiry: s.expiry,
            refresh_expiry: s.refresh_expiry,
            refresh_expiring_soon: crate::tokens::refresh_expiring(s, now),
            last_refresh: Some(s.updated_at),
            has_refresh_token: s.has_refresh_token,
            failure_reason: (!s.refresh_failure_reason.is_empty())
                .then(|| s.refresh_failure_reason.clone()),
        }
    }

    /// A link that is not stored.
    pub fn missing(provider: &str, user: Uuid) -> Self {
        Self {
            provider: provider.to_string(),
            user,
            linked: false,
            linked_at: None,
            access_expiry: None,
            refresh_expiry: None,
            refresh_expiring_soon: false,
            last_refresh: None,
            has_refresh_token: false,
            failure_reason: None,
        }
    }
}

/// Stored links, of one user or all, optionally of one provider.
pub async fn statuses(
    store: &dyn LinkStore,
    user: Option<Uuid>,
    provider: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Vec<LinkStatus>, StoreError> {
    Ok(store
        .list_links(user)
        .await?
        .iter()
        .filter(|l| provider.is_none_or(|p| l.provider_id == p))
        .map(|l| LinkStatus::of(l, now))
        .collect())
}

/// The status of one link (`linked: false` when none is stored).
pub async fn status(
    store: &dyn LinkStore,
    provider: &str,
    user: Uuid,
    now: DateTime<Utc>,
) -> Result<LinkStatus, StoreError> {
    Ok(statuses(store, Some(user), Some(provider), now)
        .await?
        .pop()
        .unwrap_or_else(|| LinkStatus::missing(provider, user)))
}

/// Stores a link a login produced (insert or replace: the failure reason and
/// any lease are cleared, other replicas are told) and writes the audit line.
pub async fn store_login(
    store: &dyn LinkStore,
    provider: &str,
    user: Uuid,
    tokens: &TokenSet,
    source: Actor,
) -> Result<(), StoreError> {
    let replaced = match store.get_link(provider, user).await {
        Ok(l) => l.is_some(),
        // A row we cannot decrypt is still a row being replaced.
        Err(StoreError::Decrypt { .. }) => true,
        Err(_) => false,
    };
    store.put_link(provider, user, tokens).await?;
    audit::link_changed(
        source,
        if replaced {
            LinkChange::Replaced
        } else {
            LinkChange::Created
        },
        provider,
        user,
    );
    Ok(())
}

/// What happened at the provider when a link was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// The provider revoked the grant.
    Revoked,
    /// Not asked (`--keep-grant`).
    Kept,
    /// The provider's configuration names no way to revoke.
    Unsupported,
    /// Revocation failed (the link was deleted anyway).
    Failed(String),
}

impl Revocation {
    /// The word used in JSON answers and audit lines.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Revoked => "revoked",
            Self::Kept => "kept",
            Self::Unsupported => "unsupported",
            Self::Failed(_) => "failed",
        }
    }

    /// The failure, if revocation failed.
    pub fn error(&self) -> Option<&str> {
        match self {
            Self::Failed(m) => Some(m),
            _ => None,
        }
    }
}

/// Deletes a link, first revoking its grant at the provider unless `keep_grant`.
/// `Ok(None)` when there was no link. A failed revocation is reported in the
/// result and the row is deleted all the same: the operator asked for it gone.
pub async fn unlink(
    store: &dyn LinkStore,
    provider: &ProviderConfig,
    user: Uuid,
    keep_grant: bool,
    source: Actor,
) -> Result<Option<Revocation>, StoreError> {
    let tokens: Option<(SecretString, SecretString)> =
        match store.get_link(&provider.id, user).await {
            Ok(Some(l)) => Some((l.access_token, l.refresh_token)),
            Ok(None) => return Ok(None),
            // The row exists but cannot be read: nothing to revoke with.
            Err(StoreError::Decrypt { .. }) => None,
            Err(e) => return Err(e),
        };
    let revocation = if keep_grant {
        Revocation::Kept
    } else {
        match (Revoker::new(provider), &tokens) {
            (Err(m), _) => Revocation::Failed(m),
            (Ok(None), _) => Revocation::Unsupported,
            (Ok(Some(_)), None) => {
                Revocation::Failed("the stored tokens cannot be decrypted".into())
            }
            (Ok(Some(r)), Some((access, refresh))) => match r.revoke(access, refresh).await {
                Ok(()) => Revocation::Revoked,
                Err(m) => Revocation::Failed(m),
            },
        }
    };
    if !store.delete_link(&provider.id, user).await? {
        // Deleted by someone else meanwhile: the link is gone either way.
        tracing::debug!(provider = %provider.id, %user, "link already deleted");
    }
    audit::link_deleted(
        source,
        &provider.id,
        user,
        revocation.as_str(),
        revocation.error(),
    );
    Ok(Some(revocation))
}
