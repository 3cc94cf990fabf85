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
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use log::{error, info, warn};
use vhost_user_backend::VringT;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::Negotiated;
use crate::tap::{Tap, TAP_HDR_LEN};
use rimg_vhost_server::{CappedWarnings, Mem, Vring, GM};

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

/// One descriptor of a chain: guest address, length, device-writable.
#[derive(Clone, Copy)]
struct Seg {
    addr: GuestAddress,
    len: u32,
    write: bool,
}

/// Walks `chain` into `out`, refusing what the device must not use: a
/// chain cut short by the walk's bound (a loop, more descriptors than the
/// queue or indirect table holds, a next index past the table, over 4 GiB
/// in all), an empty one (e.g. an indirect table outside guest memory),
/// and descriptors not wholly inside guest memory. Nothing is read from or
/// written to the buffers; their first `prefetch_budget` bytes are
/// prefetched.
fn collect<M: std::ops::Deref<Target = Mem>>(
    chain: DescriptorChain<M>,
    mem: &Mem,
    out: &mut Vec<Seg>,
    mut prefetch_budget: usize,
) -> Result<(), &'static str> {
    out.clear();
    let mut cut_short = false;
    for d in chain {
        let len = d.len() as usize;
        // One region lookup checks the range and yields the mapping to
        // prefetch from; a range over several regions takes the slow way.
        match mem.get_slice(d.addr(), len) {
            Ok(s) if prefetch_budget > 0 => {
                let n = len.min(prefetch_budget);
                prefetch(s.ptr_guard().as_ptr(), n);
                prefetch_budget -= n;
            }
            Ok(_) => {}
            Err(_) if GuestMemoryBackend::check_range(mem, d.addr(), len) => {}
            Err(_) => return Err("address outside guest memory"),
        }
        out.push(Seg {
            addr: d.addr(),
            len: d.len(),
            write: d.is_write_only(),
        });
        // virtio-queue ends the walk quietly after a descriptor that
        // still has NEXT when it hits a bound.
        cut_short = d.has_next();
    }
    if cut_short {
        return Err("descriptor chain loops, is longer than the queue or has a bad next index");
    }
    if out.is_empty() {
        return Err("empty descriptor chain");
    }
    Ok(())
}

/// Returns `heads` to the used ring (length 0) with one store of the used
/// index: virtio-queue's add_used stores it for every chain, and it is a
/// cache line the driver keeps reading. The elements before the last are
/// written here (virtio 1.x "The Virtqueue Used Ring": a le32 id and a
/// le32 len each, after the 4-byte flags and idx); the last goes through
/// add_used, whose release store of the index publishes them all.
fn add_used_burst(
    q: &mut virtio_queue::Queue,
    mem: &Mem,
    heads: &[u16],
) -> Result<(), virtio_queue::Error> {
    let Some((&last, rest)) = heads.split_last() else {
        return Ok(());
    };
    let size = q.size();
    let used = GuestAddress(q.used_ring());
    let mut next = Wrapping(q.next_used());
    let elems = used
        .checked_add(4)
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    // The ring's elements, one region lookup for the burst. Nothing checks
    // at setup that the ring lies in guest memory: one that does not (or
    // spans regions) is written element by element, and may fail.
    let ring = mem.get_slice(elems, 8 * usize::from(size)).ok();
    for &head in rest {
        if head >= size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let off = 8 * u64::from(next.0 % size);
        let val = u64::from(head).to_le();
        match &ring {
            Some(r) => r
                .write_obj(val, off as usize)
                .map_err(|e| virtio_queue::Error::GuestMemory(e.into()))?,
            None => {
                let at = elems
                    .checked_add(off)
                    .ok_or(virtio_queue::Error::AddressOverflow)?;
                mem.write_obj(val, at)
                    .map_err(virtio_queue::Error::GuestMemory)?
            }
        }
        next += Wrapping(1);
    }
    q.set_next_used(next.0);
    q.add_used(mem, last, 0)
}

/// Whether the driver wants a used-buffer notification now that the last
/// `returned` used entries were added by [`add_used_burst`] (virtio 1.x
/// "Used Buffer Notification Suppression"). virtio-queue's
/// needs_notification cannot decide it: it counts add_used calls, and a
/// burst makes one. With EVENT_IDX, its rule: the driver's used_event lies
/// among the entries just added. Without, the avail ring's NO_INTERRUPT
/// flag (which virtio-queue ignores, and a polling driver sets).
fn used_notification_needed(q: &virtio_queue::Queue, mem: &Mem, returned: usize) -> bool {
    use std::sync::atomic::fence;
    // The used entries must be visible before the driver's fields are read.
    fence(Ordering::SeqCst);
    let avail = GuestAddress(q.avail_ring());
    let load = |off: u64| {
        avail
            .checked_add(off)
            .and_then(|a| mem.load::<u16>(a, Ordering::Relaxed).ok())
            .map(u16::from_le)
    };
    if q.event_idx_enabled() {
        let new = Wrapping(q.next_used());
        load(4 + 2 * u64::from(q.size()))
            .is_none_or(|ev| usize::from((new - Wrapping(ev) - Wrapping(1)).0) < returned)
    } else {
        const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
        load(0).is_none_or(|flags| flags & VRING_AVAIL_F_NO_INTERRUPT == 0)
    }
}

/// Bytes of a TX frame prefetched ahead of its write: a 1500-byte frame
/// whole; the hardware prefetcher follows the rest of larger ones.
const PREFETCH_MAX: usize = 2048;
/// How many chains ahead of the one being written TX walks and prefetches.
const TX_LOOKAHEAD: usize = 4;
/// The smallest TX frame (with its vnet header) written straight from
/// guest memory. Below this, copying the few cache lines is cheaper than
/// the kernel's copy from lines another CPU wrote (measured: in place
/// loses at 64-byte frames and wins from 256 bytes).
const IN_PLACE_MIN: usize = 256;

/// Asks the CPU to start loading the cache lines of the `len` bytes at
/// `p`.
fn prefetch(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let skew = p as usize % 64;
        let first = p.wrapping_sub(skew);
        for off in (0..len + skew).step_by(64) {
            // SAFETY: a prefetch neither faults nor changes memory, and
            // the line is part of a mapped range anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(off).cast::<i8>()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// Copies guest memory at `addr` into `buf`: one region lookup and a
/// memcpy, or vm-memory's walk for a range over several regions.
fn read_guest(mem: &Mem, addr: GuestAddress, buf: &mut [u8]) -> Result<(), &'static str> {
    match mem.get_slice(addr, buf.len()) {
        Ok(s) => {
            s.copy_to(buf);
            Ok(())
        }
        Err(_) => mem
            .read_slice(buf, addr)
            .map_err(|_| "address outside guest memory"),
    }
}

/// A TX chain taken from the ring: its head and descriptors, or why
/// it cannot be used.
struct TxWalked {
    head: u16,
    segs: Vec<Seg>,
    walked: Result<(), &'static str>,
}

/// What a TX chain's TAP write reads.
enum TxFrame {
    /// This many bytes of its slot.
    Copied(usize),
    /// The chain's one descriptor, in guest memory.
    InPlace(*const u8, usize),
}

/// A receive chain being filled: its head and writable ranges.
#[derive(Default)]
struct RxChain {
    head: u16,
    segs: Vec<Seg>,
    cap: usize,
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

    // ----- TX: guest -> TAP -----

    fn process_tx(&mut self) {
        self.tx_blocked = false;
        let Some(vring) = self.tx_vring.clone() else {
            return;
        };
        if !Self::usable(&self.tx_vring) {
            return;
        }
        let mem = self.mem.memory().into_inner();
        if Self::avail_sane(&vring, &mem).is_err() {
            return;
        }
        // Chains returned by this call: counted, since more than 65535
        // would wrap the used index back to where it started.
        let mut returned = 0usize;
        loop {
            let mut g = vring.get_mut();
            let q = g.get_queue_mut();
            if self.event_idx {
                let _ = q.disable_notification(&*mem);
            }
            loop {
                let free = self.tx.free.len();
                if free == 0 {
                    self.tx_blocked = true;
                    break;
                }
                let taken = self.tx_burst(q, &mem, free);
                // Also chains written in place that completed earlier
                // while the queue was disabled.
                returned += self.tx_used.len();
                if let Err(e) = add_used_burst(q, &mem, &self.tx_used) {
                    // Guest-caused (a used ring outside its memory): capped.
                    self.warnings.warn(format_args!("add_used: {e}"));
                }
                self.tx_used.clear();
                if taken == 0 {
                    break;
                }
            }
            if self.tx_blocked || !self.event_idx {
                break;
            }
            match q.enable_notification(&*mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        Self::signal_tx(&vring, &mem, returned);
    }

    /// Signals the TX queue's used buffers if the driver wants to hear of
    /// the last `returned` entries (see [`used_notification_needed`]).
    fn signal_tx(vring: &Vring, mem: &Mem, returned: usize) {
        if returned > 0 && used_notification_needed(vring.get_ref().get_queue(), mem, returned) {
            if let Err(e) = vring.signal_used_queue() {
                warn!("signal used queue: {e}");
            }
        }
    }

    /// Takes up to `free` available chains and submits their TAP writes;
    /// returns how many it took. The heads of chains done with (copied,
    /// dropped, or written in place and completed) are left in `tx_used`.
    fn tx_burst(&mut self, q: &mut virtio_queue::Queue, mem: &Arc<Mem>, free: usize) -> usize {
        // The avail index is read once per burst: it is a cache line the
        // driver keeps writing (pop_descriptor_chain would read it again
        // for every chain). The chains borrow the memory rather than
        // clone its Arc: two atomic operations less per frame.
        let size = q.size();
        let mut chains = match q.iter(&**mem) {
            Ok(it) => it.take(free),
            Err(e) => {
                self.warn(format_args!("TX queue: {e}"));
                return 0;
            }
        };
        // Chains are walked, and their frames prefetched, TX_LOOKAHEAD
        // ahead of the one being written.
        for c in chains.by_ref().take(TX_LOOKAHEAD) {
            let w = self.walk_tx(c, mem);
            self.tx_ahead.push_back(w);
        }
        let mut taken = 0;
        let mut in_place = false;
        while let Some(w) = self.tx_ahead.pop_front() {
            if let Some(c) = chains.next() {
                let next = self.walk_tx(c, mem);
                self.tx_ahead.push_back(next);
            }
            taken += 1;
            let slot = self.tx.free.pop().expect("a free slot per chain");
            let frame = w.walked.and_then(|()| self.prepare_tx(&w.segs, mem, slot));
            self.tx_spare.push(w.segs);
            let (ptr, len, user_data) = match frame {
                Ok(TxFrame::Copied(len)) => {
                    self.tx_used.push(w.head);
                    (self.tx.slot(slot).as_ptr(), len, TX_BIT | slot as u64)
                }
                Ok(TxFrame::InPlace(ptr, len)) => {
                    if self.tx_in_place == 0 {
                        self.tx_mem = Some(mem.clone());
                    }
                    self.tx_in_place += 1;
                    in_place = true;
                    let head = u64::from(w.head) << HEAD_SHIFT;
                    (ptr, len, TX_BIT | IN_PLACE | head | slot as u64)
                }
                Err(why) => {
                    self.tx.free.push(slot);
                    self.stats.tx_dropped += 1;
                    let head = w.head;
                    self.warn(format_args!("dropping TX chain {head}: {why}"));
                    // A head outside the queue cannot be returned, and
                    // would make the burst's other chains unreturnable.
                    if head < size {
                        self.tx_used.push(head);
                    }
                    continue;
                }
            };
            let sqe = opcode::Write::new(TAP, ptr, len as u32)
                .build()
                .user_data(user_data);
            self.push(sqe);
            self.tx_inflight += 1;
        }
        if in_place {
            // TAP writes complete inline: the chains written in place go
            // back in this burst. One punted to a kernel worker goes back
            // when it completes (`return_tx_used`).
            self.submit();
            self.reap();
        }
        taken
    }

    /// Returns the chains of in-place TX writes that completed outside a
    /// burst to the guest. While the queue is disabled they wait for it
    /// (the next burst returns them), unless `stopping`: a queue being
    /// stopped (GET_VRING_BASE, which clears its ready flag first) still
    /// has its rings, and the frontend reads the avail position that
    /// counts these chains right after.
    fn return_tx_used(&mut self, stopping: bool) {
        if self.tx_used.is_empty() {
            return;
        }
        let n = self.tx_used.len();
        let vring = match &self.tx_vring {
            Some(v) if stopping || Self::usable(&self.tx_vring) => v.clone(),
            Some(_) => return,
            // No queue known: nothing was taken from one.
            None => {
                self.tx_used.clear();
                return;
            }
        };
        let mem = self.mem.memory();
        {
            let mut g = vring.get_mut();
            if let Err(e) = add_used_burst(g.get_queue_mut(), &mem, &self.tx_used) {
                self.warnings.warn(format_args!("add_used: {e}"));
            }
        }
        self.tx_used.clear();
        Self::signal_tx(&vring, &mem, n);
    }

    /// Walks a TX chain and starts loading the first PREFETCH_MAX bytes of
    /// its buffers into the cache: the driver wrote them on another CPU,
    /// and the copy that follows would otherwise wait for every line in
    /// turn.
    fn walk_tx(&mut self, chain: DescriptorChain<&Mem>, mem: &Mem) -> TxWalked {
        let head = chain.head_index();
        let mut segs = self.tx_spare.pop().unwrap_or_default();
        let walked = collect(chain, mem, &mut segs, PREFETCH_MAX);
        TxWalked { head, segs, walked }
    }

    /// Prepares the TAP write of a walked TX chain (vnet header + frame,
    /// device-readable only). A frame of at least IN_PLACE_MIN bytes in
    /// one descriptor, with the TAP's header layout, is written in place:
    /// the TAP's copy into its socket buffer is then the only one. A guest
    /// that changes it meanwhile garbles only its own frame, and the
    /// kernel checks the header it copied. Other chains are copied into
    /// slot `slot`.
    fn prepare_tx(
        &mut self,
        segs: &[Seg],
        mem: &Arc<Mem>,
        slot: usize,
    ) -> Result<TxFrame, &'static str> {
        let ghdr = self.neg.hdr_len;
        if let [d] = segs {
            let len = d.len as usize;
            // In-place writes in flight hold the memory they read; while
            // any reads an older map, frames are copied.
            let same_map = self.tx_mem.as_ref().is_none_or(|m| Arc::ptr_eq(m, mem));
            if ghdr == TAP_HDR_LEN
                && !d.write
                && (IN_PLACE_MIN.max(ghdr + ETH_HLEN)..=SLOT_LEN).contains(&len)
                && same_map
            {
                if let Ok(s) = mem.get_slice(d.addr, len) {
                    // virtio_net_hdr byte 1 is gso_type.
                    if s.load::<u8>(1, Ordering::Relaxed).is_ok_and(|t| t != 0) {
                        self.stats.tx_gso += 1;
                    }
                    self.stats.tx_frames += 1;
                    return Ok(TxFrame::InPlace(s.ptr_guard().as_ptr(), len));
                }
            }
        }
        self.copy_tx(segs, mem, slot).map(TxFrame::Copied)
    }

    /// Copies a walked TX chain into slot `slot` with the TAP's header
    /// layout; returns the length.
    fn copy_tx(&mut self, segs: &[Seg], mem: &Mem, slot: usize) -> Result<usize, &'static str> {
        let ghdr = self.neg.hdr_len;
        let buf = self.tx.slot(slot);
        // Guest headers of 10 bytes lack num_buffers: leave a zero gap so
        // the frame starts at TAP_HDR_LEN.
        let gap = TAP_HDR_LEN - ghdr;
        let mut pos = 0usize; // bytes of the guest stream consumed
        for d in segs {
            if d.write {
                return Err("device-writable descriptor in a TX chain");
            }
            let len = d.len as usize;
            let at = if pos >= ghdr { pos + gap } else { pos };
            let end = pos + len + if pos + len > ghdr { gap } else { 0 };
            if end > SLOT_LEN {
                return Err("frame larger than 64 KiB");
            }
            if pos < ghdr && pos + len > ghdr {
                // The descriptor holds the header's end and the frame's
                // start: split it around the gap.
                let h = ghdr - pos;
                read_guest(mem, d.addr, &mut buf[pos..ghdr])?;
                let a2 = d
                    .addr
                    .checked_add(h as u64)
                    .ok_or("address outside guest memory")?;
                read_guest(mem, a2, &mut buf[ghdr + gap..ghdr + gap + len - h])?;
            } else {
                read_guest(mem, d.addr, &mut buf[at..at + len])?;
            }
            pos += len;
        }
        if pos < ghdr {
            return Err("chain shorter than the vnet header");
        }
        if pos - ghdr < ETH_HLEN {
            return Err("frame shorter than an Ethernet header");
        }
        buf[ghdr..ghdr + gap].fill(0);
        // virtio_net_hdr byte 1 is gso_type.
        if buf[1] != 0 {
            self.stats.tx_gso += 1;
        }
        self.stats.tx_frames += 1;
        Ok(pos + gap)
    }

    // ----- RX: TAP -> guest -----

    /// Keeps reads posted in every free slot while frames flow; none while
    /// delivered frames wait for guest buffers or the queue is off.
    fn post_reads(&mut self) {
        if !self.ready.is_empty() || !Self::usable(&self.rx_vring) {
            return;
        }
        while let Some(slot) = self.rx.free.pop() {
            let ptr = self.rx.slot(slot).as_mut_ptr();
            let sqe = opcode::Read::new(TAP, ptr, SLOT_LEN as u32)
                .offset(u64::MAX)
                .build()
                .user_data(slot as u64);
            self.push(sqe);
            self.rx_posted += 1;
        }
    }

    fn deliver_rx(&mut self) {
        if self.ready.is_empty() {
            return;
        }
        let Some(vring) = self.rx_vring.clone() else {
            return;
        };
        if !Self::usable(&self.rx_vring) {
            return;
        }
        let mem = self.mem.memory().into_inner();
        if Self::avail_sane(&vring, &mem).is_err() {
            return;
        }
        let mut used_any = false;
        {
            let mut g = vring.get_mut();
            let q = g.get_queue_mut();
            while let Some(&(slot, len)) = self.ready.front() {
                match self.place(q, &mem, slot, len) {
                    Some(true) => {
                        used_any = true;
                        self.stats.rx_frames += 1;
                        if self.rx.slot(slot)[1] != 0 {
                            self.stats.rx_gso += 1;
                        }
                    }
                    Some(false) => {
                        used_any = true;
                        self.stats.rx_dropped += 1;
                    }
                    None => {
                        // Out of guest buffers: ask for a kick, unless
                        // buffers arrived meanwhile.
                        if self.event_idx {
                            if let Ok(true) = q.enable_notification(&*mem) {
                                continue;
                            }
                        }
                        break;
                    }
                }
                self.ready.pop_front();
                self.rx.free.push(slot);
            }
        }
        if used_any {
            Self::signal(&vring, &mem);
        }
    }

    /// Puts the frame in slot `slot` into guest receive chains. Some(true)
    /// delivered, Some(false) dropped (chain too small or bad), None: not
    /// enough guest buffers yet (nothing consumed).
    fn place(
        &mut self,
        q: &mut virtio_queue::Queue,
        mem: &Arc<Mem>,
        slot: usize,
        len: usize,
    ) -> Option<bool> {
        let ghdr = self.neg.hdr_len;
        let gap = TAP_HDR_LEN - ghdr;
        let total = len - gap;
        let start = q.next_avail();
        let mut n = 0usize;
        let mut cap = 0usize;
        while cap < total {
            let chain = q.pop_descriptor_chain(&**mem);
            let Some(chain) = chain else {
                q.set_next_avail(start);
                return None;
            };
            if n == self.chains.len() {
                self.chains.push(RxChain::default());
            }
            let c = &mut self.chains[n];
            c.head = chain.head_index();
            let mut why = collect(chain, mem, &mut c.segs, 0).err();
            if why.is_none() && c.segs.iter().any(|d| !d.write) {
                why = Some("device-readable descriptor in an RX chain");
            }
            c.cap = c.segs.iter().map(|d| d.len as usize).sum();
            if why.is_none() && c.cap < ghdr {
                why = Some("RX chain shorter than the vnet header");
            }
            n += 1;
            if let Some(why) = why {
                let head = c.head;
                self.warn(format_args!("dropping a frame: RX chain {head}: {why}"));
                return Some(self.drop_chains(q, mem, n));
            }
            cap += c.cap;
            if !self.neg.mrg_rxbuf && cap < total {
                self.warn(format_args!(
                    "RX chain of {cap} bytes for a {total}-byte frame"
                ));
                return Some(self.drop_chains(q, mem, n));
            }
            // A frame never needs more buffers than num_buffers can count.
            if n >= 0xffff {
                return Some(self.drop_chains(q, mem, n));
            }
        }
        // The header with num_buffers, then the frame, as one stream.
        let slot_buf = &mut self.rx.slot(slot)[..len];
        if ghdr == 12 {
            slot_buf[10..12].copy_from_slice(&(n as u16).to_le_bytes());
        }
        let hdr = &slot_buf[..ghdr];
        let frame = &slot_buf[TAP_HDR_LEN..];
        let mut src_pos = 0usize;
        let mut ok = true;
        for c in &self.chains[..n] {
            let mut written = 0u32;
            for &Seg {
                addr, len: dlen, ..
            } in &c.segs
            {
                if src_pos >= total || !ok {
                    break;
                }
                let want = (dlen as usize).min(total - src_pos);
                // Copy [src_pos, src_pos + want) of header+frame, in at
                // most two pieces.
                let mut done = 0usize;
                while done < want {
                    let p = src_pos + done;
                    let (src, room) = if p < ghdr {
                        (&hdr[p..], ghdr - p)
                    } else {
                        (&frame[p - ghdr..], total - p)
                    };
                    let k = room.min(want - done);
                    let Some(a) = addr.checked_add(done as u64) else {
                        ok = false;
                        break;
                    };
                    if mem.write_slice(&src[..k], a).is_err() {
                        ok = false;
                        break;
                    }
                    done += k;
                }
                // Only what reached guest memory counts as written.
                src_pos += done;
                written += done as u32;
            }
            if let Err(e) = q.add_used(&**mem, c.head, written) {
                self.warnings.warn(format_args!("add_used: {e}"));
            }
        }
        Some(ok)
    }

    /// Returns `n` collected chains unused (length 0) and drops the frame.
    fn drop_chains(&mut self, q: &mut virtio_queue::Queue, mem: &Arc<Mem>, n: usize) -> bool {
        for c in &self.chains[..n] {
            if let Err(e) = q.add_used(&**mem, c.head, 0) {
                self.warnings.warn(format_args!("add_used: {e}"));
            }
        }
        false
    }

    // ----- the ring -----

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
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemoryMmap;

    const SIZE: u16 = 8;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    fn setup(event_idx: bool) -> (Mem, Queue) {
        let mem: Mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        (mem, q)
    }

    fn used(mem: &Mem, i: u64) -> (u32, u32) {
        let id: u32 = mem.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(USED + 8 + 8 * i)).unwrap();
        (id, len)
    }

    #[test]
    fn a_burst_fills_the_used_ring_in_order_and_wraps() {
        let (mem, mut q) = setup(false);
        q.set_next_used(6);
        add_used_burst(&mut q, &mem, &[3, 5, 7, 1]).unwrap();
        assert_eq!(q.next_used(), 10);
        let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(idx, 10);
        assert_eq!(used(&mem, 6), (3, 0));
        assert_eq!(used(&mem, 7), (5, 0));
        assert_eq!(used(&mem, 0), (7, 0));
        assert_eq!(used(&mem, 1), (1, 0));
        // A head outside the queue is refused before anything is published.
        assert!(add_used_burst(&mut q, &mem, &[2, SIZE, 4]).is_err());
        assert_eq!(q.next_used(), 10);
        add_used_burst(&mut q, &mem, &[]).unwrap();
        assert_eq!(q.next_used(), 10);
    }

    #[test]
    fn notification_follows_used_event_or_the_no_interrupt_flag() {
        let (mem, mut q) = setup(true);
        let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE));
        // Entries 0..3 added: the driver asked to hear of entry 2 (used_event
        // 2: notify once next_used passes it), or of 5 (not yet), or of 0.
        add_used_burst(&mut q, &mem, &[0, 1, 2, 3]).unwrap();
        for (ev, want) in [(2u16, true), (0, true), (3, true), (4, false), (5, false)] {
            mem.write_obj(ev, used_event).unwrap();
            assert_eq!(
                used_notification_needed(&q, &mem, 4),
                want,
                "used_event {ev}"
            );
        }
        // Only the last entry counts as new: used_event 0 was already passed.
        mem.write_obj(0u16, used_event).unwrap();
        assert!(!used_notification_needed(&q, &mem, 1));
        // More chains than the index can count: always.
        assert!(used_notification_needed(&q, &mem, 1 << 16));

        let (mem, mut q) = setup(false);
        add_used_burst(&mut q, &mem, &[0]).unwrap();
        assert!(used_notification_needed(&q, &mem, 1));
        mem.write_obj(1u16, GuestAddress(AVAIL)).unwrap();
        assert!(!used_notification_needed(&q, &mem, 1), "NO_INTERRUPT");
    }
}
