//! Consistency: counting every reference in an image and comparing the
//! counts with the stored refcounts, as `check` (and `check -r`) does;
//! the rebuild of the refcount structures is in `rebuild`.

use crate::error::{Error, Result};
use crate::header::{field, incompat};
use crate::image::Image;
use crate::l2::{CompressedGeometry, L2Entry, COPIED, OFFSET_MASK, ZERO};
use crate::qcow::{MetaCtx, Qcow2};
use crate::rebuild::{rebuild_refcounts, write_rebuilt_laid_out};
use crate::snapshot::Snapshot;
use crate::storage::Storage;

/// Largest number of host clusters a check or rebuild will count (the
/// count array is 4 bytes per cluster: at most 1 GiB of memory).
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 28;

/// How much `check` may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Report only.
    None,
    /// Lower refcounts that are too high (leaks).
    Leaks,
    /// Everything: invalid entries, refcounts (rebuilt), COPIED flags.
    All,
}

/// What a check found, in qemu-img check's terms.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems that may lose data: refcounts too low, invalid entries,
    /// wrong COPIED flags.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Problems that stopped parts of the check.
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    /// One line per problem (and per repair), as qemu-img prints them.
    pub messages: Vec<String>,
    pub allocated_clusters: u64,
    pub total_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    pub image_end_offset: u64,
}

/// An active-L1 or active-L2 entry that cannot be used as it is.
#[derive(Debug, Clone, Copy)]
enum BadEntry {
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
enum Use {
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
    uses: Vec<Use>,
    cluster_bits: u32,
    report: &'r mut CheckReport,
    bad: Vec<BadEntry>,
    /// Where the next data cluster would be if the image were not
    /// fragmented (active L1 only).
    next_contiguous: u64,
    /// Data clusters live in an external data file: they have no
    /// refcounts in the image file.
    data_file: bool,
    /// L2 entries are 16 bytes, with a subcluster bitmap.
    extl2: bool,
    /// Largest refcount the image's width can hold; references past it
    /// are reported and not counted.
    max: u32,
    /// How many references were past `max`.
    overflows: u64,
    /// Length of the image file.
    file_len: u64,
    /// `check -r all`: entries QEMU repairs during the walk itself are
    /// repaired here too (see [`Walk::misaligned`]).
    fix_errors: bool,
    /// Corruptions that no repair touches (misaligned data clusters):
    /// they alone do not send `check -r all` to rimg's entry repair.
    unfixable: u64,
    /// Entries were rewritten on disk: cached L2 tables are stale.
    rewrote: bool,
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
        for &e in l1 {
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
    fn add(&mut self, off: u64, len: u64) -> bool {
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
        let past_end = off
            .checked_add(len)
            .map_or(u64::MAX, |e| e.saturating_sub(self.file_len));
        if past_end < 1 << self.cluster_bits && last >= self.counts.len() as u64 {
            self.counts.resize(last as usize + 1, 0);
        }
        if last >= self.counts.len() as u64 {
            self.report.corruptions += 1;
            self.report.messages.push(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
            ));
            return false;
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
    fn l1(&mut self, st: &Storage, l1: &[u64], active: bool, l2buf: &mut [u8]) -> Result<()> {
        let cs = 1u64 << self.cluster_bits;
        let g = CompressedGeometry::new(self.cluster_bits);
        for (i, &e) in l1.iter().enumerate() {
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
                    L2Entry::Compressed { .. } if self.data_file => {
                        self.report.corruptions += 1;
                        self.report.messages.push(format!(
                            "ERROR compressed cluster {k} with data file, entry={raw:#x}"
                        ));
                        break;
                    }
                    L2Entry::Compressed {
                        offset, sectors, ..
                    } => {
                        if raw & COPIED != 0 {
                            self.report.corruptions += 1;
                            self.report.messages.push(format!(
                                "ERROR: coffset={offset:#x}: Compressed cluster entry has QCOW_OFLAG_COPIED flag set"
                            ));
                        }
                        if bitmap != 0 {
                            self.report.corruptions += 1;
                            self.report.messages.push(format!(
                                "ERROR compressed cluster {k} with non-zero subcluster allocation bitmap, entry={raw:#x}"
                            ));
                            continue;
                        }
                        if !self.add(offset & !511, sectors * 512) {
                            if active {
                                self.bad.push(BadEntry::L2(l2off, k));
                            }
                            continue;
                        }
                        if active {
                            self.report.allocated_clusters += 1;
                            self.report.compressed_clusters += 1;
                            // Compressed clusters are fragmented by nature.
                            self.report.fragmented_clusters += 1;
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
    for &e in ctx.rc.table() {
        let b = e & !511;
        if b != 0 && b & (cs - 1) == 0 {
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
            w.mark_l2_tables(&crate::l2::read_l1(st, s.l1_table_offset, s.l1_size)?);
        }
    }
    let mut l2buf = vec![0u8; cs as usize];
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
        let l1 = crate::l2::read_l1(st, s.l1_table_offset, s.l1_size)?;
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

/// References to every host cluster, those from the refcount structures
/// included, and the active entries that cannot be used as they are.
fn count_refs(
    q: &Qcow2,
    ctx: &mut MetaCtx<'_>,
    rep: &mut CheckReport,
    fix_errors: bool,
) -> Result<Counted> {
    let cs = 1u64 << ctx.header.cluster_bits;
    let w = walk(q, ctx, rep, fix_errors)?;
    let (counts, bad, max, overflows, file_len) = (w.counts, w.bad, w.max, w.overflows, w.file_len);
    let unfixable = w.unfixable;
    if w.rewrote {
        ctx.drop_l2_cache();
    }
    let mut extra = Walk {
        counts,
        uses: Vec::new(),
        cluster_bits: ctx.header.cluster_bits,
        report: rep,
        bad: Vec::new(),
        next_contiguous: 0,
        data_file: ctx.header.has_data_file(),
        extl2: ctx.header.extended_l2(),
        max,
        overflows,
        file_len,
        fix_errors: false,
        unfixable: 0,
        rewrote: false,
    };
    extra.add(ctx.rc.table_offset(), ctx.rc.table_clusters() * cs);
    let blocks: Vec<(usize, u64)> = ctx
        .rc
        .table()
        .iter()
        .enumerate()
        .map(|(i, e)| (i, e & !511))
        .filter(|&(_, o)| o != 0)
        .collect();
    for (i, b) in blocks {
        if b & (cs - 1) != 0 {
            extra.report.corruptions += 1;
            extra.report.messages.push(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            continue;
        }
        extra.add(b, cs);
    }
    Ok(Counted {
        counts: extra.counts,
        bad,
        overflows: extra.overflows,
        unfixable,
    })
}

/// What [`count_refs`] found.
struct Counted {
    counts: Vec<u32>,
    bad: Vec<BadEntry>,
    /// References past the largest refcount (reported, not counted);
    /// no repair fixes those, a wider refcount does.
    overflows: u64,
    /// Misaligned data clusters, which no repair changes.
    unfixable: u64,
}

/// What comparing stored refcounts with references found.
struct Compared {
    /// A referenced cluster has refcount 0: only a rebuild can fix that.
    rebuild: bool,
    highest: u64,
}

/// Compares stored refcounts with `counts`, reporting each mismatch and
/// correcting (one cluster at a time) what `fix` allows: leaks for
/// `Leaks`, also too-low refcounts for `All`. A stored refcount of 0 is
/// never corrected here; it asks for a rebuild.
fn compare(
    q: &Qcow2,
    ctx: &mut MetaCtx<'_>,
    counts: &[u32],
    rep: &mut CheckReport,
    fix: Repair,
) -> Result<Compared> {
    let st = q.storage();
    let cs = 1u64 << ctx.header.cluster_bits;
    let mut out = Compared {
        rebuild: false,
        highest: 0,
    };
    let mut changed = false;
    for (c, &want) in counts.iter().enumerate() {
        let c = c as u64;
        let want = want as u64;
        let have = ctx.rc.get(st, c)?;
        if have > 0 || want > 0 {
            out.highest = c;
        }
        if have == want {
            continue;
        }
        let fixable = if have == 0 {
            out.rebuild = true;
            false
        } else if have > want {
            fix != Repair::None
        } else {
            fix == Repair::All
        };
        let what = if fixable {
            "Repairing"
        } else if have < want {
            "ERROR"
        } else {
            "Leaked"
        };
        rep.messages.push(format!(
            "{what} cluster {c} refcount={have} reference={want}"
        ));
        if fixable {
            let delta = want as i64 - have as i64;
            ctx.rc.update_range(st, c * cs, cs, delta, |_| {})?;
            changed = true;
            if have > want {
                rep.leaks_fixed += 1;
            } else {
                rep.corruptions_fixed += 1;
            }
        } else if have < want {
            rep.corruptions += 1;
        } else {
            rep.leaks += 1;
        }
    }
    if changed {
        ctx.rc.flush(st)?;
    }
    Ok(out)
}

/// The full check: references against stored refcounts, COPIED flags,
/// invalid entries, and (per `repair`) the fixes. The order of the steps
/// and of the messages is qemu-img's.
pub(crate) fn check(q: &Qcow2, ctx: &mut MetaCtx<'_>, repair: Repair) -> Result<CheckReport> {
    let cb = ctx.header.cluster_bits;
    let cs = 1u64 << cb;
    let mut rep = CheckReport {
        total_clusters: ctx.header.size.div_ceil(cs),
        ..Default::default()
    };
    let Counted {
        counts,
        bad,
        overflows,
        unfixable,
    } = count_refs(q, ctx, &mut rep, repair == Repair::All)?;

    if repair == Repair::All && (!bad.is_empty() || rep.corruptions > overflows + unfixable) {
        fix_entries(q, ctx, &bad, &mut rep)?;
        rebuild_refcounts(q, ctx)?;
        fix_copied(q, ctx, &mut rep, true)?;
        rep.corruptions_fixed += rep.corruptions;
        rep.corruptions = 0;
        return recheck(q, ctx, rep);
    }

    let pre_compare = rep.clone();
    let cmp = compare(q, ctx, &counts, &mut rep, Repair::None)?;
    let mut highest = cmp.highest;
    if cmp.rebuild && repair == Repair::All {
        rep.messages.push("Rebuilding refcount structure".into());
        let order = ctx.header.refcount_order;
        // The old structures stay counted: the pass below frees them as
        // leaks, as qemu-img reports it.
        write_rebuilt_laid_out(q, ctx, order, &counts, true)?;
        let mut scratch = CheckReport::default();
        let counts = count_refs(q, ctx, &mut scratch, false)?.counts;
        // What the walk still finds stays (misaligned data clusters);
        // the rest of the first pass counts as fixed (qemu-img's sums).
        let (walk_corruptions, walk_leaks) = (scratch.corruptions, scratch.leaks);
        let after = compare(q, ctx, &counts, &mut scratch, Repair::Leaks)?;
        highest = after.highest;
        rep.messages.append(&mut scratch.messages);
        if after.rebuild {
            rep.messages
                .push("ERROR rebuilt refcount structure is still broken".into());
        }
        rep.corruptions_fixed += rep.corruptions.saturating_sub(walk_corruptions);
        rep.leaks_fixed += rep.leaks.saturating_sub(walk_leaks);
        rep.corruptions = scratch.corruptions;
        rep.leaks = scratch.leaks;
    } else if repair != Repair::None {
        if cmp.rebuild {
            rep.messages
                .push("ERROR need to rebuild refcount structures".into());
            rep.check_errors += 1;
            return Ok(rep);
        }
        if rep.leaks > 0 || rep.corruptions > 0 {
            let mut msgs = std::mem::take(&mut rep.messages);
            rep = pre_compare;
            let n = rep.messages.len();
            compare(q, ctx, &counts, &mut rep, repair)?;
            // qemu-img prints both passes' lines.
            msgs.extend(rep.messages.drain(n..));
            rep.messages = msgs;
        }
    }
    rep.image_end_offset = (highest + 1) * cs;
    // With the leaks repaired and nothing else wrong, COPIED flags the
    // new refcounts contradict are corrected too (a leak on a shared
    // cluster hid them), as qemu-img does.
    let fix = repair == Repair::All
        || (repair == Repair::Leaks && rep.leaks_fixed > 0 && rep.corruptions == 0);
    fix_copied(q, ctx, &mut rep, fix)?;
    if repair != Repair::None && (rep.corruptions_fixed > 0 || rep.leaks_fixed > 0) {
        return recheck(q, ctx, rep);
    }
    Ok(rep)
}

/// Checks again after a repair; the result keeps the "fixed" counts and
/// all messages of the first pass.
fn recheck(q: &Qcow2, ctx: &mut MetaCtx<'_>, first: CheckReport) -> Result<CheckReport> {
    let mut again = check(q, ctx, Repair::None)?;
    again.corruptions_fixed = first.corruptions_fixed;
    again.leaks_fixed = first.leaks_fixed;
    let mut msgs = first.messages;
    msgs.append(&mut again.messages);
    again.messages = msgs;
    Ok(again)
}

/// Replaces unusable active entries. An entry whose cluster lies past the
/// end of the file read as zeros, so it becomes a zero cluster; an
/// unaligned one could not be read at all. Each change is reported.
fn fix_entries(
    q: &Qcow2,
    ctx: &mut MetaCtx<'_>,
    bad: &[BadEntry],
    rep: &mut CheckReport,
) -> Result<()> {
    let st = q.storage();
    let v3 = ctx.header.version >= 3;
    // Zero clusters hide the backing file; v2 has none, so those entries
    // become unallocated (reads then fall through to the backing file).
    let replacement: u64 = if v3 { crate::l2::ZERO } else { 0 };
    for b in bad {
        match *b {
            BadEntry::L1(i) => {
                let old = ctx.l1[i];
                ctx.l1[i] = 0;
                st.write_at(
                    &0u64.to_be_bytes(),
                    ctx.header.l1_table_offset + i as u64 * 8,
                )?;
                rep.messages.push(format!(
                    "Repairing L1 entry {i} ({old:#x}): its L2 table is invalid; the guest range it mapped is now unallocated (data there was unreadable)"
                ));
            }
            BadEntry::L2(table, k) => {
                let extl2 = ctx.header.extended_l2();
                let at = table + k as u64 * if extl2 { 16 } else { 8 };
                let mut raw = [0u8; 8];
                st.read_at(&mut raw, at)?;
                if extl2 {
                    // Unallocated, subclusters that read as zeros still
                    // doing so, the others reading from the backing file
                    // (qcow2.rst, "Extended L2 Entries"), as QEMU repairs.
                    let mut e = [0u8; 16];
                    st.read_at(&mut e, at)?;
                    let bitmap = u64::from_be_bytes(e[8..].try_into().unwrap());
                    e[..8].fill(0);
                    e[8..].copy_from_slice(&(bitmap & (0xffff_ffffu64 << 32)).to_be_bytes());
                    st.write_at(&e, at)?;
                } else {
                    st.write_at(&replacement.to_be_bytes(), at)?;
                }
                rep.messages.push(format!(
                    "Repairing L2 entry {k} of table {table:#x} ({:#x}): it pointed at an invalid cluster; it now reads as {}",
                    u64::from_be_bytes(raw),
                    if v3 { "zeros" } else { "unallocated" }
                ));
            }
        }
    }
    st.sync()?;
    ctx.drop_l2_cache();
    Ok(())
}

/// Checks (and with `fix`, corrects) the COPIED flags of the active L1
/// and L2 tables against the stored refcounts. Returns errors found.
fn fix_copied(q: &Qcow2, ctx: &mut MetaCtx<'_>, rep: &mut CheckReport, fix: bool) -> Result<u64> {
    let st = q.storage();
    let cb = ctx.header.cluster_bits;
    let cs = 1u64 << cb;
    let g = CompressedGeometry::new(cb);
    let file_end = st.len()?;
    let mut errors = 0;
    let mut l2buf = vec![0u8; cs as usize];
    for i in 0..ctx.l1.len() {
        let e = ctx.l1[i];
        let l2off = e & OFFSET_MASK;
        if l2off == 0 || l2off & (cs - 1) != 0 || l2off >= file_end {
            continue;
        }
        let rc = ctx.rc.get(st, l2off >> cb)?;
        if (rc == 1) != (e & COPIED != 0) {
            errors += 1;
            if fix {
                let ne = if rc == 1 { e | COPIED } else { e & !COPIED };
                ctx.l1[i] = ne;
                st.write_at(&ne.to_be_bytes(), ctx.header.l1_table_offset + i as u64 * 8)?;
                rep.corruptions_fixed += 1;
                rep.messages.push(format!(
                    "Repairing OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
            } else {
                rep.corruptions += 1;
                rep.messages.push(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
            }
        }
        st.read_at(&mut l2buf, l2off)?;
        let mut changed = false;
        let stride = if ctx.header.extended_l2() { 16 } else { 8 };
        for k in 0..(cs as usize / stride) {
            let at = k * stride;
            let raw = u64::from_be_bytes(l2buf[at..at + 8].try_into().unwrap());
            let raw = if stride == 16 {
                crate::l2::strip_ext_zero(raw)
            } else {
                raw
            };
            let host = match L2Entry::decode_in(raw, g, ctx.header.has_data_file()) {
                L2Entry::Normal { host, .. }
                | L2Entry::Zero {
                    host: Some(host), ..
                } => host,
                _ => continue,
            };
            if host & (cs - 1) != 0 {
                continue;
            }
            // Data file clusters are referenced once, by this entry.
            let rc = if ctx.header.has_data_file() {
                1
            } else {
                ctx.rc.get(st, host >> cb)?
            };
            if (rc == 1) != (raw & COPIED != 0) {
                errors += 1;
                if fix {
                    // Bit 0 as it was (reserved with extended L2 entries).
                    let orig = u64::from_be_bytes(l2buf[at..at + 8].try_into().unwrap());
                    let ne = if rc == 1 {
                        orig | COPIED
                    } else {
                        orig & !COPIED
                    };
                    l2buf[at..at + 8].copy_from_slice(&ne.to_be_bytes());
                    changed = true;
                    rep.corruptions_fixed += 1;
                    rep.messages.push(format!(
                        "Repairing OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={rc}"
                    ));
                } else {
                    rep.corruptions += 1;
                    rep.messages.push(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={rc}"
                    ));
                }
            }
        }
        if changed {
            st.write_at(&l2buf, l2off)?;
        }
    }
    if fix && errors > 0 {
        st.sync()?;
        ctx.drop_l2_cache();
    }
    Ok(errors)
}

impl Qcow2 {
    /// Checks the image's consistency (after flushing what is cached) and
    /// repairs it as far as `repair` allows.
    pub fn check_repair(&self, repair: Repair) -> Result<CheckReport> {
        if repair != Repair::None && !self.storage().writable() {
            return Err(Error::ReadOnly);
        }
        self.flush()?;
        let fix = repair == Repair::All;
        let (sn_msgs, sn_found) = self.check_snapshot_table(fix, false)?;
        let first = self.with_meta(|ctx| {
            ctx.drop_l2_cache();
            check(self, ctx, repair)
        })?;
        if fix && sn_found > 0 {
            self.check_snapshot_table(true, true)?;
        }
        let rep = self.with_meta(|ctx| {
            let mut rep = if fix && sn_found > 0 {
                // The table was rewritten after the refcount check: check
                // again, as qemu-img does after any repair.
                ctx.drop_l2_cache();
                recheck(self, ctx, first)?
            } else {
                first
            };
            rep.messages.splice(0..0, sn_msgs);
            if repair == Repair::All {
                rep.corruptions_fixed += sn_found;
            } else {
                rep.corruptions += sn_found;
            }
            if repair != Repair::None && rep.corruptions == 0 {
                // Refcounts are right and the image is consistent: it is
                // neither dirty nor corrupt any more.
                let bits = incompat::DIRTY | incompat::CORRUPT;
                if ctx.header.incompatible_features & bits != 0 {
                    ctx.header.incompatible_features &= !bits;
                    let st = self.storage();
                    st.write_at(
                        &ctx.header.incompatible_features.to_be_bytes(),
                        field::INCOMPATIBLE,
                    )?;
                    st.sync()?;
                }
            }
            Ok(rep)
        })?;
        if repair != Repair::None {
            // The repair changed tables outside the paths that keep the
            // overlap map; a repaired image takes writes again.
            self.refresh_overlap(rep.corruptions == 0);
            self.load_bitmaps_after_repair();
        }
        Ok(rep)
    }

    /// Checks without repairing.
    pub fn check(&self) -> Result<CheckReport> {
        self.check_repair(Repair::None)
    }
}
