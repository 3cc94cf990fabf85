//! Whether a driver's available ring can be read at all, checked before a
//! queue is served: the one place the daemons (and the VMM's own control
//! queue) decide that a ring is left alone until its driver repairs it.
//!
//! virtio-queue refuses to walk a ring whose avail index is more than the
//! queue size ahead of the device (it cannot be: the ring holds that many
//! entries) and logs an error for every attempt; a hostile or broken
//! driver could make a worker log at every kick. Callers check first and
//! say so once, within their capped warnings.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::QueueT;
use vm_memory::GuestMemory;

/// Why a queue's available ring cannot be served now.
#[derive(Debug, thiserror::Error)]
pub enum AvailError {
    /// The driver's avail index is more than the queue size ahead of the
    /// device's next entry.
    #[error("avail index {avail} is {ahead} entries ahead of the device (queue size {size})")]
    TooFarAhead { avail: u16, ahead: u16, size: u16 },
    /// The avail index could not be read (the ring is not in guest
    /// memory).
    #[error("available ring unreadable ({0})")]
    Unreadable(virtio_queue::Error),
}

/// The number of entries the driver made available to the device on `q`,
/// or why the ring must be left alone. Reads the avail index once, with
/// the acquire ordering the entries it counts need.
pub fn available<Q: QueueT, M: GuestMemory>(q: &Q, mem: &M) -> Result<u16, AvailError> {
    let avail = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(AvailError::Unreadable)?;
    let ahead = (avail - Wrapping(q.next_avail())).0;
    let size = q.size();
    if ahead > size {
        return Err(AvailError::TooFarAhead {
            avail: avail.0,
            ahead,
            size,
        });
    }
    Ok(ahead)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_queue::{avail_idx, memory, queue, SIZE};
    use crate::Mem;
    use vm_memory::Bytes;

    fn publish(mem: &Mem, idx: u16) {
        mem.write_obj(idx, avail_idx()).unwrap();
    }

    #[test]
    fn up_to_a_ring_ahead_is_available() {
        let (mem, mut q) = (memory(), queue(false));
        assert_eq!(available(&q, &mem).unwrap(), 0);
        publish(&mem, SIZE);
        assert_eq!(available(&q, &mem).unwrap(), SIZE);
        // Counted from the device's position, across the index's wrap.
        q.set_next_avail(u16::MAX - 2);
        publish(&mem, 3);
        assert_eq!(available(&q, &mem).unwrap(), 6);
    }

    #[test]
    fn further_ahead_is_refused_until_repaired() {
        let (mem, mut q) = (memory(), queue(false));
        q.set_next_avail(100);
        publish(&mem, 100 + SIZE + 1);
        match available(&q, &mem) {
            Err(AvailError::TooFarAhead { avail, ahead, size }) => {
                assert_eq!((avail, ahead, size), (109, 9, SIZE))
            }
            other => panic!("{other:?}"),
        }
        let e = available(&q, &mem).unwrap_err().to_string();
        assert_eq!(
            e,
            "avail index 109 is 9 entries ahead of the device (queue size 8)"
        );
        // An index behind the device is as far ahead as it gets.
        publish(&mem, 99);
        assert!(matches!(
            available(&q, &mem),
            Err(AvailError::TooFarAhead {
                ahead: u16::MAX,
                ..
            })
        ));
        publish(&mem, 101);
        assert_eq!(available(&q, &mem).unwrap(), 1);
    }

    #[test]
    fn a_ring_outside_memory_is_unreadable() {
        let (mem, mut q) = (memory(), queue(false));
        q.set_avail_ring_address(Some(0x10_0000), Some(0));
        assert!(matches!(
            available(&q, &mem),
            Err(AvailError::Unreadable(_))
        ));
    }
}
