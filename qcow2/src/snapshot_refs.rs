//! How taking a snapshot fails on a data cluster mapped past the end of
//! the file, as qemu-img fails.
//!
//! QEMU raises the refcount of every cluster the snapshot shares. For a
//! cluster past the end of the file whose refcount block does not exist,
//! it first has to allocate that block: when even the grown refcount
//! table would be over its limit this fails with EFBIG, otherwise the
//! allocation asks the caller to retry (EAGAIN), which snapshot creation
//! reports as its failure. Scripts (iotest 080) read those errnos. rimg
//! fails the same way before changing anything; the image is not corrupt
//! in that case (QEMU leaves it usable), so it is not marked.

use crate::error::Error;
use crate::refcount::Refcounts;

/// QEMU's limit on the refcount table, in entries and refcount blocks.
const MAX_REFTABLE_ENTRIES: u64 = 8 << 20;

/// The error taking a snapshot meets for the cluster at host offset
/// `off` past the end of the file, or `None` where its refcount block
/// exists (QEMU would count a reference to a cluster that is not there;
/// rimg refuses that as corruption).
pub(crate) fn past_eof_error(rc: &Refcounts, cluster_bits: u32, off: u64) -> Option<Error> {
    let per_block = (1u64 << (cluster_bits + 3)) / rc.max_refcount().count_ones().max(1) as u64;
    let index = (off >> cluster_bits) / per_block;
    match rc.table().get(index as usize) {
        Some(&e) if e & !511 != 0 => None,
        Some(_) => Some(errno(libc::EAGAIN, "allocating a refcount block")),
        None => {
            // The table must grow to index + 1 blocks, with QEMU's half
            // again of headroom.
            let blocks = index + 1;
            if blocks > MAX_REFTABLE_ENTRIES || blocks + blocks.div_ceil(2) > MAX_REFTABLE_ENTRIES {
                Some(Error::TooLarge(format!(
                    "a refcount table for the cluster at {off:#x}"
                )))
            } else {
                Some(errno(libc::EAGAIN, "growing the refcount table"))
            }
        }
    }
}

fn errno(code: i32, context: &str) -> Error {
    Error::Io {
        context: context.into(),
        source: std::io::Error::from_raw_os_error(code),
    }
}
