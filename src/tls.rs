//! TLS client roots shared by every outbound client (token endpoints and
//! upstreams): webpki's roots plus an operator's CA file, read the same way.

use std::path::Path;

/// webpki's roots plus the PEM certificates in `extra_ca`; the error says what
/// is wrong with the file (the caller names the key and the path).
pub fn roots(extra_ca: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read it: {}", e.kind()))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("bad PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("bad CA certificate: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err("no PEM certificates found".into());
        }
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_adds_to_the_webpki_roots_and_a_bad_one_says_why() {
        let base = roots(None).unwrap().len();
        assert!(base > 50, "webpki roots: {base}");
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(roots(Some(&missing)).unwrap_err().contains("cannot read"));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert_eq!(
            roots(Some(&empty)).unwrap_err(),
            "no PEM certificates found"
        );
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        assert_eq!(roots(Some(&good)).unwrap().len(), base + 1);
    }
}
