//! At-rest encryption of token columns: an AES-256-GCM keyring (first key
//! encrypts, all decrypt) in two formats — Coder's dbcrypt and tokenproxy's native
//! format that binds each value to its row and column.
//!
//! SKELETON: the lead laid out this API; the store helper implements it.

use secrecy::{SecretBox, SecretString};
use uuid::Uuid;

use crate::config::EncryptionFormat;

/// Why a value could not be encrypted or decrypted. Never holds key or token bytes.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CryptoError {
    /// The value names a key id this keyring does not have.
    #[error("no key with id {0}")]
    UnknownKey(String),
    /// The value is encrypted but no keys are configured.
    #[error("value is encrypted but no encryption keys are configured")]
    NoKeys,
    /// Authentication failed: wrong key, wrong row/column, or tampered.
    #[error("decryption failed (wrong key, row or column, or tampered value)")]
    Invalid,
    /// Not base64, too short, or not UTF-8 after decryption.
    #[error("malformed encrypted value")]
    Malformed,
}

/// Where a value lives; the native format binds the ciphertext to it.
#[derive(Debug, Clone, Copy)]
pub struct ValueContext<'a> {
    /// `provider_id` of the row.
    pub provider_id: &'a str,
    /// `user_id` of the row.
    pub user_id: Uuid,
    /// Column name, e.g. `oauth_access_token`.
    pub column: &'a str,
}

/// A value ready to store: the column text and its `*_key_id` (None = plaintext).
#[derive(Clone)]
pub struct Sealed {
    /// Column value.
    pub value: String,
    /// Key id column value.
    pub key_id: Option<String>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("value", &"[redacted]")
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// The configured keys.
pub struct Keyring {
    _priv: (),
}

impl Keyring {
    /// Builds a keyring; the first key encrypts new values in `format`.
    pub fn new(_keys: Vec<SecretBox<[u8; 32]>>, _format: EncryptionFormat) -> Self {
        todo!("store helper")
    }
    /// A keyring with no keys: values are stored in plain text.
    pub fn plaintext() -> Self {
        todo!("store helper")
    }
    /// Whether any key is configured.
    pub fn is_empty(&self) -> bool {
        todo!("store helper")
    }
    /// Encrypts with the first key (plain text when there is none).
    pub fn seal(&self, _plain: &str, _ctx: ValueContext<'_>) -> Result<Sealed, CryptoError> {
        todo!("store helper")
    }
    /// Decrypts a stored value with the key its key id names (None = plain text).
    pub fn open(
        &self,
        _value: &str,
        _key_id: Option<&str>,
        _ctx: ValueContext<'_>,
    ) -> Result<SecretString, CryptoError> {
        todo!("store helper")
    }
}
