//! A snapshot's L1 table is checked where it is used, not at open.
//!
//! QEMU opens images whose snapshot table names an L1 table with an
//! invalid offset or size, and fails only the operations that use that
//! table (apply, delete, a downgrade's zero expansion), with its
//! qcow2_validate_table wording; `check` reports the entry as corrupt.
//! Scripts (iotest 080) read those lines, so rimg checks in the same
//! places. Users that only need the table's byte range (the overlap map,
//! check's walk) skip an entry that has a problem.

use crate::error::{Error, Result};
use crate::header::MAX_L1_BYTES;
use crate::snapshot::Snapshot;

pub use crate::error::L1Problem;

impl Snapshot {
    /// The problem with this snapshot's L1 table reference, checked in
    /// QEMU's order (size first).
    pub fn l1_problem(&self, cluster_size: u64) -> Option<L1Problem> {
        if self.l1_size as u64 > MAX_L1_BYTES / 8 {
            return Some(L1Problem::TooLarge);
        }
        let end = self.l1_table_offset.checked_add(self.l1_size as u64 * 8);
        if end.is_none_or(|e| e > i64::MAX as u64)
            || !self.l1_table_offset.is_multiple_of(cluster_size)
        {
            return Some(L1Problem::BadOffset);
        }
        None
    }

    /// Fails with the problem, if any (before the table is used).
    pub fn check_l1(&self, cluster_size: u64) -> Result<()> {
        match self.l1_problem(cluster_size) {
            Some(p) => Err(Error::SnapshotL1(p)),
            None => Ok(()),
        }
    }

    /// The L1 table's byte range, where its size and end are valid (an
    /// unaligned table still has one, for the overlap checks).
    pub fn l1_range(&self) -> Option<(u64, u64)> {
        let len = self.l1_size as u64 * 8;
        (len <= MAX_L1_BYTES
            && self
                .l1_table_offset
                .checked_add(len)
                .is_some_and(|e| e <= i64::MAX as u64))
        .then_some((self.l1_table_offset, len))
    }

    /// check's line for a problem (QEMU's wording), naming the entry.
    pub(crate) fn l1_check_message(&self, p: L1Problem) -> String {
        let (id, name) = (&self.id, &self.name);
        match p {
            L1Problem::TooLarge => format!(
                "ERROR snapshot {id} ({name}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                self.l1_size
            ),
            L1Problem::BadOffset => format!(
                "ERROR snapshot {id} ({name}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                self.l1_table_offset
            ),
        }
    }
}

impl crate::qcow::Qcow2 {
    /// Reverts the disk to an internal snapshot as `qemu-img snapshot -a`
    /// does: the snapshot's L1 table is checked first, and a snapshot
    /// taken at another disk size first gives the disk that size back
    /// (iotest 061).
    pub fn snapshot_goto(&self, key: &str) -> Result<()> {
        use crate::image::Image;
        let snaps = self.snapshots();
        if let Some((_, sn)) = Snapshot::find(&snaps, key) {
            sn.check_l1(self.cluster_size())?;
            if let Some(size) = sn.disk_size.filter(|&s| s != self.size()) {
                self.resize(size)?;
            }
        }
        self.snapshot_apply(key)
    }
}
