//! The walk over the metadata that counts the references to each host
//! cluster and finds the entries that cannot be used as they are.

use super::{CheckReport, MAX_CHECK_CLUSTERS};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::l2::{CompressedGeometry, L2Entry, COPIED, OFFSET_MASK, ZERO};
use crate::qcow::{MetaCtx, Qcow2};
use crate::snapshot::Snapshot;
use crate::storage::Storage;

/// An active-L1 or active-L2 entry that cannot be used as it is.
#[derive(Debug, Clone, Copy)]
pub(super) enum BadEntry {
    /// L1 index whose L2 table offset is unaligned or past the end.
    L1(usize),
    /// (L2 table offset, index) of a data cluster entry that is unaligned
    /// or points past the end of the file.
    L2(u64, usize),
}

/// What the metadata uses a host cluster for. One kind may reference a
/// cluster several times (snapshots share L2 tables and data clusters);
/// two kinds never may. A count alone cannot see that: an L2 table that
/// is also a data cluster has refcount 2 and two references, and a guest
/// write would then rewrite the table through the data mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Use {
    Free,
    Data,
    L2,
    /// Header, L1 tables, snapshot table, refcount table and blocks.
    Meta,
}

/// Reference counts computed from the metadata, one per host cluster.
pub(crate) struct Walk<'r> {
    pub(crate) counts: Vec<u32>,
    /// Strongest use of each cluster (see [`Use`]), marked before counting
    /// so that the order of the walk does not matter.
    pub(super) uses: Vec<Use>,
    pub(super) cluster_bits: u32,
    pub(super) report: &'r mut CheckReport,
    pub(super) bad: Vec<BadEntry>,
    /// Where the next data cluster would be if the image were not
    /// fragmented (active L1 only).
    pub(super) next_contiguous: u64,
    /// Data clusters live in an external data file: they have no
    /// refcounts in the image file.
    pub(super) data_file: bool,
    /// L2 entries are 16 bytes, with a subcluster bitmap.
    pub(super) extl2: bool,
    /// Largest refcount the image's width can hold; references past it
    /// are reported and not counted.
    pub(super) max: u32,
    /// How many references were past `max`.
    pub(super) overflows: u64,
    /// Length of the image file.
    pub(super) file_len: u64,
    /// `check -r all`: entries QEMU repairs during the walk itself are
    /// repaired here too (see [`Walk::misaligned`]).
    pub(super) fix_errors: bool,
    /// Corruptions that no repair touches (misaligned data clusters,
    /// compressed entries with a subcluster bitmap or a data file): they
    /// alone do not send `check -r all` to rimg's entry repair.
    pub(super) unfixable: u64,
    /// Entries were rewritten on disk: cached L2 tables are stale.
    pub(super) rewrote: bool,
}

impl Walk<'_> {
    /// Marks the clusters of [off, off + len) as used for `u` at least;
    /// ranges past the end are reported when counted, not here.
    fn mark(&mut self, off: u64, len: u64, u: Use) {
        if len == 0 {
            return;
        }
        let n = self.uses.len() as u64;
        let first = (off >> self.cluster_bits).min(n);
        let end = off
            .checked_add(len - 1)
            .map_or(n, |e| ((e >> self.cluster_bits) + 1).min(n));
        for c in first..end {
            let m = &mut self.uses[c as usize];
            *m = (*m).max(u);
        }
    }

    /// Marks the L2 tables an L1 table names.
    fn mark_l2_tables(&mut self, l1: &[u64]) {
        for (_, e) in crate::l2::nonzero_entries(l1) {
            let off = e & OFFSET_MASK;
            if off != 0 {
                self.mark(off, 1, Use::L2);
            }
        }
    }

    /// Whether the cluster at `off` is used for something stronger than
    /// `u` (an L2 table or data cluster overlapping other metadata).
    fn overlaps(&self, off: u64, u: Use) -> bool {
        self.uses
            .get((off >> self.cluster_bits) as usize)
            .is_some_and(|&m| m > u)
    }

    /// Counts one reference to every cluster of [off, off + len).
    /// Returns false (and reports a corruption) if it lies past the end.
    pub(super) fn add(&mut self, off: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let first = off >> self.cluster_bits;
        // A range ending past 2^64 (a refcount table entry near the top,
        // say) is past the end of any file.
        let last = off
            .checked_add(len - 1)
            .map_or(u64::MAX, |e| e >> self.cluster_bits);
        // As qemu-img: a range ending less than a cluster past the end of
        // the file is counted (the file may end mid-cluster).
        // Judged per range, not by what earlier ranges made countable.
        let past_end = off
            .checked_add(len)
            .map_or(u64::MAX, |e| e.saturating_sub(self.file_len));
        if past_end >= 1 << self.cluster_bits {
            self.report.corruptions += 1;
            self.report.messages.push(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
            ));
            return false;
        }
        if last >= self.counts.len() as u64 {
            self.counts.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            if self.counts[c as usize] >= self.max {
                self.overflows += 1;
                self.report.corruptions += 1;
                self.report.messages.push(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    c << self.cluster_bits
                ));
                self.report.messages.push(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing".into(),
                );
                continue;
            }
            self.counts[c as usize] += 1;
        }
        true
    }

    /// A data cluster entry whose offset is not cluster aligned, handled
    /// as qemu-img does: one that holds no data (preallocated zeros) is
    /// repaired on the spot by `-r all` (becoming a zero entry; returns
    /// true: nothing to count); one that holds data cannot be repaired
    /// and stays an error, its (misaligned) range counted as referenced.
    fn misaligned(
        &mut self,
        st: &Storage,
        l2off: u64,
        k: usize,
        host: u64,
        data: bool,
        bitmap: u64,
    ) -> Result<bool> {
        self.report.corruptions += 1;
        if data {
            self.unfixable += 1;
            self.report.messages.push(format!(
                "ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted."
            ));
            return Ok(false);
        }
        let what = if self.fix_errors {
            "Repairing"
        } else {
            "ERROR"
        };
        self.report.messages.push(format!(
            "{what} offset={host:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
        ));
        if !self.fix_errors {
            self.unfixable += 1;
            return Ok(false);
        }
        if self.extl2 {
            // Subclusters that were allocated read as zeros now.
            let zeros = (bitmap | bitmap << 32) & (0xffff_ffffu64 << 32);
            let mut e = [0u8; 16];
            e[8..].copy_from_slice(&zeros.to_be_bytes());
            st.write_at(&e, l2off + k as u64 * 16)?;
        } else {
            st.write_at(&ZERO.to_be_bytes(), l2off + k as u64 * 8)?;
        }
        st.sync()?;
        self.rewrote = true;
        self.report.corruptions -= 1;
        self.report.corruptions_fixed += 1;
        Ok(true)
    }

    /// Counts the L2 tables and data clusters under one L1 table.
    fn l1(&mut self, st: &Storage, l1: &[u64], active: bool, l2buf: &mut Vec<u8>) -> Result<()> {
        let cs = 1u64 << self.cluster_bits;
        let g = CompressedGeometry::new(self.cluster_bits);
        for (i, e) in crate::l2::nonzero_entries(l1) {
            let l2off = e & OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            if l2off & (cs - 1) != 0 {
                self.report.corruptions += 1;
                self.report.messages.push(format!(
                    "ERROR l2_offset={l2off:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                if active {
                    self.bad.push(BadEntry::L1(i));
                }
                continue;
            }
            if !self.add(l2off, cs) {
                if active {
                    self.bad.push(BadEntry::L1(i));
                }
                continue;
            }
            if self.overlaps(l2off, Use::L2) {
                self.report.corruptions += 1;
                self.report.messages.push(format!(
                    "ERROR l2_offset={l2off:x}: Table overlaps other metadata; L1 entry corrupted"
                ));
                if active {
                    self.bad.push(BadEntry::L1(i));
                }
                continue;
            }
            // Made at the first table: most hostile images have none, and
            // a 2 MiB cluster zeroed for nothing was a tenth of their check.
            l2buf.resize(cs as usize, 0);
            st.read_at(l2buf, l2off)?;
            // Fragmentation is counted within each L2 table, as QEMU does.
            self.next_contiguous = 0;
            let stride = if self.extl2 { 16 } else { 8 };
            for (k, raw) in l2buf.chunks_exact(stride).enumerate() {
                // Extended L2 entries (qcow2.rst, "Extended L2 Entries"):
                // a subcluster bitmap follows, and bit 0 is no zero flag.
                let bitmap = if self.extl2 {
                    u64::from_be_bytes(raw[8..16].try_into().unwrap())
                } else {
                    0
                };
                let raw = u64::from_be_bytes(raw[..8].try_into().unwrap());
                let raw = if self.extl2 {
                    crate::l2::strip_ext_zero(raw)
                } else {
                    raw
                };
                let entry = L2Entry::decode_in(raw, g, self.data_file);
                match entry {
                    L2Entry::Unallocated | L2Entry::Zero { host: None, .. } => {
                        if bitmap & 0xffff_ffff != 0 {
                            self.report.corruptions += 1;
                            self.report.messages.push(
                                "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                    .into(),
                            );
                        }
                    }
                    L2Entry::Normal { host, .. }
                    | L2Entry::Zero {
                        host: Some(host), ..
                    } => {
                        // Statistics first, as qemu-img counts them.
                        if active {
                            self.report.allocated_clusters += 1;
                            if self.next_contiguous != 0 && host != self.next_contiguous {
                                self.report.fragmented_clusters += 1;
                            }
                            self.next_contiguous = host + cs;
                        }
                        if (bitmap >> 32) & bitmap != 0 {
                            self.report.corruptions += 1;
                            self.report.messages.push(format!(
                                "ERROR offset={host:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                            ));
                        }
                        if self.data_file {
                            continue;
                        }
                        if host & (cs - 1) != 0 {
                            let data = if self.extl2 {
                                bitmap & 0xffff_ffff != 0
                            } else {
                                matches!(entry, L2Entry::Normal { .. })
                            };
                            if self.misaligned(st, l2off, k, host, data, bitmap)? {
                                continue;
                            }
                        }
                        if !self.add(host, cs) {
                            if active {
                                self.bad.push(BadEntry::L2(l2off, k));
                            }
                            continue;
                        }
                        if self.overlaps(host, Use::Data) {
                            self.report.corruptions += 1;
                            self.report.messages.push(format!(
                                "ERROR offset={host:x}: Data cluster overlaps metadata; L2 entry corrupted"
                            ));
                            if active {
                                self.bad.push(BadEntry::L2(l2off, k));
                            }
                        }
                    }
                    L2Entry::Compressed { offset, len, .. } => {
                        if raw & COPIED != 0 {
                            self.report.corruptions += 1;
                            self.report.messages.push(format!(
                                "ERROR: coffset={offset:#x}: copied flag must never be set for compressed clusters"
                            ));
                        }
                        if self.data_file {
                            self.report.corruptions += 1;
                            self.report.messages.push(format!(
                                "ERROR compressed cluster {k} with data file, entry={:#x}",
                                raw & !COPIED
                            ));
                            // Reported, never repaired (as in QEMU); the
                            // walk goes on with the next entry.
                            self.unfixable += 1;
                            continue;
                        }
                        if bitmap != 0 {
                            self.report.corruptions += 1;
                            self.report.messages.push(format!(
                                "ERROR compressed cluster {k} with non-zero subcluster allocation bitmap, entry={raw:#x}"
                            ));
                            // Reported, never repaired (as in QEMU, which
                            // repairs the rest around it).
                            self.unfixable += 1;
                            continue;
                        }
                        // The exact stored range, as qemu-img reports it;
                        // it covers the same clusters as the sector-aligned one.
                        let counted = self.add(offset, len);
                        if active {
                            // Counted even when the data lies past the end,
                            // as qemu-img does.
                            self.report.allocated_clusters += 1;
                            self.report.compressed_clusters += 1;
                            // Compressed clusters are fragmented by nature.
                            self.report.fragmented_clusters += 1;
                            if !counted {
                                self.bad.push(BadEntry::L2(l2off, k));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Counts every reference to every host cluster except those from the
/// refcount structures themselves; problems go into `report`.
pub(crate) fn walk<'r>(
    q: &Qcow2,
    ctx: &MetaCtx<'_>,
    report: &'r mut CheckReport,
    fix_errors: bool,
) -> Result<Walk<'r>> {
    let st = q.storage();
    let cb = ctx.header.cluster_bits;
    let cs = 1u64 << cb;
    let clusters = st.len()?.div_ceil(cs);
    if clusters > MAX_CHECK_CLUSTERS {
        return Err(Error::TooLarge(format!(
            "{clusters} host clusters to check"
        )));
    }
    let mut w = Walk {
        counts: vec![0; clusters as usize],
        uses: vec![Use::Free; clusters as usize],
        cluster_bits: cb,
        report,
        bad: Vec::new(),
        next_contiguous: 0,
        data_file: ctx.header.has_data_file(),
        extl2: ctx.header.extended_l2(),
        max: ctx.rc.max_refcount().min(u32::MAX as u64) as u32,
        overflows: 0,
        file_len: st.len()?,
        fix_errors,
        unfixable: 0,
        rewrote: false,
    };
    // Every cluster's use first: metadata, then L2 tables of every L1.
    w.mark(0, cs, Use::Meta);
    w.mark(
        ctx.header.l1_table_offset,
        ctx.l1.len() as u64 * 8,
        Use::Meta,
    );
    if !ctx.snapshots.is_empty() {
        w.mark(
            ctx.header.snapshots_offset,
            ctx.snapshot_table_bytes,
            Use::Meta,
        );
    }
    w.mark(
        ctx.rc.table_offset(),
        ctx.rc.table_clusters() * cs,
        Use::Meta,
    );
    // An entry with reserved bits set names no block (reported with the
    // blocks, as qemu-img does).
    for (_, e) in crate::l2::nonzero_entries(ctx.rc.table()) {
        let b = e & !511;
        if e & 511 == 0 && b != 0 && b & (cs - 1) == 0 {
            w.mark(b, cs, Use::Meta);
        }
    }
    // Entries whose L1 table is invalid are reported below, not walked.
    let snapshots: Vec<&Snapshot> = ctx
        .snapshots
        .iter()
        .filter(|s| s.l1_problem(cs).is_none())
        .collect();
    for s in &snapshots {
        w.mark(s.l1_table_offset, s.l1_size as u64 * 8, Use::Meta);
    }
    if let Some((off, len)) = ctx.header.crypto_area() {
        w.mark(off, len, Use::Meta);
    }
    // Persistent bitmaps: directory, tables and data are metadata.
    let (bitmap_refs, bitmap_errs) = crate::bitmap::track::references(st, ctx.header)?;
    for &(off, len) in &bitmap_refs {
        w.mark(off, len, Use::Meta);
    }
    w.mark_l2_tables(ctx.l1);
    for s in &snapshots {
        if s.l1_table_offset >> cb < clusters {
            w.mark_l2_tables(&crate::l2::read_l1_in_file(
                st,
                w.file_len,
                s.l1_table_offset,
                s.l1_size,
            )?);
        }
    }
    let mut l2buf = Vec::new();
    w.add(0, cs);
    w.add(ctx.header.l1_table_offset, ctx.l1.len() as u64 * 8);
    if let Some((off, len)) = ctx.header.crypto_area() {
        w.add(off, len);
    }
    w.l1(st, ctx.l1, true, &mut l2buf)?;
    if !ctx.snapshots.is_empty() {
        w.add(ctx.header.snapshots_offset, ctx.snapshot_table_bytes);
    }
    for s in ctx.snapshots {
        if let Some(p) = s.l1_problem(cs) {
            w.report.corruptions += 1;
            w.report.messages.push(s.l1_check_message(p));
            // No repair rewrites the entry (qemu-img's neither).
            w.unfixable += 1;
            continue;
        }
        if !w.add(s.l1_table_offset, s.l1_size as u64 * 8) {
            continue;
        }
        let l1 = crate::l2::read_l1_in_file(st, w.file_len, s.l1_table_offset, s.l1_size)?;
        w.l1(st, &l1, false, &mut l2buf)?;
    }
    for &(off, len) in &bitmap_refs {
        // As in qemu-img, bitmap structures past the end of the file are
        // reported, not a reason to rebuild the refcounts.
        if !w.add(off, len) {
            w.unfixable += 1;
        }
    }
    w.report.corruptions += bitmap_errs.len() as u64;
    w.report.messages.extend(bitmap_errs);
    Ok(w)
}
