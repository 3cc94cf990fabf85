//! The client's handshake (§Handshake): fixed newstyle, TLS first when
//! asked, extended headers else structured replies, `base:allocation`,
//! then NBD_OPT_GO (or NBD_OPT_EXPORT_NAME for an old server).

use std::io::{self, Read, Write};

use nbd_proto::consts::{client, handshake, info, opt, rep, IHAVEOPT, NBDMAGIC};
use nbd_proto::option::{Info, InfoRequest, MetaRequest, OptionHeader, ReplyHeader};
use nbd_proto::request::Headers;
use nbd_proto::{Cursor, MAX_PAYLOAD};

use super::{
    bad, check_size, printable, Conn, Stream, MAX_OPTION_REPLIES, MAX_OPTION_REPLY,
    MAX_OPTION_REPLY_COUNT,
};

impl Conn {
    /// The handshake: returns size, flags, largest payload, minimum block
    /// size and the `base:allocation` context id.
    pub(super) fn handshake(
        &mut self,
        export: &str,
        tls: Option<&crate::nbd::uri::TlsParams>,
    ) -> io::Result<(u64, u16, u32, u32, Option<u32>)> {
        let no_zeroes = self.start(tls)?;
        self.go(export, no_zeroes)
    }

    /// The handshake up to the options about an export: the greeting,
    /// TLS when asked, then extended headers, else structured replies.
    /// Returns whether the server leaves out the 124 zero bytes.
    pub(super) fn start(&mut self, tls: Option<&crate::nbd::uri::TlsParams>) -> io::Result<bool> {
        let mut hello = [0u8; 18];
        self.s.read_exact(&mut hello)?;
        let mut c = Cursor::new(&hello);
        let magic = c.u64().map_err(|e| bad(e.to_string()))?;
        let opt_magic = c.u64().map_err(|e| bad(e.to_string()))?;
        let hflags = c.u16().map_err(|e| bad(e.to_string()))?;
        if magic != NBDMAGIC || opt_magic != IHAVEOPT {
            return Err(bad("not an NBD server speaking the newstyle handshake"));
        }
        if hflags & handshake::FIXED_NEWSTYLE == 0 {
            return Err(bad("the NBD server does not speak fixed newstyle"));
        }
        let no_zeroes = hflags & handshake::NO_ZEROES != 0;
        let cflags = client::FIXED_NEWSTYLE | if no_zeroes { client::NO_ZEROES } else { 0 };
        self.s.write_all(&cflags.to_be_bytes())?;
        if let Some(p) = tls {
            self.start_tls(p)?;
        }
        if self
            .option(opt::EXTENDED_HEADERS, &[])?
            .last()
            .is_some_and(|r| r.0 == rep::ACK)
        {
            self.h = Headers::Extended;
        } else if self
            .option(opt::STRUCTURED_REPLY, &[])?
            .last()
            .is_some_and(|r| r.0 == rep::ACK)
        {
            self.h = Headers::Compact { structured: true };
        }
        Ok(no_zeroes)
    }

    /// `base:allocation` for `export`, then NBD_OPT_GO (or
    /// NBD_OPT_EXPORT_NAME for an old server).
    fn go(
        &mut self,
        export: &str,
        no_zeroes: bool,
    ) -> io::Result<(u64, u16, u32, u32, Option<u32>)> {
        let mut allocation = None;
        if self.h.structured() {
            let m = MetaRequest {
                export: export.into(),
                queries: vec!["base:allocation".into()],
            };
            let replies = self.option(opt::SET_META_CONTEXT, &m.encode())?;
            if replies.last().is_some_and(|r| r.0 == rep::ACK) {
                for (t, d) in &replies {
                    if *t == rep::META_CONTEXT && d.len() >= 4 && &d[4..] == b"base:allocation" {
                        allocation = Some(u32::from_be_bytes(d[..4].try_into().unwrap()));
                    }
                }
            }
        }
        let go = InfoRequest {
            name: export.into(),
            items: vec![info::BLOCK_SIZE],
        };
        let replies = self.option(opt::GO, &go.encode())?;
        let (last, msg) = replies
            .last()
            .cloned()
            .unwrap_or((rep::ERR_UNSUP, Vec::new()));
        if last == rep::ERR_UNSUP && self.h != Headers::Extended {
            // An old server: the name alone, and no way to hear an error.
            self.s
                .write_all(&OptionHeader::encode(opt::EXPORT_NAME, export.as_bytes()))?;
            let mut b = [0u8; 10];
            self.s.read_exact(&mut b)?;
            if !no_zeroes {
                let mut z = [0u8; 124];
                self.s.read_exact(&mut z)?;
            }
            let size = u64::from_be_bytes(b[..8].try_into().unwrap());
            let flags = u16::from_be_bytes(b[8..].try_into().unwrap());
            check_size(size)?;
            return Ok((size, flags, MAX_PAYLOAD, 1, allocation));
        }
        if last != rep::ACK {
            return Err(refused(opt::GO, last, &msg));
        }
        let (mut size, mut flags, mut max, mut min) = (None, 0, MAX_PAYLOAD, 1);
        for (t, d) in &replies {
            if *t != rep::INFO {
                continue;
            }
            match Info::parse(d).map_err(|e| bad(format!("NBD_REP_INFO: {e}")))? {
                Info::Export { size: s, flags: f } => {
                    size = Some(s);
                    flags = f;
                }
                Info::BlockSize { min: n, max: m, .. } => {
                    // The spec's bounds: a power of two up to 64 KiB.
                    if !n.is_power_of_two() || n > 65536 {
                        return Err(bad(format!("NBD minimum block size {n}")));
                    }
                    min = n;
                    max = m.clamp(512, MAX_PAYLOAD);
                }
                _ => {}
            }
        }
        let size = size.ok_or_else(|| bad("the NBD server sent no export size"))?;
        check_size(size)?;
        // Payloads in whole blocks.
        let max = (max - max % min).max(min);
        Ok((size, flags, max, min, allocation))
    }

    /// NBD_OPT_STARTTLS, then the TLS handshake: everything after it
    /// travels inside TLS.
    fn start_tls(&mut self, p: &crate::nbd::uri::TlsParams) -> io::Result<()> {
        use crate::nbd::uri::Credentials;
        enum Session {
            Psk(openssl::ssl::SslContext),
            X509(std::sync::Arc<rustls::ClientConfig>),
        }
        // The credentials first: a missing file or key is reported as
        // such, not as the server's refusal.
        let session = match &p.creds {
            Credentials::Psk { file, username } => {
                Session::Psk(crate::nbd::tls::psk_client(file, username).map_err(io::Error::other)?)
            }
            Credentials::Certificates(_) => {
                Session::X509(crate::nbd::tls::client_config(p).map_err(io::Error::other)?)
            }
        };
        let replies = self.option(opt::STARTTLS, &[])?;
        if let Some((t, msg)) = replies.last().filter(|r| r.0 != rep::ACK) {
            return Err(refused(opt::STARTTLS, *t, msg));
        }
        let raw = std::mem::replace(&mut self.s, Stream::Closed);
        // The TLS handshake now, so that a refusal is reported here.
        self.s = match session {
            Session::Psk(ctx) => {
                let mut tls = openssl::ssl::Ssl::new(&ctx)
                    .and_then(|ssl| openssl::ssl::SslStream::new(ssl, raw))
                    .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
                tls.connect()
                    .map_err(|e| io::Error::other(format!("TLS handshake: {e}")))?;
                if !crate::nbd::tls::psk_used(tls.ssl()) {
                    return Err(io::Error::other(
                        "TLS handshake: the server did not use the pre-shared key",
                    ));
                }
                Stream::Psk(Box::new(tls))
            }
            Session::X509(config) => {
                // With no name to check, rustls still needs one (SNI).
                let host = p.hostname.clone().unwrap_or_else(|| "localhost".into());
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| io::Error::other(format!("tls-hostname {host}: {e}")))?;
                let conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
                let mut tls = rustls::StreamOwned::new(conn, raw);
                while tls.conn.is_handshaking() {
                    tls.conn
                        .complete_io(&mut tls.sock)
                        .map_err(|e| certificate_error(e, &host))?;
                }
                Stream::Tls(Box::new(tls))
            }
        };
        Ok(())
    }

    /// Sends an option; returns its replies, the final one last.
    pub(super) fn option(&mut self, o: u32, data: &[u8]) -> io::Result<Vec<(u32, Vec<u8>)>> {
        self.s.write_all(&OptionHeader::encode(o, data))?;
        let mut v = Vec::new();
        let mut kept = 0usize;
        loop {
            let mut h = [0u8; ReplyHeader::LEN];
            self.s.read_exact(&mut h)?;
            let h = ReplyHeader::parse(&h).map_err(|e| bad(e.to_string()))?;
            kept += h.len as usize;
            let misplaced = h.reply == rep::SERVER && o != opt::LIST;
            let too_many = kept > MAX_OPTION_REPLIES || v.len() >= MAX_OPTION_REPLY_COUNT;
            if h.option != o || h.len > MAX_OPTION_REPLY || too_many || misplaced {
                return Err(bad("the NBD server's option reply does not fit the option"));
            }
            let mut d = vec![0u8; h.len as usize];
            self.s.read_exact(&mut d)?;
            let last = h.reply == rep::ACK || rep::is_error(h.reply);
            v.push((h.reply, d));
            if last {
                return Ok(v);
            }
        }
    }
}

/// A refused option in QEMU's client's words (nbd_handle_reply_err):
/// what was refused, then the server's message on a line of its own.
/// An export the server does not have is NotFound.
pub(super) fn refused(o: u32, reply: u32, msg: &[u8]) -> io::Error {
    let name = match o {
        opt::EXPORT_NAME => "export name",
        opt::ABORT => "abort",
        opt::LIST => "list",
        opt::STARTTLS => "starttls",
        opt::INFO => "info",
        opt::GO => "go",
        opt::STRUCTURED_REPLY => "structured reply",
        opt::LIST_META_CONTEXT => "list meta context",
        opt::SET_META_CONTEXT => "set meta context",
        opt::EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    };
    let mut text = match reply {
        rep::ERR_POLICY => format!("Denied by server for option {o} ({name})"),
        rep::ERR_INVALID => format!("Invalid parameters for option {o} ({name})"),
        rep::ERR_PLATFORM => format!("Server lacks support for option {o} ({name})"),
        rep::ERR_TLS_REQD => format!(
            "TLS negotiation required before option {o} ({name})\nDid you forget a valid tls-creds?"
        ),
        rep::ERR_UNKNOWN => "Requested export not available".into(),
        rep::ERR_SHUTDOWN => format!("Server shutting down before option {o} ({name})"),
        rep::ERR_BLOCK_SIZE_REQD => {
            format!("Server requires INFO_BLOCK_SIZE for option {o} ({name})")
        }
        _ => format!("Unknown error code when asking for option {o} ({name})"),
    };
    if !msg.is_empty() {
        text.push_str("\nserver reported: ");
        text.push_str(&printable(&String::from_utf8_lossy(msg)));
    }
    let kind = match reply {
        rep::ERR_UNKNOWN => io::ErrorKind::NotFound,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, text)
}

/// A server certificate rustls refused, in QEMU's client's words where
/// it has them (its GnuTLS checks: the name, the issuer).
fn certificate_error(e: io::Error, host: &str) -> io::Error {
    use rustls::{CertificateError, Error};
    let text = match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => format!("Certificate does not match the hostname {host}"),
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "The certificate hasn't got a known issuer".into()
        }
        _ => return e,
    };
    io::Error::new(e.kind(), text)
}
