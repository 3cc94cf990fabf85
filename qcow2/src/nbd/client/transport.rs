//! Requests in flight on one connection (§Transmission: a server may
//! answer requests in any order, and a structured reply's chunks may
//! interleave with other replies'). Threads share the connection: each
//! sends its request, then reads its own reply.
//!
//! # Protocol
//! - Sending takes `tx`: the request gets the next cookie, is entered in
//!   `in_flight`, then written.
//! - Replies are read under `rx`, one header at a time, by whichever
//!   waiting thread holds it. A header for the holder's own request: it
//!   reads the payload into its own buffer. A header for another request
//!   still in flight: it is left in `held` (its payload next on the
//!   stream), every waiter is woken, and the holder waits. Only the
//!   thread that sent that request takes a held header, so each payload
//!   lands in its owner's buffer without a copy, and no thread reads the
//!   stream while a header is held.
//! - However a call ends, its request leaves `in_flight` and the waiters
//!   are woken ([`Reader`]'s `Drop`), one of which goes on reading.
//! - A header for no request in flight, a reply that breaks the framing,
//!   a failed write or a panic mid-reply poisons the connection (under
//!   `rx`, waking every waiter): every call fails from then on, rather
//!   than read someone else's data.
//! - Where the stream cannot be split (TLS: one state machine for both
//!   directions), a call holds `rx` from its send to the end of its
//!   reply: one request at a time, since a server that answers in order
//!   (rimg-nbd's, qemu-nbd's for one client) would not read a request
//!   while the reply to another waits to be read.
//!
//! Lock order: split, `tx` then `rx` (only to poison); unsplit, `rx`
//! then `tx`; `in_flight` is taken last and alone. A thread waits on
//! `turn` only while a header is held for another thread, which is past
//! its send and on its way to `rx`; so some thread always makes progress
//! while replies arrive (`qcow2/tests/nbd_model.rs` explores the
//! interleavings).

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use nbd_proto::consts::{cmd, cmd_flags};
use nbd_proto::reply::ReplyHeader as Rh;
use nbd_proto::request::{Headers, Request};

use super::{bad, Conn, Stream};
use crate::nbd::Socket;
use crate::sync::{Condvar, Mutex, MutexGuard};

/// A second handle that writes to the same peer as a [`super::Duplex`].
pub trait Sink: Write + Send + std::fmt::Debug {}
impl<T: Write + Send + std::fmt::Debug> Sink for T {}

/// A second handle on the connection, for requests.
#[derive(Debug)]
enum Writer {
    Socket(Socket),
    Other(Box<dyn Sink>),
}

impl Write for Writer {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Writer::Socket(s) => s.write(b),
            Writer::Other(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug)]
struct Tx {
    /// Where requests go: a second handle on the connection; None:
    /// through the reply stream (see the module docs).
    w: Option<Writer>,
    cookie: u64,
    buf: Vec<u8>,
}

#[derive(Debug)]
pub(super) struct Rx {
    pub(super) s: Stream,
    /// A header read by a thread it was not for; its payload is next on
    /// the stream.
    held: Option<Rh>,
}

#[derive(Debug)]
pub(super) struct Transport {
    pub(super) h: Headers,
    tx: Mutex<Tx>,
    rx: Mutex<Rx>,
    /// Signalled when a header is held, a reply ends, or the connection
    /// is poisoned.
    turn: Condvar,
    /// Cookies of requests sent whose replies have not ended.
    in_flight: Mutex<HashSet<u64>>,
    poisoned: AtomicBool,
    /// Requests go through the reply stream (see the module docs).
    unsplit: bool,
}

fn cookie(h: &Rh) -> u64 {
    match *h {
        Rh::Simple { cookie, .. } | Rh::Chunk { cookie, .. } => cookie,
    }
}

fn poisoned_error() -> io::Error {
    bad("the NBD connection was closed after a protocol error")
}

impl Rx {
    /// Reads the next reply header from the stream.
    fn read_header(&mut self, h: Headers) -> io::Result<Rh> {
        let mut first = [0u8; 32];
        let n = Rh::first_len(h);
        self.s.read_exact(&mut first[..n])?;
        match Rh::parse(&first[..n], h).map_err(|e| bad(e.to_string()))? {
            Ok(hdr) => Ok(hdr),
            Err(more) => {
                let mut full = [0u8; 20];
                full[..16].copy_from_slice(&first[..16]);
                self.s.read_exact(&mut full[16..16 + more])?;
                Rh::structured(&full).map_err(|e| bad(e.to_string()))
            }
        }
    }
}

/// The reply stream, held by a thread reading its request's reply.
pub(super) struct Reader<'a> {
    t: &'a Transport,
    g: Option<MutexGuard<'a, Rx>>,
    /// The request whose reply this thread reads, once sent.
    cookie: Option<u64>,
}

/// However the call ends (a reply, an error, a panic mid-payload), its
/// request leaves `in_flight` and the waiters are woken, one of which
/// goes on reading; a panic poisons the connection first, since the
/// stream may be mid-payload.
impl Drop for Reader<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.t.poisoned.store(true, Ordering::Release);
        }
        if let Some(c) = self.cookie {
            self.t
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&c);
        }
        drop(self.g.take());
        self.t.turn.notify_all();
    }
}

impl Reader<'_> {
    pub(super) fn headers(&self) -> Headers {
        self.t.h
    }

    pub(super) fn stream(&mut self) -> &mut Stream {
        &mut self.rx().s
    }

    fn rx(&mut self) -> &mut Rx {
        self.g.as_mut().expect("the reply stream is held")
    }

    /// Lets go of the stream until another thread signals.
    fn wait(&mut self) {
        let g = self.g.take().expect("the reply stream is held");
        self.g = Some(self.t.turn.wait(g).unwrap_or_else(|p| p.into_inner()));
    }

    /// The next header of request `me`'s reply; its payload is next on
    /// the stream.
    pub(super) fn next_header(&mut self, me: u64) -> io::Result<Rh> {
        loop {
            if self.t.poisoned.load(Ordering::Acquire) {
                return Err(poisoned_error());
            }
            match self.rx().held {
                Some(h) if cookie(&h) == me => {
                    self.rx().held = None;
                    return Ok(h);
                }
                Some(_) => {
                    self.wait();
                    continue;
                }
                None => {}
            }
            let h = self.t.h;
            let hdr = self.rx().read_header(h)?;
            let c = cookie(&hdr);
            if c == me {
                return Ok(hdr);
            }
            if !self
                .t
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&c)
            {
                return Err(bad("NBD reply to a request never sent"));
            }
            self.rx().held = Some(hdr);
            self.t.turn.notify_all();
            self.wait();
        }
    }
}

impl Transport {
    /// The connection after its handshake.
    pub(super) fn new(c: Conn) -> Transport {
        let w = match &c.s {
            Stream::Socket(s) => s.try_clone().ok().map(Writer::Socket),
            Stream::Other(d) => d.split().map(Writer::Other),
            Stream::Tls(_) | Stream::Psk(_) | Stream::Closed => None,
        };
        let unsplit = w.is_none();
        Transport {
            h: c.h,
            tx: Mutex::new(Tx {
                w,
                cookie: 1,
                buf: Vec::new(),
            }),
            rx: Mutex::new(Rx { s: c.s, held: None }),
            turn: Condvar::new(),
            in_flight: Mutex::new(HashSet::new()),
            poisoned: AtomicBool::new(false),
            unsplit,
        }
    }

    /// Sends a request and waits for its reply: a read's data lands in
    /// `into`, a block status's first extent of context `status.0` in
    /// `status.1`. An error the server reports is returned as it is; a
    /// broken connection poisons it.
    pub(super) fn call(
        &self,
        r: Request,
        payload: &[u8],
        into: Option<&mut [u8]>,
        status: Option<(u32, &mut Option<(u64, u32)>)>,
    ) -> io::Result<()> {
        let mut rd = Reader {
            t: self,
            g: None,
            cookie: None,
        };
        if self.unsplit {
            // One request at a time, as a serial server may need: it
            // would not read a request while its reply to another waits
            // to be read.
            rd.g = Some(self.rx.lock().unwrap_or_else(|p| p.into_inner()));
        }
        let r = self.send(r, payload, rd.g.as_deref_mut())?;
        rd.cookie = Some(r.cookie);
        if rd.g.is_none() {
            rd.g = Some(self.rx.lock().unwrap_or_else(|p| p.into_inner()));
        }
        let res = rd.reply(&r, into, status);
        if res.is_err() {
            self.poisoned.store(true, Ordering::Release);
        }
        drop(rd);
        match res? {
            None => Ok(()),
            Some(server_error) => Err(server_error),
        }
    }

    /// Poisons the connection: every waiter wakes and fails, and every
    /// later call fails.
    pub(super) fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
        // Under `rx`: a waiter is either before its check or in its wait.
        drop(self.rx.lock().unwrap_or_else(|p| p.into_inner()));
        self.turn.notify_all();
    }

    /// Writes request `r` (its cookie assigned here) and its payload;
    /// through `rx`, held by the caller, where the stream is unsplit.
    fn send(&self, mut r: Request, payload: &[u8], rx: Option<&mut Rx>) -> io::Result<Request> {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if self.poisoned.load(Ordering::Acquire) {
            return Err(poisoned_error());
        }
        if self.h == Headers::Extended && !payload.is_empty() {
            r.flags |= cmd_flags::PAYLOAD_LEN;
        }
        r.cookie = tx.cookie;
        tx.cookie += 1;
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(r.cookie);
        let tx = &mut *tx;
        tx.buf.clear();
        r.encode(self.h, &mut tx.buf);
        let small = payload.len() < 64 << 10;
        if small {
            tx.buf.extend_from_slice(payload);
        }
        let res = match (tx.w.as_mut(), rx) {
            (Some(w), _) => write_request(w, &tx.buf, payload, small),
            (None, Some(rx)) => write_request(&mut rx.s, &tx.buf, payload, small),
            (None, None) => unreachable!("an unsplit stream is written under rx"),
        };
        if let Err(e) = res {
            // Mid-request: nothing more may follow it. A reader blocked
            // on the socket sees its end; waiters for a header held for
            // this request are woken to fail.
            self.in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&r.cookie);
            match &tx.w {
                Some(w) => {
                    if let Writer::Socket(s) = w {
                        s.shutdown();
                    }
                    self.poison();
                }
                // `rx` is the caller's: it poisons and wakes on return.
                None => self.poisoned.store(true, Ordering::Release),
            }
            return Err(e);
        }
        Ok(r)
    }

    /// Asks the server to end the connection (`NBD_CMD_DISC`), unless it
    /// is poisoned.
    pub(super) fn disconnect(&mut self) {
        if self.poisoned.load(Ordering::Acquire) {
            return;
        }
        let mut b = Vec::new();
        Request {
            flags: 0,
            kind: cmd::DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        }
        .encode(self.h, &mut b);
        let tx = self.tx.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = match tx.w.as_mut() {
            Some(w) => w.write_all(&b),
            None => {
                let rx = self.rx.get_mut().unwrap_or_else(|p| p.into_inner());
                rx.s.write_all(&b)
            }
        };
    }
}

fn write_request(w: &mut impl Write, head: &[u8], payload: &[u8], small: bool) -> io::Result<()> {
    w.write_all(head)?;
    if !small {
        w.write_all(payload)?;
    }
    Ok(())
}
