//! Turning stored link rows into [`Link`]s and tokens into stored values.
//!
//! Both backends store the same columns under the same names and encrypt them
//! the same way (see [`crate::crypto`]); only the SQL and the column types on
//! the wire differ. Each backend parses its rows into a [`LinkRow`], and every
//! step from there on — decrypting, sealing, summarising, deciding whether a
//! row needs re-encryption — lives here once, so the backends cannot drift.

use chrono::{DateTime, Datelike, Utc};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use super::{Fence, Link, LinkSummary, StoreError, StoredSecret, TokenSet};
use crate::crypto::{Keyring, Sealed, ValueContext};

/// Column names, also the native format's associated data.
pub(super) const ACCESS: &str = "oauth_access_token";
/// See [`ACCESS`].
pub(super) const REFRESH: &str = "oauth_refresh_token";

/// The columns every link read selects, in [`LinkRow`] order.
pub(super) const LINK_COLUMNS: &str = "provider_id, user_id, created_at, updated_at, \
    oauth_access_token, oauth_access_token_key_id, oauth_refresh_token, \
    oauth_refresh_token_key_id, oauth_expiry, oauth_extra, \
    oauth_refresh_failure_reason, refresh_lease_expires_at";

/// A link row exactly as stored, with the backend's column types parsed.
#[derive(sqlx::FromRow)]
pub(super) struct LinkRow {
    pub(super) provider_id: String,
    pub(super) user_id: Uuid,
    pub(super) created_at: DateTime<Utc>,
    pub(super) updated_at: DateTime<Utc>,
    pub(super) oauth_access_token: String,
    pub(super) oauth_access_token_key_id: Option<String>,
    pub(super) oauth_refresh_token: String,
    pub(super) oauth_refresh_token_key_id: Option<String>,
    pub(super) oauth_expiry: DateTime<Utc>,
    pub(super) oauth_extra: Option<serde_json::Value>,
    pub(super) oauth_refresh_failure_reason: String,
    pub(super) refresh_lease_expires_at: Option<DateTime<Utc>>,
}

impl LinkRow {
    /// The stored value and key id of one token column.
    fn column(&self, column: &str) -> (&String, &Option<String>) {
        match column {
            ACCESS => (&self.oauth_access_token, &self.oauth_access_token_key_id),
            _ => (&self.oauth_refresh_token, &self.oauth_refresh_token_key_id),
        }
    }

    /// One token column exactly as stored.
    fn stored(&self, column: &str) -> Sealed {
        let (value, key_id) = self.column(column);
        Sealed {
            value: value.clone(),
            key_id: key_id.clone(),
        }
    }
}

/// Coder writes Go's zero time for "never expires". Anything in year 1 or
/// before is a zero time, whatever the time zone Coder's driver attached to it.
pub(super) fn expiry_from_db(stored: DateTime<Utc>) -> Option<DateTime<Utc>> {
    (stored.year() > 1).then_some(stored)
}

/// Encrypts one value for the column `ctx` names.
pub(super) fn seal(
    keyring: &Keyring,
    plain: &SecretString,
    ctx: ValueContext<'_>,
) -> Result<Sealed, StoreError> {
    keyring
        .seal(plain.expose_secret(), ctx)
        .map_err(|e| StoreError::Other(format!("cannot encrypt {}: {e}", ctx.column)))
}

/// Encrypts both token columns of a row.
pub(super) fn seal_pair(
    keyring: &Keyring,
    provider_id: &str,
    user_id: Uuid,
    tokens: &TokenSet,
) -> Result<(Sealed, Sealed), StoreError> {
    let ctx = |column| ValueContext {
        provider_id,
        user_id,
        column,
    };
    Ok((
        seal(keyring, &tokens.access_token, ctx(ACCESS))?,
        seal(keyring, &tokens.refresh_token, ctx(REFRESH))?,
    ))
}

/// Decrypts one token column of a row.
pub(super) fn open(
    keyring: &Keyring,
    row: &LinkRow,
    column: &'static str,
) -> Result<SecretString, StoreError> {
    let (value, key_id) = row.column(column);
    let ctx = ValueContext {
        provider_id: &row.provider_id,
        user_id: row.user_id,
        column,
    };
    keyring
        .open(value, key_id.as_deref(), ctx)
        .map_err(|source| StoreError::Decrypt {
            provider_id: row.provider_id.clone(),
            user_id: row.user_id,
            column,
            source,
        })
}

/// The link a row holds, both tokens decrypted.
pub(super) fn decode(keyring: &Keyring, row: LinkRow) -> Result<Link, StoreError> {
    let access_token = open(keyring, &row, ACCESS)?;
    let refresh_token = open(keyring, &row, REFRESH)?;
    Ok(Link {
        access_token,
        refresh_token,
        refresh_token_stored: StoredSecret(row.oauth_refresh_token),
        access_token_stored: StoredSecret(row.oauth_access_token),
        expiry: expiry_from_db(row.oauth_expiry),
        extra: row.oauth_extra,
        refresh_failure_reason: row.oauth_refresh_failure_reason,
        lease_expires_at: row.refresh_lease_expires_at,
        created_at: row.created_at,
        updated_at: row.updated_at,
        provider_id: row.provider_id,
        user_id: row.user_id,
    })
}

/// The listing entry of a row; never fails, so one bad row cannot hide the rest.
pub(super) fn summarize(keyring: &Keyring, r: LinkRow) -> LinkSummary {
    // Coder encrypts empty strings too, so an encrypted refresh token is only
    // known to be non-empty once decrypted; if it cannot be, say so rather than
    // fail the whole listing.
    let has_refresh_token = match r.oauth_refresh_token_key_id {
        None => !r.oauth_refresh_token.is_empty(),
        Some(_) => open(keyring, &r, REFRESH)
            .map(|t| !t.expose_secret().is_empty())
            .unwrap_or(true),
    };
    LinkSummary {
        refresh_expiry: LinkSummary::refresh_expiry_of(r.oauth_extra.as_ref()),
        encrypted: r.oauth_access_token_key_id.is_some() || r.oauth_refresh_token_key_id.is_some(),
        has_refresh_token,
        expiry: expiry_from_db(r.oauth_expiry),
        provider_id: r.provider_id,
        user_id: r.user_id,
        created_at: r.created_at,
        updated_at: r.updated_at,
        refresh_failure_reason: r.oauth_refresh_failure_reason,
    }
}

/// The column as it should be stored now: `None` when it already is.
fn reseal(
    keyring: &Keyring,
    row: &LinkRow,
    column: &'static str,
) -> Result<Option<Sealed>, StoreError> {
    let plain = open(keyring, row, column)?;
    let (_, key_id) = row.column(column);
    if keyring.is_current(plain.expose_secret().is_empty(), key_id.as_deref()) {
        return Ok(None);
    }
    let ctx = ValueContext {
        provider_id: &row.provider_id,
        user_id: row.user_id,
        column,
    };
    seal(keyring, &plain, ctx).map(Some)
}

/// Both token columns as `keys rotate` should store them, or `None` when the
/// row is already encrypted as the keyring wants. A column that needs no change
/// keeps its stored value exactly.
pub(super) fn rotated(
    keyring: &Keyring,
    row: &LinkRow,
) -> Result<Option<(Sealed, Sealed)>, StoreError> {
    let access = reseal(keyring, row, ACCESS)?;
    let refresh = reseal(keyring, row, REFRESH)?;
    if access.is_none() && refresh.is_none() {
        return Ok(None);
    }
    Ok(Some((
        access.unwrap_or_else(|| row.stored(ACCESS)),
        refresh.unwrap_or_else(|| row.stored(REFRESH)),
    )))
}

/// Whether one token column of `row` holds the same token as `old` (a value
/// of that column as read earlier), maybe re-encrypted (by `keys rotate` here
/// or in Coder).
fn same_value(
    keyring: &Keyring,
    row: &LinkRow,
    column: &'static str,
    old: &StoredSecret,
) -> Result<bool, StoreError> {
    let (value, _) = row.column(column);
    if *value == old.0 {
        return Ok(true);
    }
    let current = open(keyring, row, column)?;
    let ctx = ValueContext {
        provider_id: &row.provider_id,
        user_id: row.user_id,
        column,
    };
    let old = keyring.open_any(&old.0, ctx);
    Ok(crate::crypto::same_text(
        current.expose_secret(),
        old.expose_secret(),
    ))
}

/// After a missed compare-and-swap against `read`: if `row` (read after the
/// miss) still holds the same refresh token — and, when `with_access`, the same
/// access token — only re-encrypted, the fence to retry against (the values it
/// holds now). If the values are even unchanged, a write raced and was undone:
/// retry too.
pub(super) fn same_tokens(
    keyring: &Keyring,
    row: LinkRow,
    read: &Fence,
    with_access: bool,
) -> Result<Option<Fence>, StoreError> {
    if !same_value(keyring, &row, REFRESH, &read.refresh)? {
        return Ok(None);
    }
    if with_access && !same_value(keyring, &row, ACCESS, &read.access)? {
        return Ok(None);
    }
    Ok(Some(Fence {
        refresh: StoredSecret(row.oauth_refresh_token),
        access: StoredSecret(row.oauth_access_token),
    }))
}

/// Whether `new` is a different refresh token than the one `read` holds (the
/// provider rotated it).
pub(super) fn rotates(
    keyring: &Keyring,
    provider_id: &str,
    user_id: Uuid,
    read: &Fence,
    new: &SecretString,
) -> bool {
    let ctx = ValueContext {
        provider_id,
        user_id,
        column: REFRESH,
    };
    let old = keyring.open_any(&read.refresh.0, ctx);
    !crate::crypto::same_text(old.expose_secret(), new.expose_secret())
}
