//! Rebuilding the refcount structures: from the references the metadata
//! holds (a dirty image, `check -r all`), or from the stored refcounts at
//! another width (`amend -o refcount_bits`).

use super::{walk, CheckReport, MAX_CHECK_CLUSTERS};
use crate::error::{Error, Result};
use crate::header::field;
use crate::image::Image;
use crate::qcow::{MetaCtx, Qcow2};
use crate::refcount::entry_set;

/// Reference counts for a refcount rebuild; refuses images whose
/// metadata has invalid entries (those need `check -r all`).
fn count_for_rebuild(q: &Qcow2, ctx: &MetaCtx<'_>) -> Result<Vec<u32>> {
    let mut report = CheckReport::default();
    let w = walk(q, ctx, &mut report, false)?;
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
    let counts = count_for_rebuild(q, ctx)?;
    write_rebuilt(q, ctx, order, &counts)
}

/// Changes the refcount width to 2^`order` bits, keeping every stored
/// refcount as it is (as qemu-img amend does: a wrong refcount stays wrong
/// for `check` to find). The old structures become free.
pub(crate) fn change_refcount_width(q: &Qcow2, ctx: &mut MetaCtx<'_>, order: u32) -> Result<()> {
    let st = q.storage();
    let cb = ctx.header.cluster_bits;
    let cs = 1u64 << cb;
    let clusters = st.len()?.div_ceil(cs);
    if clusters > MAX_CHECK_CLUSTERS {
        return Err(Error::TooLarge(format!("{clusters} host clusters")));
    }
    let mut stored = Vec::with_capacity(clusters as usize);
    for c in 0..clusters {
        stored.push(ctx.rc.get(st, c)?);
    }
    let table = ctx.rc.table_offset() >> cb;
    let old = (table..table + ctx.rc.table_clusters()).chain(
        ctx.rc
            .table()
            .iter()
            .map(|e| (e & !511) >> cb)
            .filter(|&c| c != 0),
    );
    for c in old {
        if let Some(r) = stored.get_mut(c as usize) {
            *r = r.saturating_sub(1);
        }
    }
    let bits = 1u32 << order;
    let max = if order == 6 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let mut counts = Vec::with_capacity(stored.len());
    for (c, r) in stored.into_iter().enumerate() {
        if r > max {
            return Err(Error::InvalidArgument(format!(
                "Cannot decrease refcount entry width to {bits} bits: Cluster at offset {:#x} has a refcount of {r}",
                c as u64 * cs
            )));
        }
        counts.push(u32::try_from(r).map_err(|_| Error::RefcountOverflow(c as u64 * cs))?);
    }
    write_rebuilt(q, ctx, order, &counts)
}

/// Writes refcount structures holding `counts` (one per host cluster of
/// the file) past the end of the file and switches the header to them.
pub(crate) fn write_rebuilt(
    q: &Qcow2,
    ctx: &mut MetaCtx<'_>,
    order: u32,
    counts: &[u32],
) -> Result<()> {
    write_rebuilt_laid_out(q, ctx, order, counts, false)
}

/// As [`write_rebuilt`], with the refcount blocks before the table where
/// `blocks_first` (check's rebuild: qemu-img writes its refcount blocks
/// first and the table after them, and scripts read where the table is).
pub(crate) fn write_rebuilt_laid_out(
    q: &Qcow2,
    ctx: &mut MetaCtx<'_>,
    order: u32,
    counts: &[u32],
    blocks_first: bool,
) -> Result<()> {
    let st = q.storage();
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
    let table_at = if blocks_first {
        start + groups.len() as u64
    } else {
        start
    };
    let mut table = vec![0u64; (tc * cs / 8) as usize];
    let mut block = vec![0u8; cs as usize];
    for (k, &g) in groups.iter().enumerate() {
        let boff = (start
            + if blocks_first {
                k as u64
            } else {
                tc + k as u64
            })
            * cs;
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
    st.write_at(&raw, table_at * cs)?;
    st.sync()?;
    if order == ctx.header.refcount_order {
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&(table_at * cs).to_be_bytes());
        hdr[8..].copy_from_slice(&(tc as u32).to_be_bytes());
        st.write_at(&hdr, field::REFCOUNT_TABLE)?;
        st.sync()?;
        ctx.header.refcount_table_offset = table_at * cs;
        ctx.header.refcount_table_clusters = tc as u32;
    } else {
        let mut h = ctx.header.clone();
        h.refcount_table_offset = table_at * cs;
        h.refcount_table_clusters = tc as u32;
        h.refcount_order = order;
        let first = h.encode()?;
        st.write_at(&first, 0)?;
        st.sync()?;
        *ctx.header = h;
        let overlap = ctx.rc.take_overlap();
        *ctx.rc = crate::refcount::Refcounts::load(
            st,
            table_at * cs,
            tc,
            order,
            cb,
            ctx.rc.cache_bytes(),
        )?;
        ctx.rc.install_overlap(overlap);
    }
    ctx.rc.reset(table_at * cs, table);
    ctx.rc.note_end(area.end);
    Ok(())
}
