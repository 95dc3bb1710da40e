//! Forward-mode setup shared by tests/forward.rs and tests/recipes.rs: the
//! tokenproxy CA made by the real `tokenproxy ca init`, the `[forward]` section
//! that names it, and raw CONNECT/TLS clients for what real clients cannot do
//! (a ClientHello for another host, a mismatched inner `Host`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Runs `tokenproxy ca init --out DIR` and returns the CA certificate's path
/// (the one clients trust).
pub fn ca_init(dir: &Path) -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .args(["ca", "init", "--out"])
        .arg(dir)
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("ca.pem")
}

/// The `[forward]` section for the CA that [`ca_init`] wrote to `ca_dir`; more
/// `[forward]` keys may follow it.
pub fn forward_section(ca_dir: &Path) -> String {
    format!(
        "[forward]\nca_cert = \"{}\"\nca_key = \"{}\"\n",
        ca_dir.join("ca.pem").display(),
        ca_dir.join("ca-key.pem").display()
    )
}

/// Reads one HTTP/1.1 response (head and a Content-Length body) from `stream`.
#[allow(dead_code)]
pub async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> (u16, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.unwrap();
        assert_eq!(
            n,
            1,
            "connection closed mid-head: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.unwrap();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    (status, head)
}

/// Sends `CONNECT target` (with `auth` as `Proxy-Authorization`) and reads the answer.
#[allow(dead_code)]
pub async fn connect(stream: &mut TcpStream, target: &str, auth: Option<&str>) -> (u16, String) {
    let auth = auth
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    read_response(stream).await
}

/// Accepts any server certificate: lets a test see what the proxy does after a
/// ClientHello, without the client's own name check deciding first.
#[derive(Debug)]
#[allow(dead_code)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Starts TLS naming `sni` over `stream`, trusting any certificate (see
/// [`AnyCert`]).
#[allow(dead_code)]
pub async fn tls_trusting_anything(
    stream: TcpStream,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
}

/// One HTTP/1.1 GET on an open tunnel, naming `host`.
#[allow(dead_code)]
pub async fn get_in_tunnel<S: AsyncRead + AsyncWrite + Unpin>(
    tls: &mut S,
    path: &str,
    host: &str,
) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    read_response(tls).await
}
