//! The pair's view of a virtqueue: chains walked and checked before use,
//! used entries returned in bursts, and the notification rule for them.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use rimg_vhost_server::Mem;

/// One descriptor of a chain: guest address, length, device-writable.
#[derive(Clone, Copy)]
pub(super) struct Seg {
    pub(super) addr: GuestAddress,
    pub(super) len: u32,
    pub(super) write: bool,
}

/// Walks `chain` into `out`, refusing what the device must not use: a
/// chain cut short by the walk's bound (a loop, more descriptors than the
/// queue or indirect table holds, a next index past the table, over 4 GiB
/// in all), an empty one (e.g. an indirect table outside guest memory),
/// and descriptors not wholly inside guest memory. Nothing is read from or
/// written to the buffers; their first `prefetch_budget` bytes are
/// prefetched.
pub(super) fn collect<M: std::ops::Deref<Target = Mem>>(
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
pub(super) fn add_used_burst(
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
pub(super) fn used_notification_needed(
    q: &virtio_queue::Queue,
    mem: &Mem,
    returned: usize,
) -> bool {
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

/// Asks the CPU to start loading the cache lines of the `len` bytes at
/// `p`.
pub(super) fn prefetch(p: *const u8, len: usize) {
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
pub(super) fn read_guest(
    mem: &Mem,
    addr: GuestAddress,
    buf: &mut [u8],
) -> Result<(), &'static str> {
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
