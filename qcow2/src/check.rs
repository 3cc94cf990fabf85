//! Consistency: counting every reference in an image, and rebuilding the
//! refcount structures from those counts (used to recover images whose
//! dirty bit is set, and by `check -r`).

use crate::error::{Error, Result};
use crate::header::field;
use crate::l2::{CompressedGeometry, L2Entry, OFFSET_MASK};
use crate::qcow::{MetaCtx, Qcow2};
use crate::refcount::entry_set;
use crate::storage::Storage;

/// Largest number of host clusters a check or rebuild will count (the
/// count array is 4 bytes per cluster: at most 1 GiB of memory).
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 28;

/// Reference counts computed from the metadata, one per host cluster.
pub(crate) struct References {
    pub counts: Vec<u32>,
    cluster_bits: u32,
}

impl References {
    fn add(&mut self, off: u64, len: u64, what: &str) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = off >> self.cluster_bits;
        let last = (off + len - 1) >> self.cluster_bits;
        if last >= self.counts.len() as u64 {
            return Err(Error::Corrupt(format!(
                "{what} at {off:#x} lies beyond the end of the file"
            )));
        }
        for c in first..=last {
            let r = &mut self.counts[c as usize];
            *r = r.saturating_add(1);
        }
        Ok(())
    }
}

fn read_l1(st: &Storage, off: u64, entries: u32) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; entries as usize * 8];
    st.read_at(&mut raw, off)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect())
}

/// Counts references from L2 tables and data clusters under one L1.
fn count_l1(
    st: &Storage,
    l1: &[u64],
    cluster_bits: u32,
    refs: &mut References,
    l2buf: &mut [u8],
) -> Result<()> {
    let cs = 1u64 << cluster_bits;
    let g = CompressedGeometry::new(cluster_bits);
    for &e in l1 {
        let l2off = e & OFFSET_MASK;
        if l2off == 0 {
            continue;
        }
        if l2off & (cs - 1) != 0 {
            return Err(Error::Corrupt(format!(
                "L2 table offset {l2off:#x} is not cluster aligned"
            )));
        }
        refs.add(l2off, cs, "L2 table")?;
        st.read_at(l2buf, l2off)?;
        for raw in l2buf.chunks_exact(8) {
            let entry = L2Entry::decode(u64::from_be_bytes(raw.try_into().unwrap()), g);
            if let Some((off, len)) = entry.host_range(cs) {
                if !matches!(entry, L2Entry::Compressed { .. }) && off & (cs - 1) != 0 {
                    return Err(Error::Corrupt(format!(
                        "data cluster offset {off:#x} is not cluster aligned"
                    )));
                }
                refs.add(off, len, "data cluster")?;
            }
        }
    }
    Ok(())
}

/// Counts every reference to every host cluster except those from the
/// refcount structures themselves.
pub(crate) fn count_references(q: &Qcow2, ctx: &MetaCtx<'_>) -> Result<References> {
    let st = q.storage();
    let cb = ctx.header.cluster_bits;
    let cs = 1u64 << cb;
    let clusters = st.len()?.div_ceil(cs);
    if clusters > MAX_CHECK_CLUSTERS {
        return Err(Error::TooLarge(format!(
            "{clusters} host clusters to check"
        )));
    }
    let mut refs = References {
        counts: vec![0; clusters as usize],
        cluster_bits: cb,
    };
    let mut l2buf = vec![0u8; cs as usize];
    refs.add(0, cs, "header")?;
    refs.add(
        ctx.header.l1_table_offset,
        ctx.l1.len() as u64 * 8,
        "L1 table",
    )?;
    count_l1(st, ctx.l1, cb, &mut refs, &mut l2buf)?;
    if !ctx.snapshots.is_empty() {
        refs.add(
            ctx.header.snapshots_offset,
            ctx.snapshot_table_bytes,
            "snapshot table",
        )?;
    }
    for s in ctx.snapshots {
        refs.add(s.l1_table_offset, s.l1_size as u64 * 8, "snapshot L1 table")?;
        let l1 = read_l1(st, s.l1_table_offset, s.l1_size)?;
        count_l1(st, &l1, cb, &mut refs, &mut l2buf)?;
    }
    Ok(refs)
}

/// Replaces the refcount table and blocks with new ones, built from the
/// references found in the metadata and written past the end of the file.
/// The old structures become free space. The header switches to the new
/// table only once it is durable, so a crash leaves the old one in force.
pub(crate) fn rebuild_refcounts(q: &Qcow2, ctx: &mut MetaCtx<'_>) -> Result<()> {
    let st = q.storage();
    let refs = count_references(q, ctx)?;
    let cb = ctx.header.cluster_bits;
    let cs = 1u64 << cb;
    let order = ctx.header.refcount_order;
    let per_block = 1u64 << (cb + 3 - order);
    let max = ctx.rc.max_refcount();
    let start = refs.counts.len() as u64;
    let used_groups: Vec<u64> = {
        let mut g: Vec<u64> = refs
            .counts
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
                refs.counts.get(c as usize).copied().unwrap_or(0) as u64
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
    let mut hdr = [0u8; 12];
    hdr[..8].copy_from_slice(&(start * cs).to_be_bytes());
    hdr[8..].copy_from_slice(&(tc as u32).to_be_bytes());
    st.write_at(&hdr, field::REFCOUNT_TABLE)?;
    st.sync()?;
    ctx.header.refcount_table_offset = start * cs;
    ctx.header.refcount_table_clusters = tc as u32;
    ctx.rc.reset(start * cs, table);
    ctx.rc.note_end(area.end);
    Ok(())
}

/// Result of comparing computed references with stored refcounts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters whose refcount is lower than their references (data at
    /// risk).
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Human-readable description of each problem found.
    pub messages: Vec<String>,
}

/// Compares stored refcounts with the references the metadata makes,
/// counting the refcount structures too.
pub(crate) fn check_refcounts(q: &Qcow2, ctx: &mut MetaCtx<'_>) -> Result<CheckReport> {
    let st = q.storage();
    let mut refs = count_references(q, ctx)?;
    let cs = 1u64 << ctx.header.cluster_bits;
    refs.add(
        ctx.rc.table_offset(),
        ctx.rc.table_clusters() * cs,
        "refcount table",
    )?;
    let blocks: Vec<u64> = ctx
        .rc
        .table()
        .iter()
        .map(|e| e & !511)
        .filter(|&o| o != 0)
        .collect();
    for b in blocks {
        refs.add(b, cs, "refcount block")?;
    }
    let mut rep = CheckReport::default();
    let stored_clusters =
        (ctx.rc.table().len() as u64) << (ctx.header.cluster_bits + 3 - ctx.header.refcount_order);
    let n = (refs.counts.len() as u64).max(stored_clusters.min(refs.counts.len() as u64));
    for c in 0..n {
        let want = refs.counts[c as usize] as u64;
        let have = ctx.rc.get(st, c)?;
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
        }
    }
    Ok(rep)
}

impl Qcow2 {
    /// Checks refcounts against the metadata (after flushing).
    pub fn check(&self) -> Result<CheckReport> {
        use crate::image::Image;
        self.flush()?;
        self.with_meta(|ctx| check_refcounts(self, ctx))
    }

    /// Rebuilds all refcount structures from the metadata.
    pub fn rebuild_refcounts(&self) -> Result<()> {
        use crate::image::Image;
        self.flush()?;
        self.with_meta(|ctx| {
            ctx.drop_l2_cache();
            rebuild_refcounts(self, ctx)
        })
    }
}
