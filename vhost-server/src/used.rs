//! Returning used entries to a driver and telling it: the used-ring
//! half of a queue that every device here shares. Entries go back one by
//! one (virtio-queue's `add_used`, which counts them for its notification
//! rule) or as a burst with one store of the used index
//! ([`add_used_burst`], which needs its own rule:
//! [`used_notification_needed`]). Either way the driver is interrupted
//! only when it asked to be (EVENT_IDX's used_event, or the avail ring's
//! NO_INTERRUPT flag).

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use log::warn;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::{Mem, Vring};

/// Signals `vring`'s used buffers after entries were added one by one
/// (`Queue::add_used`) since the last call, if the driver wants to hear
/// of them: virtio-queue's rule, which counts those calls (with
/// EVENT_IDX: the driver's used_event lies among them; without, always).
pub fn signal_used(vring: &Vring, mem: &Mem) {
    let needed = vring.get_mut().get_queue_mut().needs_notification(mem);
    if needed.unwrap_or(true) {
        notify(vring);
    }
}

/// Signals `vring`'s used buffers after the last `returned` entries went
/// back through [`add_used_burst`], if the driver wants to hear of them
/// (see [`used_notification_needed`]).
pub fn signal_used_burst(vring: &Vring, mem: &Mem, returned: usize) {
    if returned > 0 && used_notification_needed(vring.get_ref().get_queue(), mem, returned) {
        notify(vring);
    }
}

/// Writes the queue's call eventfd (the frontend's irqfd). A failure is
/// the frontend's (a closed call fd): logged, and the entries stay used.
fn notify(vring: &Vring) {
    if let Err(e) = vring.signal_used_queue() {
        warn!("signal used queue: {e}");
    }
}

/// Returns `heads` to the used ring (length 0) with one store of the used
/// index: virtio-queue's add_used stores it for every chain, and it is a
/// cache line the driver keeps reading.
pub fn add_used_burst(
    q: &mut virtio_queue::Queue,
    mem: &Mem,
    heads: &[u16],
) -> Result<(), virtio_queue::Error> {
    add_used_elems(q, mem, heads.len(), |i| (heads[i], 0))
}

/// Returns `elems` (head, bytes written) to the used ring with one store
/// of the used index: the driver sees all of them or none, e.g. every
/// buffer of a merged receive frame, even if the daemon dies meanwhile.
pub fn add_used_lens(
    q: &mut virtio_queue::Queue,
    mem: &Mem,
    elems: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    add_used_elems(q, mem, elems.len(), |i| elems[i])
}

/// The `n` used elements `elem(0..n)`, published with one store of the
/// used index. The elements before the last are written here (virtio 1.x
/// "The Virtqueue Used Ring": a le32 id and a le32 len each, after the
/// 4-byte flags and idx); the last goes through add_used, whose release
/// store of the index publishes them all.
fn add_used_elems(
    q: &mut virtio_queue::Queue,
    mem: &Mem,
    n: usize,
    elem: impl Fn(usize) -> (u16, u32),
) -> Result<(), virtio_queue::Error> {
    let Some(last) = n.checked_sub(1) else {
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
    for i in 0..last {
        let (head, len) = elem(i);
        if head >= size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let off = 8 * u64::from(next.0 % size);
        let val = (u64::from(head) | u64::from(len) << 32).to_le();
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
    let (head, len) = elem(last);
    q.set_next_used(next.0);
    q.add_used(mem, head, len)
}

/// Whether the driver wants a used-buffer notification now that the last
/// `returned` used entries were added by [`add_used_burst`] (virtio 1.x
/// "Used Buffer Notification Suppression"). virtio-queue's
/// needs_notification cannot decide it: it counts add_used calls, and a
/// burst makes one. With EVENT_IDX, its rule: the driver's used_event lies
/// among the entries just added. Without, the avail ring's NO_INTERRUPT
/// flag (which virtio-queue ignores, and a polling driver sets).
pub fn used_notification_needed(q: &virtio_queue::Queue, mem: &Mem, returned: usize) -> bool {
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
        const NO_INTERRUPT: u16 = VRING_AVAIL_F_NO_INTERRUPT as u16;
        load(0).is_none_or(|flags| flags & NO_INTERRUPT == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_queue::{memory, queue, used_event, AVAIL, DESC, SIZE, USED};
    use std::fs::File;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use vm_memory::GuestMemoryAtomic;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn setup(event_idx: bool) -> (Mem, virtio_queue::Queue) {
        (memory(), queue(event_idx))
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
    fn lengths_go_with_their_heads_and_one_index_store_publishes_them() {
        let (mem, mut q) = setup(false);
        q.set_next_used(SIZE - 1);
        add_used_lens(&mut q, &mem, &[(4, 1500), (6, 7), (2, 0)]).unwrap();
        let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(idx, SIZE + 2);
        assert_eq!(used(&mem, u64::from(SIZE - 1)), (4, 1500));
        assert_eq!(used(&mem, 0), (6, 7));
        assert_eq!(used(&mem, 1), (2, 0));
        // A bad head anywhere: the index does not move.
        assert!(add_used_lens(&mut q, &mem, &[(1, 9), (SIZE, 9), (3, 9)]).is_err());
        let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(idx, SIZE + 2);
    }

    #[test]
    fn notification_follows_used_event_or_the_no_interrupt_flag() {
        let (mem, mut q) = setup(true);
        let used_event = used_event();
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

    /// A vring as the framework sets it up, with its call eventfd.
    fn vring(mem: &Mem, event_idx: bool) -> (Vring, EventFd) {
        let v =
            <Vring as VringT<crate::GM>>::new(GuestMemoryAtomic::new(mem.clone()), SIZE).unwrap();
        v.set_queue_info(DESC, AVAIL, USED).unwrap();
        v.set_queue_size(SIZE);
        v.set_queue_event_idx(event_idx);
        v.set_queue_ready(true);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let fd = call.try_clone().unwrap().into_raw_fd();
        // SAFETY: `fd` was just duplicated for this File, which owns it.
        v.set_call(Some(unsafe { File::from_raw_fd(fd) }));
        (v, call)
    }

    /// Whether the call eventfd was written (and clears it).
    fn signalled(call: &EventFd) -> bool {
        call.read().is_ok()
    }

    #[test]
    fn signal_used_follows_the_entries_added_since_the_last_call() {
        let mem = memory();
        let used_event = used_event();
        let (v, call) = vring(&mem, true);
        let add = |heads: &[u16]| {
            for &h in heads {
                v.get_mut().get_queue_mut().add_used(&mem, h, 0).unwrap();
            }
        };
        // The driver wants to hear once entry 1 is used.
        mem.write_obj(1u16, used_event).unwrap();
        add(&[0]);
        signal_used(&v, &mem);
        assert!(!signalled(&call), "entry 0 only");
        add(&[1, 2]);
        signal_used(&v, &mem);
        assert!(signalled(&call), "entry 1 among the new ones");
        add(&[3]);
        signal_used(&v, &mem);
        assert!(!signalled(&call), "entry 1 was already reported");
        // Nothing new: nothing to say.
        mem.write_obj(3u16, used_event).unwrap();
        signal_used(&v, &mem);
        assert!(!signalled(&call));

        // Without EVENT_IDX every call signals.
        let (v, call) = vring(&mem, false);
        v.get_mut().get_queue_mut().add_used(&mem, 0, 0).unwrap();
        signal_used(&v, &mem);
        assert!(signalled(&call));
    }

    #[test]
    fn signal_used_burst_counts_what_the_burst_returned() {
        let mem = memory();
        let used_event = used_event();
        let (v, call) = vring(&mem, true);
        mem.write_obj(5u16, used_event).unwrap();
        add_used_burst(v.get_mut().get_queue_mut(), &mem, &[0, 1, 2, 3]).unwrap();
        signal_used_burst(&v, &mem, 4);
        assert!(!signalled(&call), "used_event 5 not reached");
        add_used_burst(v.get_mut().get_queue_mut(), &mem, &[4, 5]).unwrap();
        signal_used_burst(&v, &mem, 2);
        assert!(signalled(&call), "used_event 5 among entries 4 and 5");
        signal_used_burst(&v, &mem, 0);
        assert!(!signalled(&call), "nothing returned");

        // Without EVENT_IDX: unless the driver set NO_INTERRUPT.
        let (v, call) = vring(&mem, false);
        add_used_burst(v.get_mut().get_queue_mut(), &mem, &[0]).unwrap();
        signal_used_burst(&v, &mem, 1);
        assert!(signalled(&call));
        mem.write_obj(1u16, GuestAddress(AVAIL)).unwrap();
        add_used_burst(v.get_mut().get_queue_mut(), &mem, &[1]).unwrap();
        signal_used_burst(&v, &mem, 1);
        assert!(!signalled(&call), "NO_INTERRUPT");
    }
}
