//! Compaction in place (`rimg compact`): clusters near the end of the
//! file move into free clusters before them, then the file is cut. No
//! second copy of the image is needed, unlike `qemu-img convert`.
//!
//! # What moves
//! A guest data cluster or an L2 table that the active tables reference
//! once and whose refcount is 1 (qcow2.rst, "Cluster mapping" and
//! "Reference counts"), refcount blocks (which a growing file leaves
//! all along it), the refcount table and the active L1 table (growing
//! the disk moves it to the end). Everything else stays where it is:
//! the header, snapshots' tables and the clusters they
//! share, compressed clusters (packed several to a cluster), and tables
//! longer than a cluster. The file then ends after the last of those, or
//! after the moved clusters.
//!
//! The persistent bitmaps move too (see `bitmaps`): the image is opened
//! with its bitmaps left on disk (`Qcow2Options::bitmaps_on_disk`). What
//! the guest reads does not change, so they stay valid, and a kill
//! cannot leave them in use.
//!
//! # Crash safety
//! Moves go in batches. In each, every step is written and synced before
//! the next begins, so a kill or a power loss at any moment leaves a
//! consistent image that leaks at most (the next `check -r leaks`, or the
//! next compaction, gives the clusters back):
//! 1. the new clusters' refcounts are set to 1 (leaks until step 3);
//! 2. the data is copied to them;
//! 3. the L2 tables are written with the new offsets (a table that moves
//!    is written whole, with its moved entries, to its new place), then
//!    the L1 entries of moved tables: each entry points at the old place
//!    or the new one, both complete and counted (bitmaps: tables, then
//!    the directory, then the header);
//! 4. the old clusters' refcounts are set to 0.
//!
//! The refcount table and the L1 table move whole, before a pass's
//! batches, in the same kind of steps: the new clusters counted, the
//! table written there, the header pointing at it, the old clusters'
//! counts dropped. The file is cut only after the last batch.

mod bitmaps;

use super::*;
use crate::check::Repair;
use crate::pagebuf::PageBuf;
use bitmaps::BitmapEdits;

/// Clusters moved per batch by default (four syncs each, five or six
/// when bitmaps move): 64 MiB with 64 KiB clusters.
pub const DEFAULT_BATCH: usize = 1024;

/// Passes over the file at most (each after the last one's dropped
/// refcount blocks).
const MAX_PASSES: usize = 4;

/// How a compaction goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactOptions {
    /// First make data clusters of zeros zero clusters.
    pub zero_detect: bool,
    /// Clusters moved per batch (at least 1): smaller batches sync more
    /// often (tests use 1 to cut between any two moves).
    pub batch: usize,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            zero_detect: false,
            batch: DEFAULT_BATCH,
        }
    }
}

/// What a compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompactStats {
    /// Clusters moved (data, tables, refcount structures, bitmaps).
    pub moved: u64,
    /// Data clusters of zeros made zero clusters (`zero_detect`).
    pub zeroed: u64,
    /// L2 tables of unallocated entries only, dropped (their L1 entries
    /// cleared: the same reading).
    pub tables_dropped: u64,
    /// Leaked clusters given back before moving.
    pub leaks_freed: u64,
    pub len_before: u64,
    pub len_after: u64,
}

/// The one reference to a movable cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The L2 table of L1 entry `l1i`.
    Table { l1i: usize },
    /// Entry `idx` of that table: a data cluster.
    Data { l1i: usize, idx: usize },
    /// The refcount block of `group` (its refcount table entry).
    RefBlock { group: u64 },
    /// The table of bitmap `bitmap` (its directory entry's index).
    BitmapTable { bitmap: usize },
    /// Entry `idx` of that table: a cluster of bitmap data.
    BitmapData { bitmap: usize, idx: usize },
    /// The bitmap directory (the header extension names it).
    BitmapDirectory,
}

/// A planned move of one cluster.
#[derive(Debug, Clone, Copy)]
struct Move {
    from: u64,
    to: u64,
    owner: Owner,
}

/// An L2 table's changes in a batch: its new place if it moves, and
/// its entries (index, new host offset) whose clusters move.
type TableEdit = (Option<u64>, Vec<(usize, u64)>);

/// A cluster's references, as the walk finds them.
enum Refs {
    One(Owner),
    /// Referenced twice, or by a compressed entry: stays.
    Pinned,
}

impl Qcow2 {
    /// Moves clusters from the end of the file into free ones before them
    /// and cuts the file; first gives leaked clusters back (as `check -r
    /// leaks`). `progress(done, total)` follows the moves. Refused on an
    /// image with corruptions, an external data file, or encryption.
    pub fn compact(
        &self,
        opts: &CompactOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CompactStats> {
        self.check_writable()?;
        if self.data.is_some() {
            return Err(Error::InvalidArgument(
                "the image keeps its data in an external data file: nothing to compact".into(),
            ));
        }
        if self.crypt_method != 0 {
            return Err(Error::UnsupportedFeature(
                "compacting encrypted images".into(),
            ));
        }
        // Nothing is written before the check passed: on a corrupt image
        // a cluster in use may look free.
        let report = self.check_repair(Repair::Leaks)?;
        if report.corruptions > 0 || report.check_errors > 0 {
            return Err(Error::Corrupt(format!(
                "the image has {} corruptions and {} check errors: repair it first (rimg check -r all)",
                report.corruptions, report.check_errors
            )));
        }
        let zeroed = if opts.zero_detect {
            self.zero_detect()?
        } else {
            0
        };
        let m = self.lock();
        let mut m = self.quiesce(m);
        self.log_close(&mut m)?;
        self.flush_locked(&mut m)?;
        // Tables are read and written directly below.
        m.l2.clear();
        let len_before = self.st.len()?;
        let mut moved = 0;
        let dropped = self.drop_empty_tables(&mut m)?;
        // The metadata map follows every change of where tables are.
        Self::refresh_map(&mut m);
        // Refcount blocks that moved down, then count nothing, are dropped
        // after a pass: the holes they leave take another (short) pass.
        // Not before the first moves: a block counting nothing yet covers
        // free clusters that moves may fill. Also after a pass that moved
        // nothing: a compaction killed before its drop leaves such blocks
        // low in a file that is otherwise dense, and only another pass
        // fills their holes.
        for _ in 0..MAX_PASSES {
            moved += self.compact_reftable(&mut m, len_before)?;
            moved += self.compact_l1(&mut m, len_before)?;
            let moves = self.compact_plan(&mut m, len_before)?;
            let total = moved + moves.len() as u64;
            if !moves.is_empty() {
                progress(moved, total);
            }
            for batch in moves.chunks(opts.batch.max(1)) {
                self.compact_batch(&mut m, batch)?;
                Self::refresh_map(&mut m);
                moved += batch.len() as u64;
                progress(moved, total);
            }
            if m.rc.drop_unused_blocks(&self.st)? == 0 && moves.is_empty() {
                break;
            }
        }
        // When the passes ran out.
        m.rc.drop_unused_blocks(&self.st)?;
        let end = self
            .last_used_cluster(&mut m, len_before)?
            .map_or(0, |c| c + 1);
        let len_after = (end << self.cluster_bits).min(len_before);
        if len_after < len_before {
            self.st.set_len(len_after)?;
            self.st.sync()?;
        }
        Self::refresh_map(&mut m);
        Ok(CompactStats {
            moved,
            zeroed,
            leaks_freed: report.leaks_fixed,
            tables_dropped: dropped,
            len_before,
            len_after,
        })
    }

    /// Makes data clusters that hold only zeros zero clusters (or
    /// unallocated, without a backing file), through the normal write
    /// path; their host clusters are freed by the flush. Not in version 2
    /// over a backing file, which has no zero clusters. Returns how many.
    fn zero_detect(&self) -> Result<u64> {
        if self.header().version < 3 && self.has_backing_file {
            return Ok(0);
        }
        let cs = self.cluster_size();
        let l2b = self.l2_bits();
        let mut buf = PageBuf::zeroed(cs as usize);
        let mut zeroed = 0;
        // Whole clusters only: a partial last one would be written, not
        // dropped.
        for gc in 0..self.size() / cs {
            let g = GuestCluster(gc);
            let data = {
                let mut m = self.lock();
                match self.l2_for(&mut m, g.l1_index(l2b))? {
                    Some(slot) => matches!(
                        self.decode(Self::l2_get(&m, slot, g.l2_index(l2b)))?,
                        L2Entry::Normal { .. }
                    ),
                    None => false,
                }
            };
            if !data {
                continue;
            }
            let off = gc * cs;
            self.read_at(&mut buf, off)?;
            if buf.iter().all(|&b| b == 0) {
                // The guest sees no change: the bitmaps stay clean.
                self.untracked(|| self.write_zeroes(off, cs, true))?;
                zeroed += 1;
            }
        }
        self.flush()?;
        Ok(zeroed)
    }

    /// Drops the L2 tables (counted once) that map nothing: every entry
    /// unallocated, or, without a backing file, reading as zeros with no
    /// host cluster (QEMU's discard leaves such tables behind). The L1
    /// entries are cleared and synced, then the tables' clusters freed;
    /// the disk reads the same, and `qemu-img convert` writes no such
    /// table either.
    fn drop_empty_tables(&self, m: &mut Meta) -> Result<u64> {
        let cs = self.cluster_size();
        let mut table = PageBuf::zeroed(cs as usize);
        let mut empty = Vec::new();
        for (l1i, &e) in m.l1.iter().enumerate() {
            let t = L1Entry(e).l2_offset();
            if t == 0 || m.rc.get(&self.st, t >> self.cluster_bits)? != 1 {
                continue;
            }
            self.st.read_at(&mut table, t)?;
            let mut maps_nothing = true;
            for e in table.chunks_exact(m.l2_stride) {
                let raw = u64::from_be_bytes(e[..8].try_into().unwrap());
                // Extended L2 entries: no subcluster allocated.
                let alloc = e.get(8..12).is_some_and(|b| b != [0; 4]);
                let none = match self.decode(raw)? {
                    L2Entry::Unallocated => !self.has_backing_file || e.iter().all(|&b| b == 0),
                    L2Entry::Zero { host: None, .. } => !self.has_backing_file,
                    _ => false,
                };
                if !none || alloc {
                    maps_nothing = false;
                    break;
                }
            }
            if maps_nothing {
                empty.push((l1i, t));
            }
        }
        if empty.is_empty() {
            return Ok(0);
        }
        for &(l1i, _) in &empty {
            m.l1[l1i] = 0;
            self.st
                .write_at(&[0; 8], m.header.l1_table_offset + l1i as u64 * 8)?;
        }
        self.st.sync()?;
        for &(_, t) in &empty {
            m.rc.update_range(&self.st, t, cs, -1, |_| {})?;
        }
        m.rc.flush(&self.st)?;
        Ok(empty.len() as u64)
    }

    /// Moves the refcount table (which a growing file reallocates near
    /// its end) into the lowest free run that holds it, if that lies
    /// before it; returns the clusters moved.
    fn compact_reftable(&self, m: &mut Meta, len: u64) -> Result<u64> {
        let cb = self.cluster_bits;
        let tc = m.rc.table_clusters();
        let at = m.rc.table_offset() >> cb;
        let Some(to) = self.lowest_free_run(m, tc, at.min(len >> cb))? else {
            return Ok(0);
        };
        m.rc.relocate_table(&self.st, to << cb)?;
        Ok(tc)
    }

    /// Moves the active L1 table (which growing the disk reallocates at
    /// the end of the file) into the lowest free run that holds it, if
    /// that lies before it, as growing moves it; returns the clusters
    /// moved.
    fn compact_l1(&self, m: &mut Meta, len: u64) -> Result<u64> {
        let cb = self.cluster_bits;
        let at = m.header.l1_table_offset >> cb;
        let n = (m.l1.len() as u64 * 8).div_ceil(self.cluster_size());
        if at == 0 || n == 0 {
            return Ok(0);
        }
        let Some(to) = self.lowest_free_run(m, n, at.min(len >> cb))? else {
            return Ok(0);
        };
        m.rc.update_range(&self.st, to << cb, n << cb, 1, |_| {})?;
        m.rc.flush(&self.st)?;
        self.move_l1(m, to << cb, m.l1.len())?;
        m.rc.flush(&self.st)?;
        self.st.sync()?;
        Ok(n)
    }

    /// The first of the lowest `n` free clusters in a row below cluster
    /// `below`, where refcount blocks exist: counting them must not
    /// allocate a block.
    fn lowest_free_run(&self, m: &mut Meta, n: u64, below: u64) -> Result<Option<u64>> {
        let per_block = 1u64 << (self.cluster_bits + 3 - m.header.refcount_order);
        let mut run = 0;
        for c in 0..below {
            let counted =
                m.rc.table()
                    .get((c / per_block) as usize)
                    .is_some_and(|&e| e != 0);
            if counted && m.rc.get(&self.st, c)? == 0 {
                run += 1;
                if run == n {
                    return Ok(Some(c + 1 - n));
                }
            } else {
                run = 0;
            }
        }
        Ok(None)
    }

    /// The metadata map again, after tables moved (a refusal stays).
    fn refresh_map(m: &mut Meta) {
        let refused = m.rc.overlap.refused().map(str::to_string);
        Self::rebuild_overlap(m, refused);
    }

    /// The highest cluster below `len` with a refcount.
    fn last_used_cluster(&self, m: &mut Meta, len: u64) -> Result<Option<u64>> {
        for c in (0..len.div_ceil(self.cluster_size())).rev() {
            if m.rc.get(&self.st, c)? > 0 {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    /// The moves, highest cluster first: each movable cluster
    /// from the end down, into the lowest free cluster, while that lies
    /// before it; it stops at the first cluster that cannot move.
    fn compact_plan(&self, m: &mut Meta, len: u64) -> Result<Vec<Move>> {
        let cs = self.cluster_size();
        let cb = self.cluster_bits;
        let n = len.div_ceil(cs);
        // The file cannot end before `used` clusters: nothing below that
        // needs to move, so only references above it are collected.
        let mut used = 0u64;
        let mut free = Vec::new();
        let per_block = 1u64 << (cb + 3 - m.header.refcount_order);
        for c in 0..n {
            if m.rc.get(&self.st, c)? > 0 {
                used += 1;
            } else if m
                .rc
                .table()
                .get((c / per_block) as usize)
                .is_some_and(|&e| e != 0)
            {
                // Only where a refcount block exists: setting the
                // refcount must not allocate one (it could take a
                // cluster planned for a move).
                free.push(c);
            }
        }
        let mut refs: HashMap<u64, Refs> = HashMap::new();
        let mut note = |c: u64, r: Refs| {
            if c >= used {
                let pinned = refs.contains_key(&c) || matches!(r, Refs::Pinned);
                refs.insert(c, if pinned { Refs::Pinned } else { r });
            }
        };
        for (group, &e) in m.rc.table().iter().enumerate() {
            if e & OFFSET_MASK != 0 {
                note(
                    (e & OFFSET_MASK) >> cb,
                    Refs::One(Owner::RefBlock {
                        group: group as u64,
                    }),
                );
            }
        }
        let mut table = PageBuf::zeroed(cs as usize);
        for (l1i, &e) in m.l1.iter().enumerate() {
            let t = L1Entry(e).l2_offset();
            if t == 0 {
                continue;
            }
            note(t >> cb, Refs::One(Owner::Table { l1i }));
            self.st.read_at(&mut table, t)?;
            for idx in 0..1usize << self.l2_bits() {
                let at = idx * m.l2_stride;
                let raw = u64::from_be_bytes(table[at..at + 8].try_into().unwrap());
                match self.decode(raw)? {
                    L2Entry::Normal { host, .. }
                    | L2Entry::Zero {
                        host: Some(host), ..
                    } => note(host >> cb, Refs::One(Owner::Data { l1i, idx })),
                    L2Entry::Compressed {
                        offset, sectors, ..
                    } => {
                        let first = offset >> cb;
                        let last = ((offset & !511) + sectors * 512 - 1) >> cb;
                        (first..=last).for_each(|c| note(c, Refs::Pinned));
                    }
                    _ => {}
                }
            }
        }
        self.note_bitmaps(m, &mut note)?;
        let mut moves = Vec::new();
        let mut free = free.into_iter();
        for c in (used..n).rev() {
            let rc = m.rc.get(&self.st, c)?;
            if rc == 0 {
                continue;
            }
            let Some(Refs::One(owner)) = refs.get(&c).filter(|_| rc == 1) else {
                break;
            };
            match free.next() {
                Some(to) if to < c => moves.push(Move {
                    from: c,
                    to,
                    owner: *owner,
                }),
                _ => break,
            }
        }
        Ok(moves)
    }

    /// One batch of moves, in the order of the module docs (refcount
    /// blocks one at a time first, see `Refcounts::relocate_block`).
    fn compact_batch(&self, m: &mut Meta, moves: &[Move]) -> Result<()> {
        let cs = self.cluster_size();
        let cb = self.cluster_bits;
        for mv in moves {
            if let Owner::RefBlock { group } = mv.owner {
                m.rc.relocate_block(&self.st, group, mv.to << cb)?;
            }
        }
        let moves: Vec<Move> = moves
            .iter()
            .filter(|mv| !matches!(mv.owner, Owner::RefBlock { .. }))
            .copied()
            .collect();
        if moves.is_empty() {
            return Ok(());
        }
        // 1. The new clusters counted.
        for mv in &moves {
            m.rc.update_range(&self.st, mv.to << cb, cs, 1, |_| {})?;
        }
        m.rc.flush(&self.st)?;
        self.st.sync()?;
        // 2. Data copied (tables are written in 3, with their new entries).
        let mut buf = PageBuf::zeroed(cs as usize);
        for mv in &moves {
            if let Owner::Data { .. } | Owner::BitmapData { .. } = mv.owner {
                self.st.read_at(&mut buf, mv.from << cb)?;
                self.st.write_at(&buf, mv.to << cb)?;
            }
        }
        self.st.sync()?;
        // 3. Tables: every one with a moved entry or moving itself, then
        // the L1 entries of those that moved.
        let mut tables: HashMap<usize, TableEdit> = HashMap::new();
        for mv in &moves {
            match mv.owner {
                Owner::Table { l1i } => tables.entry(l1i).or_default().0 = Some(mv.to << cb),
                Owner::Data { l1i, idx } => {
                    tables.entry(l1i).or_default().1.push((idx, mv.to << cb))
                }
                _ => {}
            }
        }
        let mut l1_moved = Vec::new();
        for (&l1i, (to, entries)) in &tables {
            let at = L1Entry(m.l1[l1i]).l2_offset();
            self.st.read_at(&mut buf, at)?;
            for &(idx, host) in entries {
                let o = idx * m.l2_stride;
                let raw = u64::from_be_bytes(buf[o..o + 8].try_into().unwrap());
                let raw = (raw & !OFFSET_MASK) | host;
                buf[o..o + 8].copy_from_slice(&raw.to_be_bytes());
            }
            self.st.write_at(&buf, to.unwrap_or(at))?;
            if let Some(to) = to {
                l1_moved.push((l1i, *to));
            }
        }
        let bitmaps = BitmapEdits::new(&moves, cb);
        self.write_bitmap_tables(m, &bitmaps)?;
        self.st.sync()?;
        if !l1_moved.is_empty() || bitmaps.repoints() {
            for &(l1i, to) in &l1_moved {
                m.l1[l1i] = (m.l1[l1i] & !OFFSET_MASK) | to;
                let e = m.l1[l1i].to_be_bytes();
                self.st
                    .write_at(&e, m.header.l1_table_offset + l1i as u64 * 8)?;
            }
            self.write_bitmap_directory(m, &bitmaps)?;
            self.st.sync()?;
        }
        if let Some(to) = bitmaps.directory {
            self.switch_bitmap_directory(m, to)?;
        }
        // 4. The old clusters given back.
        for mv in &moves {
            m.rc.update_range(&self.st, mv.from << cb, cs, -1, |_| {})?;
        }
        m.rc.flush(&self.st)?;
        self.st.sync()
    }
}
