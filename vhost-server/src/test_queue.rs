//! For the unit tests: a split queue as a driver set it up, its rings at
//! fixed addresses of a small guest memory.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::Mem;

/// Entries of the queue.
pub const SIZE: u16 = 8;
/// Where the descriptor table, the avail ring and the used ring lie.
pub const DESC: u64 = 0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;

/// Guest memory holding the rings: 16 KiB at 0.
pub fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap()
}

/// The queue, ready, with or without EVENT_IDX.
pub fn queue(event_idx: bool) -> Queue {
    let mut q = Queue::new(SIZE).unwrap();
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q
}

/// The driver's avail index.
pub fn avail_idx() -> GuestAddress {
    GuestAddress(AVAIL + 2)
}

/// The driver's used_event (EVENT_IDX), after the avail ring.
pub fn used_event() -> GuestAddress {
    GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE))
}
