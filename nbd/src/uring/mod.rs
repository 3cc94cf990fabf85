//! Requests of one plain-socket connection served on an io_uring by the
//! connection's own thread (`--aio io_uring`, the default). The socket's
//! receives and sends and the image file's data reads and writes are all
//! operations on one ring, so requests overlap without worker threads, as
//! in the block daemon's queue workers.
//!
//! # Protocol
//! - **In.** One receive at a time, into the input buffer, or straight
//!   into the payload buffer of a write whose header has arrived (1 MiB
//!   at a time: a header that announces 32 MiB and sends nothing commits
//!   nothing). Requests are parsed in order, each into a slot. As on the
//!   threaded path ([`crate::concurrent`]), a request holds room in
//!   [`BUDGET`] for its payload, its reply data and [`OVERHEAD`] before
//!   its payload is received; while there is no room (or no free slot of
//!   [`SLOTS`]) nothing more is parsed or received, so a client that sends
//!   and never reads makes the server stop reading.
//! - **Data.** A READ or WRITE whose bytes are the guest's, in a local
//!   file, goes through the engine's split data path under an I/O epoch:
//!   mapped extent by extent, data extents become ring reads and writes at
//!   their host offsets; other read extents (zeros, the backing file,
//!   compressed clusters) are read by the engine. A write extent whose
//!   cluster another request is allocating parks the request; the engine
//!   calls the connection's waker (an eventfd whose read is always posted
//!   on the ring) when that allocation ends. A write is answered once
//!   every extent is committed (and, with FUA, flushed). At most
//!   `MAX_INFLIGHT` operations are in flight, so that completions never
//!   overflow the ring; a request mapped into more waits for room.
//! - **Everything else** (FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS, CACHE,
//!   and the reads and writes the split path cannot do: encrypted images,
//!   data on an NBD server, a probed raw image's first sector, a raw
//!   file's padded tail) runs in the engine on this thread in non-blocking
//!   mode: where it would wait for an allocation (perhaps one of this
//!   connection's, which only this thread can end) it is parked and runs
//!   again whole when woken. A flush covers every write answered before
//!   it arrived, since a write is answered only once committed.
//! - **Out.** Replies are sent in the order they become ready, up to
//!   [`BATCH`] in one `sendmsg`, one send at a time; a short send is
//!   finished first.
//! - **End.** NBD_CMD_DISC, the client's end closing, a framing error or a
//!   failed send end receiving (a receive in flight is ended by shutting
//!   the socket's reading side). Requests taken are finished and their
//!   replies sent (unless a send failed); then the waker's read is ended
//!   and the ring drained. The server's shutdown (SIGTERM) shuts the
//!   socket down, which ends the receive in flight. The ring follows the
//!   daemons' one teardown policy ([`WorkerRing`]): nothing the kernel may
//!   still read or write is freed, and a ring that cannot be waited on
//!   leaks what its operations use (`Conn::leak`).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types};
use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use nbd_proto::consts::cmd;
use nbd_proto::request::{Headers, Request};
use nbd_proto::MAX_PAYLOAD;
use qcow2::pagebuf::PageBuf;
use qcow2::sync::AllocWaker;
use qcow2::{Image, IoEpoch, PendingWrite};
use rimg_vhost_server::{RingOwner, WorkerRing};

#[cfg(doc)]
use crate::concurrent::OVERHEAD;
use crate::concurrent::{cost, BUDGET};
use crate::handshake::Session;
use crate::server::Stream;
use crate::transmission::{Aio, Exec, Failure, Policy, TransmissionError};

mod data;

/// Most requests taken at once per connection.
pub const SLOTS: usize = 256;
/// Replies gathered into one send at most.
pub const BATCH: usize = 64;
const ENTRIES: u32 = 256;
/// Most operations in flight: within the completion queue (twice the
/// entries), so that completions never overflow it however long the loop
/// is busy elsewhere; a request that would go past waits in `throttled`.
const MAX_INFLIGHT: usize = 2 * ENTRIES as usize - 8;
/// The input buffer, where request headers (and small payloads) land.
const INPUT: usize = 256 << 10;
/// A payload is received (and its buffer grown) this much at a time.
const PIECE: usize = 1 << 20;
/// The buffer capacity a free slot keeps (its payload's and its reply's
/// each): at most 64 MiB kept between requests by a connection's slots.
const SLOT_KEEP: usize = 128 << 10;

/// `user_data` of the ring's operations other than data I/O, whose
/// `user_data` is the slot's index in the high half and its operation's
/// in the low one.
const RECV: u64 = u64::MAX;
const SEND: u64 = u64::MAX - 1;
const WAKE: u64 = u64::MAX - 2;

/// What the ring may do: receive and send on the socket, read and write
/// the image's data file (and read the waker's eventfd).
const OPS: [u8; 4] = [
    opcode::Recv::CODE,
    opcode::SendMsg::CODE,
    opcode::Read::CODE,
    opcode::Write::CODE,
];

/// A connection's ring and the eventfd that wakes it, made when its
/// thread starts: before the thread reads anything from the client, it
/// gives up making rings ([`crate::seccomp::enter_connection`]).
pub struct Ring {
    ring: WorkerRing,
    wake: Arc<Waker>,
}

impl Ring {
    /// Refused where rings cannot be restricted (before 5.10): the
    /// threaded path serves then, rather than an unrestricted ring on the
    /// thread that talks to the client.
    pub fn new() -> std::io::Result<Ring> {
        if !rimg_vhost_server::uring::can_restrict() {
            return Err(std::io::Error::other(
                "this kernel cannot restrict io_uring operations",
            ));
        }
        Ok(Ring {
            ring: WorkerRing::restricted(ENTRIES, &OPS, None, &[])?,
            wake: Arc::new(Waker(EventFd::new(libc::EFD_CLOEXEC)?)),
        })
    }

    /// A ring for connections of `policy`, if it says io_uring and one
    /// can be made (else the threaded path serves, with a warning once).
    pub fn for_policy(policy: Policy) -> Option<Ring> {
        if policy.aio != Aio::IoUring {
            return None;
        }
        Ring::new()
            .inspect_err(|e| {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| warn!("io_uring: {e}: connections are served by threads"));
            })
            .ok()
    }
}

/// Serves requests on socket `s` until the client disconnects, on `ring`.
pub fn serve(
    s: &Stream,
    session: &Session,
    policy: Policy,
    ring: Ring,
) -> Result<(), TransmissionError> {
    Conn::new(s, session, policy, ring).run()
}

/// Calls the connection's loop back when an allocation it waits for ends.
struct Waker(EventFd);

impl AllocWaker for Waker {
    fn wake(&self) {
        // Never blocks: an eventfd's count does not reach its maximum
        // before the loop reads it.
        let _ = self.0.write(1);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Free,
    /// Its payload is being received.
    Payload,
    /// Being answered (or parked).
    Run,
    /// Its reply is queued or being sent.
    Reply,
}

/// One data read or write on the ring.
struct Op {
    /// Where in the request's data it starts.
    pos: usize,
    len: usize,
    host: u64,
    /// Bytes moved so far: a short read or write goes on from there.
    moved: usize,
    /// The mapped write this op carries the data of.
    wio: Option<PendingWrite>,
}

struct Slot<'a> {
    stage: Stage,
    req: Request,
    /// The write's payload.
    data: PageBuf,
    plen: usize,
    /// Payload bytes received.
    got: usize,
    cost: u64,
    /// Its reply is left in `exec.out`.
    exec: Exec<'a>,
    /// Through the split data path (else in the engine).
    split: bool,
    /// Where a read's data starts in `exec.out`.
    at: usize,
    /// Data bytes mapped and issued.
    done: u64,
    pending: u32,
    parked: bool,
    failed: Option<Failure>,
    ops: Vec<Op>,
    /// Held while the request's mappings are in use.
    epoch: Option<IoEpoch>,
}

/// Kernel-visible buffers besides the slots': they stay put while the
/// operations that name them are in flight.
struct Wire {
    msg: libc::msghdr,
    iov: [libc::iovec; BATCH],
}

impl Wire {
    fn new() -> Box<Wire> {
        Box::new(Wire {
            // SAFETY: msghdr is plain data; all zeros is a valid one (no
            // name, no control data, no iovecs).
            msg: unsafe { std::mem::zeroed() },
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; BATCH],
        })
    }
}

/// A connection's event loop (see the module docs).
struct Conn<'a> {
    ring: WorkerRing,
    s: &'a Stream,
    fd: RawFd,
    session: &'a Session,
    policy: Policy,
    h: Headers,
    img: Arc<dyn Image>,
    /// The data file of the split path; None when every request goes
    /// through the engine.
    file: Option<RawFd>,
    guards_first_sector: bool,
    waker: Arc<dyn AllocWaker>,
    wake_fd: Arc<Waker>,
    /// The waker's read is not posted again: the loop is ending.
    closing: bool,

    input: Vec<u8>,
    /// Parsed up to here; received up to `rlen`.
    rpos: usize,
    rlen: usize,
    recv_busy: bool,
    /// The request whose payload is being received.
    partial: Option<usize>,
    /// Parsing waits for room.
    blocked: bool,
    /// No more requests are taken; the result to return.
    eof: bool,
    end: Result<(), TransmissionError>,

    slots: Vec<Slot<'a>>,
    free: Vec<usize>,
    held: u64,
    parked: Vec<usize>,
    /// Requests waiting for room in the ring (`MAX_INFLIGHT`).
    throttled: Vec<usize>,
    /// The waker's read failed: parked requests are retried as
    /// allocations end, polled (`Image::wait_for_allocations`).
    poll_parked: bool,

    outq: std::collections::VecDeque<usize>,
    /// Bytes of the first queued reply already sent.
    sent_front: usize,
    send_busy: bool,
    /// A send failed: replies are dropped.
    broken: bool,
    wire: Box<Wire>,
    /// Where the waker's read puts the eventfd's count (apart from
    /// `wire`, which is changed while the read is in flight).
    wake_buf: Box<[u8; 8]>,
    reaped: Vec<(u64, i32)>,
}

impl<'a> Conn<'a> {
    fn new(s: &'a Stream, session: &'a Session, policy: Policy, ring: Ring) -> Conn<'a> {
        let Ring {
            ring,
            wake: wake_fd,
        } = ring;
        let img = session.export.image.clone();
        let file = match (img.data_in_clear(), img.data_storage().file()) {
            (true, Some(f)) => Some(f.as_raw_fd()),
            _ => None,
        };
        Conn {
            ring,
            s,
            fd: s.as_raw_fd(),
            session,
            policy,
            h: session.headers,
            guards_first_sector: img.guards_first_sector(),
            img,
            file,
            waker: wake_fd.clone(),
            wake_fd,
            closing: false,
            input: vec![0; INPUT],
            rpos: 0,
            rlen: 0,
            recv_busy: false,
            partial: None,
            blocked: false,
            eof: false,
            end: Ok(()),
            slots: Vec::new(),
            free: Vec::new(),
            held: 0,
            parked: Vec::new(),
            throttled: Vec::new(),
            poll_parked: false,
            outq: Default::default(),
            sent_front: 0,
            send_busy: false,
            broken: false,
            wire: Wire::new(),
            wake_buf: Box::new([0; 8]),
            reaped: Vec::new(),
        }
    }

    fn run(mut self) -> Result<(), TransmissionError> {
        self.arm_wake();
        loop {
            self.parse();
            self.post_recv();
            self.post_send();
            if self.finished() {
                break;
            }
            if self.poll_parked && !self.parked.is_empty() && self.ring.inflight() == 0 {
                self.img
                    .wait_for_allocations(std::time::Duration::from_millis(10));
                self.retry_parked();
                continue;
            }
            if let Err(e) = self.ring.wait() {
                self.leak();
                return Err(e.into());
            }
            self.reap_completions();
            for idx in std::mem::take(&mut self.throttled) {
                self.plan(idx);
            }
        }
        // The waker's read completes on this count.
        self.closing = true;
        let _ = self.wake_fd.0.write(1);
        if let Err(e) = self.drain_ring() {
            self.leak();
            return Err(e.into());
        }
        std::mem::replace(&mut self.end, Ok(()))
    }

    fn finished(&self) -> bool {
        self.eof && !self.recv_busy && !self.send_busy && self.free.len() == self.slots.len()
    }

    /// Stops taking requests; the first result stays.
    fn stop(&mut self, res: Result<(), TransmissionError>) {
        if !self.eof {
            self.eof = true;
            self.end = res;
        }
        // A payload still being received into is let go of once the
        // receive is over.
        if !self.recv_busy {
            if let Some(idx) = self.partial.take() {
                self.free_slot(idx);
            }
        } else {
            // SAFETY: shutdown(2) on the connection's own socket, which
            // `self.s` keeps open; it changes no memory.
            unsafe { libc::shutdown(self.fd, libc::SHUT_RD) };
        }
    }

    // ----- requests in -----

    /// Takes the requests in the input buffer while there is room.
    fn parse(&mut self) {
        self.blocked = false;
        let hl = self.h.request_len();
        while !self.eof && self.partial.is_none() && self.rlen - self.rpos >= hl {
            let req = match Request::parse(&self.input[self.rpos..self.rpos + hl], self.h) {
                Ok(r) => r,
                Err(e) => return self.stop(Err(e.into())),
            };
            let plen = req.payload_len(self.h);
            if plen > MAX_PAYLOAD as u64 {
                return self.stop(Err(TransmissionError::PayloadTooLong(plen)));
            }
            if req.kind == cmd::DISC {
                self.rpos += hl;
                return self.stop(Ok(()));
            }
            let c = cost(&req, self.h, self.session.contexts.len());
            let full = self.free.is_empty() && self.slots.len() >= SLOTS;
            if full || (self.held > 0 && self.held + c > BUDGET) {
                self.blocked = true;
                return;
            }
            self.rpos += hl;
            self.held += c;
            let idx = self.take_slot();
            let take = (plen as usize).min(self.rlen - self.rpos);
            let s = &mut self.slots[idx];
            s.req = req;
            s.cost = c;
            s.plen = plen as usize;
            s.got = take;
            s.data.resize(take);
            s.data
                .copy_from_slice(&self.input[self.rpos..self.rpos + take]);
            self.rpos += take;
            if take < s.plen {
                s.stage = Stage::Payload;
                self.partial = Some(idx);
                return;
            }
            self.start(idx);
        }
    }

    fn take_slot(&mut self) -> usize {
        if let Some(i) = self.free.pop() {
            return i;
        }
        self.slots.push(Slot {
            stage: Stage::Free,
            req: Request::default(),
            data: PageBuf::new(),
            plen: 0,
            got: 0,
            cost: 0,
            exec: Exec::new(self.session, self.policy),
            split: false,
            at: 0,
            done: 0,
            pending: 0,
            parked: false,
            failed: None,
            ops: Vec::new(),
            epoch: None,
        });
        self.slots.len() - 1
    }

    fn free_slot(&mut self, idx: usize) {
        let s = &mut self.slots[idx];
        self.held -= s.cost;
        s.stage = Stage::Free;
        if s.exec.out.capacity() > SLOT_KEEP {
            s.exec.out = Vec::new();
        }
        if s.data.capacity() > SLOT_KEEP {
            s.data = PageBuf::new();
        }
        self.free.push(idx);
    }

    fn post_recv(&mut self) {
        if self.recv_busy || self.eof {
            return;
        }
        // A payload's piece arrives whole (MSG_WAITALL: one completion,
        // not one per socket buffer's worth); headers as they come.
        let (p, n, flags) = if let Some(idx) = self.partial {
            let s = &mut self.slots[idx];
            if s.data.len() == s.got {
                s.data.resize((s.got + PIECE).min(s.plen));
            }
            let b = &mut s.data[s.got..];
            (b.as_mut_ptr(), b.len(), libc::MSG_WAITALL)
        } else {
            if self.blocked {
                return;
            }
            self.input.copy_within(self.rpos..self.rlen, 0);
            self.rlen -= self.rpos;
            self.rpos = 0;
            let b = &mut self.input[self.rlen..];
            (b.as_mut_ptr(), b.len(), 0)
        };
        let sqe = opcode::Recv::new(types::Fd(self.fd), p, n as u32)
            .flags(flags)
            .build()
            .user_data(RECV);
        // Set before the push, which may reap, and so run `stop`.
        self.recv_busy = true;
        // SAFETY: the buffer (the input buffer's free end, or the payload
        // buffer of the slot in `partial`) is neither moved, resized nor
        // freed while the receive is in flight (`recv_busy`): the input
        // is compacted and payloads grown only here, with no receive in
        // flight; the slot in `partial` is let go of only with no receive
        // in flight (`stop`, `received`); a wedged ring leaks them all
        // (`leak`).
        unsafe { self.push_entry(&sqe) };
    }

    fn received(&mut self, res: i32) {
        self.recv_busy = false;
        if self.eof {
            // Ended by `stop`: what came in is not taken.
            if let Some(idx) = self.partial.take() {
                self.free_slot(idx);
            }
            return;
        }
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return;
        }
        if res < 0 {
            let e = std::io::Error::from_raw_os_error(-res);
            return self.stop(Err(e.into()));
        }
        if res == 0 {
            // Between requests (or within a header, as the threaded path
            // reads it): a disconnect; within a payload: cut short.
            let res = match self.partial.is_some() {
                true => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
                false => Ok(()),
            };
            return self.stop(res);
        }
        let n = res as usize;
        let Some(idx) = self.partial else {
            self.rlen += n;
            return;
        };
        let s = &mut self.slots[idx];
        s.got += n;
        if s.got == s.plen {
            self.partial = None;
            self.start(idx);
        }
    }

    fn arm_wake(&mut self) {
        let b = &mut self.wake_buf;
        let sqe = opcode::Read::new(types::Fd(self.wake_fd.0.as_raw_fd()), b.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE);
        // SAFETY: the buffer is boxed, untouched until the read completes,
        // and kept until the ring is drained (the loop ends the read by
        // counting on the eventfd), or leaked.
        unsafe { self.push_entry(&sqe) };
    }

    // ----- replies out -----

    fn reply(&mut self, idx: usize) {
        self.slots[idx].stage = Stage::Reply;
        match self.broken {
            true => self.free_slot(idx),
            false => self.outq.push_back(idx),
        }
    }

    fn post_send(&mut self) {
        if self.send_busy || self.broken || self.outq.is_empty() {
            return;
        }
        let mut n = 0;
        for (k, &idx) in self.outq.iter().take(BATCH).enumerate() {
            let skip = if k == 0 { self.sent_front } else { 0 };
            let b = &self.slots[idx].exec.out[skip..];
            self.wire.iov[k] = libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            };
            n += 1;
        }
        let w = &mut *self.wire;
        w.msg.msg_iov = w.iov.as_mut_ptr();
        w.msg.msg_iovlen = n;
        let sqe = opcode::SendMsg::new(types::Fd(self.fd), &w.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(SEND);
        // Set before the push, which may reap.
        self.send_busy = true;
        // SAFETY: the message header and iovecs are in the boxed `wire`,
        // untouched until the send completes (`send_busy`); the replies
        // they point at stay queued, unchanged, until then.
        unsafe { self.push_entry(&sqe) };
    }

    fn sent(&mut self, res: i32) {
        self.send_busy = false;
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return;
        }
        if res <= 0 {
            let e = std::io::Error::from_raw_os_error(if res == 0 { libc::EPIPE } else { -res });
            debug!("reply not sent, ending the connection: {e}");
            self.broken = true;
            self.s.shutdown();
            self.stop(Ok(()));
            self.sent_front = 0;
            while let Some(idx) = self.outq.pop_front() {
                self.free_slot(idx);
            }
            return;
        }
        let mut n = res as usize;
        while n > 0 {
            let idx = self.outq[0];
            let left = self.slots[idx].exec.out.len() - self.sent_front;
            if n < left {
                self.sent_front += n;
                break;
            }
            n -= left;
            self.sent_front = 0;
            self.outq.pop_front();
            self.free_slot(idx);
        }
    }

    // ----- the ring -----

    /// The ring cannot be waited on: its operations may still run, so
    /// what they use is leaked, the writes abandoned and the epochs kept
    /// for good (see [`PendingWrite::abandon`]).
    fn leak(&mut self) {
        for s in &mut self.slots {
            for op in &mut s.ops {
                if let Some(w) = op.wio.take() {
                    w.abandon();
                }
            }
            if let Some(e) = s.epoch.take() {
                std::mem::forget(e);
            }
        }
        std::mem::forget(std::mem::take(&mut self.slots));
        std::mem::forget(std::mem::take(&mut self.input));
        std::mem::forget(std::mem::replace(&mut self.wire, Wire::new()));
        std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
        self.free.clear();
    }
}

impl RingOwner for Conn<'_> {
    fn worker_ring(&mut self) -> &mut WorkerRing {
        &mut self.ring
    }

    fn reap_completions(&mut self) {
        // Handlers may push (and so reap) again: a fresh list then.
        let mut done = std::mem::take(&mut self.reaped);
        done.extend(self.ring.completions().map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &done {
            match ud {
                RECV => self.received(res),
                SEND => self.sent(res),
                WAKE => self.woken(res),
                _ => self.data_done((ud >> 32) as usize, (ud & 0xffff_ffff) as usize, res),
            }
        }
        done.clear();
        self.reaped = done;
    }
}

impl Drop for Conn<'_> {
    /// Left with operations in flight (a panic): the socket is shut down
    /// (which ends its receive and send) and the waker's read ended, then
    /// the ring is drained without handling what completes (writes roll
    /// back, no reply is sent), so that the client is let go; a ring that
    /// cannot be waited on leaks what its operations use. (A panic that
    /// poisoned the engine's metadata lock aborts the process instead,
    /// when a rollback takes that lock: the engine's policy.)
    fn drop(&mut self) {
        if self.ring.inflight() == 0 {
            return;
        }
        self.s.shutdown();
        let _ = self.wake_fd.0.write(1);
        while self.ring.inflight() > 0 {
            if self.ring.wait().is_err() {
                return self.leak();
            }
            for _ in self.ring.completions() {}
        }
    }
}
