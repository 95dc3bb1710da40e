//! Known-answer and binding tests of the at-rest encryption formats.
//!
//! The expected strings were computed independently with Python's `cryptography`
//! package (not with this crate):
//!
//! ```python
//! key = bytes(range(32)); nonce = bytes(range(0xa0, 0xac)); pt = b"gho_test-access-token"
//! base64.b64encode(nonce + AESGCM(key).encrypt(nonce, pt, None))          # Coder
//! hashlib.sha256(b"aes256gcm" + key).hexdigest()[:7]                       # Coder key id
//! aad = b"tokenproxy-v1\x00github\x0000000000-0000-0000-0000-000000000001\x00oauth_access_token"
//! base64.b64encode(nonce + AESGCM(key).encrypt(nonce, pt, aad))           # native
//! hashlib.sha256(b"tokenproxy-native-v1" + key).hexdigest()[:16]           # native key id
//! ```

use secrecy::{ExposeSecret, SecretBox};
use tokenproxy::config::EncryptionFormat;
use tokenproxy::crypto::{coder_key_id, native_key_id, CryptoError, Keyring, ValueContext};
use uuid::Uuid;

fn kat_key() -> [u8; 32] {
    std::array::from_fn(|i| i as u8)
}

fn kat_nonce() -> [u8; 12] {
    std::array::from_fn(|i| 0xa0 + i as u8)
}

const PLAIN: &str = "gho_test-access-token";
const CODER_CIPHERTEXT: &str =
    "oKGio6SlpqeoqaqrgXATcjGucctPBOSwYgmz8wTDMnX8RAt1mZnq0n0Mc5kKaHWpQw==";
const CODER_KEY_ID: &str = "6d28cf8";
const NATIVE_CIPHERTEXT: &str =
    "oKGio6SlpqeoqaqrgXATcjGucctPBOSwYgmz8wTDMnX8/i92t98KpXK8flf9FG7LMQ==";
const NATIVE_KEY_ID: &str = "29860c11ab30d489";

fn keyring(format: EncryptionFormat, keys: &[[u8; 32]]) -> Keyring {
    Keyring::new(
        keys.iter().map(|k| SecretBox::new(Box::new(*k))).collect(),
        format,
    )
}

fn user1() -> Uuid {
    Uuid::from_u128(1)
}

fn ctx<'a>(provider_id: &'a str, user_id: Uuid, column: &'a str) -> ValueContext<'a> {
    ValueContext {
        provider_id,
        user_id,
        column,
    }
}

#[test]
fn coder_known_answer() {
    assert_eq!(coder_key_id(&kat_key()), CODER_KEY_ID);
    let kr = keyring(EncryptionFormat::Coder, &[kat_key()]);
    // Coder uses no associated data, so the context must not matter.
    let sealed = kr
        .seal_with_nonce(PLAIN, ctx("any", Uuid::new_v4(), "x"), kat_nonce())
        .unwrap();
    assert_eq!(sealed.value, CODER_CIPHERTEXT);
    assert_eq!(sealed.key_id.as_deref(), Some(CODER_KEY_ID));
    let opened = kr
        .open(
            CODER_CIPHERTEXT,
            Some(CODER_KEY_ID),
            ctx("other", user1(), "y"),
        )
        .unwrap();
    assert_eq!(opened.expose_secret(), PLAIN);
}

#[test]
fn native_known_answer() {
    assert_eq!(native_key_id(&kat_key()), NATIVE_KEY_ID);
    let kr = keyring(EncryptionFormat::Native, &[kat_key()]);
    let here = ctx("github", user1(), "oauth_access_token");
    let sealed = kr.seal_with_nonce(PLAIN, here, kat_nonce()).unwrap();
    assert_eq!(sealed.value, NATIVE_CIPHERTEXT);
    assert_eq!(sealed.key_id.as_deref(), Some(NATIVE_KEY_ID));
    let opened = kr
        .open(NATIVE_CIPHERTEXT, Some(NATIVE_KEY_ID), here)
        .unwrap();
    assert_eq!(opened.expose_secret(), PLAIN);
}

#[test]
fn native_value_moved_to_another_row_or_column_fails() {
    let kr = keyring(EncryptionFormat::Native, &[kat_key()]);
    let here = ctx("github", user1(), "oauth_access_token");
    let sealed = kr.seal(PLAIN, here).unwrap();
    let id = sealed.key_id.as_deref();
    for elsewhere in [
        ctx("github", user1(), "oauth_refresh_token"),
        ctx("github", Uuid::from_u128(2), "oauth_access_token"),
        ctx("gitlab", user1(), "oauth_access_token"),
    ] {
        assert_eq!(
            kr.open(&sealed.value, id, elsewhere).err(),
            Some(CryptoError::Invalid)
        );
    }
    assert_eq!(
        kr.open(&sealed.value, id, here).unwrap().expose_secret(),
        PLAIN
    );
}

#[test]
fn random_nonces_differ_and_never_contain_plaintext() {
    let kr = keyring(EncryptionFormat::Coder, &[kat_key()]);
    let c = ctx("github", user1(), "oauth_access_token");
    let a = kr.seal(PLAIN, c).unwrap();
    let b = kr.seal(PLAIN, c).unwrap();
    assert_ne!(a.value, b.value);
    assert!(!a.value.contains(PLAIN));
}

#[test]
fn second_key_still_decrypts_after_rotation_order_change() {
    let old = kat_key();
    let new = [0x42; 32];
    let before = keyring(EncryptionFormat::Coder, &[old]);
    let sealed = before.seal(PLAIN, ctx("p", user1(), "c")).unwrap();
    let after = keyring(EncryptionFormat::Coder, &[new, old]);
    assert_eq!(
        after
            .open(
                &sealed.value,
                sealed.key_id.as_deref(),
                ctx("p", user1(), "c")
            )
            .unwrap()
            .expose_secret(),
        PLAIN
    );
    assert_ne!(after.primary_key_id(), sealed.key_id.as_deref());
}
