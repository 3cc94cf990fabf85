//! The pair's checks of guest chains, on chains built in guest memory
//! with virtio-queue's mock split queue: the walk every chain goes
//! through ([`collect`]), then what TX and RX refuse of a walked chain.

use super::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDesc, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

mod collect;
mod tx_rx;

/// Guest memory: 2 MiB at 0. The mock queue's rings lie below `BUFS`.
const MEM: u64 = 2 << 20;
const QSIZE: u16 = 16;
const BUFS: u64 = 0x1000;
/// Why `collect` refuses a chain.
const CUT_SHORT: &str = "descriptor chain loops, is longer than the queue or has a bad next index";
const OUTSIDE: &str = "address outside guest memory";
const EMPTY: &str = "empty descriptor chain";
/// Two buffers the chains point at, and an indirect table.
const BUF: u64 = 0x10000;
const BUF2: u64 = 0x20000;
const TABLE: u64 = 0x40000;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

fn guest() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDesc::new(addr, len, flags, next))
}

/// A chain linked in order from (address, length, device-writable).
fn linked(descs: &[(u64, u32, bool)]) -> Vec<RawDescriptor> {
    let n = descs.len();
    descs
        .iter()
        .enumerate()
        .map(|(i, &(a, l, w))| {
            let next = if i + 1 < n { NEXT } else { 0 };
            raw(a, l, next | if w { WRITE } else { 0 }, i as u16 + 1)
        })
        .collect()
}

/// Writes an indirect table at `at`.
fn store_table(mem: &Mem, at: u64, table: &[RawDescriptor]) {
    for (i, d) in table.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(at + 16 * i as u64)).unwrap();
    }
}

/// A queue whose descriptor table is `table`, with the chains at `heads`
/// available.
fn queue(mem: &Mem, table: &[RawDescriptor], heads: &[u16]) -> Queue {
    let vq = MockSplitQueue::new(mem, QSIZE);
    assert!(vq.end().0 <= BUFS);
    for (i, d) in table.iter().enumerate() {
        vq.desc_table().store(i as u16, *d).unwrap();
    }
    for (i, &h) in heads.iter().enumerate() {
        vq.avail().ring().ref_at(i).unwrap().store(h);
    }
    vq.avail().idx().store(heads.len() as u16);
    vq.create_queue().unwrap()
}

/// The one chain of a queue whose descriptor table is `table`.
fn pop<'a>(mem: &'a Mem, table: &[RawDescriptor], head: u16) -> DescriptorChain<&'a Mem> {
    let mut q = queue(mem, table, &[head]);
    let chain = q.iter(mem).unwrap().next().expect("a chain");
    chain
}

/// Guest memory outside the rings (which the device may write).
fn buffers(mem: &Mem) -> Vec<u8> {
    let mut v = vec![0u8; (MEM - BUFS) as usize];
    mem.read_slice(&mut v, GuestAddress(BUFS)).unwrap();
    v
}
