//! A small write-back cache of metadata tables (L2 tables, refcount
//! blocks), keyed by host offset.
//!
//! The cache only stores; it never does I/O. Its owner decides when a dirty
//! table may be written (refcount blocks before the L2 tables that depend
//! on them, see the crate docs), so eviction hands the victim back instead
//! of writing it. Buffers are reused when a slot is recycled: a warm cache
//! allocates nothing.
//!
//! Each slot keeps the byte range changed since it was last written, so
//! that a write-back covers only the pages that changed: with metadata
//! written at every completed request (`MetadataPersistence`), a whole
//! 64 KiB table per 8-byte entry would be most of the cost.

use std::collections::HashMap;
use std::ops::Range;

/// Unit of partial write-back: the page, so the kernel never reads a
/// page in to merge a partial write, and a page is the unit it keeps.
pub(crate) const WRITE_UNIT: usize = 4096;

pub(crate) struct TableCache {
    table_bytes: usize,
    capacity: usize,
    slots: Vec<Slot>,
    index: HashMap<u64, usize>,
    tick: u64,
}

struct Slot {
    /// Host offset of the table; `u64::MAX` marks an empty slot.
    key: u64,
    data: Box<[u8]>,
    /// Bytes changed since the table was last written (None: clean).
    dirty: Option<Range<usize>>,
    last_use: u64,
}

const EMPTY: u64 = u64::MAX;

impl TableCache {
    /// A cache of `capacity_bytes / table_bytes` tables, at least 4.
    pub fn new(table_bytes: usize, capacity_bytes: u64) -> Self {
        let capacity = ((capacity_bytes / table_bytes as u64) as usize).max(4);
        TableCache {
            table_bytes,
            capacity,
            slots: Vec::new(),
            // Grown as tables are loaded: a small image with tiny
            // clusters would otherwise pay for a large empty index.
            index: HashMap::new(),
            tick: 0,
        }
    }

    /// Slot index holding `key`, marked as recently used.
    pub fn lookup(&mut self, key: u64) -> Option<usize> {
        let i = *self.index.get(&key)?;
        self.tick += 1;
        self.slots[i].last_use = self.tick;
        Some(i)
    }

    /// A slot to load a new table into: an empty one, or the least recently
    /// used. The caller must write the victim back first if
    /// [`is_dirty`](Self::is_dirty), then call [`assign`](Self::assign).
    pub fn victim(&mut self) -> usize {
        if self.slots.len() < self.capacity {
            self.slots.push(Slot {
                key: EMPTY,
                data: vec![0u8; self.table_bytes].into_boxed_slice(),
                dirty: None,
                last_use: 0,
            });
            return self.slots.len() - 1;
        }
        if let Some(i) = self.slots.iter().position(|s| s.key == EMPTY) {
            return i;
        }
        self.slots
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.last_use)
            .map(|(i, _)| i)
            .expect("capacity is at least 4")
    }

    /// Gives slot `i` to `key`; its buffer is to be filled by the caller.
    /// `dirty`: the whole table is to be written (a new one).
    pub fn assign(&mut self, i: usize, key: u64, dirty: bool) {
        let old = self.slots[i].key;
        if old != EMPTY {
            self.index.remove(&old);
        }
        // One slot per key: a stale copy elsewhere must never be written.
        if let Some(j) = self.index.remove(&key) {
            self.slots[j].key = EMPTY;
            self.slots[j].dirty = None;
        }
        self.tick += 1;
        let all = 0..self.table_bytes;
        let s = &mut self.slots[i];
        s.key = key;
        s.dirty = dirty.then_some(all);
        s.last_use = self.tick;
        self.index.insert(key, i);
    }

    pub fn key(&self, i: usize) -> u64 {
        self.slots[i].key
    }
    pub fn data(&self, i: usize) -> &[u8] {
        &self.slots[i].data
    }
    /// Mutable access; marks the whole table dirty.
    pub fn data_mut(&mut self, i: usize) -> &mut [u8] {
        let all = 0..self.table_bytes;
        self.data_mut_part(i, all)
    }
    /// Mutable access to the whole table, marking only `changed` dirty:
    /// the caller changes no byte outside it.
    pub fn data_mut_part(&mut self, i: usize, changed: Range<usize>) -> &mut [u8] {
        let s = &mut self.slots[i];
        s.dirty = Some(match s.dirty.take() {
            None => changed,
            Some(d) => d.start.min(changed.start)..d.end.max(changed.end),
        });
        &mut s.data
    }
    /// The bytes of slot `i` to write back: the changed range widened to
    /// whole [`WRITE_UNIT`]s (within the table), or None when clean.
    pub fn dirty_range(&self, i: usize) -> Option<Range<usize>> {
        let s = &self.slots[i];
        let d = s.dirty.as_ref().filter(|_| s.key != EMPTY)?;
        let start = d.start - d.start % WRITE_UNIT;
        let end = d.end.next_multiple_of(WRITE_UNIT).min(self.table_bytes);
        Some(start..end)
    }
    /// Buffer access for loading, without marking dirty.
    pub fn buffer(&mut self, i: usize) -> &mut [u8] {
        &mut self.slots[i].data
    }
    pub fn is_dirty(&self, i: usize) -> bool {
        self.slots[i].key != EMPTY && self.slots[i].dirty.is_some()
    }
    pub fn mark_clean(&mut self, i: usize) {
        self.slots[i].dirty = None;
    }
    pub fn has_dirty(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.key != EMPTY && s.dirty.is_some())
    }
    /// Slots with dirty tables, in host offset order (sequential writes).
    pub fn dirty_slots(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.is_dirty(i))
            .collect();
        v.sort_by_key(|&i| self.slots[i].key);
        v
    }
    /// Forgets `key` (its cluster was freed); any dirty data is dropped.
    pub fn remove(&mut self, key: u64) {
        if let Some(i) = self.index.remove(&key) {
            self.slots[i].key = EMPTY;
            self.slots[i].dirty = None;
        }
    }
    /// Forgets everything (after the tables were rebuilt on disk).
    pub fn clear(&mut self) {
        self.index.clear();
        self.slots.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_ranges_grow_to_whole_pages_within_the_table() {
        let mut c = TableCache::new(65536, 4 * 65536);
        let i = c.victim();
        c.assign(i, 0x10000, false);
        assert_eq!(c.dirty_range(i), None);
        c.data_mut_part(i, 8..16)[8] = 1;
        assert_eq!(c.dirty_range(i), Some(0..4096));
        c.data_mut_part(i, 4096 * 3 + 8..4096 * 3 + 16);
        assert_eq!(c.dirty_range(i), Some(0..4 * 4096), "one range, unions");
        c.mark_clean(i);
        assert_eq!(c.dirty_range(i), None);
        c.data_mut_part(i, 65528..65536);
        assert_eq!(c.dirty_range(i), Some(61440..65536));
        c.data_mut(i);
        assert_eq!(c.dirty_range(i), Some(0..65536));
        // A new table is written whole.
        let j = c.victim();
        c.assign(j, 0x20000, true);
        assert_eq!(c.dirty_range(j), Some(0..65536));
        // Tables smaller than a page are written whole.
        let mut s = TableCache::new(512, 4 * 512);
        let k = s.victim();
        s.assign(k, 512, false);
        s.data_mut_part(k, 16..24);
        assert_eq!(s.dirty_range(k), Some(0..512));
    }
}
