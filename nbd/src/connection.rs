//! One client, from the greeting to its disconnect: the handshake under
//! its deadline, TLS when the server requires it (the client's
//! `NBD_OPT_STARTTLS`, then option haggling again inside TLS), then
//! transmission.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use log::{debug, warn};
use openssl::ssl::SslStream;
use rustls::{ServerConnection, StreamOwned};

use crate::export::Exports;
use crate::handshake::{self, HandshakeError, Outcome, Session, Tls};
use crate::server::Stream;
use crate::tls::TlsCreds;
use crate::transmission::{self, Policy};

/// The client's socket; while `end` is set, every read and write must
/// end by then (the handshake's deadline): each waits at most for the
/// time left, so a client that trickles bytes or never reads is cut off
/// when the time is up, in TLS as in clear.
struct Timed {
    s: Stream,
    end: Option<Instant>,
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
}

impl Read for Timed {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.s.read(b)
    }
}

impl Write for Timed {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
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
    // The ring first (TLS sessions are served one request at a time,
    // without): then this thread, which reads what the client sends,
    // gives up making rings (whose operations no filter sees).
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
            if let Err(e) = tls.get_mut().disarm() {
                return warn!("client {id}: {e}");
            }
            transmit(id, &mut tls, &session, policy);
            let _ = tls.shutdown();
        }
        (Outcome::StartTls, Some(TlsCreds::X509(config))) => {
            let conn = match ServerConnection::new(config.clone()) {
                Ok(c) => c,
                Err(e) => return warn!("client {id}: TLS: {e}"),
            };
            // The TLS handshake runs on the first read, under the same
            // deadline.
            let mut tls = StreamOwned::new(conn, t);
            let session = match handshake::options(&mut tls, exports, no_zeroes, Tls::Active) {
                Ok(Outcome::Session(s)) => s,
                Ok(Outcome::StartTls) => return warn!("client {id}: STARTTLS inside TLS"),
                Err(e) => return report(id, e),
            };
            if let Err(e) = tls.sock.disarm() {
                return warn!("client {id}: {e}");
            }
            transmit(id, &mut tls, &session, policy);
            // The spec's end of a TLS session: close_notify.
            tls.conn.send_close_notify();
            let _ = tls.conn.complete_io(&mut tls.sock);
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

/// Requests one at a time (TLS: one state machine for both directions).
fn transmit<S: Read + Write>(id: u64, s: &mut S, session: &Session, policy: Policy) {
    log_session(id, session);
    if let Err(e) = transmission::serve(s, session, policy) {
        warn!("client {id}: {e}");
    }
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
