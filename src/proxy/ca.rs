//! The forward-mode certificate authority: creating one (`tokenproxy ca init`),
//! loading it, and minting short-lived leaf certificates for intercepted hosts.
//!
//! Clients trust this one CA; tokenproxy then terminates TLS for every routed host
//! with a leaf it signs on first use. Leaves live a day and are cached for half
//! of that, so a cached leaf always has at least twelve hours left, and a busy host
//! costs one key generation and one signature, not one per connection. The cache
//! holds complete rustls server configs (leaf + key + ALPN), keyed by host.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use secrecy::{ExposeSecret, SecretString};

/// How long a minted leaf is valid.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long a minted leaf is reused; well inside its lifetime.
const LEAF_CACHE_TTL: Duration = Duration::from_secs(12 * 3600);
/// Leaves are valid from a little before now, for clients with slow clocks.
const BACKDATE: Duration = Duration::from_secs(3600);
/// Most hosts with a cached leaf.
const LEAF_CACHE_CAPACITY: u64 = 10_000;

/// Why the CA could not be loaded or a leaf minted.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or parsed; names the config key.
    #[error("{key} {path}: {message}")]
    File {
        /// `forward.ca_cert` or `forward.ca_key`.
        key: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Generating or signing a certificate failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// rustls refused the minted certificate.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// A new CA: its certificate (PEM) and private key (PEM, secret).
pub fn generate_ca(
    common_name: &str,
    lifetime: Duration,
) -> Result<(String, SecretString), CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "tokenproxy");
    params.distinguished_name = dn;
    // It signs leaves only, never other CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), SecretString::from(key.serialize_pem())))
}

/// The loaded CA and its cache of minted leaves.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    leaves: moka::future::Cache<String, Arc<rustls::ServerConfig>>,
    minted: Counter,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("minted", &self.minted())
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Loads the CA certificate and key named by `[forward]`, checking they belong
    /// together.
    /// `minted` counts the leaves minted (a metric).
    pub fn load(cert_path: &Path, key_path: &Path, minted: Counter) -> Result<Self, CaError> {
        let file_err = |key: &'static str, path: &Path, message: String| CaError::File {
            key,
            path: path.display().to_string(),
            message,
        };
        let cert_pem = std::fs::read_to_string(cert_path)
            .map_err(|e| file_err("forward.ca_cert", cert_path, e.to_string()))?;
        let key_pem = SecretString::from(
            std::fs::read_to_string(key_path)
                .map_err(|e| file_err("forward.ca_key", key_path, e.to_string()))?,
        );
        let ca_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| file_err("forward.ca_cert", cert_path, "no PEM certificate".into()))?;
        let key = KeyPair::from_pem(key_pem.expose_secret())
            .map_err(|_| file_err("forward.ca_key", key_path, "not a PEM private key".into()))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(key.serialize_der()),
        ))
        .map_err(|_| file_err("forward.ca_key", key_path, "unsupported key type".into()))?;
        rustls::sign::CertifiedKey::new(vec![ca_der.clone()], signer)
            .keys_match()
            .map_err(|_| {
                file_err(
                    "forward.ca_key",
                    key_path,
                    "does not belong to forward.ca_cert".into(),
                )
            })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| file_err("forward.ca_cert", cert_path, e.to_string()))?;
        Ok(Self {
            issuer,
            ca_der,
            leaves: moka::future::Cache::builder()
                .max_capacity(LEAF_CACHE_CAPACITY)
                .time_to_live(LEAF_CACHE_TTL)
                .build(),
            minted,
        })
    }

    /// The TLS server config presenting a leaf for `host` (a DNS name or IP
    /// address, lowercase), minting and caching it on first use. Concurrent first
    /// uses of one host share one mint.
    pub async fn server_config(
        &self,
        host: &str,
    ) -> Result<Arc<rustls::ServerConfig>, Arc<CaError>> {
        self.leaves
            .try_get_with(host.to_string(), async { self.mint(host).map(Arc::new) })
            .await
    }

    /// Whether a leaf for `host` is cached (serving it mints nothing).
    pub fn has_leaf(&self, host: &str) -> bool {
        self.leaves.contains_key(host)
    }

    /// How many leaves have been minted since start.
    pub fn minted(&self) -> u64 {
        self.minted.get()
    }

    fn mint(&self, host: &str) -> Result<rustls::ServerConfig, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_LIFETIME;
        let leaf = params.signed_by(&key, &self.issuer)?;
        let chain = vec![leaf.der().clone(), self.ca_der.clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        self.minted.inc();
        tracing::debug!(host, "minted a leaf certificate");
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (tempfile::TempDir, CertAuthority) {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = generate_ca("test CA", Duration::from_secs(3600)).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert).unwrap();
        std::fs::write(dir.path().join("ca-key.pem"), key.expose_secret()).unwrap();
        let ca = CertAuthority::load(
            &dir.path().join("ca.pem"),
            &dir.path().join("ca-key.pem"),
            Counter::default(),
        )
        .unwrap();
        (dir, ca)
    }

    #[tokio::test]
    async fn leaves_are_cached_per_host() {
        let (_dir, ca) = ca();
        let a = ca.server_config("a.example.com").await.unwrap();
        let again = ca.server_config("a.example.com").await.unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        ca.server_config("127.0.0.1").await.unwrap();
        assert_eq!(ca.minted(), 2);
    }

    #[test]
    fn mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = generate_ca("one", Duration::from_secs(3600)).unwrap();
        let (_, other_key) = generate_ca("two", Duration::from_secs(3600)).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert).unwrap();
        std::fs::write(dir.path().join("k.pem"), other_key.expose_secret()).unwrap();
        let err = CertAuthority::load(
            &dir.path().join("ca.pem"),
            &dir.path().join("k.pem"),
            Counter::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("forward.ca_key "), "{err}");
        let err = CertAuthority::load(
            &dir.path().join("nope.pem"),
            &dir.path().join("k.pem"),
            Counter::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("forward.ca_cert "), "{err}");
    }
}
