//! Consistency: counting every reference in an image, and rebuilding the
//! refcount structures from those counts (used to recover images whose
//! dirty bit is set, and by `check -r`).

use crate::error::{Error, Result};
use crate::header::{field, incompat};
use crate::image::Image;
use crate::l2::{CompressedGeometry, L2Entry, COPIED, OFFSET_MASK, ZERO};
use crate::qcow::{MetaCtx, Qcow2};
use crate::refcount::entry_set;
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
struct Walk<'r> {
    counts: Vec<u32>,
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
        if last >= self.counts.len() as u64 {
            self.report.corruptions += 1;
            self.report.messages.push(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
            ));
            return false;
        }
        for c in first..=last {
            let r = &mut self.counts[c as usize];
            *r = r.saturating_add(1);
        }
        true
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
                let raw = if self.extl2 { raw & !ZERO } else { raw };
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
                            self.report.corruptions += 1;
                            self.report.messages.push(format!(
                                "ERROR offset={host:x}: Cluster is not properly aligned; L2 entry corrupted."
                            ));
                            if active {
                                self.bad.push(BadEntry::L2(l2off, k));
                            }
                            continue;
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
fn walk<'r>(q: &Qcow2, ctx: &MetaCtx<'_>, report: &'r mut CheckReport) -> Result<Walk<'r>> {
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
    for s in ctx.snapshots {
        w.mark(s.l1_table_offset, s.l1_size as u64 * 8, Use::Meta);
    }
    if let Some((off, len)) = ctx.header.crypto_area() {
        w.mark(off, len, Use::Meta);
    }
    w.mark_l2_tables(ctx.l1);
    for s in ctx.snapshots {
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
        if !w.add(s.l1_table_offset, s.l1_size as u64 * 8) {
            continue;
        }
        let l1 = crate::l2::read_l1(st, s.l1_table_offset, s.l1_size)?;
        w.l1(st, &l1, false, &mut l2buf)?;
    }
    Ok(w)
}

/// Reference counts for a refcount rebuild; refuses images whose
/// metadata has invalid entries (those need `check -r all`).
fn count_for_rebuild(q: &Qcow2, ctx: &MetaCtx<'_>) -> Result<Vec<u32>> {
    let mut report = CheckReport::default();
    let w = walk(q, ctx, &mut report)?;
    let counts = w.counts;
    if report.corruptions > 0 {
        return Err(Error::Corrupt(format!(
            "cannot rebuild refcounts: {}",
            report.messages.first().cloned().unwrap_or_default()
        )));
    }
    Ok(counts)
}

/// Replaces the refcount table and blocks with new ones, built from the
/// references found in the metadata and written past the end of the file.
/// The old structures become free space. The header switches to the new
/// table only once it is durable, so a crash leaves the old one in force.
pub(crate) fn rebuild_refcounts(q: &Qcow2, ctx: &mut MetaCtx<'_>) -> Result<()> {
    let order = ctx.header.refcount_order;
    rebuild_refcounts_as(q, ctx, order)
}

/// Rebuilds the refcount structures with entries of 2^`order` bits. When
/// the width changes, the header switches table and width in one write of
/// its first sector.
pub(crate) fn rebuild_refcounts_as(q: &Qcow2, ctx: &mut MetaCtx<'_>, order: u32) -> Result<()> {
    let st = q.storage();
    let counts = count_for_rebuild(q, ctx)?;
    let cb = ctx.header.cluster_bits;
    let cs = 1u64 << cb;
    let per_block = 1u64 << (cb + 3 - order);
    let max = if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    };
    let start = counts.len() as u64;
    let used_groups: Vec<u64> = {
        let mut g: Vec<u64> = counts
            .iter()
            .enumerate()
            .filter(|(_, &r)| r != 0)
            .map(|(c, _)| c as u64 / per_block)
            .collect();
        g.dedup();
        g
    };
    // Find a stable layout: table at [start, start + tc), one block per
    // group in use, blocks after the table.
    let (mut tc, mut groups) = (1u64, Vec::new());
    for _ in 0..64 {
        // Groups in use plus those the new area touches; the area grows
        // with the number of blocks, so iterate to a fixed point.
        loop {
            let area_end = start + tc + groups.len() as u64;
            let mut g = used_groups.clone();
            g.extend(start / per_block..=(area_end - 1) / per_block);
            g.sort_unstable();
            g.dedup();
            let stable = g.len() == groups.len();
            groups = g;
            if stable {
                break;
            }
        }
        let entries = groups.last().map_or(1, |g| g + 1);
        let need = (entries * 8).div_ceil(cs);
        if need <= tc {
            break;
        }
        tc = need;
    }
    if tc * cs > crate::header::MAX_REFTABLE_BYTES {
        return Err(Error::TooLarge(
            "rebuilt refcount table would exceed 8 MiB".into(),
        ));
    }
    let area = start..start + tc + groups.len() as u64;
    let mut table = vec![0u64; (tc * cs / 8) as usize];
    let mut block = vec![0u8; cs as usize];
    for (k, &g) in groups.iter().enumerate() {
        let boff = (start + tc + k as u64) * cs;
        table[g as usize] = boff;
        block.fill(0);
        for i in 0..per_block {
            let c = g * per_block + i;
            let r = if area.contains(&c) {
                1
            } else {
                counts.get(c as usize).copied().unwrap_or(0) as u64
            };
            if r > max {
                return Err(Error::RefcountOverflow(c * cs));
            }
            if r != 0 {
                entry_set(&mut block, i as usize, order, r);
            }
        }
        st.write_at(&block, boff)?;
    }
    let mut raw = vec![0u8; (tc * cs) as usize];
    for (k, e) in table.iter().enumerate() {
        raw[k * 8..k * 8 + 8].copy_from_slice(&e.to_be_bytes());
    }
    st.write_at(&raw, start * cs)?;
    st.sync()?;
    if order == ctx.header.refcount_order {
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&(start * cs).to_be_bytes());
        hdr[8..].copy_from_slice(&(tc as u32).to_be_bytes());
        st.write_at(&hdr, field::REFCOUNT_TABLE)?;
        st.sync()?;
        ctx.header.refcount_table_offset = start * cs;
        ctx.header.refcount_table_clusters = tc as u32;
    } else {
        let mut h = ctx.header.clone();
        h.refcount_table_offset = start * cs;
        h.refcount_table_clusters = tc as u32;
        h.refcount_order = order;
        let first = h.encode()?;
        st.write_at(&first, 0)?;
        st.sync()?;
        *ctx.header = h;
        let overlap = ctx.rc.take_overlap();
        *ctx.rc =
            crate::refcount::Refcounts::load(st, start * cs, tc, order, cb, ctx.rc.cache_bytes())?;
        ctx.rc.install_overlap(overlap);
    }
    ctx.rc.reset(start * cs, table);
    ctx.rc.note_end(area.end);
    Ok(())
}

/// The full check: references against stored refcounts, COPIED flags,
/// invalid entries, and (per `repair`) the fixes.
pub(crate) fn check(q: &Qcow2, ctx: &mut MetaCtx<'_>, repair: Repair) -> Result<CheckReport> {
    let st = q.storage();
    let cb = ctx.header.cluster_bits;
    let cs = 1u64 << cb;
    let mut rep = CheckReport {
        total_clusters: ctx.header.size.div_ceil(cs),
        ..Default::default()
    };
    let (mut counts, bad) = {
        let w = walk(q, ctx, &mut rep)?;
        (w.counts, w.bad)
    };
    // References from the refcount structures themselves.
    let mut extra = Walk {
        counts: std::mem::take(&mut counts),
        uses: Vec::new(),
        cluster_bits: cb,
        report: &mut rep,
        bad: Vec::new(),
        next_contiguous: 0,
        data_file: ctx.header.has_data_file(),
        extl2: ctx.header.extended_l2(),
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
    counts = extra.counts;

    if repair == Repair::All && (!bad.is_empty() || rep.corruptions > 0) {
        fix_entries(q, ctx, &bad, &mut rep)?;
        rebuild_refcounts(q, ctx)?;
        fix_copied(q, ctx, &mut rep, true)?;
        rep.corruptions_fixed = rep.corruptions;
        return recheck(q, ctx, rep);
    }

    // Stored refcounts against references.
    let mut highest = 0u64;
    let mut leaks_to_fix = Vec::new();
    for (c, &want) in counts.iter().enumerate() {
        let c = c as u64;
        let want = want as u64;
        let have = ctx.rc.get(st, c)?;
        if have > 0 || want > 0 {
            highest = c;
        }
        if have < want {
            rep.corruptions += 1;
            rep.messages.push(format!(
                "ERROR cluster {c} refcount={have} reference={want}"
            ));
        } else if have > want {
            rep.leaks += 1;
            rep.messages.push(format!(
                "Leaked cluster {c} refcount={have} reference={want}"
            ));
            leaks_to_fix.push((c, have - want));
        }
    }
    rep.image_end_offset = (highest + 1) * cs;
    let copied_errors = fix_copied(q, ctx, &mut rep, false)?;

    match repair {
        Repair::None => Ok(rep),
        Repair::Leaks if rep.leaks == 0 => Ok(rep),
        Repair::Leaks => {
            for &(c, extra) in &leaks_to_fix {
                ctx.rc
                    .update_range(st, c * cs, cs, -(extra as i64), |_| {})?;
                rep.messages.push(format!(
                    "Repairing cluster {c} refcount={} reference={}",
                    counts[c as usize] as u64 + extra,
                    counts[c as usize]
                ));
            }
            ctx.rc.flush(st)?;
            rep.leaks_fixed = rep.leaks;
            // As qemu-img: with the leaks gone and nothing else wrong,
            // COPIED flags the new refcounts contradict are corrected too
            // (a leak on a shared cluster hid them).
            if rep.corruptions == 0 {
                rep.corruptions_fixed += fix_copied(q, ctx, &mut rep, true)?;
            }
            recheck(q, ctx, rep)
        }
        Repair::All => {
            if rep.leaks == 0 && rep.corruptions == 0 {
                return Ok(rep);
            }
            let refcount_errors = rep.corruptions - copied_errors;
            if rep.leaks > 0 || refcount_errors > 0 {
                rebuild_refcounts(q, ctx)?;
                rep.leaks_fixed = rep.leaks;
            }
            fix_copied(q, ctx, &mut rep, true)?;
            rep.corruptions_fixed = rep.corruptions;
            recheck(q, ctx, rep)
        }
    }
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
            let raw = if stride == 16 { raw & !ZERO } else { raw };
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
        let (sn_msgs, sn_found) = self.check_snapshot_table(repair == Repair::All)?;
        let rep = self.with_meta(|ctx| {
            ctx.drop_l2_cache();
            let mut rep = check(self, ctx, repair)?;
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
        }
        Ok(rep)
    }

    /// Checks without repairing.
    pub fn check(&self) -> Result<CheckReport> {
        self.check_repair(Repair::None)
    }
}
