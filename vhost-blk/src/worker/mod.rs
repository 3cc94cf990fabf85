//! One virtqueue's request engine: requests are decoded from the ring,
//! mapped through the image (allocating qcow2 clusters where needed), and
//! their data moves between guest memory and the file holding guest data
//! (the image file, or its external data file) through this queue's own
//! io_uring. Encrypted images are the exception: the engine reads and
//! writes their data itself, synchronously (`engine_io`). With extended
//! L2 entries a mapping ends where the kind of subcluster changes: only
//! data subclusters are read from the file, zero and unallocated ones go
//! through the bounce buffer. The ring's
//! completion eventfd is polled by the same epoll loop as the queue's
//! kick, so the thread never waits for guest data I/O on the ring;
//! buffered writes it makes itself (`inline`: the page cache takes them
//! without io-wq's round trip).
//!
//! # Ordering and progress
//! - A serving thread never blocks on another queue's allocation: its
//!   blocker may be a request in another queue's ring, and at shutdown
//!   that queue's thread may already be gone, leaving its ring unreaped
//!   until every thread has stopped.
//! - A write extent is begun with `try_begin_write`: when another
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
//!
//! # Where the code is
//! - `slot`: a request slot and its lifecycle, from the decoded chain to
//!   the status byte (`start`, `finish`), and DISCARD/WRITE_ZEROES.
//! - `kick`: taking requests from the virtqueue, completions, parked
//!   requests and notifying the driver.
//! - `plan`: mapping a read or write request's extents through the image.
//! - `engine_io`: reads and writes done by the engine (encrypted images).
//! - `uring`: the io_uring submit/reap path and the bounce buffer.
//! - `teardown`: draining at stop and disconnect, and dropping a worker.
//! - `resubmit`: inflight tracking at ring start: the requests a killed
//!   daemon took and never returned run again.
//!
//! # Inflight tracking
//! With an inflight region (INFLIGHT_SHMFD), a head is marked when it is
//! taken, before its request starts: `start` may finish it, and other
//! requests with it, and a completion published while a taken head is
//! unmarked would make a restarted daemon rewind the avail ring past it
//! or onto a head already returned. `finish` links the head as the last
//! batch before `add_used` and clears the mark after it; a request
//! dropped unanswered keeps its mark and runs again at the next start.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use io_uring::{opcode, IoUring};
use qcow2::{AllocWaker, Image};
use rimg_vhost_server::inflight::{Inflight, QueueLog, Region};
use rimg_vhost_server::{CappedWarnings, RingOwner, WorkerRing};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::DeviceConfig;
use crate::control::QueueStats;

pub use rimg_vhost_server::{Mem, Vring, GM};

mod engine_io;
mod kick;
mod plan;
mod poll;
mod resubmit;
mod slot;
mod teardown;
mod uring;

pub use poll::Polling;
use slot::Slot;

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
    rimg_vhost_server::restricted_ring(entries, &RING_OPS, Some(efd.as_raw_fd()), &[])
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

/// The file holding guest data (the image file, or a qcow2 image's
/// external data file) opened a second time with O_DIRECT, when the
/// daemon runs with `--direct`. Buffered data I/O goes to the engine's own
/// descriptor of that file ([`Image::data_storage`]), borrowed from the
/// image each worker holds.
pub struct DataFiles {
    pub direct: Option<std::fs::File>,
    /// Buffered reads are made by the worker (see
    /// [`rimg_vhost_server::inline::reads_here`]).
    pub reads_here: bool,
}

pub struct Worker {
    img: Arc<dyn Image>,
    /// The image's mapped bytes are the guest's ([`Image::data_in_clear`]):
    /// reads and writes go to the ring; otherwise through the engine.
    data_in_clear: bool,
    files: Arc<DataFiles>,
    cfg: Arc<DeviceConfig>,
    writeback: Arc<AtomicBool>,
    mem: GM,
    /// Counts the data I/Os in flight; never closed while any is (see
    /// `Drop`).
    ring: WorkerRing,
    efd: EventFd,
    /// Registered by the engine for parked requests; writes `efd`.
    waker: Arc<dyn AllocWaker>,
    queue: usize,
    slots: Vec<Slot>,
    free: Vec<usize>,
    parked: VecDeque<usize>,
    /// BOUNCE_LEN bytes, page-aligned (for O_DIRECT, and so that a
    /// write cut short by a kill ends on a sector: `qcow2::pagebuf`).
    bounce: qcow2::pagebuf::PageBuf,
    vring: Option<Vring>,
    /// Used entries were added since the last notification check.
    need_signal: bool,
    event_idx: bool,
    /// The ring could not be read at the last kick (avail index far
    /// ahead): said once, until the driver repairs it.
    stalled: bool,
    /// Warnings the guest can cause, capped.
    warnings: CappedWarnings,
    /// This queue's counters (`query-stats`), kept across connections.
    stats: Arc<QueueStats>,
    /// The connection's inflight region, if the frontend set one.
    inflight: Inflight,
    /// This queue's part of it, from the ring's start on.
    log: Option<QueueLog<Arc<Region>>>,
}

impl Worker {
    pub fn new(
        queue: usize,
        img: Arc<dyn Image>,
        files: Arc<DataFiles>,
        cfg: Arc<DeviceConfig>,
        writeback: Arc<AtomicBool>,
        mem: GM,
        stats: Arc<QueueStats>,
    ) -> std::io::Result<Worker> {
        let qs = usize::from(cfg.queue_size);
        let efd = EventFd::new(EFD_NONBLOCK)?;
        let ring = WorkerRing::new(ring((qs * 2).next_power_of_two() as u32, &efd)?);
        let waker: Arc<dyn AllocWaker> = Arc::new(EventFdWaker(efd.try_clone()?));
        Ok(Worker {
            data_in_clear: img.data_in_clear(),
            img,
            files,
            cfg,
            writeback,
            mem,
            ring,
            efd,
            waker,
            queue,
            slots: (0..qs).map(|_| Slot::default()).collect(),
            free: (0..qs).rev().collect(),
            parked: VecDeque::new(),
            bounce: qcow2::pagebuf::PageBuf::zeroed(BOUNCE_LEN),
            vring: None,
            need_signal: false,
            event_idx: false,
            stalled: false,
            warnings: CappedWarnings::new(module_path!(), format!("queue {queue}")),
            stats,
            inflight: Inflight::new(0),
            log: None,
        })
    }

    /// The connection's inflight region handle, which this queue uses
    /// once the frontend set a region (without one, nothing is tracked).
    pub fn with_inflight(mut self, inflight: Inflight) -> Worker {
        self.inflight = inflight;
        self
    }

    /// The fd that becomes readable when the ring has completions.
    pub fn completion_fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// The ring could not be waited on: what is in flight stays in
    /// flight, so nothing it touches may be freed (see `Drop`).
    pub fn is_wedged(&self) -> bool {
        self.ring.is_wedged()
    }

    /// What this queue holds, for the daemon's state dump (SIGUSR1).
    pub fn state(&self) -> String {
        use std::fmt::Write;
        let busy = self.slots.iter().filter(|s| s.busy).count();
        let mut out = format!(
            "queue {}: {busy} requests taken, {} data I/Os in the ring, {} parked{}{}",
            self.queue,
            self.ring.inflight(),
            self.parked.len(),
            if self.stalled {
                ", ring unreadable"
            } else {
                ""
            },
            if self.ring.is_wedged() {
                ", ring wedged"
            } else {
                ""
            },
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
}

impl RingOwner for Worker {
    fn worker_ring(&mut self) -> &mut WorkerRing {
        &mut self.ring
    }

    fn reap_completions(&mut self) {
        self.reap()
    }
}
