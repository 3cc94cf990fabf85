//! Consistency: counting every reference in an image and comparing the
//! counts with the stored refcounts, as `check` (and `check -r`) does;
//! the rebuild of the refcount structures is in `rebuild`.

pub(crate) mod rebuild;
mod refcounts;
mod repair;
pub mod report;
mod walk;

use crate::error::{Error, Result};
use crate::header::{field, incompat};
use crate::image::Image;
use crate::qcow::{MetaCtx, Qcow2};
use rebuild::{rebuild_refcounts, write_rebuilt_laid_out};
use refcounts::{compare, count_refs, Counted};
use repair::{fix_copied, fix_entries};
pub use report::CheckReport;
pub(crate) use walk::walk;

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
        rebuild: bad_blocks,
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
    let mut cmp = compare(q, ctx, &counts, &mut rep, Repair::None)?;
    cmp.rebuild |= bad_blocks;
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
            // qemu-img's check fails with EIO here: no report follows.
            rep.failed = Some("Input/output error".into());
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
