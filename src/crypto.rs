//! At-rest encryption of token columns: an AES-256-GCM keyring (first key
//! encrypts, all decrypt) in two formats — Coder's dbcrypt and tokenproxy's native
//! format that binds each value to its row and column.
//!
//! Both formats store `base64(nonce(12) || ciphertext || tag(16))` and put a key id
//! in the column's `*_key_id` companion. They differ in two ways:
//!
//! * **Coder** (`enterprise/dbcrypt` in coder/coder): no associated data; key id =
//!   first 7 hex characters of `SHA-256("aes256gcm" || key)`. Needed to share rows
//!   with Coder, whose foreign keys also require the id in `dbcrypt_keys`.
//! * **Native**: associated data `"tokenproxy-v1\0{provider}\0{user}\0{column}"`, so a
//!   ciphertext copied into another row or column fails to authenticate; key id =
//!   first 16 hex characters of `SHA-256("tokenproxy-native-v1" || key)`.
//!
//! The key id's length says which format a value is in, so one keyring reads both
//! and a deployment can switch formats (then `keys rotate`) without downtime.
//! Empty strings stay plain text with a NULL key id: there is nothing to hide and
//! it keeps "no refresh token" visible without a key.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::EncryptionFormat;

/// The value Coder encrypts into `dbcrypt_keys.test` to check a key.
pub const CODER_TEST_VALUE: &str = "coder";

const TAG_LEN: usize = 16;
const CODER_ID_LEN: usize = 7;
const NATIVE_ID_LEN: usize = 16;

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

impl ValueContext<'_> {
    /// The native format's associated data. Postgres text cannot hold NUL, so the
    /// NUL separators make the encoding unambiguous.
    fn native_aad(&self) -> Vec<u8> {
        format!(
            "tokenproxy-v1\0{}\0{}\0{}",
            self.provider_id, self.user_id, self.column
        )
        .into_bytes()
    }
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

/// One key with both of its ids; ring keeps the key bytes out of reach.
struct KeyEntry {
    aead: LessSafeKey,
    coder_id: String,
    native_id: String,
}

/// The configured keys.
pub struct Keyring {
    keys: Vec<KeyEntry>,
    format: EncryptionFormat,
    rng: SystemRandom,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("keys", &self.keys.len())
            .field("format", &self.format)
            .finish()
    }
}

/// Whether two secrets (or their digests) are equal, in time that depends on
/// their length only: every comparison of a secret goes through here.
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.ct_eq(b))
}

/// [`same_bytes`] for text.
pub fn same_text(a: &str, b: &str) -> bool {
    same_bytes(a.as_bytes(), b.as_bytes())
}

/// `Coder` key id: first 7 hex chars of SHA-256("aes256gcm" || key).
pub fn coder_key_id(key: &[u8; 32]) -> String {
    digest_prefix(b"aes256gcm", key, CODER_ID_LEN)
}

/// Native key id: first 16 hex chars of SHA-256("tokenproxy-native-v1" || key).
pub fn native_key_id(key: &[u8; 32]) -> String {
    digest_prefix(b"tokenproxy-native-v1", key, NATIVE_ID_LEN)
}

fn digest_prefix(label: &[u8], key: &[u8; 32], len: usize) -> String {
    let mut h = Sha256::new();
    h.update(label);
    h.update(key);
    let mut hex = hex::encode(h.finalize());
    hex.truncate(len);
    hex
}

impl Keyring {
    /// Builds a keyring; the first key encrypts new values in `format`.
    pub fn new(keys: Vec<SecretBox<[u8; 32]>>, format: EncryptionFormat) -> Self {
        let keys = keys
            .iter()
            .map(|k| {
                let bytes = k.expose_secret();
                let unbound = UnboundKey::new(&AES_256_GCM, bytes)
                    .expect("AES-256-GCM accepts every 32-byte key");
                KeyEntry {
                    aead: LessSafeKey::new(unbound),
                    coder_id: coder_key_id(bytes),
                    native_id: native_key_id(bytes),
                }
            })
            .collect();
        Self {
            keys,
            format,
            rng: SystemRandom::new(),
        }
    }

    /// A keyring with no keys: values are stored in plain text.
    pub fn plaintext() -> Self {
        Self::new(Vec::new(), EncryptionFormat::default())
    }

    /// Whether any key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The format new values are written in.
    pub fn format(&self) -> EncryptionFormat {
        self.format
    }

    /// The key id new values get (None = plain text).
    pub fn primary_key_id(&self) -> Option<&str> {
        self.keys.first().map(|k| match self.format {
            EncryptionFormat::Coder => k.coder_id.as_str(),
            EncryptionFormat::Native => k.native_id.as_str(),
        })
    }

    /// Coder-format ids of every key, first key first (for `dbcrypt_keys`).
    pub fn coder_key_ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.coder_id.clone()).collect()
    }

    /// Whether a value stored under `key_id` (plain, `None`) is already in the form
    /// [`seal`](Self::seal) would write now, so rotation can leave it alone.
    pub fn is_current(&self, plain_is_empty: bool, key_id: Option<&str>) -> bool {
        if plain_is_empty {
            return key_id.is_none();
        }
        key_id == self.primary_key_id()
    }

    /// Encrypts with the first key (plain text when there is none).
    pub fn seal(&self, plain: &str, ctx: ValueContext<'_>) -> Result<Sealed, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| CryptoError::Malformed)?;
        self.seal_with_nonce(plain, ctx, nonce)
    }

    /// [`seal`](Self::seal) with a caller-chosen nonce. Only for known-answer tests:
    /// reusing a nonce under one key breaks AES-GCM.
    #[doc(hidden)]
    pub fn seal_with_nonce(
        &self,
        plain: &str,
        ctx: ValueContext<'_>,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Sealed, CryptoError> {
        let Some(key) = self.keys.first() else {
            return Ok(Sealed {
                value: plain.to_owned(),
                key_id: None,
            });
        };
        if plain.is_empty() {
            return Ok(Sealed {
                value: String::new(),
                key_id: None,
            });
        }
        let (aad, key_id) = match self.format {
            EncryptionFormat::Coder => (Vec::new(), key.coder_id.clone()),
            EncryptionFormat::Native => (ctx.native_aad(), key.native_id.clone()),
        };
        let mut buf = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
        buf.extend_from_slice(&nonce);
        buf.extend_from_slice(plain.as_bytes());
        let mut body = buf.split_off(NONCE_LEN);
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .map_err(|_| CryptoError::Invalid)?;
        buf.extend_from_slice(&body);
        Ok(Sealed {
            value: B64.encode(&buf),
            key_id: Some(key_id),
        })
    }

    /// Encrypts `""` the way coderd's dbcrypt does (a ciphertext with a key id;
    /// [`seal`](Self::seal) keeps empty values plain). coderd records a permanent
    /// refresh failure as this value; plain `""` when there is no key.
    pub fn seal_empty_as_coder(&self) -> Result<Sealed, CryptoError> {
        let Some(key) = self.keys.first() else {
            return Ok(Sealed {
                value: String::new(),
                key_id: None,
            });
        };
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| CryptoError::Malformed)?;
        let mut body = Vec::with_capacity(TAG_LEN);
        key.aead
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut body)
            .map_err(|_| CryptoError::Invalid)?;
        let mut buf = nonce.to_vec();
        buf.extend_from_slice(&body);
        Ok(Sealed {
            value: B64.encode(&buf),
            key_id: Some(key.coder_id.clone()),
        })
    }

    /// Decrypts a stored value with the key its key id names (None = plain text).
    pub fn open(
        &self,
        value: &str,
        key_id: Option<&str>,
        ctx: ValueContext<'_>,
    ) -> Result<SecretString, CryptoError> {
        let Some(id) = key_id.filter(|id| !id.is_empty()) else {
            return Ok(SecretString::from(value.to_owned()));
        };
        if self.keys.is_empty() {
            return Err(CryptoError::NoKeys);
        }
        let (key, aad) = if id.len() == CODER_ID_LEN {
            let k = self.keys.iter().find(|k| k.coder_id == id);
            (k, Vec::new())
        } else {
            let k = self.keys.iter().find(|k| k.native_id == id);
            (k, ctx.native_aad())
        };
        let key = key.ok_or_else(|| CryptoError::UnknownKey(id.to_owned()))?;
        open_with(&key.aead, value, &aad)
    }

    /// Decrypts a value whose key id was not kept, by trying every key in both
    /// formats; a value no key authenticates is taken as plain text. Used to tell
    /// whether a row still holds the same refresh token after a re-encryption.
    pub fn open_any(&self, value: &str, ctx: ValueContext<'_>) -> SecretString {
        let native = ctx.native_aad();
        for k in &self.keys {
            for aad in [&[][..], &native[..]] {
                if let Ok(s) = open_with(&k.aead, value, aad) {
                    return s;
                }
            }
        }
        SecretString::from(value.to_owned())
    }
}

fn open_with(key: &LessSafeKey, value: &str, aad: &[u8]) -> Result<SecretString, CryptoError> {
    let mut raw = B64.decode(value).map_err(|_| CryptoError::Malformed)?;
    if raw.len() < NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Malformed);
    }
    let mut body = raw.split_off(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(&raw).map_err(|_| CryptoError::Malformed)?;
    let plain = key
        .open_in_place(nonce, Aad::from(aad), &mut body)
        .map_err(|_| CryptoError::Invalid)?;
    let text = String::from_utf8(plain.to_vec()).map_err(|_| CryptoError::Malformed)?;
    // Scrub the working buffer; the plaintext now lives only in the secret.
    body.iter_mut().for_each(|b| *b = 0);
    Ok(SecretString::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(format: EncryptionFormat, keys: &[[u8; 32]]) -> Keyring {
        Keyring::new(
            keys.iter().map(|k| SecretBox::new(Box::new(*k))).collect(),
            format,
        )
    }

    fn ctx(column: &str) -> ValueContext<'_> {
        ValueContext {
            provider_id: "github",
            user_id: Uuid::nil(),
            column,
        }
    }

    #[test]
    fn roundtrip_both_formats_and_cross_format_read() {
        let key = [7u8; 32];
        for f in [EncryptionFormat::Coder, EncryptionFormat::Native] {
            let kr = ring(f, &[key]);
            let s = kr.seal("tok", ctx("c")).unwrap();
            assert_ne!(s.value, "tok");
            let other = ring(
                match f {
                    EncryptionFormat::Coder => EncryptionFormat::Native,
                    EncryptionFormat::Native => EncryptionFormat::Coder,
                },
                &[key],
            );
            let got = other.open(&s.value, s.key_id.as_deref(), ctx("c")).unwrap();
            assert_eq!(got.expose_secret(), "tok");
        }
    }

    #[test]
    fn empty_and_keyless_stay_plain() {
        let kr = ring(EncryptionFormat::Native, &[[1u8; 32]]);
        let s = kr.seal("", ctx("c")).unwrap();
        assert!(s.key_id.is_none() && s.value.is_empty());
        let p = Keyring::plaintext().seal("x", ctx("c")).unwrap();
        assert!(p.key_id.is_none() && p.value == "x");
        assert!(matches!(
            Keyring::plaintext().open("v", Some("abcdef0"), ctx("c")),
            Err(CryptoError::NoKeys)
        ));
    }

    #[test]
    fn unknown_key_and_tamper() {
        let kr = ring(EncryptionFormat::Coder, &[[1u8; 32]]);
        let s = kr.seal("tok", ctx("c")).unwrap();
        let other = ring(EncryptionFormat::Coder, &[[2u8; 32]]);
        assert!(matches!(
            other.open(&s.value, s.key_id.as_deref(), ctx("c")),
            Err(CryptoError::UnknownKey(_))
        ));
        let mut raw = B64.decode(&s.value).unwrap();
        raw[13] ^= 1;
        assert!(matches!(
            kr.open(&B64.encode(raw), s.key_id.as_deref(), ctx("c")),
            Err(CryptoError::Invalid)
        ));
        assert!(matches!(
            kr.open("!!", s.key_id.as_deref(), ctx("c")),
            Err(CryptoError::Malformed)
        ));
    }

    #[test]
    fn key_ids_have_their_lengths_and_differ() {
        let k = [3u8; 32];
        assert_eq!(coder_key_id(&k).len(), 7);
        assert_eq!(native_key_id(&k).len(), 16);
        assert!(!native_key_id(&k).starts_with(&coder_key_id(&k)));
    }
}
