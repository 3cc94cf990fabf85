//! One virtqueue's request engine: requests are decoded from the ring,
//! mapped through the image (allocating qcow2 clusters where needed), and
//! their data moves between guest memory and the file holding guest data
//! (the image file, or its external data file) through this queue's own
//! io_uring. With extended L2 entries a mapping ends where the kind of
//! subcluster changes: only data subclusters are read from the file, zero
//! and unallocated ones go through the bounce buffer. The ring's completion eventfd is polled by the
//! same epoll loop as the queue's kick, so the thread never blocks on
//! guest data I/O.
//!
//! # Ordering and progress
//! - A serving thread never blocks on another queue's allocation: its
//!   blocker may be a request in another queue's ring, and at shutdown
//!   that queue's thread may already be gone, leaving its ring unreaped
//!   until every thread has stopped.
//! - A qcow2 write extent is begun with `try_begin_write`: when another
//!   request is allocating the same cluster, the request is parked and the
//!   engine registers this queue's waker on that cluster. The waker writes
//!   the completion eventfd, so the epoll loop runs `handle_completions`,
//!   which retries the parked requests, once the allocation has ended
//!   (the protocol and why nothing is lost: `qcow2::sync`). A parked
//!   request holds no allocation.
//! - DISCARD and WRITE_ZEROES run synchronously in the engine's
//!   non-blocking mode (`qcow2::sync::without_blocking`): where the engine
//!   would wait for an allocation it registers the waker and refuses, and
//!   the request is parked and run again whole when woken (zeroing is
//!   idempotent). FLUSH waits for this queue's own ring only.
//! - `drain_all` (stop_vring, on the connection thread) waits for other
//!   queues' allocations with a timeout, and drops requests still parked
//!   after a while unanswered (never returned into the stopped ring).
//! - When the worker threads are gone (disconnect), `drain_stopped`
//!   drains every queue's ring before retrying parked requests, without
//!   blocking: a parked request's blocker may sit in another queue's ring.
//! - A request's status is written and its descriptor returned only after
//!   all of its data I/O and metadata commits completed.
//! - Guest memory stays mapped while any I/O into it is in flight: each
//!   request holds a reference to the memory map it was decoded against,
//!   and dropping a worker drains its ring first.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use log::{debug, error, warn};
use qcow2::qcow::{IoTicket, Mapping, WriteIo};
use qcow2::{AllocWaker, Image};
use rimg_vhost_server::CappedWarnings;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::DeviceConfig;
use crate::request::{Invalid, Kind, Request, ZeroSeg};

pub use rimg_vhost_server::{Mem, Vring, GM};

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Most iovecs one readv/writev takes (IOV_MAX).
const IOV_MAX: usize = 1024;
/// Bounce buffer for data that does not come straight from the file
/// (backing images, compressed clusters, iovec overflow, guest buffers
/// not aligned for O_DIRECT).
const BOUNCE_LEN: usize = 1 << 20;
/// Alignment of buffers, file offsets and lengths for O_DIRECT (the
/// daemon checks at start that the file system accepts it).
pub const DIRECT_ALIGN: usize = 512;

/// The io_uring operations a queue's ring accepts: guest data moves with
/// vectored reads and writes, nothing else (flushes, discards and zeroing
/// are synchronous calls).
pub const RING_OPS: [u8; 2] = [opcode::Readv::CODE, opcode::Writev::CODE];

/// A queue's io_uring: `entries` entries, restricted to [`RING_OPS`],
/// completions signalled on `efd`.
pub fn ring(entries: u32, efd: &EventFd) -> std::io::Result<IoUring> {
    rimg_vhost_server::restricted_ring(entries, &RING_OPS, efd.as_raw_fd(), &[])
}

/// The next request chain of `q`, or why the ring cannot be read: an
/// available index more than the queue size ahead of the device, or
/// unreadable. (Unlike `pop_descriptor_chain`, which logs such errors
/// itself, on every call.)
fn next_chain(
    q: &mut virtio_queue::Queue,
    mem: &Arc<Mem>,
) -> Result<Option<DescriptorChain<Arc<Mem>>>, virtio_queue::Error> {
    Ok(q.iter(mem.clone())?.next())
}

/// Host iovecs pointing into guest memory.
#[derive(Default)]
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers refer to guest memory mappings that the owning
// slot keeps alive (an Arc of the memory map); they are only handed to the
// kernel, never dereferenced by this process, so moving them between
// threads is as safe as moving the Arc.
unsafe impl Send for IoVecs {}

/// One data I/O in the ring.
struct Op {
    iov: IoVecs,
    /// Position of the op's data in the request's data stream.
    at: u64,
    host: u64,
    write: bool,
    expect: usize,
    /// The qcow2 write this op carries the data of.
    wio: Option<WriteIo>,
    /// Issued on the O_DIRECT fd (retried buffered on EINVAL).
    direct: bool,
}

/// A request slot: the decoded request and its progress.
#[derive(Default)]
struct Slot {
    req: Request,
    mem: Option<Arc<Mem>>,
    busy: bool,
    /// Data bytes already mapped and issued.
    done: u64,
    pending: u32,
    failed: bool,
    parked: bool,
    ops: Vec<Option<Op>>,
    /// Held while the request's qcow2 mappings are in use.
    ticket: Option<IoTicket>,
}

/// Wakes a queue's epoll loop when an allocation its parked requests wait
/// for has ended: a write to its completion eventfd.
struct EventFdWaker(EventFd);

impl AllocWaker for EventFdWaker {
    fn wake(&self) {
        // Fails only if the counter would overflow: it is readable then.
        let _ = self.0.write(1);
    }
}

/// Where data I/O goes: the file holding guest data (the image file, or
/// a qcow2 image's external data file), opened a second time with
/// O_DIRECT when the daemon runs with `--direct`.
pub struct DataFiles {
    pub buffered: RawFd,
    pub direct: Option<std::fs::File>,
}

pub struct Worker {
    img: Arc<dyn Image>,
    files: Arc<DataFiles>,
    cfg: Arc<DeviceConfig>,
    writeback: Arc<AtomicBool>,
    mem: GM,
    /// Dropped only when nothing is in flight in it (see `Drop`).
    ring: std::mem::ManuallyDrop<IoUring>,
    efd: EventFd,
    /// Registered by the engine for parked requests; writes `efd`.
    waker: Arc<dyn AllocWaker>,
    /// The ring could not be waited on: what is in flight stays in flight,
    /// so nothing it touches may be freed (see `Drop`).
    wedged: bool,
    queue: usize,
    slots: Vec<Slot>,
    free: Vec<usize>,
    parked: VecDeque<usize>,
    inflight_ops: usize,
    /// BOUNCE_LEN bytes from `bounce_at` on, aligned for O_DIRECT (the
    /// vector is never resized, so the address stays).
    bounce: Vec<u8>,
    bounce_at: usize,
    vring: Option<Vring>,
    /// Used entries were added since the last notification check.
    need_signal: bool,
    event_idx: bool,
    /// The ring could not be read at the last kick (avail index far
    /// ahead): said once, until the driver repairs it.
    stalled: bool,
    /// Warnings the guest can cause, capped.
    warnings: CappedWarnings,
}

impl Worker {
    pub fn new(
        queue: usize,
        img: Arc<dyn Image>,
        files: Arc<DataFiles>,
        cfg: Arc<DeviceConfig>,
        writeback: Arc<AtomicBool>,
        mem: GM,
    ) -> std::io::Result<Worker> {
        let qs = usize::from(cfg.queue_size);
        let efd = EventFd::new(EFD_NONBLOCK)?;
        let ring = ring((qs * 2).next_power_of_two() as u32, &efd)?;
        let waker: Arc<dyn AllocWaker> = Arc::new(EventFdWaker(efd.try_clone()?));
        let bounce = vec![0u8; BOUNCE_LEN + 4096];
        Ok(Worker {
            img,
            files,
            cfg,
            writeback,
            mem,
            ring: std::mem::ManuallyDrop::new(ring),
            efd,
            waker,
            wedged: false,
            queue,
            slots: (0..qs).map(|_| Slot::default()).collect(),
            free: (0..qs).rev().collect(),
            parked: VecDeque::new(),
            inflight_ops: 0,
            bounce_at: bounce.as_ptr().align_offset(4096),
            bounce,
            vring: None,
            need_signal: false,
            event_idx: false,
            stalled: false,
            warnings: CappedWarnings::new(module_path!(), format!("queue {queue}")),
        })
    }

    /// The fd that becomes readable when the ring has completions.
    pub fn completion_fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// Handles a kick: takes every available request from the queue.
    pub fn handle_kick(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        let mut mem = self.mem.memory().into_inner();
        let (capacity, readonly) = (self.cfg.capacity, self.cfg.readonly);
        loop {
            if self.event_idx {
                if let Err(e) = vring.get_mut().get_queue_mut().disable_notification(&*mem) {
                    self.warnings
                        .warn(format_args!("disable_notification: {e}"));
                }
            }
            let mut unreadable = None;
            while let Some(idx) = self.free.last().copied() {
                let chain = match next_chain(vring.get_mut().get_queue_mut(), &mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => {
                        self.stalled = false;
                        break;
                    }
                    Err(e) => {
                        unreadable = Some(e);
                        break;
                    }
                };
                self.stalled = false;
                self.free.pop();
                let slot = &mut self.slots[idx];
                slot.busy = true;
                let mut r = slot.req.parse(chain, &*mem, capacity, readonly);
                if r.is_err() {
                    // The frontend may have added memory (ADD_MEM_REG,
                    // SET_MEM_TABLE) and then published this request after
                    // `mem` was loaded: before refusing the request, take
                    // it again against the current map.
                    let fresh = self.mem.memory().into_inner();
                    if !Arc::ptr_eq(&fresh, &mem) {
                        mem = fresh;
                        let mut g = vring.get_mut();
                        let q = g.get_queue_mut();
                        let next = q.next_avail();
                        q.set_next_avail(next.wrapping_sub(1));
                        match next_chain(q, &mem) {
                            Ok(Some(chain)) => {
                                debug!("request taken again with the current memory map");
                                r = slot.req.parse(chain, &*mem, capacity, readonly);
                            }
                            // The ring cannot be read now: the first
                            // answer stands, the entry stays consumed.
                            _ => q.set_next_avail(next),
                        }
                    }
                }
                slot.mem = Some(mem.clone());
                self.start(idx, r);
            }
            if let Some(e) = unreadable {
                self.ring_unreadable(vring, &mem, e);
                break;
            }
            if !self.event_idx || self.free.is_empty() {
                break;
            }
            match vring.get_mut().get_queue_mut().enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.warnings.warn(format_args!("enable_notification: {e}"));
                    break;
                }
            }
        }
        self.submit();
        self.signal();
    }

    /// The driver's available ring cannot be read: its index is more than
    /// the queue size ahead of the device (virtio-queue refuses to walk
    /// it), or it lies outside guest memory. Nothing is taken from the
    /// queue until the driver repairs it; kicks meanwhile are ignored
    /// quietly (one warning per episode, within the worker's budget).
    /// With EVENT_IDX, notifications stay on so the repair is kicked.
    fn ring_unreadable(&mut self, vring: &Vring, mem: &Mem, e: virtio_queue::Error) {
        if !self.stalled {
            self.stalled = true;
            let g = vring.get_ref();
            let q = g.get_queue();
            let avail = q.avail_idx(mem, Ordering::Acquire).map(|a| a.0);
            match (e, avail) {
                (virtio_queue::Error::InvalidAvailRingIndex, Ok(avail)) => {
                    let ahead = avail.wrapping_sub(q.next_avail());
                    let size = q.size();
                    drop(g);
                    self.warnings.warn(format_args!(
                        "avail index {avail} is {ahead} entries ahead of the device \
                         (queue size {size}): ignoring the queue until the driver repairs it"
                    ));
                }
                (e, _) => {
                    drop(g);
                    self.warnings.warn(format_args!(
                        "available ring unreadable ({e}): ignoring the queue until the \
                         driver repairs it"
                    ));
                }
            }
        }
        if self.event_idx {
            let _ = vring.get_mut().get_queue_mut().enable_notification(mem);
        }
    }

    /// Handles the ring's completion eventfd.
    pub fn handle_completions(&mut self) {
        let _ = self.efd.read();
        self.reap();
        self.run_parked();
        self.submit();
        self.signal();
        // A kick that found no free slot left requests in the ring.
        if let Some(v) = self.vring.clone() {
            if !self.free.is_empty() {
                self.handle_kick(&v);
            }
        }
    }

    /// stop_vring: completes everything in flight and parked, then
    /// forgets the ring, so that a late completion event (a waker fired by
    /// an allocation this drain waited for) does not touch the stopped
    /// queue. The next kick hands the ring back.
    pub fn stop(&mut self) {
        self.drain_all();
        self.vring = None;
    }

    /// Completes everything in flight and parked while the other queues'
    /// threads still serve them. A request parked on another queue's
    /// allocation is retried whenever an allocation ends (the engine's
    /// condition variable, with a timeout: that queue's thread may stop
    /// at any moment, a daemon shutting down); one still parked after
    /// `STOP_PATIENCE` is dropped unanswered, never returned into the
    /// stopped ring.
    fn drain_all(&mut self) {
        const STOP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);
        let deadline = std::time::Instant::now() + STOP_PATIENCE;
        while self.drain() && !self.parked.is_empty() {
            self.run_parked();
            self.submit();
            if self.inflight_ops == 0 && !self.parked.is_empty() {
                if std::time::Instant::now() >= deadline {
                    warn!(
                        "queue {}: stopping with {} requests still waiting for other \
                         queues' allocations: dropped unanswered",
                        self.queue,
                        self.parked.len()
                    );
                    self.drop_parked();
                    break;
                }
                if let Some(q) = self.img.as_qcow2() {
                    q.wait_for_allocations(std::time::Duration::from_millis(50));
                }
            }
        }
        self.signal();
    }

    /// Frees the slots of parked requests without answering them (a queue
    /// that stops while they still wait). They hold no allocation and no
    /// I/O in flight; their I/O tickets go back.
    fn drop_parked(&mut self) {
        while let Some(idx) = self.parked.pop_front() {
            let slot = &mut self.slots[idx];
            slot.parked = false;
            slot.busy = false;
            slot.mem = None;
            slot.ops.clear();
            if let (Some(t), Some(q)) = (slot.ticket.take(), self.img.as_qcow2()) {
                q.io_end(t);
            }
            self.free.push(idx);
        }
    }

    /// One round of draining a queue whose thread is gone (disconnect):
    /// waits for its ring, then retries its parked requests without
    /// blocking. Returns whether anything is left (in flight or parked).
    /// Callers run rounds over every queue until none has anything left
    /// (see [`BlkBackend::drain`](crate::backend::BlkBackend::drain)); a
    /// wedged ring ends that early: its requests are left as they are.
    pub fn drain_stopped(&mut self) -> bool {
        if !self.drain() {
            return false;
        }
        self.run_parked();
        self.submit();
        self.signal();
        self.inflight_ops > 0 || !self.parked.is_empty()
    }

    pub fn is_wedged(&self) -> bool {
        self.wedged
    }

    /// What this queue holds, for the daemon's state dump (SIGUSR1).
    pub fn state(&self) -> String {
        use std::fmt::Write;
        let busy = self.slots.iter().filter(|s| s.busy).count();
        let mut out = format!(
            "queue {}: {busy} requests taken, {} data I/Os in the ring, {} parked{}{}",
            self.queue,
            self.inflight_ops,
            self.parked.len(),
            if self.stalled {
                ", ring unreadable"
            } else {
                ""
            },
            if self.wedged { ", ring wedged" } else { "" },
        );
        for &idx in &self.parked {
            let s = &self.slots[idx];
            let _ = write!(
                out,
                "\n  parked: head {} {:?} offset {} len {} at byte {} ({} I/Os pending)",
                s.req.head, s.req.kind, s.req.offset, s.req.len, s.done, s.pending
            );
        }
        out
    }

    fn start(&mut self, idx: usize, parsed: Result<(), Invalid>) {
        if let Err(inv) = parsed {
            match inv {
                Invalid::NoStatus => {
                    self.warnings.warn(format_args!(
                        "request without a status descriptor: returned unanswered"
                    ));
                    self.finish(idx, None, 0);
                }
                Invalid::Status(st, why) => {
                    self.warnings.warn(format_args!("invalid request: {why}"));
                    self.finish(idx, Some(st), 0);
                }
            }
            return;
        }
        let slot = &mut self.slots[idx];
        slot.done = 0;
        slot.pending = 0;
        slot.failed = false;
        slot.parked = false;
        slot.ops.clear();
        match slot.req.kind.expect("parsed") {
            Kind::In | Kind::Out => {
                slot.ticket = self.img.as_qcow2().map(|q| q.io_begin());
                self.plan(idx)
            }
            Kind::Flush => {
                if !self.drain() {
                    self.finish(idx, Some(S_IOERR), 0);
                    return;
                }
                let st = match self.img.flush() {
                    Ok(()) => S_OK,
                    Err(e) => {
                        error!("flush: {e}");
                        S_IOERR
                    }
                };
                self.finish(idx, Some(st), 0);
            }
            Kind::GetId => {
                let slot = &self.slots[idx];
                let mut id = [0u8; 20];
                let n = self.cfg.serial.len().min(20);
                id[..n].copy_from_slice(&self.cfg.serial[..n]);
                let n = (slot.req.len as usize).min(20);
                let mem = slot.mem.clone().expect("mem");
                let ok = slot.req.write_data(&*mem, 0, &id[..n]);
                self.finish(idx, Some(if ok { S_OK } else { S_IOERR }), n as u32);
            }
            Kind::Discard | Kind::WriteZeroes => {
                if !self.drain() {
                    self.finish(idx, Some(S_IOERR), 0);
                    return;
                }
                self.run_zero(idx);
            }
        }
    }

    /// Runs a discard or write-zeroes request. The engine does not wait
    /// for another request's allocation: the request is parked, the waker
    /// registered, and the whole request runs again when woken (zeroing is
    /// idempotent).
    fn run_zero(&mut self, idx: usize) {
        let w = self.waker.clone();
        let st = qcow2::sync::without_blocking(&w, || self.zero_segments(idx));
        match st {
            Some(st) => self.finish(idx, Some(st), 0),
            None => {
                self.slots[idx].parked = true;
                self.parked.push_back(idx);
            }
        }
    }

    /// Retries a parked request: a read or write maps the rest of its
    /// data, a discard or write-zeroes runs again.
    fn retry(&mut self, idx: usize) {
        self.slots[idx].parked = false;
        match self.slots[idx].req.kind {
            Some(Kind::Discard) | Some(Kind::WriteZeroes) => self.run_zero(idx),
            _ => self.plan(idx),
        }
    }

    /// The status of a discard or write-zeroes request, or None when it
    /// must wait for an allocation (non-blocking mode).
    fn zero_segments(&mut self, idx: usize) -> Option<u8> {
        let slot = &self.slots[idx];
        let mem = slot.mem.clone().expect("mem");
        let write_zeroes = slot.req.kind == Some(Kind::WriteZeroes);
        let nsegs = slot.req.len / 16;
        for i in 0..nsegs {
            let mut b = [0u8; 16];
            if !slot.req.read_data(&*mem, i * 16, &mut b) {
                return Some(S_IOERR);
            }
            let Some(seg) = ZeroSeg::decode(&b) else {
                self.warnings.warn(format_args!(
                    "discard/write-zeroes segment with reserved flags"
                ));
                return Some(virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8);
            };
            if !write_zeroes && seg.unmap {
                return Some(virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8);
            }
            let Some((off, len)) = seg.byte_range(self.cfg.capacity) else {
                self.warnings.warn(format_args!(
                    "discard/write-zeroes past the end of the disk"
                ));
                return Some(S_IOERR);
            };
            let r = if write_zeroes {
                self.img.write_zeroes(off, len, seg.unmap)
            } else {
                self.img.discard(off, len)
            };
            match r {
                Ok(()) => {}
                Err(qcow2::Error::WouldBlock) => return None,
                Err(e) => {
                    error!("discard/write-zeroes at {off} len {len}: {e}");
                    return Some(S_IOERR);
                }
            }
        }
        if write_zeroes && !self.writeback.load(Ordering::Relaxed) && self.img.flush().is_err() {
            return Some(S_IOERR);
        }
        Some(S_OK)
    }

    /// Maps and issues the rest of a read or write request's data; parks
    /// it at a write extent whose cluster another request is allocating.
    fn plan(&mut self, idx: usize) {
        let write = self.slots[idx].req.kind == Some(Kind::Out);
        while !self.slots[idx].failed && self.slots[idx].done < self.slots[idx].req.len {
            let slot = &self.slots[idx];
            let done = slot.done;
            let off = slot.req.offset + done;
            let rem = slot.req.len - done;
            let step = if write {
                self.plan_write_extent(idx, off, rem)
            } else {
                self.plan_read_extent(idx, off, rem)
            };
            match step {
                Ok(Some(n)) => self.slots[idx].done += n,
                Ok(None) => {
                    let slot = &mut self.slots[idx];
                    if !slot.parked {
                        slot.parked = true;
                        self.parked.push_back(idx);
                    }
                    return;
                }
                Err(e) => {
                    error!(
                        "{} at offset {off}: {e}",
                        if write { "write" } else { "read" }
                    );
                    self.slots[idx].failed = true;
                }
            }
        }
        self.maybe_complete(idx);
    }

    /// Issues one read extent; returns the bytes it covers.
    fn plan_read_extent(&mut self, idx: usize, off: u64, rem: u64) -> qcow2::Result<Option<u64>> {
        let done = self.slots[idx].done;
        let Some(q) = self.img.as_qcow2() else {
            // Raw: the guest offset is the file offset.
            self.issue(idx, done, rem, off, false, None);
            return Ok(Some(rem));
        };
        let (m, n) = q.map_read(off, rem)?;
        match m {
            Mapping::Data(host) => self.issue(idx, done, n, host, false, None),
            other => {
                // Zeros, the backing image, compressed data: synchronous,
                // through the bounce buffer.
                let mem = self.slots[idx].mem.clone().expect("mem");
                let mut k = 0u64;
                while k < n {
                    let c = (n - k).min(BOUNCE_LEN as u64) as usize;
                    let buf = &mut self.bounce[self.bounce_at..][..c];
                    q.read_mapped(other, buf, off + k)?;
                    if !self.slots[idx].req.write_data(&*mem, done + k, buf) {
                        return Err(qcow2::Error::io(
                            "guest buffer",
                            std::io::Error::other("not writable"),
                        ));
                    }
                    k += c as u64;
                }
            }
        }
        Ok(Some(n))
    }

    /// Issues one write extent; `None` when the request must wait.
    fn plan_write_extent(&mut self, idx: usize, off: u64, rem: u64) -> qcow2::Result<Option<u64>> {
        let done = self.slots[idx].done;
        let Some(q) = self.img.as_qcow2() else {
            self.issue(idx, done, rem, off, true, None);
            return Ok(Some(rem));
        };
        let len = rem.min(usize::MAX as u64 >> 1) as usize;
        let Some(wio) = q.try_begin_write(off, len, &self.waker)? else {
            return Ok(None);
        };
        let (n, host) = (wio.len as u64, wio.host);
        self.issue(idx, done, n, host, true, Some(wio));
        Ok(Some(n))
    }

    /// Queues the transfer of request data bytes [at, at + n) to or from
    /// file offset `host`.
    fn issue(&mut self, idx: usize, at: u64, n: u64, host: u64, write: bool, wio: Option<WriteIo>) {
        let mut iov = IoVecs::default();
        let slot = &mut self.slots[idx];
        let mem = slot.mem.clone().expect("mem");
        let ok = build_iovecs(&mem, &slot.req.segs, at, n, &mut iov.0);
        let direct = self.files.direct.is_some();
        if !ok || iov.0.len() > IOV_MAX || (direct && !direct_aligned(&iov.0, host, n)) {
            // Rare: memory that does not map, too fragmented for one
            // vectored call, or (with O_DIRECT) guest buffers not aligned
            // for it. Do it synchronously through the bounce buffer.
            let r = self.bounce_io(idx, at, n, host, write);
            if let Some(w) = wio {
                if let Some(q) = self.img.as_qcow2() {
                    if let Err(e) = q.end_write(w, r.is_ok()) {
                        error!("write commit: {e}");
                        self.slots[idx].failed = true;
                    }
                }
            }
            if let Err(e) = r {
                error!("bounce I/O at {host}: {e}");
                self.slots[idx].failed = true;
            }
            return;
        }
        let op = Op {
            iov,
            at,
            host,
            write,
            expect: n as usize,
            wio,
            direct,
        };
        let slot = &mut self.slots[idx];
        let opi = slot.ops.len();
        slot.ops.push(Some(op));
        slot.pending += 1;
        self.push_op(idx, opi);
    }

    fn push_op(&mut self, idx: usize, opi: usize) {
        let op = self.slots[idx].ops[opi].as_ref().expect("op");
        let fd = match (&self.files.direct, op.direct) {
            (Some(f), true) => f.as_raw_fd(),
            _ => self.files.buffered,
        };
        let entry = if op.write {
            opcode::Writev::new(types::Fd(fd), op.iov.0.as_ptr(), op.iov.0.len() as u32)
                .offset(op.host)
                .build()
        } else {
            opcode::Readv::new(types::Fd(fd), op.iov.0.as_ptr(), op.iov.0.len() as u32)
                .offset(op.host)
                .build()
        };
        let entry: squeue::Entry = entry.user_data(((idx as u64) << 32) | opi as u64);
        self.inflight_ops += 1;
        loop {
            // SAFETY: the iovec array and the guest memory it points into
            // stay alive until the completion is reaped: the array is owned
            // by the op in its slot (not touched until then), and the slot
            // holds an Arc of the memory map; a worker drains its ring
            // before it is dropped.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // Submission queue full: hand what is queued to the kernel.
            // With the completion queue overflowing the kernel refuses
            // (EBUSY) until completions are reaped: reap them (this
            // request has `pending` > 0, so it is not completed under us).
            if let Err(e) = self.ring.submit() {
                match e.raw_os_error() {
                    Some(libc::EBUSY) | Some(libc::EAGAIN) => self.reap(),
                    Some(libc::EINTR) => {}
                    _ => error!("io_uring submit: {e}"),
                }
            }
        }
    }

    /// Moves request data bytes [at, at + n) to or from file offset
    /// `host` synchronously, through the bounce buffer. With O_DIRECT the
    /// data goes through the direct file whenever offset and length allow
    /// (the bounce buffer is aligned): the same file's pages must not be
    /// written both through the page cache and around it, or the kernel
    /// fails to invalidate them (EIO at the next fsync, stale cached data).
    fn bounce_io(
        &mut self,
        idx: usize,
        at: u64,
        n: u64,
        host: u64,
        write: bool,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let slot = &self.slots[idx];
        let mem = slot.mem.clone().expect("mem");
        let mut k = 0u64;
        while k < n {
            let c = (n - k).min(BOUNCE_LEN as u64) as usize;
            let pos = host + k;
            let file = match &self.files.direct {
                Some(f) if (pos | c as u64).is_multiple_of(DIRECT_ALIGN as u64) => f,
                _ => crate::server::data_storage(self.img.as_ref()).file(),
            };
            let buf = &mut self.bounce[self.bounce_at..][..c];
            if write {
                if !slot.req.read_data(&*mem, at + k, buf) {
                    return Err(std::io::Error::other("guest buffer not readable"));
                }
                file.write_all_at(buf, pos)?;
            } else {
                read_full_at(file, buf, pos)?;
                if !slot.req.write_data(&*mem, at + k, buf) {
                    return Err(std::io::Error::other("guest buffer not writable"));
                }
            }
            k += c as u64;
        }
        Ok(())
    }

    fn submit(&mut self) {
        if let Err(e) = self.ring.submit() {
            error!("io_uring submit: {e}");
        }
    }

    /// Processes every available completion.
    fn reap(&mut self) {
        loop {
            let cqe = self.ring.completion().next();
            let Some(cqe) = cqe else { break };
            self.inflight_ops -= 1;
            let ud = cqe.user_data();
            let (idx, opi) = ((ud >> 32) as usize, (ud & 0xffff_ffff) as usize);
            let res = cqe.result();
            let op = self.slots[idx].ops[opi].take().expect("op in flight");
            let mut ok = res >= 0 && res as usize == op.expect;
            if res == -libc::EINVAL && op.direct {
                // O_DIRECT refused what `direct_aligned` let through (a
                // stricter device): again through the aligned bounce
                // buffer, never through the page cache.
                ok = self
                    .bounce_io(idx, op.at, op.expect as u64, op.host, op.write)
                    .is_ok();
            }
            if !ok && !op.write && res >= 0 {
                // A read that stopped at the end of the file (clusters
                // allocated but never written past it): the rest reads as
                // zeros, as the engine's own reads do.
                let r = res as u64;
                let rest = op.expect as u64 - r;
                ok = self
                    .bounce_io(idx, op.at + r, rest, op.host + r, false)
                    .is_ok();
            }
            let slot = &mut self.slots[idx];
            if !ok {
                error!(
                    "{} at file offset {}: {}",
                    if op.write { "write" } else { "read" },
                    op.host,
                    if res < 0 {
                        std::io::Error::from_raw_os_error(-res).to_string()
                    } else {
                        format!("short transfer {res} of {}", op.expect)
                    }
                );
                slot.failed = true;
            }
            if let Some(w) = op.wio {
                if let Some(q) = self.img.as_qcow2() {
                    if let Err(e) = q.end_write(w, ok) {
                        error!("write commit: {e}");
                        slot.failed = true;
                    }
                }
            }
            slot.pending -= 1;
            self.maybe_complete(idx);
        }
    }

    /// Retries parked writes (their blocker may be gone; one that is
    /// refused again is parked again, with the waker registered anew).
    fn run_parked(&mut self) {
        for _ in 0..self.parked.len() {
            let Some(idx) = self.parked.pop_front() else {
                break;
            };
            self.retry(idx);
        }
    }

    /// Waits until this queue has no I/O in flight. False when the ring
    /// cannot be waited on: the worker is then wedged for good, and what
    /// is in flight is never freed (see `Drop`).
    fn drain(&mut self) -> bool {
        while self.inflight_ops > 0 && !self.wedged {
            if let Err(e) = self.ring.submit_and_wait(1) {
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {}
                    _ => {
                        error!("io_uring wait: {e}: queue {} stops here", self.queue);
                        self.wedged = true;
                    }
                }
            }
            self.reap();
        }
        !self.wedged
    }

    fn maybe_complete(&mut self, idx: usize) {
        let slot = &self.slots[idx];
        if !slot.busy || slot.pending > 0 || slot.parked {
            return;
        }
        if !slot.failed && slot.done < slot.req.len {
            return;
        }
        let mut st = if slot.failed { S_IOERR } else { S_OK };
        let kind = slot.req.kind;
        let used = if kind == Some(Kind::In) {
            slot.req.len as u32
        } else {
            0
        };
        if st == S_OK && kind == Some(Kind::Out) && !self.writeback.load(Ordering::Relaxed) {
            // Write-through cache mode: durable before completion.
            if let Err(e) = self.img.flush() {
                error!("flush after write-through write: {e}");
                st = S_IOERR;
            }
        }
        self.finish(idx, Some(st), used);
    }

    /// Writes the status, returns the descriptor chain and frees the slot.
    fn finish(&mut self, idx: usize, status: Option<u8>, data_len: u32) {
        let slot = &mut self.slots[idx];
        let mem = slot.mem.take().expect("mem");
        let mut used = 0;
        if let Some(st) = status {
            if mem.write_obj(st, slot.req.status).is_ok() {
                used = data_len + 1;
            } else {
                self.warnings
                    .warn(format_args!("status byte outside guest memory"));
            }
        }
        slot.busy = false;
        slot.ops.clear();
        if let (Some(t), Some(q)) = (slot.ticket.take(), self.img.as_qcow2()) {
            q.io_end(t);
        }
        let head = slot.req.head;
        self.free.push(idx);
        if let Some(v) = &self.vring {
            let mut g = v.get_mut();
            if let Err(e) = g.get_queue_mut().add_used(&*mem, head, used) {
                drop(g);
                self.warnings.warn(format_args!("add_used: {e}"));
            }
            self.need_signal = true;
        }
    }

    fn signal(&mut self) {
        if !self.need_signal {
            return;
        }
        self.need_signal = false;
        let Some(v) = &self.vring else { return };
        let mem = self.mem.memory();
        let needed = v.get_mut().get_queue_mut().needs_notification(&*mem);
        if needed.unwrap_or(true) {
            if let Err(e) = v.signal_used_queue() {
                warn!("signal used queue: {e}");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // In-flight I/O targets guest memory and commits qcow2 metadata:
        // finish it before the ring and the memory go away. The backend
        // drained every queue already (`drain_stopped`); this is the last
        // guard, and never blocks on another queue.
        self.drain();
        if self.wedged && self.inflight_ops > 0 {
            // The kernel may still read or write the iovecs, the guest
            // memory they point into and the ring: leak them all rather
            // than free them under it. Their allocations are abandoned
            // (the new clusters leaked, so a late write lands nowhere that
            // matters) and the engine keeps their tickets, so nothing they
            // mapped is reused: a leak, never damage.
            error!(
                "queue {}: {} I/Os still in flight: leaking their memory",
                self.queue, self.inflight_ops
            );
            if let Some(q) = self.img.as_qcow2() {
                for op in self.slots.iter_mut().flat_map(|s| s.ops.iter_mut()) {
                    if let Some(w) = op.as_mut().and_then(|op| op.wio.take()) {
                        q.abandon_write(w);
                    }
                }
            }
            std::mem::forget(std::mem::take(&mut self.slots));
            return;
        }
        // SAFETY: nothing is in flight (drained), and `self.ring` is not
        // used again: this is the end of `drop`, and no field's own drop
        // touches it.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.ring) };
        // Requests still parked hold no allocation; their I/O tickets go
        // back, or the engine would keep every later free pending.
        if let Some(q) = self.img.as_qcow2() {
            for s in &mut self.slots {
                if let Some(t) = s.ticket.take() {
                    q.io_end(t);
                }
            }
        }
    }
}

/// Whether O_DIRECT takes these buffers at file offset `host` for `n`
/// bytes.
fn direct_aligned(iov: &[libc::iovec], host: u64, n: u64) -> bool {
    let a = DIRECT_ALIGN as u64;
    (host | n).is_multiple_of(a)
        && iov
            .iter()
            .all(|v| (v.iov_base as u64 | v.iov_len as u64).is_multiple_of(a))
}

/// Reads `buf.len()` bytes at `pos`; past the end of the file, zeros
/// (clusters allocated but never written at the file's end).
fn read_full_at(file: &std::fs::File, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut k = 0;
    while k < buf.len() {
        match file.read_at(&mut buf[k..], pos + k as u64) {
            Ok(0) => {
                buf[k..].fill(0);
                break;
            }
            Ok(r) => k += r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Builds host iovecs for request data bytes [at, at + n). False when part
/// of the range does not map to host memory.
fn build_iovecs(
    mem: &Mem,
    segs: &[(vm_memory::GuestAddress, u32)],
    at: u64,
    n: u64,
    out: &mut Vec<libc::iovec>,
) -> bool {
    let mut pos = 0u64;
    let end = at + n;
    for &(addr, len) in segs {
        let (a, b) = (pos, pos + u64::from(len));
        pos = b;
        let (s, e) = (a.max(at), b.min(end));
        if s >= e {
            continue;
        }
        for sl in GuestMemoryBackend::get_slices(mem, addr.unchecked_add(s - a), (e - s) as usize) {
            let Ok(sl) = sl else { return false };
            out.push(libc::iovec {
                iov_base: sl.ptr_guard_mut().as_ptr().cast(),
                iov_len: sl.len(),
            });
        }
        if b >= end {
            break;
        }
    }
    true
}
