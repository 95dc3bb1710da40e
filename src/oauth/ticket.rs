//! Signed login URLs: `tokenproxy link login-url` and the `login_url` of
//! `link_missing` / `reauth_required` errors.
//!
//! A ticket names one provider and one user and expires; it is
//! `<payload>.<mac>`, both base64url, the payload `provider TAB user TAB
//! expiry-seconds TAB random id` and the MAC HMAC-SHA256 over it. The MAC key is
//! derived (HKDF-SHA256, info `tokenproxy login-url v1`) from the first
//! `encryption.keys` entry (or `coder.encryption_keys`): every replica and the CLI
//! already hold it, and it is never used for anything else. Tickets signed with
//! any configured key are accepted, so a key rotation does not void outstanding
//! URLs. Issuing one writes nothing; it is spent (single use) when a browser
//! starts a flow with it, by recording its id in the database.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use chrono::{DateTime, Utc};
use ring::{hkdf, hmac};
use secrecy::ExposeSecret;
use uuid::Uuid;

/// Longest lifetime a ticket may be issued with.
pub const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// What a valid ticket grants: starting one sign-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// Provider id.
    pub provider_id: String,
    /// User the link will belong to.
    pub user_id: Uuid,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
    /// Random id, recorded when spent.
    pub id: String,
}

/// Why a ticket was refused. Messages are shown to the browser.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Not a ticket, or its signature does not verify.
    #[error("the login link is not valid (altered, or signed with another key)")]
    Invalid,
    /// Past its expiry.
    #[error("the login link has expired")]
    Expired,
    /// Valid, but for another provider than the URL's.
    #[error("the login link is for another provider")]
    WrongProvider,
}

/// Issues and verifies tickets with keys derived from the encryption keyring.
pub struct TicketKeys {
    keys: Vec<hmac::Key>,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys")
            .field("keys", &self.keys.len())
            .finish()
    }
}

struct HmacLen;
impl hkdf::KeyType for HmacLen {
    fn len(&self) -> usize {
        32
    }
}

impl TicketKeys {
    /// Keys derived from `encryption` (first key signs); `None` when it is empty.
    pub fn derive(encryption: &[secrecy::SecretBox<[u8; 32]>]) -> Option<Self> {
        if encryption.is_empty() {
            return None;
        }
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"tokenproxy");
        let keys = encryption
            .iter()
            .map(|k| {
                let prk = salt.extract(k.expose_secret());
                let mut raw = [0u8; 32];
                prk.expand(&[b"tokenproxy login-url v1"], HmacLen)
                    .and_then(|okm| okm.fill(&mut raw))
                    .expect("32 bytes is a valid HKDF-SHA256 length");
                hmac::Key::new(hmac::HMAC_SHA256, &raw)
            })
            .collect();
        Some(Self { keys })
    }

    /// A ticket for `user` at `provider`, valid until `expires_at`.
    pub fn issue(&self, provider_id: &str, user_id: Uuid, expires_at: DateTime<Utc>) -> String {
        let id: [u8; 16] = rand::random();
        let payload = format!(
            "{provider_id}\t{user_id}\t{}\t{}",
            expires_at.timestamp(),
            B64.encode(id)
        );
        let tag = hmac::sign(&self.keys[0], payload.as_bytes());
        format!("{}.{}", B64.encode(payload), B64.encode(tag.as_ref()))
    }

    /// Verifies `ticket` for `provider_id` at `now`.
    pub fn verify(
        &self,
        ticket: &str,
        provider_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Ticket, TicketError> {
        let (payload, tag) = ticket.split_once('.').ok_or(TicketError::Invalid)?;
        let payload = B64.decode(payload).map_err(|_| TicketError::Invalid)?;
        let tag = B64.decode(tag).map_err(|_| TicketError::Invalid)?;
        // ring's verify compares in constant time.
        if !self
            .keys
            .iter()
            .any(|k| hmac::verify(k, &payload, &tag).is_ok())
        {
            return Err(TicketError::Invalid);
        }
        let text = String::from_utf8(payload).map_err(|_| TicketError::Invalid)?;
        let mut parts = text.split('\t');
        let (Some(p), Some(u), Some(exp), Some(id), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TicketError::Invalid);
        };
        let user_id = u.parse().map_err(|_| TicketError::Invalid)?;
        let expires_at = exp
            .parse::<i64>()
            .ok()
            .and_then(|s| DateTime::from_timestamp(s, 0))
            .ok_or(TicketError::Invalid)?;
        if p != provider_id {
            return Err(TicketError::WrongProvider);
        }
        if expires_at <= now {
            return Err(TicketError::Expired);
        }
        Ok(Ticket {
            provider_id: p.to_string(),
            user_id,
            expires_at,
            id: id.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(byte: u8) -> TicketKeys {
        TicketKeys::derive(&[secrecy::SecretBox::new(Box::new([byte; 32]))]).unwrap()
    }

    #[test]
    fn issued_tickets_verify_once_per_provider_until_expiry() {
        let k = keys(1);
        let user = Uuid::new_v4();
        let now = Utc::now();
        let t = k.issue("gh", user, now + chrono::Duration::minutes(10));
        let v = k.verify(&t, "gh", now).unwrap();
        assert_eq!((v.provider_id.as_str(), v.user_id), ("gh", user));
        assert_eq!(k.verify(&t, "gl", now), Err(TicketError::WrongProvider));
        let later = now + chrono::Duration::minutes(11);
        assert_eq!(k.verify(&t, "gh", later), Err(TicketError::Expired));
        // Two tickets for the same pair differ (each is spent on its own).
        let t2 = k.issue("gh", user, now + chrono::Duration::minutes(10));
        assert_ne!(k.verify(&t2, "gh", now).unwrap().id, v.id);
    }

    #[test]
    fn altered_or_foreign_tickets_are_invalid() {
        let k = keys(1);
        let now = Utc::now();
        let t = k.issue("gh", Uuid::new_v4(), now + chrono::Duration::minutes(10));
        let (payload, tag) = t.split_once('.').unwrap();
        let other_user = B64.encode(
            String::from_utf8(B64.decode(payload).unwrap())
                .unwrap()
                .replacen('-', "0", 1),
        );
        for bad in [
            format!("{other_user}.{tag}"),
            format!("{payload}.{}", B64.encode([0u8; 32])),
            "garbage".to_string(),
            String::new(),
        ] {
            assert_eq!(
                k.verify(&bad, "gh", now),
                Err(TicketError::Invalid),
                "{bad}"
            );
        }
        assert_eq!(keys(2).verify(&t, "gh", now), Err(TicketError::Invalid));
        // After a rotation the old key still verifies.
        let rotated = TicketKeys::derive(&[
            secrecy::SecretBox::new(Box::new([2; 32])),
            secrecy::SecretBox::new(Box::new([1; 32])),
        ])
        .unwrap();
        assert!(rotated.verify(&t, "gh", now).is_ok());
    }
}
