//! Requests of one connection answered concurrently, as
//! clients that keep many requests in flight (QEMU's NBD client, nbdcopy,
//! the kernel's) expect: on a disk, a read that waits for the device
//! does not hold up the others. The spec lets a server answer in any
//! order; a flush still covers every write answered before it arrived,
//! since a write is answered only once the engine has done it.
//!
//! # Protocol
//! - The connection's thread reads requests and queues them ([`Queue`],
//!   which states why nothing waits for ever); workers
//!   (at most [`WORKERS`], started while queued requests outnumber idle
//!   workers) take them, answer, and write each reply whole under the
//!   writer lock.
//! - Requests in the queue or being answered hold a share of
//!   [`BUDGET`] bytes (payload, reply data, and [`OVERHEAD`] each, so
//!   that requests without data count too): the reader waits for room
//!   before it reads a payload, so a client that sends and never reads
//!   makes the server stop reading, as a serial server would.
//! - At the end (the client's disconnect, or a broken socket) the queue
//!   is closed: workers finish what is queued and exit, and the scope
//!   joins them before the connection ends. A worker whose reply cannot
//!   be written, or that panics, shuts the socket down, which ends the
//!   reader (a panic also closes the queue: the reader does not wait for
//!   the room the lost request held).
//! - With no worker at all (a spawn that fails), the reader answers the
//!   request itself.

use std::io::{self, BufReader, Read, Write};
use std::sync::Mutex;

use log::debug;

use nbd_proto::consts::cmd;
use nbd_proto::request::{Headers, Request};
use nbd_proto::MAX_PAYLOAD;

use crate::handshake::Session;
use crate::queue::Queue;
use crate::server::Stream;
use crate::transmission::{next_request, Exec, Policy, TransmissionError};

/// Most workers per connection.
pub const WORKERS: usize = 8;
/// Most bytes of payloads and replies held per connection.
pub const BUDGET: u64 = 64 << 20;
/// What every request counts against the budget beyond its payload and
/// reply data (its place in the queue, its header), so that requests
/// without data are bounded too: at most BUDGET / OVERHEAD queued.
pub const OVERHEAD: u64 = 4 << 10;
/// A block status reply's count: 65536 extents of 16 bytes per context
/// at the most.
const STATUS_REPLY: u64 = 1 << 20;

/// What a request holds of the budget: its payload, its reply's data
/// (bounded as the request is checked) and [`OVERHEAD`].
pub(crate) fn cost(req: &Request, h: Headers, contexts: usize) -> u64 {
    let reply = match req.kind {
        cmd::READ => req.len.min(MAX_PAYLOAD as u64),
        cmd::BLOCK_STATUS => STATUS_REPLY * contexts as u64,
        _ => 0,
    };
    OVERHEAD + req.payload_len(h) + reply
}

struct Job {
    req: Request,
    data: qcow2::pagebuf::PageBuf,
    cost: u64,
}

/// A connection as its reader and workers share it: one reader
/// receives, workers send whole replies one at a time, and anyone may
/// end it (which makes the reader's receive return).
pub trait Wire: Sync {
    fn recv(&self, b: &mut [u8]) -> io::Result<usize>;
    /// Sends one reply whole, not interleaved with another's.
    fn send(&self, reply: &[u8]) -> io::Result<()>;
    fn shutdown(&self);
}

/// A socket in clear.
struct Plain {
    reader: Mutex<Stream>,
    writer: Mutex<Stream>,
    s: Stream,
}

impl Wire for Plain {
    fn recv(&self, b: &mut [u8]) -> io::Result<usize> {
        self.reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(b)
    }
    fn send(&self, reply: &[u8]) -> io::Result<()> {
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(reply)
    }
    fn shutdown(&self) {
        self.s.shutdown();
    }
}

/// The reader's side of a [`Wire`], as a byte stream.
struct Recv<'a, W>(&'a W);

impl<W: Wire> Read for Recv<'_, W> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.0.recv(b)
    }
}

/// Serves requests on socket `s` until the client disconnects, answering
/// them concurrently.
pub fn serve(s: &Stream, session: &Session, policy: Policy) -> Result<(), TransmissionError> {
    let plain = Plain {
        reader: Mutex::new(s.try_clone()?),
        writer: Mutex::new(s.try_clone()?),
        s: s.try_clone()?,
    };
    serve_on(&plain, session, policy)
}

/// Serves requests on `wire` until the client disconnects, answering
/// them concurrently.
pub fn serve_on<W: Wire>(
    wire: &W,
    session: &Session,
    policy: Policy,
) -> Result<(), TransmissionError> {
    let mut reader = BufReader::with_capacity(256 << 10, Recv(wire));
    let q: Queue<Job> = Queue::new(BUDGET, WORKERS);
    let h = session.headers;
    std::thread::scope(|sc| {
        let worker = || {
            let mut exec = Exec::new(session, policy);
            while let Some(job) = q.take() {
                let cost = job.cost;
                let failed = Failed { q: &q, wire, cost };
                answer(&mut exec, job, wire);
                std::mem::forget(failed);
                q.release(cost);
            }
        };
        let mut inline = Exec::new(session, policy);
        let res = loop {
            let mut data = qcow2::pagebuf::PageBuf::new();
            // Room for the payload and the reply before the payload is
            // read (a read's reply is bounded as its request is checked).
            let mut cost = 0;
            let got = next_request(&mut reader, h, &mut data, |req| {
                cost = self::cost(req, h, session.contexts.len());
                q.reserve(cost);
            });
            let req = match got {
                Ok(Some(r)) => r,
                Ok(None) => {
                    q.release(cost);
                    break Ok(());
                }
                Err(e) => {
                    q.release(cost);
                    break Err(e);
                }
            };
            let job = Job { req, data, cost };
            let start = || {
                std::thread::Builder::new()
                    .name("nbd-worker".into())
                    .spawn_scoped(sc, worker)
                    .is_ok()
            };
            if let Some(job) = q.dispatch(job, start) {
                let cost = job.cost;
                answer(&mut inline, job, wire);
                q.release(cost);
            }
        };
        q.close();
        res
    })
}

/// Answers one job and writes its reply; a reply that cannot be written
/// ends the connection (the socket is shut down, so the reader stops).
fn answer<W: Wire>(exec: &mut Exec, job: Job, wire: &W) {
    exec.answer(&job.req, &job.data);
    drop(job);
    if let Err(e) = wire.send(&exec.out) {
        debug!("reply not sent, ending the connection: {e}");
        wire.shutdown();
    }
    exec.trim();
}

/// Armed while a worker answers: if it panics instead, its request will
/// never be answered, so the connection ends (the socket shut down, the
/// queue closed so that the reader does not wait for the room it held).
struct Failed<'a, W: Wire> {
    q: &'a Queue<Job>,
    wire: &'a W,
    cost: u64,
}

impl<W: Wire> Drop for Failed<'_, W> {
    fn drop(&mut self) {
        self.wire.shutdown();
        self.q.close();
        self.q.release(self.cost);
    }
}
