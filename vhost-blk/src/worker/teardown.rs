//! Teardown: draining a queue at stop_vring and after a disconnect, and
//! dropping a worker, which never frees what the kernel may still touch.

use log::{error, warn};
use rimg_vhost_server::RingOwner;

use super::Worker;

impl Worker {
    /// stop_vring: completes everything in flight and parked, then
    /// forgets the ring, so that a late completion event (a waker fired by
    /// an allocation this drain waited for) does not touch the stopped
    /// queue. The next kick hands the ring back.
    pub fn stop(&mut self) {
        self.drain_all();
        if self.ring.is_wedged() {
            // The frontend may start the queue again on this connection
            // (a guest reboot): from now on the writes still in the ring
            // must fence their ranges, not hold them.
            self.abandon_writes();
        }
        self.vring = None;
    }

    /// Ends the writes still in a wedged ring (their data may land at
    /// any time): the engine leaks their new clusters or fences the
    /// ranges they may land in, so that nothing waits for them and no
    /// newer write is overtaken. Their epoch guards stay with the slots,
    /// which are never freed under the kernel (see `Drop`).
    fn abandon_writes(&mut self) {
        for op in self.slots.iter_mut().flat_map(|s| s.ops.iter_mut()) {
            if let Some(w) = op.as_mut().and_then(|op| op.wio.take()) {
                w.abandon();
            }
        }
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
            self.ring.submit();
            if self.ring.inflight() == 0 && !self.parked.is_empty() {
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
                self.img
                    .wait_for_allocations(std::time::Duration::from_millis(50));
            }
        }
        self.signal();
    }

    /// Frees the slots of parked requests without answering them (a queue
    /// that stops while they still wait). They hold no allocation and no
    /// I/O in flight; their I/O epochs end.
    fn drop_parked(&mut self) {
        while let Some(idx) = self.parked.pop_front() {
            let slot = &mut self.slots[idx];
            slot.parked = false;
            slot.busy = false;
            slot.mem = None;
            slot.ops.clear();
            slot.epoch = None;
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
        self.ring.submit();
        self.signal();
        self.ring.inflight() > 0 || !self.parked.is_empty()
    }

    /// Waits until this queue has no I/O in flight. False when the ring
    /// cannot be waited on: the worker is then wedged for good, and what
    /// is in flight is never freed (see `Drop`).
    pub(super) fn drain(&mut self) -> bool {
        if self.ring.is_wedged() {
            return false;
        }
        if let Err(e) = self.drain_ring() {
            error!("io_uring wait: {e}: queue {} stops here", self.queue);
        }
        !self.ring.is_wedged()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // In-flight I/O targets guest memory and commits qcow2 metadata:
        // finish it before the ring and the memory go away. The backend
        // drained every queue already (`drain_stopped`); this is the last
        // guard, and never blocks on another queue.
        self.drain();
        if self.ring.inflight() > 0 {
            // Only a wedged ring stops draining early. The kernel may
            // still read or write the iovecs, the guest memory they point
            // into and the ring: the ring leaks itself (WorkerRing's
            // Drop), and the slots are leaked rather than freed under it.
            // Their allocations are abandoned (the new clusters leaked, so
            // a late write lands nowhere that matters) and their epoch
            // guards are leaked with the slots, so nothing they mapped is
            // reused: a leak, never damage.
            error!(
                "queue {}: {} I/Os still in flight: leaking their memory",
                self.queue,
                self.ring.inflight()
            );
            self.abandon_writes();
            self.ring.retire(std::mem::take(&mut self.slots));
        }
        // Otherwise requests still parked hold no allocation; their epoch
        // guards end as the slots drop, or the engine would keep every
        // later free pending.
    }
}
