//! TLS for NBD connections, shared by the client here and rimg-nbd:
//! rustls with the ring provider, and credentials read from a directory
//! with QEMU's and libnbd's file names.
//!
//! Pre-shared keys (QEMU's `tls-creds-psk`, libnbd's `tls-psk-file`)
//! are OpenSSL's: rustls has no TLS-PSK (rustls issue 174). Only those
//! sessions use it; the keys file is QEMU's and GnuTLS's `keys.psk`.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};

use openssl::ssl::{
    SslContext, SslContextBuilder, SslMethod, SslOptions, SslSessionCacheMode, SslVerifyMode,
    SslVersion,
};

use super::uri::{Credentials, TlsParams};

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
    let Credentials::Certificates(dir) = &p.creds else {
        return Err("TLS: not X.509 credentials".into());
    };
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

/// The longest identity GnuTLS takes (MAX_USERNAME_SIZE 128, with its
/// NUL), and OpenSSL's longest key (PSK_MAX_PSK_LEN).
const MAX_IDENTITY: usize = 128;
const MAX_KEY: usize = 512;

/// The cipher suites of a PSK session before TLS 1.3: AEAD only, with an
/// ephemeral key exchange where GnuTLS offers one (ECDHE-PSK with
/// ChaCha20-Poly1305). TLS 1.3 takes its own suites; a key given this
/// way is used with SHA-256 there.
const PSK_CIPHERS: &str = "ECDHE-PSK-CHACHA20-POLY1305:PSK-AES256-GCM-SHA384:\
                           PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305";

/// The identities and keys of a `keys.psk` file: one `identity:hexkey`
/// per line (GnuTLS's psktool format, which QEMU reads: the identity
/// ends at the first colon). Blank lines are skipped and trailing white
/// space ignored; anything else malformed is an error naming its line.
pub fn read_psk_keys(p: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| format!("{}:{}: {why}", p.display(), i + 1);
        let (id, hex) = line
            .split_once(':')
            .ok_or_else(|| bad("expected IDENTITY:HEXKEY"))?;
        if id.is_empty() || id.len() >= MAX_IDENTITY || id.contains('\0') {
            return Err(bad("identity empty, longer than 127 bytes or with a NUL"));
        }
        let key = decode_hex(hex).ok_or_else(|| bad("the key is not hexadecimal"))?;
        if key.is_empty() || key.len() > MAX_KEY {
            return Err(bad("key empty or longer than 512 bytes"));
        }
        keys.push((id.to_string(), key));
    }
    if keys.is_empty() {
        return Err(format!("{}: no keys", p.display()));
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

fn psk_context(method: SslMethod) -> Result<SslContextBuilder, String> {
    let mut b = SslContextBuilder::new(method).map_err(|e| format!("TLS: {e}"))?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .and_then(|()| b.set_cipher_list(PSK_CIPHERS))
        .and_then(|()| b.set_num_tickets(0))
        .map_err(|e| format!("TLS: {e}"))?;
    // No resumption, by ticket or by session id: every connection proves
    // the key again. No renegotiation (a TLS 1.2 peer's would make a
    // write wait for reading, which rimg-nbd's workers never do). A peer
    // that closes without close_notify ends the stream: NBD's framing
    // catches a request or reply cut short.
    b.set_options(
        SslOptions::NO_TICKET | SslOptions::NO_RENEGOTIATION | SslOptions::IGNORE_UNEXPECTED_EOF,
    );
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    Ok(b)
}

/// The client's context for a PSK session as `username`, with its key
/// from `file`. The server must use the key: in TLS 1.3 one may ignore
/// it and answer with a certificate, which this client never accepts
/// (see also [`psk_used`]).
pub fn psk_client(file: &Path, username: &str) -> Result<SslContext, String> {
    let key = read_psk_keys(file)?
        .into_iter()
        .find(|(id, _)| id == username)
        .map(|(_, k)| k)
        .ok_or_else(|| format!("{}: no key for '{username}'", file.display()))?;
    let identity = username.as_bytes().to_vec();
    let mut b = psk_context(SslMethod::tls_client())?;
    b.set_verify_callback(SslVerifyMode::PEER, |_, _| false);
    b.set_psk_client_callback(move |_, _hint, id, psk| {
        // The file's lengths were checked against OpenSSL's bounds; a
        // smaller buffer fails the handshake (0: no key), never panics.
        if identity.len() >= id.len() || key.len() > psk.len() {
            return Ok(0);
        }
        id[..identity.len()].copy_from_slice(&identity);
        id[identity.len()] = 0;
        psk[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    Ok(b.build())
}

/// After a client's handshake: whether the session was keyed by the
/// pre-shared key (no certificate came, and in TLS 1.3 the PSK was
/// taken: OpenSSL reports that as a resumed session).
pub fn psk_used(ssl: &openssl::ssl::SslRef) -> bool {
    let tls13 = ssl.version2() == Some(SslVersion::TLS1_3);
    ssl.peer_certificate().is_none() && (!tls13 || ssl.session_reused())
}

/// The server's context: the client's identity picks its key among
/// `keys`; an unknown identity fails the handshake.
pub fn psk_server(keys: Vec<(String, Vec<u8>)>) -> Result<SslContext, String> {
    let mut b = psk_context(SslMethod::tls_server())?;
    b.set_psk_server_callback(move |_, identity, psk| {
        let found = identity.and_then(|i| keys.iter().find(|(id, _)| id.as_bytes() == i));
        Ok(match found {
            Some((_, k)) if k.len() <= psk.len() => {
                psk[..k.len()].copy_from_slice(k);
                k.len()
            }
            _ => 0,
        })
    });
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_files_as_psktool_writes_them() {
        let dir = std::env::temp_dir().join(format!("rimg-psk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("keys.psk");
        std::fs::write(&f, "qemu:00ff10\n\nalice:DEADbeef \r\n").unwrap();
        let keys = read_psk_keys(&f).unwrap();
        assert_eq!(keys[0], ("qemu".into(), vec![0, 0xff, 0x10]));
        assert_eq!(keys[1], ("alice".into(), vec![0xde, 0xad, 0xbe, 0xef]));
        assert!(psk_client(&f, "alice").is_ok());
        assert!(psk_client(&f, "bob")
            .unwrap_err()
            .contains("no key for 'bob'"));
        let long = format!("{}:00", "i".repeat(128));
        let nul = "a\0b:00".to_string();
        for bad in [
            "qemu",
            "qemu:0g",
            "qemu:abc",
            ":00",
            "qemu:",
            "",
            "qemu:+f+f",
            "a:b:cc",
        ] {
            std::fs::write(&f, bad).unwrap();
            assert!(read_psk_keys(&f).is_err(), "{bad:?}");
        }
        for bad in [long, nul] {
            std::fs::write(&f, &bad).unwrap();
            assert!(read_psk_keys(&f).is_err(), "{bad:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
