//! The pair's view of a virtqueue's descriptors: chains walked and
//! checked before use, their buffers prefetched and read. (Used entries
//! go back through `rimg_vhost_server::used`.)

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

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
