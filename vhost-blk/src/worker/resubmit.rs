//! Ring start with an inflight region: the requests the previous daemon
//! (killed, or stopped with requests dropped) took and never returned run
//! again, in the order it took them, before anything new is read from the
//! avail ring; the avail ring is read on from `used + resubmitted`, which
//! overrides the frontend's SET_VRING_BASE (QEMU sends the guest's used
//! index). Every block request is idempotent when run again.

use std::sync::atomic::Ordering;

use log::{debug, info, warn};
use rimg_vhost_server::chain;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use super::{Vring, Worker};

impl Worker {
    /// Called at the ring's first kick (its start): takes this queue's
    /// part of the inflight region, if any, recovers it and resubmits.
    pub(super) fn resubmit(&mut self, vring: &Vring) {
        self.log = self.inflight.queue(self.queue);
        let Some(log) = self.log.as_mut() else {
            return;
        };
        let mem = self.mem.memory().into_inner();
        let (used, size, base, table) = {
            let g = vring.get_ref();
            let q = g.get_queue();
            let used = q.used_idx(&*mem, Ordering::Acquire);
            (used, q.size(), q.next_avail(), q.desc_table())
        };
        let used = match used {
            Ok(u) => u.0,
            Err(e) => {
                warn!(
                    "queue {}: used ring unreadable ({e}): inflight tracking off",
                    self.queue
                );
                self.log = None;
                return;
            }
        };
        if size > log.desc_num() {
            warn!(
                "queue {}: ring of {size} entries, the inflight region tracks {}: \
                 inflight tracking off",
                self.queue,
                log.desc_num()
            );
            self.log = None;
            return;
        }
        let heads = log.restart(self.queue, used, size);
        let next = used.wrapping_add(heads.len() as u16);
        {
            let mut g = vring.get_mut();
            let q = g.get_queue_mut();
            q.set_next_used(used);
            q.set_next_avail(next);
        }
        if next != base {
            debug!(
                "queue {}: avail ring read from {next} (the frontend's base was {base})",
                self.queue
            );
        }
        info!(
            "queue {}: resubmitting {} requests taken by the previous daemon",
            self.queue,
            heads.len()
        );
        let (capacity, readonly) = (self.cfg.capacity(), self.cfg.readonly);
        for head in heads {
            // There are as many slots as the largest ring's entries, and
            // every slot is free at a ring's start.
            let Some(idx) = self.free.pop() else {
                warn!(
                    "queue {}: no free slot to resubmit head {head}: it stays marked",
                    self.queue
                );
                break;
            };
            let slot = &mut self.slots[idx];
            slot.busy = true;
            slot.started = Some(std::time::Instant::now());
            let descs = chain::at(&*mem, table, size, head);
            let r = slot.req.parse_descs(head, descs, &*mem, capacity, readonly);
            slot.mem = Some(mem.clone());
            // Still marked, with its counter: no second take.
            self.start(idx, r);
        }
        self.ring.submit();
        self.reap();
        self.signal();
        // Completions the previous daemon published may never have been
        // signalled: one interrupt more is harmless.
        if let Err(e) = vring.signal_used_queue() {
            warn!("queue {}: signal used queue: {e}", self.queue);
        }
    }
}
