//! Moving a refcount block to another cluster (`rimg compact`).

use super::*;

impl Refcounts {
    /// Moves the refcount block of `group` to the free cluster at `to`,
    /// each step durable before the next, so that a crash anywhere
    /// leaves a consistent image that leaks at most (qcow2.rst,
    /// "Reference counts": the table entry is the block's one reference):
    /// 1. `to` counted (in whichever block covers it: this one, maybe);
    /// 2. the block, with that count, copied to `to`;
    /// 3. the table entry pointing at `to`;
    /// 4. the old cluster's count dropped (in the moved block, maybe).
    pub fn relocate_block(&mut self, st: &Storage, group: u64, to: u64) -> Result<()> {
        let cs = self.cluster_size();
        let Some(from) = self.block_offset(group)? else {
            return Err(Error::Corrupt(format!(
                "refcount block {group} to move does not exist"
            )));
        };
        self.update_range(st, to, cs, 1, |_| {})?;
        self.flush(st)?;
        let i = self.block_slot(st, from)?;
        let data = self.cache.data(i).to_vec();
        st.write_at(&data, to)?;
        st.sync()?;
        self.cache.remove(from);
        self.overlap.remove(Kind::RefcountBlock, from, cs);
        self.overlap.add(Kind::RefcountBlock, to, cs);
        self.table[group as usize] = to;
        self.table_dirty = true;
        self.flush(st)?;
        self.update_range(st, from, cs, -1, |_| {})?;
        self.flush(st)
    }
}

impl Refcounts {
    /// Moves the refcount table to the free clusters from `to` on (as
    /// many as it has), in the same kind of steps: the new clusters
    /// counted, the table written there, the header pointing at it, the
    /// old clusters' counts dropped.
    pub fn relocate_table(&mut self, st: &Storage, to: u64) -> Result<()> {
        let cs = self.cluster_size();
        let bytes = self.table_clusters * cs;
        self.update_range(st, to, bytes, 1, |_| {})?;
        self.flush(st)?;
        self.overlap.add(Kind::RefcountTable, to, bytes);
        self.write_table_at(st, to)?;
        st.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&to.to_be_bytes());
        hdr[8..].copy_from_slice(&(self.table_clusters as u32).to_be_bytes());
        self.overlap
            .write(st, &hdr, field::REFCOUNT_TABLE, Allow::only(Kind::Header))?;
        st.sync()?;
        let from = std::mem::replace(&mut self.table_offset, to);
        self.overlap.remove(Kind::RefcountTable, from, bytes);
        self.update_range(st, from, bytes, -1, |_| {})?;
        self.flush(st)
    }
}
