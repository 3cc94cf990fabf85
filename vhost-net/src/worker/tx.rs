//! TX: frames from the guest's chains to the TAP queue (see the module
//! docs of [`super`] for the buffers and in-place writes).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use io_uring::opcode;
use vhost_user_backend::VringT;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddressSpace, GuestMemoryBackend};

use crate::tap::TAP_HDR_LEN;
use rimg_vhost_server::Mem;

use super::*;

/// Bytes of a TX frame prefetched ahead of its write: a 1500-byte frame
/// whole; the hardware prefetcher follows the rest of larger ones.
pub(super) const PREFETCH_MAX: usize = 2048;
/// How many chains ahead of the one being written TX walks and prefetches.
pub(super) const TX_LOOKAHEAD: usize = 4;
/// The smallest TX frame (with its vnet header) written straight from
/// guest memory. Below this, copying the few cache lines is cheaper than
/// the kernel's copy from lines another CPU wrote (measured: in place
/// loses at 64-byte frames and wins from 256 bytes).
pub(super) const IN_PLACE_MIN: usize = 256;

/// A TX chain taken from the ring: its head and descriptors, or why
/// it cannot be used.
pub(super) struct TxWalked {
    pub(super) head: u16,
    pub(super) segs: Vec<Seg>,
    pub(super) walked: Result<(), &'static str>,
}

/// What a TX chain's TAP write reads.
pub(super) enum TxFrame {
    /// This many bytes of its slot.
    Copied(usize),
    /// The chain's one descriptor, in guest memory.
    InPlace(*const u8, usize),
}

impl PairWorker {
    // ----- TX: guest -> TAP -----

    pub(super) fn process_tx(&mut self) {
        self.tx_blocked = false;
        let Some((vring, mem)) = self.serving(true) else {
            return;
        };
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
                // Every chain takes a slot, and at most a queue's worth is
                // outstanding, returned or not (see [`TxOrder`]).
                let room = usize::from(q.size()).saturating_sub(self.tx_order.len());
                let free = self.tx.free.len().min(room);
                if free == 0 {
                    self.tx_blocked = true;
                    break;
                }
                let taken = self.tx_burst(q, &mem, free);
                // Also chains written in place that completed earlier
                // while the queue was disabled.
                self.tx_order.pop_done(&mut self.tx_used);
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
        signal_used_burst(&vring, &mem, returned);
    }

    /// Takes up to `free` available chains and submits their TAP writes;
    /// returns how many it took. Chains done with (copied, dropped, or
    /// written in place and completed) are marked so in `tx_order`.
    pub(super) fn tx_burst(
        &mut self,
        q: &mut virtio_queue::Queue,
        mem: &Arc<Mem>,
        free: usize,
    ) -> usize {
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
            if self.ring.is_wedged() {
                // Nothing reaches the TAP through a wedged ring: the
                // frame is dropped and its chain returned.
                self.tx_spare.push(w.segs);
                self.stats.tx_dropped.add(1);
                if w.head < size {
                    self.tx_order.take(w.head, true);
                }
                continue;
            }
            let slot = self.tx.free.pop().expect("a free slot per chain");
            let frame = w.walked.and_then(|()| self.prepare_tx(&w.segs, mem, slot));
            self.tx_spare.push(w.segs);
            let (ptr, len, user_data) = match frame {
                Ok(TxFrame::Copied(len)) => {
                    self.tx_order.take(w.head, true);
                    (self.tx.slot(slot).as_ptr(), len, TX_BIT | slot as u64)
                }
                Ok(TxFrame::InPlace(ptr, len)) => {
                    if self.tx_in_place == 0 {
                        self.tx_mem = Some(mem.clone());
                    }
                    self.tx_in_place += 1;
                    in_place = true;
                    let seq = u64::from(self.tx_order.take(w.head, false)) << SEQ_SHIFT;
                    (ptr, len, TX_BIT | IN_PLACE | seq | slot as u64)
                }
                Err(why) => {
                    self.tx.free.push(slot);
                    self.stats.tx_dropped.add(1);
                    let head = w.head;
                    self.warn(format_args!("dropping TX chain {head}: {why}"));
                    // A head outside the queue cannot be returned, and
                    // would make the burst's other chains unreturnable.
                    if head < size {
                        self.tx_order.take(head, true);
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
    pub(super) fn return_tx_used(&mut self, stopping: bool) {
        self.tx_order.pop_done(&mut self.tx_used);
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
        signal_used_burst(&vring, &mem, n);
    }

    /// Walks a TX chain and starts loading the first PREFETCH_MAX bytes of
    /// its buffers into the cache: the driver wrote them on another CPU,
    /// and the copy that follows would otherwise wait for every line in
    /// turn.
    pub(super) fn walk_tx(&mut self, chain: DescriptorChain<&Mem>, mem: &Mem) -> TxWalked {
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
    pub(super) fn prepare_tx(
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
                        self.stats.tx_gso.add(1);
                    }
                    self.stats.tx_frames.add(1);
                    return Ok(TxFrame::InPlace(s.ptr_guard().as_ptr(), len));
                }
            }
        }
        self.copy_tx(segs, mem, slot).map(TxFrame::Copied)
    }

    /// Copies a walked TX chain into slot `slot` with the TAP's header
    /// layout; returns the length.
    pub(super) fn copy_tx(
        &mut self,
        segs: &[Seg],
        mem: &Mem,
        slot: usize,
    ) -> Result<usize, &'static str> {
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
            self.stats.tx_gso.add(1);
        }
        self.stats.tx_frames.add(1);
        Ok(pos + gap)
    }

    // ----- RX: TAP -> guest -----
}
