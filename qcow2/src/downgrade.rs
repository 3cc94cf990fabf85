//! A downgrade to version 2 with internal snapshots: zero clusters in the
//! snapshots' L2 tables become what version 2 can express, as QEMU's
//! qcow2_expand_zero_clusters does for inactive tables (iotest 061).
//!
//! The active tables were expanded before (through guest writes, which
//! copy any L2 table they share with a snapshot). An inactive L2 table is
//! rewritten in place on disk: a zero cluster without host cluster
//! becomes unallocated where no backing file shows through, otherwise a
//! new cluster of zeros (counted once per reference to its L2 table); a
//! preallocated zero cluster has its cluster zeroed and the zero flag
//! dropped.

use crate::amend_progress::AmendProgress;
use crate::error::Result;
use crate::image::Image;
use crate::l2::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::overlap::{Allow, Kind};
use crate::qcow::{MetaCtx, Qcow2};

/// Expands the zero clusters of every snapshot's L2 tables; reports one
/// step per snapshot L1 entry, after the `visited` of `total` before.
pub(crate) fn expand_inactive(
    q: &Qcow2,
    ctx: &mut MetaCtx<'_>,
    has_backing: bool,
    progress: &mut AmendProgress<'_>,
    mut visited: u64,
    total: u64,
) -> Result<()> {
    let st = q.storage();
    let cb = ctx.header.cluster_bits;
    let cs = 1u64 << cb;
    // Inactive tables are read from disk: nothing cached may be newer.
    ctx.drop_l2_cache();
    let zeros = vec![0u8; cs as usize];
    let mut buf = vec![0u8; cs as usize];
    let snaps = ctx.snapshots.to_vec();
    for sn in &snaps {
        sn.check_l1(cs)?;
        let l1 = crate::l2::read_l1(st, sn.l1_table_offset, sn.l1_size)?;
        for &e in &l1 {
            let l2 = e & OFFSET_MASK;
            if l2 != 0 {
                let shared = ctx.rc.get(st, l2 >> cb)?;
                st.read_at(&mut buf, l2)?;
                let mut dirty = false;
                for k in 0..(cs / 8) as usize {
                    let raw = u64::from_be_bytes(buf[k * 8..k * 8 + 8].try_into().unwrap());
                    if raw & COMPRESSED != 0 || raw & ZERO == 0 {
                        continue;
                    }
                    let mut host = raw & OFFSET_MASK;
                    if host == 0 {
                        if !has_backing {
                            buf[k * 8..k * 8 + 8].fill(0);
                            dirty = true;
                            continue;
                        }
                        host = ctx.rc.alloc(st, 1)?;
                        if shared > 1 {
                            ctx.rc
                                .update_range(st, host, cs, shared as i64 - 1, |_| {})?;
                        }
                    }
                    ctx.rc.overlap.write(st, &zeros, host, Allow::NOTHING)?;
                    let copied = if shared == 1 { COPIED } else { 0 };
                    buf[k * 8..k * 8 + 8].copy_from_slice(&(host | copied).to_be_bytes());
                    dirty = true;
                }
                if dirty {
                    ctx.rc.flush(st)?;
                    ctx.rc
                        .overlap
                        .write(st, &buf, l2, Allow::only(Kind::ActiveL2))?;
                }
            }
            visited += 1;
            progress.report(visited, total);
        }
    }
    st.sync()
}
