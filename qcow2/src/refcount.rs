//! Refcount table, refcount blocks and the cluster allocator
//! (qcow2.rst, "Cluster refcounts").
//!
//! Invariants this module keeps:
//! - A cluster is handed out only if its refcount is 0, and its refcount is
//!   raised (in the cache) before it is handed out, so two allocations can
//!   never get the same cluster.
//! - Refcount blocks count themselves: a new block is placed inside the
//!   range it covers where possible, else in a cluster that an existing
//!   block covers.
//! - Refcount blocks may be written back at any time: increments reach the
//!   disk early (a leak at worst), and decrements are only made once no
//!   pointer on disk references the cluster (see `Qcow2::flush`).
//! - A refcount table entry is written only after the block it points to is
//!   durable, and the header switches to a new table only after the table
//!   is durable.
//! - The metadata overlap map (`overlap`) lives here, with the allocator:
//!   every cluster handed out is checked against it (a free cluster can be
//!   no metadata), refcount blocks and the table are registered where they
//!   are created, moved or dropped, and every write this module makes is
//!   checked first (see [`crate::overlap`]).

use std::ops::Range;

mod relocate;

use crate::cache::TableCache;
use crate::error::{Error, Result};
use crate::header::{field, MAX_REFTABLE_BYTES};
use crate::overlap::{Allow, Kind, MetadataMap};
use crate::storage::Storage;
use crate::units::HostOffset;

pub(crate) struct Refcounts {
    /// Host offsets of refcount blocks (0 = none); bits 0-8 are reserved.
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u64,
    table_dirty: bool,
    order: u32,
    cluster_bits: u32,
    /// log2 of refcount entries per block.
    block_bits: u32,
    cache: TableCache,
    cache_bytes: u64,
    /// No cluster below this one is free (a hint, kept conservative).
    free_hint: u64,
    /// One past the highest cluster that is allocated or written: where
    /// fresh space at the end of the file begins.
    end: u64,
    /// Where the image's metadata is; checked before every write of the
    /// engine (the `Qcow2` reaches it through here too).
    pub overlap: MetadataMap,
}

/// Mask for the host offset in a refcount table entry.
const RT_OFFSET_MASK: u64 = !511;

impl Refcounts {
    pub fn load(
        st: &Storage,
        table_offset: u64,
        table_clusters: u64,
        order: u32,
        cluster_bits: u32,
        cache_bytes: u64,
    ) -> Result<Refcounts> {
        let cs = 1u64 << cluster_bits;
        let bytes = (table_clusters * cs) as usize; // bounded by header validation
        let mut raw = vec![0u8; bytes];
        st.read_at(&mut raw, table_offset)?;
        let table = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        let end = st.len()?.div_ceil(cs);
        let mut rc = Refcounts {
            table,
            table_offset,
            table_clusters,
            table_dirty: false,
            order,
            cluster_bits,
            block_bits: cluster_bits + 3 - order,
            cache: TableCache::new(cs as usize, cache_bytes),
            cache_bytes,
            free_hint: 0,
            end,
            overlap: MetadataMap::new(cluster_bits, false),
        };
        rc.register_overlap();
        Ok(rc)
    }

    /// Installs `map` as the overlap map, with this table and its blocks
    /// registered in it (in place of any refcount structures it had).
    pub fn install_overlap(&mut self, map: MetadataMap) {
        self.overlap = map;
        self.register_overlap();
    }

    /// Takes the overlap map out (to carry it over to a reloaded
    /// `Refcounts`).
    pub fn take_overlap(&mut self) -> MetadataMap {
        std::mem::replace(
            &mut self.overlap,
            MetadataMap::new(self.cluster_bits, false),
        )
    }

    fn register_overlap(&mut self) {
        let cs = self.cluster_size();
        self.overlap.clear_kind(Kind::RefcountTable);
        self.overlap.clear_kind(Kind::RefcountBlock);
        self.overlap.add(
            Kind::RefcountTable,
            self.table_offset,
            self.table_clusters * cs,
        );
        let blocks = self
            .table
            .iter()
            .map(|e| e & RT_OFFSET_MASK)
            .filter(|&off| off != 0)
            .map(|off| (off, cs));
        self.overlap.extend(Kind::RefcountBlock, blocks);
    }

    /// Writes back the changed part of the dirty block in cache slot `i`.
    fn write_block(&mut self, st: &Storage, i: usize) -> Result<()> {
        let Some(r) = self.cache.dirty_range(i) else {
            return Ok(());
        };
        let at = self.cache.key(i) + r.start as u64;
        self.overlap.write(
            st,
            &self.cache.data(i)[r],
            at,
            Allow::only(Kind::RefcountBlock),
        )?;
        self.cache.mark_clean(i);
        Ok(())
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.order)) - 1
        }
    }
    pub fn cache_bytes(&self) -> u64 {
        self.cache_bytes
    }
    pub fn table_offset(&self) -> u64 {
        self.table_offset
    }
    pub fn table_clusters(&self) -> u64 {
        self.table_clusters
    }
    pub fn table(&self) -> &[u64] {
        &self.table
    }
    /// One past the highest cluster in use or written.
    pub fn end(&self) -> u64 {
        self.end
    }
    pub fn note_end(&mut self, cluster_end: u64) {
        self.end = self.end.max(cluster_end);
    }
    /// Clusters `run`, allocated and never written, were given back: if
    /// they end the used area, it ends before them.
    pub fn unnote_end(&mut self, run: Range<u64>) {
        if self.end == run.end {
            self.end = run.start;
        }
    }

    fn block_offset(&self, group: u64) -> Result<Option<u64>> {
        let Some(&e) = self.table.get(group as usize) else {
            return Ok(None);
        };
        let off = e & RT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off & (self.cluster_size() - 1) != 0 {
            return Err(Error::Corrupt(format!(
                "refcount block offset {off:#x} is not cluster aligned"
            )));
        }
        Ok(Some(off))
    }

    /// Cache slot of the refcount block at `off`, loading it if needed.
    fn block_slot(&mut self, st: &Storage, off: u64) -> Result<usize> {
        if let Some(i) = self.cache.lookup(off) {
            return Ok(i);
        }
        let i = self.cache.victim();
        if self.cache.is_dirty(i) {
            self.write_block(st, i)?;
        }
        st.read_at(self.cache.buffer(i), off)?;
        self.cache.assign(i, off, false);
        Ok(i)
    }

    pub fn get(&mut self, st: &Storage, cluster: u64) -> Result<u64> {
        let group = cluster >> self.block_bits;
        let Some(off) = self.block_offset(group)? else {
            return Ok(0);
        };
        let i = self.block_slot(st, off)?;
        let idx = (cluster & ((1 << self.block_bits) - 1)) as usize;
        Ok(entry_get(self.cache.data(i), idx, self.order))
    }

    /// Sets the refcount of `cluster`, creating its refcount block if
    /// needed. `avoid` is a range of clusters that must not be used for new
    /// refcount structures (an allocation in progress).
    fn set(&mut self, st: &Storage, cluster: u64, value: u64, avoid: &Range<u64>) -> Result<()> {
        let group = cluster >> self.block_bits;
        let off = match self.block_offset(group)? {
            Some(off) => off,
            None => {
                if value == 0 {
                    return Ok(());
                }
                self.create_block(st, group, avoid)?
            }
        };
        let i = self.block_slot(st, off)?;
        let idx = (cluster & ((1 << self.block_bits) - 1)) as usize;
        let b = self.cache.data_mut_part(i, entry_bytes(idx, self.order));
        entry_set(b, idx, self.order, value);
        if value == 0 {
            self.free_hint = self.free_hint.min(cluster);
        } else {
            self.note_end(cluster + 1);
        }
        Ok(())
    }

    /// Sets the refcount of `cluster` to `value` (a repair's: with
    /// 64-bit refcounts the difference from the current one need not fit
    /// a signed delta).
    pub fn set_refcount(&mut self, st: &Storage, cluster: u64, value: u64) -> Result<()> {
        if value > self.max_refcount() {
            return Err(Error::RefcountOverflow(cluster << self.cluster_bits));
        }
        self.set(st, cluster, value, &(0..0))
    }

    /// Adds `delta` to the refcount of every cluster touched by the byte
    /// range [offset, offset + len). Returns the clusters whose refcount
    /// dropped to zero via `freed`.
    pub fn update_range(
        &mut self,
        st: &Storage,
        offset: u64,
        len: u64,
        delta: i64,
        mut freed: impl FnMut(u64),
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        for c in first..=last {
            let cur = self.get(st, c)?;
            let new = if delta >= 0 {
                cur.checked_add(delta as u64)
                    .filter(|&v| v <= self.max_refcount())
                    .ok_or(Error::RefcountOverflow(c << self.cluster_bits))?
            } else {
                cur.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                    Error::Corrupt(format!(
                        "refcount of cluster at {:#x} would drop below zero",
                        c << self.cluster_bits
                    ))
                })?
            };
            self.set(st, c, new, &(0..0))?;
            if new == 0 {
                freed(c);
            }
        }
        Ok(())
    }

    /// [`alloc`](Self::alloc) for guest data: the host offset of `n` new
    /// contiguous clusters, typed as the data path uses it.
    pub(crate) fn alloc_data(&mut self, st: &Storage, n: u64) -> Result<HostOffset> {
        self.alloc(st, n).map(HostOffset)
    }

    /// Drops one reference from every host cluster touched by [host,
    /// host + len): data given back or freed. `freed` as in
    /// [`update_range`](Self::update_range).
    pub(crate) fn unref(
        &mut self,
        st: &Storage,
        host: HostOffset,
        len: u64,
        freed: impl FnMut(u64),
    ) -> Result<()> {
        self.update_range(st, host.0, len, -1, freed)
    }

    /// Allocates `n` contiguous free clusters, sets their refcounts to 1 and
    /// returns the host offset of the first.
    pub fn alloc(&mut self, st: &Storage, n: u64) -> Result<u64> {
        let (start, first_free) = self.find_free(st, n, self.free_hint)?;
        // A cluster with refcount 0 is no metadata; if it is, the
        // refcounts are wrong and using it would overwrite a table.
        self.overlap.check(
            st,
            start << self.cluster_bits,
            n << self.cluster_bits,
            Allow::NOTHING,
        )?;
        let range = start..start + n;
        // Blocks first (they may need clusters, never from `range`), so
        // that setting the refcounts below cannot recurse.
        let (g0, g1) = (start >> self.block_bits, (start + n - 1) >> self.block_bits);
        for g in g0..=g1 {
            if self.block_offset(g)?.is_none() {
                self.create_block(st, g, &range)?;
            }
        }
        for c in range.clone() {
            if self.get(st, c)? != 0 {
                // A refcount structure created above may not land in the
                // range; this is an internal invariant.
                return Err(Error::Corrupt(format!(
                    "allocator picked in-use cluster {:#x}",
                    c << self.cluster_bits
                )));
            }
            self.set(st, c, 1, &range)?;
        }
        // Everything between the old hint and the first free cluster seen
        // is in use; the range just taken is too.
        self.free_hint = if first_free == start {
            start + n
        } else {
            first_free
        };
        Ok(start << self.cluster_bits)
    }

    /// First run of `n` clusters with refcount 0 at or after `from`, and
    /// the first free cluster seen on the way.
    fn find_free(&mut self, st: &Storage, n: u64, from: u64) -> Result<(u64, u64)> {
        let mut run_start = from;
        let mut first_free = None;
        let mut c = from;
        let per_block = 1u64 << self.block_bits;
        while c - run_start < n {
            let group = c >> self.block_bits;
            if self.block_offset(group)?.is_none() {
                // No block: the whole group is free.
                first_free.get_or_insert(c);
                c = (group + 1) * per_block;
                continue;
            }
            if self.get(st, c)? == 0 {
                first_free.get_or_insert(c);
                c += 1;
            } else {
                c += 1;
                run_start = c;
            }
        }
        Ok((run_start, first_free.unwrap_or(run_start)))
    }

    /// Creates the refcount block for `group`, placing it so it counts
    /// itself when possible. Returns its host offset.
    fn create_block(&mut self, st: &Storage, group: u64, avoid: &Range<u64>) -> Result<u64> {
        if group as usize >= self.table.len() {
            self.grow_table(st, group + 1, avoid)?;
            if let Some(off) = self.block_offset(group)? {
                return Ok(off);
            }
        }
        let per_block = 1u64 << self.block_bits;
        let g_start = group * per_block;
        // Every cluster of a group without a block has refcount 0. Take the
        // first one outside `avoid`.
        let candidate = if !avoid.contains(&g_start) {
            Some(g_start)
        } else if avoid.end < g_start + per_block {
            Some(avoid.end)
        } else {
            None
        };
        let (cluster, self_counting) = match candidate {
            Some(c) => (c, true),
            // `avoid` covers the whole group: place the block elsewhere.
            None => {
                let c = self.find_free_outside(st, avoid)?;
                (c, false)
            }
        };
        let off = cluster << self.cluster_bits;
        self.overlap
            .check(st, off, self.cluster_size(), Allow::NOTHING)?;
        let i = self.cache.victim();
        if self.cache.is_dirty(i) {
            self.write_block(st, i)?;
        }
        self.cache.buffer(i).fill(0);
        self.cache.assign(i, off, true);
        self.table[group as usize] = off;
        self.overlap
            .add(Kind::RefcountBlock, off, self.cluster_size());
        self.table_dirty = true;
        self.note_end(cluster + 1);
        if self_counting {
            let idx = (cluster - g_start) as usize;
            entry_set(self.cache.data_mut(i), idx, self.order, 1);
        } else {
            let avoid2 = avoid.start.min(cluster)..avoid.end.max(cluster + 1);
            self.set(st, cluster, 1, &avoid2)?;
        }
        Ok(off)
    }

    fn find_free_outside(&mut self, st: &Storage, avoid: &Range<u64>) -> Result<u64> {
        let (c, _) = self.find_free(st, 1, self.free_hint)?;
        if avoid.contains(&c) {
            return Ok(self.find_free(st, 1, avoid.end)?.0);
        }
        Ok(c)
    }

    /// Replaces the refcount table with a larger one of at least
    /// `min_entries`, placed at the end of the file together with the new
    /// refcount blocks that cover it.
    fn grow_table(&mut self, st: &Storage, min_entries: u64, avoid: &Range<u64>) -> Result<()> {
        let cs = self.cluster_size();
        let per_block = 1u64 << self.block_bits;
        let start = self.end.max(avoid.end);
        let old_len = self.table.len() as u64;
        let mut want = min_entries.max(old_len + old_len / 2).max(1);
        let (mut tc, mut blocks): (u64, Vec<u64>);
        loop {
            tc = (want * 8).div_ceil(cs);
            // Groups that the new area (table + blocks) touches and that
            // have no block yet; iterate until the layout is stable.
            let mut nb = 0u64;
            loop {
                let area_end = start + tc + nb;
                blocks = (start / per_block..=(area_end - 1) / per_block)
                    .filter(|&g| {
                        self.table
                            .get(g as usize)
                            .is_none_or(|&e| e & RT_OFFSET_MASK == 0)
                    })
                    .collect();
                if blocks.len() as u64 == nb {
                    break;
                }
                nb = blocks.len() as u64;
            }
            let need = blocks.iter().max().map_or(0, |g| g + 1).max(min_entries);
            if need <= tc * cs / 8 {
                want = tc * cs / 8;
                break;
            }
            want = need;
        }
        if want * 8 > MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge("refcount table would exceed 8 MiB".into()));
        }
        let area_clusters = tc + blocks.len() as u64;
        self.overlap.check(
            st,
            start << self.cluster_bits,
            area_clusters << self.cluster_bits,
            Allow::NOTHING,
        )?;
        // Lay out: table at [start, start+tc), blocks after it.
        let mut table = self.table.clone();
        table.resize(want as usize, 0);
        for (k, &g) in blocks.iter().enumerate() {
            table[g as usize] = (start + tc + k as u64) << self.cluster_bits;
        }
        let old_table = std::mem::replace(&mut self.table, table);
        let area = start..start + tc + blocks.len() as u64;
        // New blocks start empty; then count the whole area.
        for &g in &blocks {
            let off = self.table[g as usize];
            let i = self.cache.victim();
            if self.cache.is_dirty(i) {
                self.write_block(st, i)?;
            }
            self.cache.buffer(i).fill(0);
            self.cache.assign(i, off, true);
            self.overlap.add(Kind::RefcountBlock, off, cs);
        }
        self.overlap
            .add(Kind::RefcountTable, start << self.cluster_bits, tc * cs);
        self.note_end(area.end);
        for c in area.clone() {
            self.set(st, c, 1, &area)?;
        }
        // Durable order: blocks, then table, then header, then free the old.
        self.write_dirty_blocks(st)?;
        st.sync()?;
        self.write_table_at(st, start << self.cluster_bits)?;
        st.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&(start << self.cluster_bits).to_be_bytes());
        hdr[8..].copy_from_slice(&(tc as u32).to_be_bytes());
        self.overlap
            .write(st, &hdr, field::REFCOUNT_TABLE, Allow::only(Kind::Header))?;
        st.sync()?;
        let (old_off, old_clusters) = (self.table_offset, self.table_clusters);
        self.overlap
            .remove(Kind::RefcountTable, old_off, old_clusters * cs);
        self.table_offset = start << self.cluster_bits;
        self.table_clusters = tc;
        self.table_dirty = false;
        drop(old_table);
        self.update_range(st, old_off, old_clusters * cs, -1, |_| {})?;
        Ok(())
    }

    fn write_table_at(&mut self, st: &Storage, off: u64) -> Result<()> {
        let cs = self.cluster_size() as usize;
        let mut raw = vec![0u8; (self.table.len() * 8).next_multiple_of(cs)];
        for (k, e) in self.table.iter().enumerate() {
            raw[k * 8..k * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.overlap
            .write(st, &raw, off, Allow::only(Kind::RefcountTable))
    }

    fn write_dirty_blocks(&mut self, st: &Storage) -> Result<()> {
        for i in self.cache.dirty_slots() {
            self.write_block(st, i)?;
        }
        Ok(())
    }

    /// Whether `flush` has something to write (and will sync).
    pub fn is_dirty(&self) -> bool {
        self.cache.has_dirty() || self.table_dirty
    }

    /// Writes dirty blocks, then (after they are durable) the table
    /// entries that point to new blocks. Leaves everything durable.
    pub fn flush(&mut self, st: &Storage) -> Result<()> {
        if self.cache.has_dirty() {
            self.write_dirty_blocks(st)?;
            st.sync()?;
        }
        if self.table_dirty {
            self.write_table_at(st, self.table_offset)?;
            st.sync()?;
            self.table_dirty = false;
        }
        Ok(())
    }

    /// Removes the refcount blocks that count nothing but themselves (after
    /// a shrink freed what they covered), as QEMU's qcow2_shrink_reftable
    /// does, so that the file can end sooner. Order: the table without
    /// them is durable first; only then does a block counted by another
    /// block lose that reference (a self-counting block's count goes with
    /// it).
    pub fn drop_unused_blocks(&mut self, st: &Storage) -> Result<usize> {
        self.flush(st)?;
        let per_block = 1u64 << self.block_bits;
        let mut unused = Vec::new();
        for g in 0..self.table.len() as u64 {
            let Some(off) = self.block_offset(g)? else {
                continue;
            };
            let i = self.block_slot(st, off)?;
            let own = off >> self.cluster_bits;
            let mut b = self.cache.data(i).to_vec();
            if own >> self.block_bits == g {
                entry_set(&mut b, (own & (per_block - 1)) as usize, self.order, 0);
            }
            if b.iter().all(|&x| x == 0) {
                unused.push((g, off));
            }
        }
        if unused.is_empty() {
            return Ok(0);
        }
        for &(g, off) in &unused {
            self.table[g as usize] = 0;
            self.overlap
                .remove(Kind::RefcountBlock, off, self.cluster_size());
        }
        self.table_dirty = true;
        self.flush(st)?;
        for &(g, off) in &unused {
            self.cache.remove(off);
            let own = off >> self.cluster_bits;
            if own >> self.block_bits != g {
                self.update_range(st, off, 1, -1, |_| {})?;
            }
            self.free_hint = self.free_hint.min(own);
        }
        self.flush(st)?;
        Ok(unused.len())
    }

    /// Drops cached blocks (after the structures were rebuilt elsewhere).
    pub fn reset(&mut self, table_offset: u64, table: Vec<u64>) {
        self.table_clusters = (table.len() as u64 * 8).div_ceil(self.cluster_size());
        self.table = table;
        self.table_offset = table_offset;
        self.table_dirty = false;
        self.cache.clear();
        self.free_hint = 0;
        self.register_overlap();
    }
}

/// The bytes of a block that refcount entry `idx` lies in.
fn entry_bytes(idx: usize, order: u32) -> Range<usize> {
    let (bit, bits) = (idx << order, 1usize << order);
    bit / 8..(bit + bits).div_ceil(8)
}

/// Reads refcount entry `idx` of a block (qcow2.rst: widths below 8 bits
/// are packed from the least significant bit of each byte; wider ones are
/// big-endian).
pub(crate) fn entry_get(block: &[u8], idx: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (idx % per_byte) * bits;
            ((block[idx / per_byte] >> shift) as u64) & ((1u64 << bits) - 1)
        }
        3 => block[idx] as u64,
        4 => u16::from_be_bytes([block[2 * idx], block[2 * idx + 1]]) as u64,
        5 => u32::from_be_bytes(block[4 * idx..4 * idx + 4].try_into().unwrap()) as u64,
        _ => u64::from_be_bytes(block[8 * idx..8 * idx + 8].try_into().unwrap()),
    }
}

pub(crate) fn entry_set(block: &mut [u8], idx: usize, order: u32, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (idx % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[idx / per_byte];
            *b = (*b & !mask) | (((v as u8) << shift) & mask);
        }
        3 => block[idx] = v as u8,
        4 => block[2 * idx..2 * idx + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => block[4 * idx..4 * idx + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => block[8 * idx..8 * idx + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_roundtrip_every_width() {
        for order in 0..=6u32 {
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let mut block = vec![0u8; 512];
            let n = (512 * 8) >> order;
            for i in 0..n {
                entry_set(&mut block, i, order, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    entry_get(&block, i, order),
                    (i as u64 * 7) & max,
                    "order {order} idx {i}"
                );
                // Setting an entry changes only the bytes said to hold it.
                let r = entry_bytes(i, order);
                let mut b = block.clone();
                entry_set(&mut b, i, order, !entry_get(&block, i, order) & max);
                for (k, (x, y)) in block.iter().zip(&b).enumerate() {
                    assert!(x == y || r.contains(&k), "order {order} idx {i} byte {k}");
                }
                assert_ne!(block[r.clone()], b[r]);
            }
        }
    }
}
