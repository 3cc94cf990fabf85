//! Emptying an image after `commit`, as QEMU's qcow2_make_empty does.
//!
//! Where nothing but the active tables takes space (version 3, no
//! snapshots, bitmaps, encryption or data file), QEMU rewrites the image
//! as a new one: dirty bit set, L1 table zeroed, header, refcount table,
//! one refcount block and L1 table laid out again in the first clusters,
//! clean again, file cut. Each step fires its blkdebug event, and a step
//! that fails leaves a dirty image for the next open to repair; iotest
//! 098 injects errors on those events and reads what the repair then
//! reports, so rimg takes the same steps in the same order. Elsewhere
//! every cluster is discarded.

use crate::error::Result;
use crate::header::{autoclear, field, incompat};
use crate::image::Image;
use crate::qcow::{MetaCtx, Qcow2};
use crate::refcount::entry_set;

impl Qcow2 {
    /// Drops every cluster of the active disk (qemu-img commit's emptying
    /// of the top image).
    pub fn make_empty(&self) -> Result<()> {
        let h = self.header();
        let cs = self.cluster_size();
        let l1_clusters = (u64::from(h.l1_size) * 8).div_ceil(cs).max(1);
        let per_block = (cs * 8) >> h.refcount_order;
        let simple = h.version >= 3
            && self.snapshots().is_empty()
            && h.autoclear_features & autoclear::BITMAPS == 0
            && 3 + l1_clusters <= per_block
            && h.crypt_method == 0
            && !h.has_data_file();
        if !simple {
            self.deallocate(0, self.size())?;
            return self.flush();
        }
        self.flush()?;
        self.with_meta(|ctx| completely_empty(self, ctx, l1_clusters))?;
        self.refresh_overlap(true);
        Ok(())
    }
}

fn completely_empty(q: &Qcow2, ctx: &mut MetaCtx<'_>, l1_clusters: u64) -> Result<()> {
    let st = q.storage();
    let cs = 1u64 << ctx.header.cluster_bits;
    ctx.drop_l2_cache();
    let set_incompat = |bits: u64| -> Result<()> {
        st.write_at(&bits.to_be_bytes(), field::INCOMPATIBLE)?;
        st.sync()
    };
    // Refcounts will be wrong until the end: the dirty bit says so.
    set_incompat(ctx.header.incompatible_features | incompat::DIRTY)?;
    st.debug_event("l1_update");
    st.write_zeroes(ctx.header.l1_table_offset, l1_clusters * cs)?;
    ctx.l1.iter_mut().for_each(|e| *e = 0);
    st.debug_event("empty_image_prepare");
    st.write_zeroes(cs, (2 + l1_clusters) * cs)?;
    st.debug_event("l1_update");
    st.debug_event("reftable_update");
    // L1 table at cluster 3, refcount table (one cluster) at cluster 1.
    let mut hdr = [0u8; 20];
    hdr[..8].copy_from_slice(&(3 * cs).to_be_bytes());
    hdr[8..16].copy_from_slice(&cs.to_be_bytes());
    hdr[16..].copy_from_slice(&1u32.to_be_bytes());
    st.write_at(&hdr, 40)?;
    st.sync()?;
    ctx.header.l1_table_offset = 3 * cs;
    ctx.header.refcount_table_offset = cs;
    ctx.header.refcount_table_clusters = 1;
    st.debug_event("refblock_alloc");
    // The first refcount block at cluster 2, counting the new structures.
    st.write_at(&(2 * cs).to_be_bytes(), cs)?;
    st.sync()?;
    let order = ctx.header.refcount_order;
    let mut block = vec![0u8; cs as usize];
    for c in 0..3 + l1_clusters {
        entry_set(&mut block, c as usize, order, 1);
    }
    st.write_at(&block, 2 * cs)?;
    st.sync()?;
    let mut table = vec![0u64; (cs / 8) as usize];
    table[0] = 2 * cs;
    ctx.rc.reset(cs, table);
    set_incompat(ctx.header.incompatible_features & !incompat::DIRTY)?;
    st.set_len((3 + l1_clusters) * cs)?;
    Ok(())
}
