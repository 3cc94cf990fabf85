//! One queue pair's data path: RX (TAP -> guest) and TX (guest -> TAP)
//! through this pair's own io_uring, whose completion eventfd wakes the
//! same epoll loop as the two queues' kicks.
//!
//! # Buffers
//! Frames cross a fixed pool of slots, each large enough for the biggest
//! GSO frame plus its vnet header, allocated once per connection: the fast
//! path allocates nothing.
//! - TX: a burst of available chains (one read of the avail index) is
//!   walked, each chain's frame prefetched `TX_LOOKAHEAD` chains ahead
//!   of its write. A frame of `IN_PLACE_MIN` bytes or more in one
//!   descriptor is written straight from guest memory; others are copied
//!   into a free slot. One io_uring submission carries the burst's
//!   writes. A copied chain goes back to the guest at once; one written in
//!   place when its write completes, which for a TAP is inline, within the
//!   submission, so the whole burst goes back with one store of the used
//!   index. Every write, in place or not, takes a slot: with none free, TX
//!   waits for write completions.
//!
//! # Guest memory held by in-place writes
//! An in-place write reads guest memory after the chain was taken: the
//! memory map it points into is held (`tx_mem`) until the last such write
//! completes. While writes into an older map are in flight (the frontend
//! sent a new memory table), frames are copied instead.
//! - RX: reads are kept posted on the TAP in free slots. A completed read
//!   is copied into the guest's receive chains (several with MRG_RXBUF).
//!   When the guest has no buffers, frames wait in their slots and no
//!   read is re-posted, so the TAP is not read until the guest kicks.
//!
//! # Teardown
//! Posted reads write into the slots: before the worker (and its slots)
//! goes away, they are cancelled and every in-flight operation is reaped.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use log::{error, info, warn};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::Negotiated;
use crate::tap::{Tap, TAP_HDR_LEN};
use rimg_vhost_server::{CappedWarnings, Mem, Vring, GM};

mod ring;
mod rx;
mod tx;

use ring::{add_used_burst, collect, read_guest, used_notification_needed, Seg};
use rx::RxChain;
use tx::{TxWalked, TX_LOOKAHEAD};

/// Largest frame (GSO super-frame) plus vnet header either way.
const SLOT_LEN: usize = TAP_HDR_LEN + 65550;
/// Distance between slot starts: the slot rounded up to whole cache lines,
/// plus 17 lines. With a stride near 64 KiB every slot would start in the
/// same cache sets, and a burst of frames through 64 slots would evict
/// itself from L1 and L2; 17 lines (odd) spread their starts over the sets.
const SLOT_STRIDE: usize = SLOT_LEN.next_multiple_of(64) + 17 * 64;
const RX_SLOTS: usize = 64;
const TX_SLOTS: usize = 64;
/// user_data bit marking a TX write (clear: an RX read).
const TX_BIT: u64 = 1 << 32;
const CANCEL: u64 = 1 << 33;
/// user_data bit marking a TX write straight from guest memory; the
/// chain's head is then in bits 40..56, returned when the write completes.
const IN_PLACE: u64 = 1 << 34;
const HEAD_SHIFT: u32 = 40;
/// The shortest frame worth writing to the TAP: an Ethernet header.
const ETH_HLEN: usize = 14;

/// The io_uring operations a pair's ring accepts: frames are read from
/// and written to the pair's TAP queue, and posted reads are cancelled at
/// teardown. Nothing else.
pub const RING_OPS: [u8; 3] = [
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::AsyncCancel::CODE,
];

/// Entries of a pair's io_uring: every slot's operation and its cancel.
const RING_ENTRIES: u32 = ((RX_SLOTS + TX_SLOTS) * 2).next_power_of_two() as u32;

/// A pair's io_uring: `entries` entries, restricted to [`RING_OPS`],
/// completions signalled on `efd`, with the pair's TAP queue `tap` as
/// fixed file [`TAP`] (no file-table lookup and reference count per
/// frame).
pub fn ring(entries: u32, efd: &EventFd, tap: RawFd) -> std::io::Result<IoUring> {
    rimg_vhost_server::restricted_ring(entries, &RING_OPS, efd.as_raw_fd(), &[tap])
}

/// The TAP queue, as the ring's fixed file.
pub const TAP: types::Fixed = types::Fixed(0);

/// Counters, for tests and logs.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub tx_frames: u64,
    /// TX frames the guest handed over unsegmented (GSO type set).
    pub tx_gso: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    /// RX frames the TAP handed over unsegmented.
    pub rx_gso: u64,
    pub rx_dropped: u64,
}

struct Pool {
    mem: Vec<u8>,
    free: Vec<usize>,
}

impl Pool {
    fn new(n: usize) -> Pool {
        Pool {
            mem: vec![0; n * SLOT_STRIDE],
            free: (0..n).rev().collect(),
        }
    }

    fn slot(&mut self, i: usize) -> &mut [u8] {
        &mut self.mem[i * SLOT_STRIDE..i * SLOT_STRIDE + SLOT_LEN]
    }
}

pub struct PairWorker {
    pair: usize,
    tap: Arc<Tap>,
    mem: GM,
    ring: IoUring,
    efd: EventFd,
    neg: Negotiated,
    event_idx: bool,
    rx: Pool,
    tx: Pool,
    /// Posted reads (slot indices are in neither free list nor `ready`).
    rx_posted: usize,
    tx_inflight: usize,
    /// Completed reads not yet delivered: (slot, length), in order.
    ready: VecDeque<(usize, usize)>,
    /// Chains collected for the frame being delivered (reused).
    chains: Vec<RxChain>,
    rx_vring: Option<Vring>,
    tx_vring: Option<Vring>,
    tx_blocked: bool,
    attached: bool,
    /// Warnings about malformed guest buffers and rings, capped.
    warnings: CappedWarnings,
    /// TX chains walked ahead of the one being written, and descriptor
    /// lists to walk into (reused).
    tx_ahead: VecDeque<TxWalked>,
    tx_spare: Vec<Vec<Seg>>,
    /// Heads of TX chains done with, to return as one burst (reused).
    tx_used: Vec<u16>,
    /// TX writes in flight straight from guest memory, and the memory
    /// they read, held mapped until the last completes.
    tx_in_place: usize,
    tx_mem: Option<Arc<Mem>>,
    /// Completions of one reap (reused: no allocation per burst).
    cq: Vec<(u64, i32)>,
    pub stats: Stats,
}

impl PairWorker {
    pub fn new(pair: usize, tap: Arc<Tap>, mem: GM) -> std::io::Result<PairWorker> {
        let efd = EventFd::new(EFD_NONBLOCK)?;
        let ring = ring(RING_ENTRIES, &efd, tap.queue_fd(pair))?;
        Ok(PairWorker {
            pair,
            tap,
            mem,
            ring,
            efd,
            neg: Negotiated {
                hdr_len: 12,
                mrg_rxbuf: false,
                tap_offloads: 0,
            },
            event_idx: false,
            rx: Pool::new(RX_SLOTS),
            tx: Pool::new(TX_SLOTS),
            rx_posted: 0,
            tx_inflight: 0,
            ready: VecDeque::with_capacity(RX_SLOTS),
            chains: (0..64).map(|_| RxChain::default()).collect(),
            rx_vring: None,
            tx_vring: None,
            tx_blocked: false,
            attached: true,
            warnings: CappedWarnings::new(module_path!(), format!("pair {pair}")),
            tx_ahead: VecDeque::with_capacity(TX_LOOKAHEAD),
            tx_spare: (0..=TX_LOOKAHEAD).map(|_| Vec::with_capacity(4)).collect(),
            tx_used: Vec::with_capacity(TX_SLOTS),
            tx_in_place: 0,
            tx_mem: None,
            cq: Vec::with_capacity(RING_ENTRIES as usize),
            stats: Stats::default(),
        })
    }

    pub fn completion_fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    pub fn set_negotiated(&mut self, n: Negotiated) {
        self.neg = n;
    }

    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    fn warn(&mut self, msg: std::fmt::Arguments<'_>) {
        self.warnings.warn(msg);
    }

    fn usable(v: &Option<Vring>) -> bool {
        v.as_ref().is_some_and(|v| {
            let s = v.get_ref();
            s.is_enabled() && s.get_queue().ready()
        })
    }

    /// A kick on the RX (`tx == false`) or TX queue, or the vring-enable
    /// event: remember the rings, then move whatever can move.
    pub fn handle_kick(&mut self, rx: &Vring, tx: &Vring) {
        if self.rx_vring.is_none() {
            self.rx_vring = Some(rx.clone());
            self.tx_vring = Some(tx.clone());
        }
        self.update_attachment();
        self.check_avail_idx(true);
        self.check_avail_idx(false);
        self.process_tx();
        self.deliver_rx();
        self.post_reads();
        self.submit();
    }

    /// Logs an avail index more than the queue size ahead of the device
    /// (see [`Self::avail_sane`]).
    fn check_avail_idx(&mut self, tx: bool) {
        let v = if tx { &self.tx_vring } else { &self.rx_vring };
        if !Self::usable(v) {
            return;
        }
        let Some(v) = v.clone() else {
            return;
        };
        if let Err((avail, ahead, size)) = Self::avail_sane(&v, &self.mem.memory()) {
            let which = if tx { "TX" } else { "RX" };
            self.warn(format_args!(
                "{which} avail index {avail} is {ahead} entries ahead of the device \
                 (queue size {size}): ignoring the queue until the driver repairs it"
            ));
        }
    }

    /// Whether the driver's avail index is at most the queue size ahead
    /// of the device; if not, (index, distance, size). virtio-queue yields
    /// nothing from such a ring (and logs an error for every attempt), so
    /// the queue is left alone until the driver publishes a sane index.
    fn avail_sane(v: &Vring, mem: &Mem) -> Result<(), (u16, u16, u16)> {
        let g = v.get_ref();
        let q = g.get_queue();
        let Ok(avail) = q.avail_idx(mem, Ordering::Acquire) else {
            return Ok(());
        };
        let ahead = avail.0.wrapping_sub(q.next_avail());
        if ahead > q.size() {
            return Err((avail.0, ahead, q.size()));
        }
        Ok(())
    }

    /// The io_uring completion eventfd fired.
    pub fn handle_completions(&mut self) {
        let _ = self.efd.read();
        self.reap();
        self.return_tx_used(false);
        self.update_attachment();
        if self.tx_blocked {
            self.process_tx();
        }
        self.deliver_rx();
        self.post_reads();
        self.submit();
    }

    /// A multi-queue TAP steers frames to every attached queue: detach
    /// ours while the guest has this pair disabled (VQ_PAIRS_SET), or
    /// those frames would wait here forever.
    fn update_attachment(&mut self) {
        let want = Self::usable(&self.rx_vring);
        if want != self.attached && self.rx_vring.is_some() {
            match self.tap.set_queue_attached(self.pair, want) {
                Ok(()) => {
                    self.attached = want;
                    if self.tap.num_queues() > 1 {
                        info!(
                            "pair {}: TAP queue {}",
                            self.pair,
                            if want { "attached" } else { "detached" }
                        );
                    }
                }
                Err(e) => error!("{e}"),
            }
            if !want {
                // Frames already read for a disabled queue are dropped.
                while let Some((slot, _)) = self.ready.pop_front() {
                    self.rx.free.push(slot);
                    self.stats.rx_dropped += 1;
                }
            }
        }
    }

    fn push(&mut self, sqe: io_uring::squeue::Entry) {
        // SAFETY: the entry points into a slot of this worker's pools or,
        // for an in-place TX write, into guest memory; both live until
        // the op completes. Slots are not reused before their completion
        // is reaped; the guest memory map an in-place write reads is held
        // in `tx_mem` until the last such completion is reaped; teardown
        // (`quiesce`, also run on drop) reaps everything.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.submit();
        }
    }

    fn submit(&mut self) {
        if let Err(e) = self.ring.submit() {
            error!("io_uring submit: {e}");
        }
    }

    fn reap(&mut self) {
        let mut cq = std::mem::take(&mut self.cq);
        cq.clear();
        for cqe in self.ring.completion() {
            cq.push((cqe.user_data(), cqe.result()));
        }
        for &(ud, res) in &cq {
            if ud & CANCEL != 0 {
                continue;
            }
            let slot = (ud & 0xffff_ffff) as usize;
            if ud & TX_BIT != 0 {
                self.tx_inflight -= 1;
                self.tx.free.push(slot);
                if ud & IN_PLACE != 0 {
                    self.tx_used.push((ud >> HEAD_SHIFT) as u16);
                    self.tx_in_place -= 1;
                    if self.tx_in_place == 0 {
                        self.tx_mem = None;
                    }
                }
                if res < 0 {
                    self.stats.tx_dropped += 1;
                }
                continue;
            }
            self.rx_posted -= 1;
            let n = res.max(0) as usize;
            if res < 0 || n <= TAP_HDR_LEN {
                // A cancelled read that io_uring had punted to a worker
                // thread may end with EINTR, or on older kernels with the
                // kernel-internal ERESTARTSYS (512): both mean cancelled.
                const ERESTARTSYS: i32 = 512;
                let cancelled = [libc::ECANCELED, libc::EAGAIN, libc::EINTR, ERESTARTSYS];
                if res < 0 && !cancelled.contains(&-res) {
                    self.warn(format_args!(
                        "TAP read: {}",
                        std::io::Error::from_raw_os_error(-res)
                    ));
                }
                self.rx.free.push(slot);
            } else {
                self.ready.push_back((slot, n));
            }
        }
        self.cq = cq;
    }

    /// The ring cannot be waited on: what its in-flight operations read
    /// or write (the pools, the guest memory map in-place writes read) is
    /// leaked, never freed under the kernel, and fresh pools take over.
    fn abandon_inflight(&mut self) {
        std::mem::forget(std::mem::replace(&mut self.rx, Pool::new(RX_SLOTS)));
        std::mem::forget(std::mem::replace(&mut self.tx, Pool::new(TX_SLOTS)));
        std::mem::forget(self.tx_mem.take());
        self.rx_posted = 0;
        self.tx_inflight = 0;
        self.tx_in_place = 0;
        self.ready.clear();
    }

    /// Cancels posted reads and waits for every in-flight operation.
    pub fn quiesce(&mut self) {
        if self.rx_posted > 0 {
            for slot in 0..RX_SLOTS {
                let sqe = opcode::AsyncCancel::new(slot as u64)
                    .build()
                    .user_data(CANCEL);
                self.push(sqe);
            }
        }
        while self.rx_posted + self.tx_inflight > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                let transient = [libc::EINTR, libc::EAGAIN, libc::EBUSY];
                if !e.raw_os_error().is_some_and(|c| transient.contains(&c)) {
                    error!("io_uring wait: {e}: abandoning in-flight operations");
                    self.abandon_inflight();
                    break;
                }
            }
            self.reap();
        }
        while let Some((slot, _)) = self.ready.pop_front() {
            self.rx.free.push(slot);
        }
        // Chains written in place that completed just now go back to the
        // queue they came from: none may linger for a restarted queue.
        self.return_tx_used(true);
        self.rx_vring = None;
        self.tx_vring = None;
    }

    pub fn pair(&self) -> usize {
        self.pair
    }

    /// What the pair holds right now, for the SIGUSR1 state dump.
    pub fn state(&self) -> String {
        let s = &self.stats;
        format!(
            "pair {}: rx {} reads posted, {} frames waiting for buffers; \
             tx {} writes in flight ({} from guest memory){}; \
             tx {} frames, rx {} frames",
            self.pair,
            self.rx_posted,
            self.ready.len(),
            self.tx_inflight,
            self.tx_in_place,
            if self.tx_blocked {
                ", waiting for a slot"
            } else {
                ""
            },
            s.tx_frames,
            s.rx_frames
        )
    }

    fn signal(vring: &Vring, mem: &Mem) {
        let needed = vring.get_mut().get_queue_mut().needs_notification(mem);
        if needed.unwrap_or(true) {
            if let Err(e) = vring.signal_used_queue() {
                warn!("signal used queue: {e}");
            }
        }
    }
}

impl Drop for PairWorker {
    fn drop(&mut self) {
        self.quiesce();
        // A queue detached for a disabled pair is attached again for the
        // next connection.
        if !self.attached {
            let _ = self.tap.set_queue_attached(self.pair, true);
        }
    }
}

#[cfg(test)]
mod tests;
