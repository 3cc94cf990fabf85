//! A descriptor chain read from its head index, for requests a daemon
//! resubmits from an inflight region (virtio-queue 0.18 builds chains
//! only from the avail ring: `DescriptorChain::new` is crate-private).
//! The walk has the same bounds as virtio-queue's: at most the queue's
//! size of descriptors per table, one level of indirection (a table of
//! whole descriptors, at most 65535 of them), at most 2^32 bytes, and it
//! ends quietly on a descriptor it cannot read or follow; a descriptor
//! that still says NEXT then tells the caller the chain was cut short.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

const DESC_LEN: u64 = 16;

/// The chain starting at descriptor `head` of the table at `table`, in a
/// queue of `size` entries.
pub fn at<M: GuestMemory>(mem: &M, table: u64, size: u16, head: u16) -> Chain<'_, M> {
    Chain {
        mem,
        table: GuestAddress(table),
        size,
        next: head,
        ttl: size,
        indirect: false,
        bytes: 0,
    }
}

/// The descriptors of a chain, in order.
pub struct Chain<'a, M> {
    mem: &'a M,
    table: GuestAddress,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<M: GuestMemory> Chain<'_, M> {
    /// Continues in the indirect table `d` points at; false if it cannot.
    fn enter_indirect(&mut self, d: &Descriptor) -> bool {
        let n = u64::from(d.len()) / DESC_LEN;
        if self.indirect || u64::from(d.len()) % DESC_LEN != 0 || n > u64::from(u16::MAX) {
            return false;
        }
        self.table = GuestAddress(d.addr().raw_value());
        self.size = n as u16;
        self.next = 0;
        self.ttl = self.size;
        self.indirect = true;
        true
    }
}

impl<M: GuestMemory> Iterator for Chain<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.size {
                return None;
            }
            let at = self.table.checked_add(u64::from(self.next) * DESC_LEN)?;
            let d: Descriptor = self.mem.read_obj(at).ok()?;
            if d.refers_to_indirect_table() {
                if !self.enter_indirect(&d) {
                    return None;
                }
                continue;
            }
            self.bytes = self.bytes.checked_add(d.len())?;
            if d.has_next() {
                self.next = d.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::test_queue::{self, AVAIL, DESC, SIZE};

    /// Indirect tables live here, 16 entries each.
    const INDIRECT: u64 = 0x3000;

    fn random_desc(rng: &mut rand::rngs::StdRng) -> [u8; 16] {
        let mut b = [0u8; 16];
        let addr = if rng.random_bool(0.1) {
            rng.random::<u64>()
        } else {
            rng.random_range(0..0x4000u64)
        };
        let len: u32 = match rng.random_range(0..10) {
            0 => u32::MAX - rng.random_range(0..4),
            1..=3 => 16 * rng.random_range(0..5),
            _ => rng.random_range(0..0x1000),
        };
        let mut flags: u16 = rng.random_range(0..4);
        if rng.random_bool(0.15) {
            flags |= 4;
        }
        let next: u16 = rng.random_range(0..SIZE + 2);
        let addr = if flags & 4 != 0 && rng.random_bool(0.7) {
            INDIRECT + 0x100 * rng.random_range(0..4u64)
        } else {
            addr
        };
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        b
    }

    fn fields(d: &Descriptor) -> (u64, u32, u16, u16) {
        (d.addr().raw_value(), d.len(), d.flags(), d.next())
    }

    /// The same descriptors as virtio-queue's own walk from the avail
    /// ring, on random tables (loops, bad indexes, indirect tables, huge
    /// lengths included).
    #[test]
    fn walks_as_virtio_queue_does() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..3000 {
            let mem = test_queue::memory();
            for i in 0..SIZE {
                mem.write_slice(
                    &random_desc(&mut rng),
                    GuestAddress(DESC + 16 * u64::from(i)),
                )
                .unwrap();
            }
            for i in 0..64u64 {
                mem.write_slice(&random_desc(&mut rng), GuestAddress(INDIRECT + 16 * i))
                    .unwrap();
            }
            let head = rng.random_range(0..SIZE);
            let mut q = test_queue::queue(false);
            mem.write_obj(head, GuestAddress(AVAIL + 4)).unwrap();
            mem.write_obj(1u16, test_queue::avail_idx()).unwrap();
            let theirs: Vec<_> = q
                .pop_descriptor_chain(&mem)
                .expect("a chain")
                .map(|d| fields(&d))
                .collect();
            let ours: Vec<_> = at(&mem, DESC, SIZE, head).map(|d| fields(&d)).collect();
            assert_eq!(ours, theirs, "round {round}, head {head}");
        }
    }
}
