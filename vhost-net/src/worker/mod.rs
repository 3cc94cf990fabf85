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
//!   writes. A copied chain is done at once; one written in place when its
//!   write completes, which for a TAP is inline, within the submission,
//!   so the whole burst goes back with one store of the used index.
//!   Chains go back in the order they were taken ([`order`]). Every
//!   write, in place or not, takes a slot: with none free, TX waits for
//!   write completions.
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
//! A ring that cannot be waited on keeps the slots and memory maps its
//! operations use for good (the daemons' one policy:
//! `rimg_vhost_server::uring`).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use log::{error, info};
use rimg_vhost_server::avail::{self, AvailError};
use rimg_vhost_server::stats::Counter;
use rimg_vhost_server::used::{add_used_burst, add_used_lens, signal_used_burst};
use rimg_vhost_server::workers::QueueWorker;
use rimg_vhost_server::{CappedWarnings, Mem, RingOwner, Vring, WorkerRing, GM};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::Negotiated;
use crate::tap::{Tap, TAP_HDR_LEN};

mod order;
mod ring;
mod rx;
mod tx;

use order::TxOrder;
use ring::{collect, read_guest, Seg};
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
/// chain's sequence number ([`TxOrder`]) is then in bits 40..64, and the
/// chain done when the write completes.
const IN_PLACE: u64 = 1 << 34;
const SEQ_SHIFT: u32 = 40;
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
    rimg_vhost_server::restricted_ring(entries, &RING_OPS, Some(efd.as_raw_fd()), &[tap])
}

/// The TAP queue, as the ring's fixed file.
pub const TAP: types::Fixed = types::Fixed(0);

/// One connection's counters of a pair, for logs, tests and the control
/// socket's `query-stats` (which reads them while the worker runs).
#[derive(Debug, Default)]
pub struct Stats {
    pub tx_frames: Counter,
    /// TX frames the guest handed over unsegmented (GSO type set).
    pub tx_gso: Counter,
    pub tx_dropped: Counter,
    pub rx_frames: Counter,
    /// RX frames the TAP handed over unsegmented.
    pub rx_gso: Counter,
    pub rx_dropped: Counter,
}

impl Stats {
    /// The counters in the order of the log line.
    pub fn values(&self) -> [u64; 6] {
        [
            self.tx_frames.get(),
            self.tx_gso.get(),
            self.tx_dropped.get(),
            self.rx_frames.get(),
            self.rx_gso.get(),
            self.rx_dropped.get(),
        ]
    }
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
    ring: WorkerRing,
    /// The ring wedged and what was in flight in it was abandoned.
    abandoned: bool,
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
    /// Chains collected for the frame being delivered, and their used
    /// entries (both reused).
    chains: Vec<RxChain>,
    rx_used: Vec<(u16, u32)>,
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
    /// TX chains taken and not yet returned, in take order.
    tx_order: TxOrder,
    /// Heads of TX chains to return as one burst (reused).
    tx_used: Vec<u16>,
    /// TX writes in flight straight from guest memory, and the memory
    /// they read, held mapped until the last completes.
    tx_in_place: usize,
    tx_mem: Option<Arc<Mem>>,
    /// Completions of one reap (reused: no allocation per burst).
    cq: Vec<(u64, i32)>,
    pub stats: Arc<Stats>,
}

impl PairWorker {
    pub fn new(pair: usize, tap: Arc<Tap>, mem: GM) -> std::io::Result<PairWorker> {
        let efd = EventFd::new(EFD_NONBLOCK)?;
        let ring = WorkerRing::new(ring(RING_ENTRIES, &efd, tap.queue_fd(pair))?);
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
            rx_used: Vec::with_capacity(64),
            rx_vring: None,
            tx_vring: None,
            tx_blocked: false,
            abandoned: false,
            attached: true,
            warnings: CappedWarnings::new(module_path!(), format!("pair {pair}")),
            tx_ahead: VecDeque::with_capacity(TX_LOOKAHEAD),
            tx_spare: (0..=TX_LOOKAHEAD).map(|_| Vec::with_capacity(4)).collect(),
            tx_order: TxOrder::default(),
            tx_used: Vec::with_capacity(TX_SLOTS),
            tx_in_place: 0,
            tx_mem: None,
            cq: Vec::with_capacity(RING_ENTRIES as usize),
            stats: Arc::default(),
        })
    }

    pub fn set_negotiated(&mut self, n: Negotiated) {
        self.neg = n;
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

    /// Logs an avail index more than the queue size ahead of the device
    /// (see [`Self::serving`]).
    fn check_avail_idx(&mut self, tx: bool) {
        let v = if tx { &self.tx_vring } else { &self.rx_vring };
        if !Self::usable(v) {
            return;
        }
        let Some(v) = v.clone() else {
            return;
        };
        let checked = avail::available(v.get_ref().get_queue(), &*self.mem.memory());
        if let Err(e @ AvailError::TooFarAhead { .. }) = checked {
            let which = if tx { "TX" } else { "RX" };
            self.warn(format_args!(
                "{which} {e}: ignoring the queue until the driver repairs it"
            ));
        }
    }

    /// The TX (or RX) vring and the current memory map, when the queue
    /// can be served: enabled, ready, and its avail index at most the
    /// queue size ahead of the device. virtio-queue yields nothing from a
    /// ring further ahead (and logs an error for every attempt), so the
    /// queue is left alone until the driver publishes a sane index. (An
    /// unreadable index is left to the queue's own walk to refuse.)
    fn serving(&self, tx: bool) -> Option<(Vring, Arc<Mem>)> {
        let v = if tx { &self.tx_vring } else { &self.rx_vring };
        if !Self::usable(v) {
            return None;
        }
        let vring = v.clone()?;
        let mem = self.mem.memory().into_inner();
        let checked = avail::available(vring.get_ref().get_queue(), &*mem);
        if let Err(AvailError::TooFarAhead { .. }) = checked {
            return None;
        }
        Some((vring, mem))
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
                    self.stats.rx_dropped.add(1);
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
        // (`quiesce`, also run on drop) reaps everything, or leaks both
        // when the ring cannot be waited on.
        unsafe { self.push_entry(&sqe) }
    }

    fn submit(&mut self) {
        self.ring.submit();
    }

    fn reap(&mut self) {
        let mut cq = std::mem::take(&mut self.cq);
        cq.clear();
        for cqe in self.ring.completions() {
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
                    self.tx_order.complete((ud >> SEQ_SHIFT) as u32);
                    self.tx_in_place -= 1;
                    if self.tx_in_place == 0 {
                        self.tx_mem = None;
                    }
                }
                if res < 0 {
                    self.stats.tx_dropped.add(1);
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
    /// The wedged ring hands out no completion any more, so none of the
    /// old pools' slots ever comes back into the new ones.
    fn abandon_inflight(&mut self) {
        self.ring
            .retire(std::mem::replace(&mut self.rx, Pool::new(RX_SLOTS)));
        self.ring
            .retire(std::mem::replace(&mut self.tx, Pool::new(TX_SLOTS)));
        self.ring.retire(self.tx_mem.take());
        self.tx_order.abandon_pending();
        self.rx_posted = 0;
        self.tx_inflight = 0;
        self.tx_in_place = 0;
        self.ready.clear();
    }

    /// Cancels posted reads and waits for every in-flight operation (the
    /// cancellations included).
    pub fn quiesce(&mut self) {
        if self.rx_posted > 0 {
            for slot in 0..RX_SLOTS {
                let sqe = opcode::AsyncCancel::new(slot as u64)
                    .build()
                    .user_data(CANCEL);
                self.push(sqe);
            }
        }
        if self.abandoned {
            // Wedged and abandoned already: nothing was pushed since (no
            // read is posted, frames are dropped), the pools are fresh.
        } else if let Err(e) = self.drain_ring() {
            error!("io_uring wait: {e}: abandoning in-flight operations");
            self.abandon_inflight();
            self.abandoned = true;
        }
        while let Some((slot, _)) = self.ready.pop_front() {
            self.rx.free.push(slot);
        }
        // Chains written in place that completed just now go back to the
        // queue they came from: none may linger for a restarted queue.
        self.return_tx_used(true);
        self.tx_order.clear();
        self.rx_vring = None;
        self.tx_vring = None;
    }

    pub fn pair(&self) -> usize {
        self.pair
    }
}

impl QueueWorker for PairWorker {
    /// Queues 2i (RX) and 2i + 1 (TX) form pair i.
    const QUEUES_PER_THREAD: usize = 2;

    fn completion_fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// A kick on the RX or TX queue, or the vring-enabled event (both
    /// may let frames move): remember the rings, then move whatever can.
    fn handle_kick(&mut self, _event: u16, vrings: &[Vring]) {
        if self.rx_vring.is_none() {
            self.rx_vring = Some(vrings[0].clone());
            self.tx_vring = Some(vrings[1].clone());
            // The rings' first event on this connection: a daemon that
            // died before us may have returned chains without telling
            // the driver. One spurious interrupt costs less than a stall.
            for v in &vrings[..2] {
                if v.get_ref().get_queue().ready() {
                    let _ = v.signal_used_queue();
                }
            }
        }
        self.update_attachment();
        self.check_avail_idx(true);
        self.check_avail_idx(false);
        self.process_tx();
        self.deliver_rx();
        self.post_reads();
        self.submit();
    }

    /// The io_uring completion eventfd fired.
    fn handle_completions(&mut self) {
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

    fn stop(&mut self) {
        self.quiesce()
    }

    /// What the pair holds right now, for the SIGUSR1 state dump.
    fn state(&self) -> String {
        let s = &self.stats;
        format!(
            "pair {}: rx {} reads posted, {} frames waiting for buffers; \
             tx {} writes in flight ({} from guest memory){}; \
             tx {} frames, rx {} frames{}",
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
            s.tx_frames.get(),
            s.rx_frames.get(),
            if self.ring.is_wedged() {
                "; ring wedged: frames are dropped"
            } else {
                ""
            }
        )
    }
}

impl RingOwner for PairWorker {
    fn worker_ring(&mut self) -> &mut WorkerRing {
        &mut self.ring
    }

    fn reap_completions(&mut self) {
        self.reap()
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
