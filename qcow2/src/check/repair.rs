//! Repairs of the active tables: unusable entries and COPIED flags.

use super::walk::BadEntry;
use super::CheckReport;
use crate::error::Result;
use crate::image::Image;
use crate::l2::{CompressedGeometry, L2Entry, COPIED, OFFSET_MASK};
use crate::qcow::{MetaCtx, Qcow2};

/// Replaces unusable active entries. An entry whose cluster lies past the
/// end of the file read as zeros, so it becomes a zero cluster; an
/// unaligned one could not be read at all. Each change is reported.
pub(super) fn fix_entries(
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

/// `entry` with its COPIED flag set to `on`.
fn with_copied(entry: u64, on: bool) -> u64 {
    if on {
        entry | COPIED
    } else {
        entry & !COPIED
    }
}

/// Counts a COPIED flag that disagreed with the refcount of `what`: as
/// repaired (the caller has corrected it) with `fix`, else as found, each
/// with its message in qemu-img's words.
fn count_copied_error(rep: &mut CheckReport, fix: bool, what: std::fmt::Arguments<'_>) {
    if fix {
        rep.corruptions_fixed += 1;
        rep.messages.push(format!("Repairing OFLAG_COPIED {what}"));
    } else {
        rep.corruptions += 1;
        rep.messages.push(format!("ERROR OFLAG_COPIED {what}"));
    }
}

/// Checks (and with `fix`, corrects) the COPIED flags of the active L1
/// and L2 tables against the stored refcounts. Returns errors found.
pub(super) fn fix_copied(
    q: &Qcow2,
    ctx: &mut MetaCtx<'_>,
    rep: &mut CheckReport,
    fix: bool,
) -> Result<u64> {
    let st = q.storage();
    let cb = ctx.header.cluster_bits;
    let cs = 1u64 << cb;
    let g = CompressedGeometry::new(cb);
    let mut errors = 0;
    let mut l2buf = vec![0u8; cs as usize];
    for i in 0..ctx.l1.len() {
        let e = ctx.l1[i];
        let l2off = e & OFFSET_MASK;
        // A table past the end reads as zeros (and its refcount as 0,
        // past the refcount blocks), as in qemu-img.
        if l2off == 0 || l2off & (cs - 1) != 0 {
            continue;
        }
        // A refcount that cannot be read (its block misaligned) skips
        // the table, unreported, as in qemu-img's check_oflag_copied.
        let Ok(rc) = ctx.rc.get(st, l2off >> cb) else {
            continue;
        };
        if (rc == 1) != (e & COPIED != 0) {
            errors += 1;
            if fix {
                let ne = with_copied(e, rc == 1);
                ctx.l1[i] = ne;
                st.write_at(&ne.to_be_bytes(), ctx.header.l1_table_offset + i as u64 * 8)?;
            }
            count_copied_error(
                rep,
                fix,
                format_args!("L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"),
            );
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
                match ctx.rc.get(st, host >> cb) {
                    Ok(rc) => rc,
                    Err(_) => continue,
                }
            };
            if (rc == 1) != (raw & COPIED != 0) {
                errors += 1;
                if fix {
                    // Bit 0 as it was (reserved with extended L2 entries).
                    let orig = u64::from_be_bytes(l2buf[at..at + 8].try_into().unwrap());
                    let ne = with_copied(orig, rc == 1);
                    l2buf[at..at + 8].copy_from_slice(&ne.to_be_bytes());
                    changed = true;
                }
                count_copied_error(
                    rep,
                    fix,
                    format_args!("data cluster: l2_entry={raw:x} refcount={rc}"),
                );
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
