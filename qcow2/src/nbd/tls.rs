//! TLS for NBD connections, shared by the client here and rimg-nbd:
//! rustls with the ring provider, and credentials read from a directory
//! with QEMU's and libnbd's file names.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::uri::TlsParams;

/// rustls's ring provider: its key exchanges are classical (rustls marks
/// it deprecated for having no post-quantum one), which every NBD peer
/// (GnuTLS in QEMU and libnbd) speaks; aws-lc-rs would need cmake and a
/// C toolchain beyond the one the project builds with.
#[allow(deprecated)]
pub fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The certificates of a PEM file (at least one).
pub fn read_certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(p)
        .map_err(|e| format!("{}: {e}", p.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", p.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", p.display()));
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn read_key(p: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// A CA's certificates as roots of trust.
pub fn roots(ca: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(ca)? {
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    Ok(roots)
}

/// The client's configuration: the CA of `ca-cert.pem`, and the client
/// certificate of `client-cert.pem` and `client-key.pem` when present.
pub fn client_config(p: &TlsParams) -> Result<Arc<ClientConfig>, String> {
    let dir = &p.certificates;
    let b = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(&dir.join("ca-cert.pem"))?);
    let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    let config = if cert.exists() && key.exists() {
        b.with_client_auth_cert(read_certs(&cert)?, read_key(&key)?)
            .map_err(|e| format!("{}: {e}", dir.display()))?
    } else {
        b.with_no_client_auth()
    };
    Ok(Arc::new(config))
}
