//! A TLS session shared by a connection's reader and its workers, so
//! that TLS clients get their requests answered concurrently as clients
//! in clear do ([`concurrent`](crate::concurrent)). One TLS state
//! machine serves both directions, so it sits under a lock held only
//! for calls that do not block: the socket is used without waiting
//! (MSG_DONTWAIT), and whoever must wait for it (the reader for data,
//! a worker for room to send) lets go of the lock and polls the socket.
//! A second lock keeps replies whole: a worker holds it until its reply
//! is all handed to the socket.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard};

use openssl::ssl::{ErrorCode, SslStream};
use rustls::ServerConnection;

use crate::concurrent::Wire;
use crate::connection::Timed;
use crate::server::Stream;

/// An established session, its socket in the no-wait mode.
pub(crate) enum Session {
    Rustls(Box<ServerConnection>, Timed),
    Openssl(SslStream<Timed>),
}

pub(crate) struct Duplex {
    tls: Mutex<Session>,
    send: Mutex<()>,
    /// The same socket, to poll and to shut down.
    sock: Stream,
}

/// What a caller waits for before it tries again.
enum Wait {
    Readable,
    Writable,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io_error(e: openssl::ssl::Error) -> io::Error {
    e.into_io_error().unwrap_or_else(io::Error::other)
}

/// What an OpenSSL call that could not finish waits for: the socket's
/// readiness, only when it said it would block.
fn openssl_wait(e: openssl::ssl::Error) -> io::Result<Wait> {
    let blocked = e
        .io_error()
        .is_none_or(|io| io.kind() == io::ErrorKind::WouldBlock);
    match e.code() {
        ErrorCode::WANT_READ if blocked => Ok(Wait::Readable),
        ErrorCode::WANT_WRITE if blocked => Ok(Wait::Writable),
        _ => Err(io_error(e)),
    }
}

/// The most plaintext an OpenSSL write takes under the lock.
const PIECE: usize = 64 << 10;

/// How long the end of a session waits to hand its close_notify over.
const CLOSE_WAIT_MS: i32 = 2000;

impl Duplex {
    pub(crate) fn new(session: Session, sock: Stream) -> Duplex {
        Duplex {
            tls: Mutex::new(session),
            send: Mutex::new(()),
            sock,
        }
    }

    fn poll(&self, w: Wait) -> io::Result<()> {
        self.poll_within(w, -1)
    }

    /// Waits for the socket (at most `ms` milliseconds; -1: no bound).
    fn poll_within(&self, w: Wait, ms: i32) -> io::Result<()> {
        let events = match w {
            Wait::Readable => libc::POLLIN,
            Wait::Writable => libc::POLLOUT,
        };
        let mut p = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events,
            revents: 0,
        };
        loop {
            // SAFETY: one pollfd, valid for the call.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r >= 0 {
                // Readiness, a hang-up or an error: the next call tells.
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// The session's close_notify, after the last reply: handed to the
    /// socket, waiting for room a bounded time (a client that stopped
    /// reading does not hold the connection).
    pub(crate) fn close(&self) {
        let _g = lock(&self.send);
        let mut first = true;
        loop {
            let wait = match &mut *lock(&self.tls) {
                Session::Rustls(c, sock) => {
                    if std::mem::take(&mut first) {
                        c.send_close_notify();
                    }
                    match flush_rustls(c, sock) {
                        Ok(Some(w)) => w,
                        _ => return,
                    }
                }
                Session::Openssl(s) => match s.shutdown() {
                    Ok(_) => return,
                    Err(e) => match openssl_wait(e) {
                        Ok(w) => w,
                        Err(_) => return,
                    },
                },
            };
            if self.poll_within(wait, CLOSE_WAIT_MS).is_err() {
                return;
            }
        }
    }
}

/// Hands rustls's pending records to the socket until it would wait.
fn flush_rustls(c: &mut ServerConnection, sock: &mut Timed) -> io::Result<Option<Wait>> {
    while c.wants_write() {
        match c.write_tls(sock) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(Wait::Writable)),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

impl Wire for Duplex {
    fn recv(&self, b: &mut [u8]) -> io::Result<usize> {
        loop {
            let wait = match &mut *lock(&self.tls) {
                Session::Rustls(c, sock) => {
                    match c.reader().read(b) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        r => return r,
                    }
                    match c.read_tls(sock) {
                        // The peer's end: what it sent says how (after a
                        // close_notify the end, else UnexpectedEof, which
                        // the request reader takes as a disconnect).
                        Ok(0) => {
                            c.process_new_packets().map_err(io::Error::other)?;
                            return c.reader().read(b);
                        }
                        Ok(_) => {
                            let state = c.process_new_packets().map_err(io::Error::other);
                            // Alerts and key updates it owes the peer; a
                            // failing socket is the workers' to report.
                            let _ = flush_rustls(c, sock);
                            state?;
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Wait::Readable,
                        Err(e) => return Err(e),
                    }
                }
                Session::Openssl(s) => match s.ssl_read(b) {
                    Ok(n) => return Ok(n),
                    // close_notify, or (IGNORE_UNEXPECTED_EOF) the end.
                    Err(e) if e.code() == ErrorCode::ZERO_RETURN => return Ok(0),
                    Err(e) if e.code() == ErrorCode::SYSCALL && e.io_error().is_none() => {
                        return Ok(0)
                    }
                    // It may also wait to finish sending what a worker
                    // left (a key update the peer asked for): the reader
                    // then waits for room, as a worker would.
                    Err(e) => openssl_wait(e)?,
                },
            };
            self.poll(wait)?;
        }
    }

    fn send(&self, reply: &[u8]) -> io::Result<()> {
        let _whole = lock(&self.send);
        let mut rest = reply;
        loop {
            let wait = match &mut *lock(&self.tls) {
                Session::Rustls(c, sock) => {
                    // As much as rustls buffers, then out to the socket.
                    while !rest.is_empty() {
                        match c.writer().write(rest)? {
                            0 => break,
                            n => rest = &rest[n..],
                        }
                    }
                    match flush_rustls(c, sock)? {
                        Some(w) => w,
                        None if rest.is_empty() => return Ok(()),
                        None => continue,
                    }
                }
                // A record's worth at a time, so that the reader gets
                // the lock between them; retried with the same slice
                // after it would block (OpenSSL's rule without partial
                // writes).
                Session::Openssl(s) => match s.ssl_write(&rest[..rest.len().min(PIECE)]) {
                    Ok(n) => {
                        rest = &rest[n..];
                        if rest.is_empty() {
                            return Ok(());
                        }
                        continue;
                    }
                    // Renegotiation is off: a write never waits for
                    // reading, which is the reader's alone.
                    Err(e) => match openssl_wait(e)? {
                        Wait::Writable => Wait::Writable,
                        Wait::Readable => {
                            return Err(io::Error::other("TLS: a write waits for the peer"))
                        }
                    },
                },
            };
            self.poll(wait)?;
        }
    }

    fn shutdown(&self) {
        self.sock.shutdown();
    }
}
