//! Metadata overlap checks before every write, as QEMU's
//! `qcow2_pre_write_overlap_check` makes them in its default "cached"
//! mode.
//!
//! # The invariant
//! No byte is written to the image file inside a host cluster that holds
//! one of these structures, unless the write is that structure rewriting
//! itself:
//! - the header cluster (cluster 0),
//! - the active L1 table,
//! - the active L2 tables: every table the active L1 names, in the L2
//!   cache or not,
//! - the refcount table and every refcount block it names,
//! - the snapshot table and every snapshot's L1 table,
//! - the bitmap directory (bitmap tables and data are not tracked, as in
//!   QEMU: a writable open keeps their content in memory).
//!
//! L2 tables that only snapshots reference are not tracked, as in QEMU's
//! default mode (they are reachable only by reading every snapshot L1).
//!
//! Every write the engine makes (guest data in place or into new clusters,
//! copy-on-write fill, L2/L1 tables, refcount blocks and table, snapshot
//! table, header fields, holes punched for freed clusters) goes through
//! [`MetadataMap::check`] (or the `write*` helpers that call it) first,
//! with the one kind of structure it is allowed to overlap: itself.
//! Allocation checks every new cluster against all kinds, since a cluster
//! with refcount 0 can be none of them.
//!
//! # Keeping it cheap
//! The map is updated where the structures change (an L1 entry set, a
//! refcount block created or dropped, the L1, refcount table or snapshot
//! table moved), never rebuilt per write. Single-cluster structures (the
//! header, L2 tables, refcount blocks) sit in one sorted vector, 8 bytes
//! each (the L1 table itself costs as much); multi-cluster tables in a
//! short sorted vector of ranges. A check is two binary searches.
//!
//! # A refused write
//! The write is not made; the error says which structure it would have
//! overwritten. The image is marked corrupt on disk (incompatible feature
//! bit 1, version 3 only, as QEMU's `qcow2_mark_corrupt`): QEMU and rimg
//! then refuse to open it read-write until `check -r all` repaired it.
//! From then on this open image refuses every write (QEMU detaches the
//! driver the same way), so none of the in-memory metadata that led to the
//! overlap reaches the file.

use crate::error::{Error, Result};
use crate::header::{field, incompat};
use crate::storage::Storage;

/// A kind of metadata structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Header = 0,
    ActiveL1 = 1,
    ActiveL2 = 2,
    RefcountTable = 3,
    RefcountBlock = 4,
    SnapshotTable = 5,
    SnapshotL1 = 6,
    BitmapDirectory = 7,
}

/// Every kind, by number (three bits of a map key).
const KINDS: [Kind; 8] = [
    Kind::Header,
    Kind::ActiveL1,
    Kind::ActiveL2,
    Kind::RefcountTable,
    Kind::RefcountBlock,
    Kind::SnapshotTable,
    Kind::SnapshotL1,
    Kind::BitmapDirectory,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Header => "qcow2 header",
            Kind::ActiveL1 => "active L1 table",
            Kind::ActiveL2 => "active L2 table",
            Kind::RefcountTable => "refcount table",
            Kind::RefcountBlock => "refcount block",
            Kind::SnapshotTable => "snapshot table",
            Kind::SnapshotL1 => "snapshot L1 table",
            Kind::BitmapDirectory => "bitmap directory",
        }
    }

    /// Structures that always fill exactly one cluster.
    fn single(self) -> bool {
        matches!(self, Kind::Header | Kind::ActiveL2 | Kind::RefcountBlock)
    }

    fn from_bits(b: u64) -> Kind {
        KINDS[(b & 7) as usize]
    }
}

/// The kinds a write may overlap: the structure it rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Allow(u8);

impl Allow {
    /// Guest data, and new structures in newly allocated clusters.
    pub const NOTHING: Allow = Allow(0);
    /// A structure rewriting itself.
    pub const fn only(k: Kind) -> Allow {
        Allow(1 << k as u8)
    }
    fn allows(self, k: Kind) -> bool {
        self.0 & (1 << k as u8) != 0
    }
}

/// A multi-cluster table: clusters [start, end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    start: u64,
    end: u64,
    kind: Kind,
}

/// Where the metadata of one image is, by host cluster (see the module
/// docs).
#[derive(Debug)]
pub(crate) struct MetadataMap {
    cluster_bits: u32,
    /// Single-cluster structures, `cluster << 3 | kind`, sorted; a
    /// structure named twice (a corrupt image) is in it twice.
    singles: Vec<u64>,
    /// Multi-cluster tables sorted by start, and for each index the
    /// largest `end` of the ranges up to it (so a lookup can stop walking
    /// back once no earlier range reaches the write).
    ranges: Vec<Range>,
    max_end: Vec<u64>,
    /// The image has the incompatible-features field (version 3).
    v3: bool,
    /// The first refused write; every later write is refused too.
    refused: Option<String>,
}

impl MetadataMap {
    pub fn new(cluster_bits: u32, v3: bool) -> MetadataMap {
        MetadataMap {
            cluster_bits,
            singles: Vec::new(),
            ranges: Vec::new(),
            max_end: Vec::new(),
            v3,
            refused: None,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Clusters [first, end) touched by bytes [off, off + len).
    fn clusters(&self, off: u64, len: u64) -> (u64, u64) {
        let first = off >> self.cluster_bits;
        let last = off.saturating_add(len.max(1) - 1) >> self.cluster_bits;
        (first, last + 1)
    }

    fn key(cluster: u64, kind: Kind) -> u64 {
        // Offsets in tables have at most 56 bits and clusters at least 9,
        // so the shift cannot lose bits of a real cluster number.
        (cluster << 3) | kind as u64
    }

    /// Registers a structure at bytes [off, off + len). Single-cluster
    /// kinds take the cluster holding `off`, whatever `len`.
    pub fn add(&mut self, kind: Kind, off: u64, len: u64) {
        if kind.single() {
            let k = Self::key(off >> self.cluster_bits, kind);
            let at = self.singles.partition_point(|&x| x < k);
            self.singles.insert(at, k);
        } else if len > 0 {
            let (start, end) = self.clusters(off, len);
            let r = Range { start, end, kind };
            let at = self.ranges.partition_point(|x| *x < r);
            self.ranges.insert(at, r);
            self.reindex();
        }
    }

    /// Registers many structures of one kind at once (one sort, however
    /// many: for building the map from whole tables).
    pub fn extend(&mut self, kind: Kind, structs: impl IntoIterator<Item = (u64, u64)>) {
        let cb = self.cluster_bits;
        if kind.single() {
            self.singles.extend(
                structs
                    .into_iter()
                    .map(|(off, _)| Self::key(off >> cb, kind)),
            );
            self.singles.sort_unstable();
        } else {
            for (off, len) in structs {
                if len > 0 {
                    let (start, end) = self.clusters(off, len);
                    self.ranges.push(Range { start, end, kind });
                }
            }
            self.ranges.sort_unstable();
            self.reindex();
        }
    }

    /// Unregisters a structure added with the same arguments (one
    /// registration of it, if it was added several times).
    pub fn remove(&mut self, kind: Kind, off: u64, len: u64) {
        if kind.single() {
            let k = Self::key(off >> self.cluster_bits, kind);
            let at = self.singles.partition_point(|&x| x < k);
            if self.singles.get(at) == Some(&k) {
                self.singles.remove(at);
            }
        } else if len > 0 {
            let (start, end) = self.clusters(off, len);
            let r = Range { start, end, kind };
            if let Some(at) = self.ranges.iter().position(|x| *x == r) {
                self.ranges.remove(at);
                self.reindex();
            }
        }
    }

    /// Unregisters every structure of `kind`.
    pub fn clear_kind(&mut self, kind: Kind) {
        if kind.single() {
            self.singles.retain(|&k| Kind::from_bits(k) != kind);
        } else {
            self.ranges.retain(|r| r.kind != kind);
            self.reindex();
        }
    }

    fn reindex(&mut self) {
        self.max_end.clear();
        let mut m = 0;
        for r in &self.ranges {
            m = m.max(r.end);
            self.max_end.push(m);
        }
    }

    /// The first structure other than `allow` that bytes [off, off + len)
    /// touch: its kind and host offset.
    pub fn find(&self, off: u64, len: u64, allow: Allow) -> Option<(Kind, u64)> {
        let (first, end) = self.clusters(off, len);
        let cb = self.cluster_bits;
        let from = self.singles.partition_point(|&k| k >> 3 < first);
        for &k in &self.singles[from..] {
            if k >> 3 >= end {
                break;
            }
            let kind = Kind::from_bits(k);
            if !allow.allows(kind) {
                return Some((kind, (k >> 3) << cb));
            }
        }
        // Ranges starting before `end`, walked back while any of them can
        // still reach `first`.
        let mut i = self.ranges.partition_point(|r| r.start < end);
        while i > 0 && self.max_end[i - 1] > first {
            i -= 1;
            let r = self.ranges[i];
            if r.end > first && !allow.allows(r.kind) {
                return Some((r.kind, r.start << cb));
            }
        }
        None
    }

    /// Whether a write was refused (the image is marked corrupt).
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Carries an earlier refusal over to a rebuilt map.
    pub fn set_refused(&mut self, why: String) {
        self.refused = Some(why);
    }

    /// Fails once a write was refused: the image takes no more writes and
    /// no flushes.
    pub fn usable(&self) -> Result<()> {
        match &self.refused {
            None => Ok(()),
            Some(first) => Err(Error::OverlapRefused(format!(
                "the image was marked corrupt after a refused write ({first}); it takes no more writes"
            ))),
        }
    }

    /// Checks that a write of bytes [off, off + len) may be made: it
    /// touches no structure but `allow`, and no write was refused before.
    /// Otherwise refuses it, marking the image corrupt.
    pub fn check(&mut self, st: &Storage, off: u64, len: u64, allow: Allow) -> Result<()> {
        self.usable()?;
        let Some((kind, at)) = self.find(off, len, allow) else {
            return Ok(());
        };
        let msg = format!(
            "write of {len} bytes at {off:#x} would overwrite {} at {at:#x}",
            kind.name()
        );
        self.refused = Some(msg.clone());
        Err(Error::OverlapRefused(if !self.v3 {
            format!("{msg}; refused (version 2 has no corrupt bit: this open image takes no more writes)")
        } else {
            match mark_corrupt(st) {
                Ok(()) => format!("{msg}; refused, image marked corrupt"),
                Err(e) => format!("{msg}; refused (marking the image corrupt failed: {e})"),
            }
        }))
    }

    /// Refuses an operation that found the metadata corrupt (`msg` says
    /// how) before writing anything: as a refused write, the image is
    /// marked corrupt and takes no more writes.
    pub fn refuse_corrupt(&mut self, st: &Storage, msg: String) -> Error {
        if let Err(e) = self.usable() {
            return e;
        }
        self.refused = Some(msg.clone());
        Error::Corrupt(if !self.v3 {
            format!("{msg}; refused (version 2 has no corrupt bit: this open image takes no more writes)")
        } else {
            match mark_corrupt(st) {
                Ok(()) => format!("{msg}; refused, image marked corrupt"),
                Err(e) => format!("{msg}; refused (marking the image corrupt failed: {e})"),
            }
        })
    }

    /// Checks, then writes `buf` at `off`.
    pub fn write(&mut self, st: &Storage, buf: &[u8], off: u64, allow: Allow) -> Result<()> {
        self.check(st, off, buf.len() as u64, allow)?;
        st.write_at(buf, off)
    }

    /// Checks, then zeroes [off, off + len).
    pub fn write_zeroes(&mut self, st: &Storage, off: u64, len: u64, allow: Allow) -> Result<()> {
        self.check(st, off, len, allow)?;
        st.write_zeroes(off, len)
    }

    /// Checks, then punches a hole at [off, off + len).
    pub fn punch_hole(&mut self, st: &Storage, off: u64, len: u64) -> Result<()> {
        self.check(st, off, len, Allow::NOTHING)?;
        st.punch_hole(off, len)
    }
}

/// Sets the corrupt bit in the header on disk (read, modify, write: the
/// field on disk is the one of record) and makes it durable.
fn mark_corrupt(st: &Storage) -> Result<()> {
    let mut b = [0u8; 8];
    st.read_at(&mut b, field::INCOMPATIBLE)?;
    let v = u64::from_be_bytes(b) | incompat::CORRUPT;
    st.write_at(&v.to_be_bytes(), field::INCOMPATIBLE)?;
    st.sync()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CB: u32 = 16;
    const CS: u64 = 1 << CB;

    fn map() -> MetadataMap {
        let mut m = MetadataMap::new(CB, true);
        m.add(Kind::Header, 0, CS);
        m.add(Kind::RefcountTable, CS, CS);
        m.add(Kind::RefcountBlock, 2 * CS, CS);
        m.add(Kind::ActiveL1, 3 * CS, 16);
        m.add(Kind::ActiveL2, 4 * CS, CS);
        m.add(Kind::SnapshotL1, 10 * CS, 3 * CS);
        m
    }

    #[test]
    fn finds_each_kind_by_any_byte_of_its_clusters() {
        let m = map();
        let cases = [
            (0, Kind::Header, 0),
            (CS + 100, Kind::RefcountTable, CS),
            (2 * CS + CS - 1, Kind::RefcountBlock, 2 * CS),
            // The L1 is 16 bytes; its whole cluster is protected.
            (3 * CS + 4096, Kind::ActiveL1, 3 * CS),
            (4 * CS + 8, Kind::ActiveL2, 4 * CS),
            (12 * CS + 5, Kind::SnapshotL1, 10 * CS),
        ];
        for (off, kind, at) in cases {
            assert_eq!(m.find(off, 1, Allow::NOTHING), Some((kind, at)), "{off:#x}");
        }
        for off in [5 * CS, 9 * CS + CS - 1, 13 * CS, 1 << 40] {
            assert_eq!(m.find(off, 1, Allow::NOTHING), None, "{off:#x}");
        }
        // A long write starting in free space and ending in a table.
        assert_eq!(
            m.find(5 * CS, 5 * CS + 1, Allow::NOTHING),
            Some((Kind::SnapshotL1, 10 * CS))
        );
        assert_eq!(m.find(5 * CS, 5 * CS, Allow::NOTHING), None);
    }

    #[test]
    fn a_structure_may_rewrite_itself_only() {
        let m = map();
        assert_eq!(m.find(4 * CS, CS, Allow::only(Kind::ActiveL2)), None);
        assert_eq!(
            m.find(2 * CS, 3 * CS, Allow::only(Kind::ActiveL2)),
            Some((Kind::RefcountBlock, 2 * CS))
        );
        // A cluster that is both an L2 table and a refcount block (a
        // corrupt image): the L2 table may not be written there.
        let mut m = map();
        m.add(Kind::RefcountBlock, 4 * CS, CS);
        assert_eq!(
            m.find(4 * CS, CS, Allow::only(Kind::ActiveL2)),
            Some((Kind::RefcountBlock, 4 * CS))
        );
    }

    #[test]
    fn extend_is_add_in_bulk() {
        let mut a = MetadataMap::new(CB, true);
        let mut b = MetadataMap::new(CB, true);
        let l2s = [9 * CS, 3 * CS, 7 * CS, 3 * CS];
        let l1s = [(40 * CS, 2 * CS), (20 * CS, 8), (30 * CS, 5 * CS)];
        for &o in &l2s {
            a.add(Kind::ActiveL2, o, CS);
        }
        for &(o, l) in &l1s {
            a.add(Kind::SnapshotL1, o, l);
        }
        b.extend(Kind::ActiveL2, l2s.iter().map(|&o| (o, CS)));
        b.extend(Kind::SnapshotL1, l1s);
        assert_eq!(a.singles, b.singles);
        assert_eq!(a.ranges, b.ranges);
        assert_eq!(a.max_end, b.max_end);
    }

    #[test]
    fn add_and_remove_count_registrations() {
        let mut m = map();
        m.add(Kind::ActiveL2, 7 * CS, CS);
        m.add(Kind::ActiveL2, 7 * CS, CS);
        m.remove(Kind::ActiveL2, 7 * CS, CS);
        assert!(m.find(7 * CS, 1, Allow::NOTHING).is_some(), "named twice");
        m.remove(Kind::ActiveL2, 7 * CS, CS);
        assert!(m.find(7 * CS, 1, Allow::NOTHING).is_none());
        m.remove(Kind::SnapshotL1, 10 * CS, 3 * CS);
        assert!(m.find(11 * CS, 1, Allow::NOTHING).is_none());
        m.clear_kind(Kind::RefcountBlock);
        assert!(m.find(2 * CS, 1, Allow::NOTHING).is_none());
        assert!(m.find(CS, 1, Allow::NOTHING).is_some());
    }

    #[test]
    fn ranges_nested_and_overlapping() {
        let mut m = MetadataMap::new(CB, true);
        // A long table with a short one inside and one after it: the
        // walk back must not stop at the short one.
        m.add(Kind::SnapshotL1, 10 * CS, 100 * CS);
        m.add(Kind::SnapshotL1, 20 * CS, CS);
        m.add(Kind::SnapshotTable, 200 * CS, CS);
        assert_eq!(
            m.find(50 * CS, 1, Allow::NOTHING),
            Some((Kind::SnapshotL1, 10 * CS))
        );
        assert_eq!(m.find(150 * CS, 1, Allow::NOTHING), None);
        assert_eq!(
            m.find(150 * CS, 51 * CS, Allow::NOTHING),
            Some((Kind::SnapshotTable, 200 * CS))
        );
    }

    #[test]
    fn refusal_marks_corrupt_and_sticks() {
        let dir = std::env::temp_dir().join(format!("rimg-overlap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, vec![0u8; 4 * CS as usize]).unwrap();
        let st = Storage::open(&p, true).unwrap();
        let mut m = map();
        m.check(&st, 5 * CS, CS, Allow::NOTHING).unwrap();
        let e = m
            .check(&st, 4 * CS + 512, 4096, Allow::NOTHING)
            .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("active L2 table at 0x40000"), "{s}");
        assert!(matches!(e, Error::OverlapRefused(_)));
        let mut b = [0u8; 8];
        st.read_at(&mut b, field::INCOMPATIBLE).unwrap();
        assert_eq!(u64::from_be_bytes(b), incompat::CORRUPT);
        // Every later write is refused, even one that overlaps nothing,
        // and the write helpers make none.
        assert!(m.write(&st, &[1u8; 16], 5 * CS, Allow::NOTHING).is_err());
        let mut d = [0u8; 16];
        st.read_at(&mut d, 5 * CS).unwrap();
        assert_eq!(d, [0u8; 16]);
        assert!(m.refused().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn version_2_is_refused_without_a_header_bit() {
        let dir = std::env::temp_dir().join(format!("rimg-overlap2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, vec![0u8; 4 * CS as usize]).unwrap();
        let st = Storage::open(&p, true).unwrap();
        let mut m = MetadataMap::new(CB, false);
        m.add(Kind::ActiveL2, 2 * CS, CS);
        assert!(m.check(&st, 2 * CS, 8, Allow::NOTHING).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), vec![0u8; 4 * CS as usize]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
