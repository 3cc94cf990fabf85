//! Counting every reference (the refcount structures' own included) and
//! comparing the counts with the stored refcounts.

use super::walk::{walk, BadEntry, Walk};
use super::{CheckReport, Repair};
use crate::error::Result;
use crate::image::Image;
use crate::qcow::{MetaCtx, Qcow2};

/// References to every host cluster, those from the refcount structures
/// included, and the active entries that cannot be used as they are.
pub(super) fn count_refs(
    q: &Qcow2,
    ctx: &mut MetaCtx<'_>,
    rep: &mut CheckReport,
    fix_errors: bool,
) -> Result<Counted> {
    let cb = ctx.header.cluster_bits;
    let cs = 1u64 << cb;
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
    // The refcount blocks, with qemu-img's checks and messages in its
    // order (check_refblocks). All but a block outside the image ask for
    // a rebuild, as there (`-r all` rebuilds for any corruption).
    let mut rebuild = false;
    let table: Vec<u64> = ctx.rc.table().to_vec();
    // A zero entry names no block: nothing to check.
    for (i, e) in crate::l2::nonzero_entries(&table) {
        let b = e & !511;
        let err = |extra: &mut Walk<'_>, msg: String| {
            extra.report.corruptions += 1;
            extra.report.messages.push(msg);
        };
        if e & 511 != 0 {
            rebuild = true;
            err(
                &mut extra,
                format!("ERROR refcount table entry {i} has reserved bits set"),
            );
        } else if b & (cs - 1) != 0 {
            rebuild = true;
            err(
                &mut extra,
                format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ),
            );
        } else if b >> cb >= extra.counts.len() as u64 {
            let what = if fix_errors { "Repairing" } else { "ERROR" };
            err(
                &mut extra,
                format!("{what} refcount block {i} is outside image"),
            );
        } else if b != 0 {
            extra.add(b, cs);
            let n = extra.counts[(b >> cb) as usize];
            if n != 1 {
                rebuild = true;
                err(&mut extra, format!("ERROR refcount block {i} refcount={n}"));
            }
        }
    }
    Ok(Counted {
        counts: extra.counts,
        bad,
        overflows: extra.overflows,
        unfixable,
        rebuild,
    })
}

/// What [`count_refs`] found.
pub(super) struct Counted {
    pub(super) counts: Vec<u32>,
    pub(super) bad: Vec<BadEntry>,
    /// References past the largest refcount (reported, not counted);
    /// no repair fixes those, a wider refcount does.
    pub(super) overflows: u64,
    /// Misaligned data clusters, which no repair changes.
    pub(super) unfixable: u64,
    /// A refcount block is unusable: only a rebuild repairs that.
    pub(super) rebuild: bool,
}

/// What comparing stored refcounts with references found.
pub(super) struct Compared {
    /// A referenced cluster has refcount 0: only a rebuild can fix that.
    pub(super) rebuild: bool,
    pub(super) highest: u64,
}

/// Compares stored refcounts with `counts`, reporting each mismatch and
/// correcting (one cluster at a time) what `fix` allows: leaks for
/// `Leaks`, also too-low refcounts for `All`. A stored refcount of 0 is
/// never corrected here; it asks for a rebuild.
pub(super) fn compare(
    q: &Qcow2,
    ctx: &mut MetaCtx<'_>,
    counts: &[u32],
    rep: &mut CheckReport,
    fix: Repair,
) -> Result<Compared> {
    let st = q.storage();
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
            // Set, not moved by a delta: a 64-bit refcount may be more
            // than i64::MAX away (QEMU takes the difference unsigned).
            ctx.rc.set_refcount(st, c, want)?;
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
