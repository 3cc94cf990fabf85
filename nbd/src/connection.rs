//! One client, from the greeting to its disconnect: the handshake under
//! its deadline, TLS when the server requires it (the client's
//! `NBD_OPT_STARTTLS`, then option haggling again inside TLS), then
//! transmission.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use log::{debug, warn};
use openssl::ssl::SslStream;
use rustls::{ServerConnection, StreamOwned};

use crate::duplex::{self, Duplex};
use crate::export::Exports;
use crate::handshake::{self, HandshakeError, Outcome, Session, Tls};
use crate::server::Stream;
use crate::tls::TlsCreds;
use crate::transmission::Policy;

/// The client's socket; while `end` is set, every read and write must
/// end by then (the handshake's deadline): each waits at most for the
/// time left, so a client that trickles bytes or never reads is cut off
/// when the time is up, in TLS as in clear.
pub(crate) struct Timed {
    s: Stream,
    end: Option<Instant>,
    /// Past the handshake, under a session shared by several threads
    /// (see `duplex`): reads and writes never wait (WouldBlock instead).
    dontwait: bool,
}

impl Timed {
    fn arm(&self) -> io::Result<()> {
        let Some(end) = self.end else {
            return Ok(());
        };
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.s.set_timeouts(Some(left))
    }

    /// The handshake is over: no deadline any more.
    fn disarm(&mut self) -> io::Result<()> {
        self.end = None;
        self.s.set_timeouts(None::<Duration>)
    }

    /// Past a TLS handshake: no deadline, no waiting (see `duplex`);
    /// returns the socket again, to poll and shut down.
    fn shared(&mut self) -> io::Result<Stream> {
        self.disarm()?;
        self.dontwait = true;
        self.s.try_clone()
    }
}

/// A byte count from recv(2) or send(2), or the error it reported.
fn counted(r: isize) -> io::Result<usize> {
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

impl Read for Timed {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        if self.dontwait {
            // SAFETY: receives into `b`, valid and writable for its length.
            let r = unsafe {
                libc::recv(
                    self.s.as_raw_fd(),
                    b.as_mut_ptr().cast(),
                    b.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            return counted(r);
        }
        self.arm()?;
        self.s.read(b)
    }
}

impl Write for Timed {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.dontwait {
            // SAFETY: sends from `b`, valid for its length.
            let r = unsafe {
                libc::send(
                    self.s.as_raw_fd(),
                    b.as_ptr().cast(),
                    b.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            return counted(r);
        }
        self.arm()?;
        self.s.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Serves client `id` on `s` until it disconnects.
pub fn run(
    id: u64,
    s: Stream,
    exports: &Exports,
    policy: Policy,
    limit: Option<Duration>,
    tls: Option<&TlsCreds>,
) {
    // The ring first (TLS sessions are served by worker threads, see
    // `duplex`, without one): then this thread, which reads what the
    // client sends, gives up making rings (whose operations no filter
    // sees).
    let ring = match tls {
        None => crate::uring::Ring::for_policy(policy),
        Some(_) => None,
    };
    if let Err(e) = crate::seccomp::enter_connection() {
        return warn!("client {id}: not served: connection seccomp filter: {e}");
    }
    let mut t = Timed {
        s,
        end: limit.map(|l| Instant::now() + l),
        dontwait: false,
    };
    let mode = if tls.is_some() {
        Tls::Required
    } else {
        Tls::Off
    };
    let first = handshake::greet(&mut t).and_then(|no_zeroes| {
        Ok((
            no_zeroes,
            handshake::options(&mut t, exports, no_zeroes, mode)?,
        ))
    });
    let (no_zeroes, outcome) = match first {
        Ok(x) => x,
        Err(e) => return report(id, e),
    };
    match (outcome, tls) {
        (Outcome::Session(session), _) => {
            if let Err(e) = t.disarm() {
                return warn!("client {id}: {e}");
            }
            log_session(id, &session);
            let served = match ring {
                Some(r) => crate::uring::serve(&t.s, &session, policy, r),
                None => crate::concurrent::serve(&t.s, &session, policy),
            };
            if let Err(e) = served {
                warn!("client {id}: {e}");
            }
        }
        (Outcome::StartTls, Some(TlsCreds::Psk(ctx))) => {
            let tls = openssl::ssl::Ssl::new(ctx).and_then(|ssl| SslStream::new(ssl, t));
            let mut tls = match tls {
                Ok(s) => s,
                Err(e) => return warn!("client {id}: TLS: {e}"),
            };
            // The handshake under the same deadline; a client with an
            // unknown identity or the wrong key fails it.
            if let Err(e) = tls.accept() {
                let e = e.into_io_error().unwrap_or_else(io::Error::other);
                return report(id, HandshakeError::Io(e));
            }
            let session = match handshake::options(&mut tls, exports, no_zeroes, Tls::Active) {
                Ok(Outcome::Session(s)) => s,
                Ok(Outcome::StartTls) => return warn!("client {id}: STARTTLS inside TLS"),
                Err(e) => return report(id, e),
            };
            let sock = match tls.get_mut().shared() {
                Ok(s) => s,
                Err(e) => return warn!("client {id}: {e}"),
            };
            serve_tls(
                id,
                Duplex::new(duplex::Session::Openssl(tls), sock),
                &session,
                policy,
            );
        }
        (Outcome::StartTls, Some(TlsCreds::X509 { config, authz })) => {
            let conn = match ServerConnection::new(config.clone()) {
                Ok(c) => c,
                Err(e) => return warn!("client {id}: TLS: {e}"),
            };
            // The TLS handshake first, under the same deadline, so that
            // the client's certificate can be judged before anything
            // else (QEMU's order).
            let mut tls = StreamOwned::new(conn, t);
            while tls.conn.is_handshaking() {
                if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                    return report(id, HandshakeError::Io(e));
                }
            }
            if let Some(want) = authz {
                let subject = tls
                    .conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| crate::authz::subject_dn(c));
                if subject.as_deref() != Some(want.as_str()) {
                    // For the log only: a subject may hold control
                    // characters.
                    let shown: String = subject
                        .unwrap_or_else(|| "(none)".into())
                        .chars()
                        .map(|c| if c.is_control() { '?' } else { c })
                        .collect();
                    return warn!("client {id}: TLS x509 authz check for {shown} is denied");
                }
            }
            let session = match handshake::options(&mut tls, exports, no_zeroes, Tls::Active) {
                Ok(Outcome::Session(s)) => s,
                Ok(Outcome::StartTls) => return warn!("client {id}: STARTTLS inside TLS"),
                Err(e) => return report(id, e),
            };
            let sock = match tls.sock.shared() {
                Ok(s) => s,
                Err(e) => return warn!("client {id}: {e}"),
            };
            let StreamOwned { conn, sock: t } = tls;
            serve_tls(
                id,
                Duplex::new(duplex::Session::Rustls(Box::new(conn), t), sock),
                &session,
                policy,
            );
        }
        (Outcome::StartTls, None) => warn!("client {id}: STARTTLS without credentials"),
    }
}

fn log_session(id: u64, session: &Session) {
    debug!(
        "client {id}: export '{}', {:?}, contexts {:?}",
        session.export.name, session.headers, session.contexts
    );
}

/// A TLS session's requests, answered concurrently (see `duplex`); at
/// the end the spec's close_notify.
fn serve_tls(id: u64, d: Duplex, session: &Session, policy: Policy) {
    log_session(id, session);
    if let Err(e) = crate::concurrent::serve_on(&d, session, policy) {
        warn!("client {id}: {e}");
    }
    d.close();
}

/// Logs how a handshake failed: quietly for clients that just left.
fn report(id: u64, e: HandshakeError) {
    match e {
        HandshakeError::Aborted => debug!("client {id}: ended the handshake"),
        // A client that asked its question (a list, an info) and left
        // without reading the last reply.
        HandshakeError::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::UnexpectedEof
            ) =>
        {
            debug!("client {id}: left during the handshake: {e}")
        }
        HandshakeError::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            warn!("client {id}: handshake not finished within the limit: disconnected")
        }
        e => warn!("client {id}: handshake: {e}"),
    }
}
