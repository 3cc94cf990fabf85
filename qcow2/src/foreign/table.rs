//! On-disk tables of foreign formats (block maps, allocation tables),
//! clipped to the file.
//!
//! QEMU reads a whole table in one request, and whatever of it lies past
//! the end of the file reads as zeros: those entries exist and are zero.
//! A [`Table`] keeps only the bytes inside the file and answers zero for
//! the rest, which gives the same entries while a hostile entry count
//! costs no memory: what is held is at most the file's length.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::storage::Storage;

/// A table of `len` bytes at file offset `offset`, its in-file part held.
#[derive(Debug)]
pub(crate) struct Table {
    bytes: Vec<u8>,
    /// Bytes set past the held part by a writable image (an entry far
    /// out in a table the file did not reach): one entry per allocation,
    /// so memory follows what was written, not the entry's index.
    past: BTreeMap<u64, u8>,
}

impl Table {
    /// Reads the part of [offset, offset + len) that lies inside the file.
    pub(crate) fn load(st: &Storage, offset: u64, len: u64) -> Result<Table> {
        let file_len = st.len()?;
        let n = file_len.saturating_sub(offset).min(len);
        // n <= the file's length, which a Vec can hold on 64-bit hosts.
        let mut bytes = vec![0u8; n as usize];
        st.read_at(&mut bytes, offset)?;
        Ok(Table {
            bytes,
            past: BTreeMap::new(),
        })
    }

    /// Entries of `width` bytes that start inside the file (a last one
    /// cut by the end of the file included); every later entry is zero.
    pub(crate) fn entries_in_file(&self, width: u64) -> u64 {
        (self.bytes.len() as u64).div_ceil(width)
    }

    /// The `N` bytes of entry `i`, zero past the end of the file.
    fn entry<const N: usize>(&self, i: u64) -> [u8; N] {
        let mut e = [0u8; N];
        let start = i.saturating_mul(N as u64);
        let held = self.bytes.len() as u64;
        if start < held {
            let s = start as usize;
            let end = (s + N).min(self.bytes.len());
            e[..end - s].copy_from_slice(&self.bytes[s..end]);
        }
        if !self.past.is_empty() && start.saturating_add(N as u64) > held {
            for (k, b) in e.iter_mut().enumerate() {
                let at = start.saturating_add(k as u64);
                if at >= held {
                    *b = self.past.get(&at).copied().unwrap_or(0);
                }
            }
        }
        e
    }

    /// Entry `i` as a little-endian u32.
    pub(crate) fn u32_le(&self, i: u64) -> u32 {
        u32::from_le_bytes(self.entry(i))
    }

    /// Entry `i` as a little-endian u64.
    pub(crate) fn u64_le(&self, i: u64) -> u64 {
        u64::from_le_bytes(self.entry(i))
    }

    /// Sets entry `i` to the little-endian `v` (a writable image's table,
    /// after `v` is written to the file).
    pub(crate) fn set_u32_le(&mut self, i: u64, v: u32) {
        self.set(i * 4, v.to_le_bytes());
    }

    /// Sets entry `i` to the big-endian `v`.
    pub(crate) fn set_u32_be(&mut self, i: u64, v: u32) {
        self.set(i * 4, v.to_be_bytes());
    }

    /// Sets entry `i` to the little-endian `v`.
    pub(crate) fn set_u64_le(&mut self, i: u64, v: u64) {
        self.set(i * 8, v.to_le_bytes());
    }

    fn set<const N: usize>(&mut self, start: u64, v: [u8; N]) {
        let held = self.bytes.len() as u64;
        // Just past the held part (a table the file ends inside), the
        // held part grows (the file has grown as far); far past it, the
        // bytes go to `past`.
        if start + N as u64 <= held + 4096 {
            let s = start as usize;
            if self.bytes.len() < s + N {
                self.bytes.resize(s + N, 0);
            }
            self.bytes[s..s + N].copy_from_slice(&v);
        } else {
            for (k, b) in v.into_iter().enumerate() {
                self.past.insert(start + k as u64, b);
            }
        }
    }

    /// The table's bytes in [start, start + len) (a sector to write back).
    pub(crate) fn bytes(&self, start: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|k| self.entry::<1>(start + k)[0])
            .collect()
    }

    /// Entry `i` as a big-endian u32.
    pub(crate) fn u32_be(&self, i: u64) -> u32 {
        u32::from_be_bytes(self.entry(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(file: &[u8], offset: u64, len: u64) -> Table {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("rimg-table-{}-{n}", std::process::id()));
        std::fs::write(&p, file).unwrap();
        let st = Storage::open(&p, false).unwrap();
        let t = Table::load(&st, offset, len).unwrap();
        std::fs::remove_file(&p).unwrap();
        t
    }

    #[test]
    fn entries_past_the_end_of_the_file_are_zero_and_not_held() {
        let file: Vec<u8> = (1..=10).collect();
        // 4 entries from offset 2: bytes 2..10 exist, the rest does not.
        let t = table(&file, 2, 1 << 40);
        assert_eq!(t.bytes.len(), 8);
        assert_eq!(t.entries_in_file(4), 2);
        assert_eq!(t.u32_le(0), u32::from_le_bytes([3, 4, 5, 6]));
        assert_eq!(t.u32_le(1), u32::from_le_bytes([7, 8, 9, 10]));
        assert_eq!(t.u32_le(2), 0);
        assert_eq!(t.u32_le(u64::MAX), 0);
        assert_eq!(t.u32_be(1), u32::from_be_bytes([7, 8, 9, 10]));
        // An entry cut by the end of the file: its missing bytes are zero.
        let t = table(&file, 4, 100);
        assert_eq!(t.entries_in_file(4), 2);
        assert_eq!(t.u32_le(1), u32::from_le_bytes([9, 10, 0, 0]));
        // A table that starts past the end holds nothing.
        let t = table(&file, 4096, 100);
        assert_eq!(t.entries_in_file(4), 0);
        assert_eq!(t.u32_le(0), 0);
    }

    #[test]
    fn set_entries_grow_the_held_part_or_stay_apart() {
        let file: Vec<u8> = (1..=10).collect();
        let mut t = table(&file, 2, 1 << 40);
        t.set_u32_le(1, 0xaabbccdd);
        t.set_u32_be(3, 7 << 24);
        assert_eq!((t.u32_le(1), t.u32_le(3), t.u32_le(2)), (0xaabbccdd, 7, 0));
        assert_eq!(t.bytes.len(), 16);
        // Far out: held apart, nothing allocated up to it.
        t.set_u32_le(1 << 28, 0x01020304);
        assert_eq!(t.bytes.len(), 16);
        t.set_u64_le(1 << 28, 9);
        assert_eq!(t.u64_le(1 << 28), 9);
        assert_eq!(t.u32_le(1 << 28), 0x01020304);
        assert_eq!(t.u32_le((1 << 28) - 1), 0);
        assert_eq!(t.bytes((1 << 30) - 2, 8), [0, 0, 4, 3, 2, 1, 0, 0]);
        assert_eq!(t.bytes(12, 6), [7, 0, 0, 0, 0, 0]);
        t.set_u64_le(2, 0x1122_3344_5566_7788);
        assert_eq!(t.u64_le(2), 0x1122_3344_5566_7788);
        assert_eq!((t.u32_le(4), t.u32_le(5)), (0x5566_7788, 0x1122_3344));
        assert_eq!(t.bytes.len(), 24);
    }
}
