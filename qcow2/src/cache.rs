//! A small write-back cache of metadata tables (L2 tables, refcount
//! blocks), keyed by host offset.
//!
//! The cache only stores; it never does I/O. Its owner decides when a dirty
//! table may be written (refcount blocks before the L2 tables that depend
//! on them, see the crate docs), so eviction hands the victim back instead
//! of writing it. Buffers are reused when a slot is recycled: a warm cache
//! allocates nothing.

use std::collections::HashMap;

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
    dirty: bool,
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
                dirty: false,
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
    pub fn assign(&mut self, i: usize, key: u64, dirty: bool) {
        let old = self.slots[i].key;
        if old != EMPTY {
            self.index.remove(&old);
        }
        // One slot per key: a stale copy elsewhere must never be written.
        if let Some(j) = self.index.remove(&key) {
            self.slots[j].key = EMPTY;
            self.slots[j].dirty = false;
        }
        self.tick += 1;
        let s = &mut self.slots[i];
        s.key = key;
        s.dirty = dirty;
        s.last_use = self.tick;
        self.index.insert(key, i);
    }

    pub fn key(&self, i: usize) -> u64 {
        self.slots[i].key
    }
    pub fn data(&self, i: usize) -> &[u8] {
        &self.slots[i].data
    }
    /// Mutable access; marks the table dirty.
    pub fn data_mut(&mut self, i: usize) -> &mut [u8] {
        self.slots[i].dirty = true;
        &mut self.slots[i].data
    }
    /// Buffer access for loading, without marking dirty.
    pub fn buffer(&mut self, i: usize) -> &mut [u8] {
        &mut self.slots[i].data
    }
    pub fn is_dirty(&self, i: usize) -> bool {
        self.slots[i].key != EMPTY && self.slots[i].dirty
    }
    pub fn mark_clean(&mut self, i: usize) {
        self.slots[i].dirty = false;
    }
    pub fn has_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.key != EMPTY && s.dirty)
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
            self.slots[i].dirty = false;
        }
    }
    /// Forgets everything (after the tables were rebuilt on disk).
    pub fn clear(&mut self) {
        self.index.clear();
        self.slots.clear();
    }
}
