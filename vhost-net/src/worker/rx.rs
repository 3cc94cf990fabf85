//! RX: frames read from the TAP queue into the guest's receive chains.

use std::sync::Arc;

use io_uring::opcode;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes};

use crate::tap::TAP_HDR_LEN;
use rimg_vhost_server::Mem;

use super::*;

/// A receive chain being filled: its head and writable ranges.
#[derive(Default)]
pub(super) struct RxChain {
    pub(super) head: u16,
    pub(super) segs: Vec<Seg>,
    pub(super) cap: usize,
}

impl PairWorker {
    /// Keeps reads posted in every free slot while frames flow; none while
    /// delivered frames wait for guest buffers or the queue is off.
    pub(super) fn post_reads(&mut self) {
        if !self.ready.is_empty() || !Self::usable(&self.rx_vring) || self.ring.is_wedged() {
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

    pub(super) fn deliver_rx(&mut self) {
        if self.ready.is_empty() {
            return;
        }
        let Some((vring, mem)) = self.serving(false) else {
            return;
        };
        // Used entries added, each frame's with one store of the index.
        let mut returned = 0usize;
        {
            let mut g = vring.get_mut();
            let q = g.get_queue_mut();
            while let Some(&(slot, len)) = self.ready.front() {
                let placed = self.place(q, &mem, slot, len);
                if placed.is_some() {
                    returned += self.rx_used.len();
                }
                match placed {
                    Some(true) => {
                        self.stats.rx_frames.add(1);
                        if self.rx.slot(slot)[1] != 0 {
                            self.stats.rx_gso.add(1);
                        }
                    }
                    Some(false) => {
                        self.stats.rx_dropped.add(1);
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
        signal_used_burst(&vring, &mem, returned);
    }

    /// Puts the frame in slot `slot` into guest receive chains. Some(true)
    /// delivered, Some(false) dropped (chain too small or bad), None: not
    /// enough guest buffers yet (nothing consumed). The chains it used
    /// are returned with one store of the used index (and left in
    /// `rx_used`): a daemon killed meanwhile leaves the guest none of a
    /// merged frame's buffers, never some of them.
    pub(super) fn place(
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
        self.rx_used.clear();
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
            // A head outside the queue cannot be returned, and would
            // keep the frame's other chains from going back.
            if c.head < q.size() {
                self.rx_used.push((c.head, written));
            }
        }
        if let Err(e) = add_used_lens(q, mem, &self.rx_used) {
            self.warnings.warn(format_args!("add_used: {e}"));
        }
        Some(ok)
    }

    /// Returns `n` collected chains unused (length 0) and drops the frame.
    pub(super) fn drop_chains(
        &mut self,
        q: &mut virtio_queue::Queue,
        mem: &Arc<Mem>,
        n: usize,
    ) -> bool {
        self.rx_used.clear();
        let size = q.size();
        let heads = self.chains[..n].iter().filter(|c| c.head < size);
        self.rx_used.extend(heads.map(|c| (c.head, 0)));
        if let Err(e) = add_used_lens(q, mem, &self.rx_used) {
            self.warnings.warn(format_args!("add_used: {e}"));
        }
        false
    }

    // ----- the ring -----
}
