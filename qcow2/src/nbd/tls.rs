//! TLS for NBD connections, shared by the client here and rimg-nbd:
//! rustls with the ring provider, and credentials read from a directory
//! with QEMU's and libnbd's file names.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};

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

/// The client's configuration: the CA of `ca-cert.pem` (required even
/// when it is not checked, as QEMU requires it), and the client
/// certificate of `client-cert.pem` and `client-key.pem` when present.
/// Made per connection and never shared between different `TlsParams`:
/// a resumed TLS 1.3 session is not judged again by `ServerCheck`.
pub fn client_config(p: &TlsParams) -> Result<Arc<ClientConfig>, String> {
    let dir = &p.certificates;
    let provider = Arc::new(provider());
    let chain = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(&dir.join("ca-cert.pem"))?),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("{}: {e}", dir.display()))?;
    let b = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerCheck {
            chain,
            name: p.hostname.is_some(),
            verify: p.verify_peer,
        }));
    let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    let config = if cert.exists() && key.exists() {
        b.with_client_auth_cert(read_certs(&cert)?, read_key(&key)?)
            .map_err(|e| format!("{}: {e}", dir.display()))?
    } else {
        b.with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// The server's certificate judged as QEMU's client judges it: chained
/// to the CA and carrying the name asked for; not at all with
/// `verify-peer=off`. With no name (an `nbds+unix` URI without
/// `tls-hostname`, where QEMU would refuse) the chain only. The handshake's
/// own signatures are always checked: they prove the server holds the
/// key of the certificate it sent.
#[derive(Debug)]
struct ServerCheck {
    chain: Arc<WebPkiServerVerifier>,
    name: bool,
    verify: bool,
}

impl ServerCertVerifier for ServerCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.verify {
            return Ok(ServerCertVerified::assertion());
        }
        // webpki checks the chain before the name: a name error means
        // the chain was good.
        match self
            .chain
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.name => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}
