//! The qcow2 image: guest reads and writes mapped through L1/L2 tables,
//! cluster allocation with copy-on-write, and the write ordering that keeps
//! the file consistent across a crash.
//!
//! # Locking
//! All metadata (header copy, L1, the L2 and refcount caches, the in-flight
//! allocation set, pending frees) lives in one [`Meta`] behind a mutex. The
//! mutex is held only to look up or change metadata, never across guest
//! data I/O: a request maps its range under the lock, drops it, and does
//! its data I/O on the shared file (pread/pwrite take `&self`).
//!
//! A write that needs new clusters registers the guest clusters it
//! allocates in `inflight` before dropping the lock. Any other request that
//! would change the mapping of one of those guest clusters (another
//! allocating write, a discard, write-zeroes) waits on `alloc_done` until
//! the first one has committed its L2 entries. Reads and in-place writes
//! never wait: they see the old mapping until the commit.
//!
//! # Write ordering (crash safety)
//! - Data and copy-on-write fill are written (pwrite completed) before the
//!   L2 entry that maps them is changed, even in the cache.
//! - Refcount increases are durable before any L2 or L1 entry that uses
//!   them reaches the disk: writing back an L2 table (eviction or flush)
//!   first flushes the refcount cache and syncs.
//! - A new L2 table is durable before the L1 entry pointing to it is
//!   written (L1 entries are written at flush, after the L2 tables).
//! - A reference is removed on disk before the refcount drops: frees are
//!   queued in `pending_free` and applied only after the flush that made
//!   the new L2/L1 entries durable. Queued clusters cannot be reused
//!   before that, so no freed cluster is overwritten while an old pointer
//!   to it may still be on disk.
//! - `flush` makes every completed write durable.
//! - A freed cluster is not reused while data I/O that may have mapped it
//!   is still running outside the lock: such I/O holds an [`IoTicket`]
//!   from [`Qcow2::io_begin`] to [`Qcow2::io_end`], frees are tagged with
//!   the epoch they were queued in, and a flush applies only frees queued
//!   after every active ticket was taken (the rest wait for a later flush).
//! - Space reserved at the end of the file ahead of new clusters
//!   (`Qcow2Options::preallocate_ahead`) has no refcounts and nothing
//!   points into it until an allocation takes it, as any free cluster.
//!
//! A crash at any point therefore leaves at worst leaked clusters.
//!
//! # Metadata overlap checks
//! Every write (guest data in place or into new clusters, metadata tables,
//! header fields, holes for freed clusters) is first checked against the
//! map of where the metadata is ([`crate::overlap`], kept in `Meta::rc`);
//! a write that would land on other metadata is refused and the image is
//! marked corrupt. The map follows the L1 entries (`set_l1`), the refcount
//! structures (the `refcount` module), the L1 and snapshot tables.

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::cache::TableCache;
use crate::compress;
use crate::create::Preallocation;
use crate::datafile::DataFile;
use crate::error::{Error, Result};
use crate::header::{field, incompat, Header};
use crate::image::{Extent, ExtentKind, Format, Image};
use crate::l2::{CompressedGeometry, L1Entry, L2Entry, OFFSET_MASK};
use crate::overlap::{Allow, Kind, MetadataMap};
use crate::refcount::Refcounts;
use crate::snapshot::Snapshot;
use crate::storage::Storage;
use crate::sync::{AllocWaker, Condvar, Mutex, MutexGuard, Waiters};

#[path = "subcluster.rs"]
mod subcluster;

/// Tunables for opening a qcow2 image.
#[derive(Debug, Clone)]
pub struct Qcow2Options {
    /// Bytes of L2 tables to keep cached.
    pub l2_cache_bytes: u64,
    /// Bytes of refcount blocks to keep cached.
    pub refcount_cache_bytes: u64,
    /// Punch holes in the host file for clusters freed by discard.
    pub discard_passthrough: bool,
    /// Open for repair: images marked corrupt may be opened for writing,
    /// and a dirty image's refcounts are left for the check to rebuild.
    pub repair: bool,
    /// When a data allocation reaches past the space reserved at the end
    /// of the file, reserve this many bytes more beyond it (fallocate,
    /// extending the file); 0: never. Guest writes into new clusters then
    /// land in space the filesystem has already allocated, which for
    /// O_DIRECT writes avoids extending the file once per cluster (ext4
    /// serializes those). The unused tail is cut off again when the image
    /// is dropped; after a crash it is only free space at the end of the
    /// file (no cluster there has a refcount). QEMU's `preallocate`
    /// filter does the same.
    pub preallocate_ahead: u64,
    /// Password of an encrypted image (`encrypt.key-secret`).
    pub encrypt_key: Option<crate::encrypt::Secret>,
    /// Open an encrypted image without its key, for metadata only (as
    /// qemu-img info does); data I/O is then refused.
    pub no_io: bool,
    /// The external data file to use in place of the one the header
    /// names (QEMU's `data-file` option).
    pub data_file: Option<std::path::PathBuf>,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Qcow2Options {
            l2_cache_bytes: 32 << 20,
            refcount_cache_bytes: 4 << 20,
            discard_passthrough: true,
            repair: false,
            preallocate_ahead: 0,
            encrypt_key: None,
            no_io: false,
            data_file: None,
        }
    }
}

struct Meta {
    header: Header,
    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    l2_stride: usize,
    l1: Vec<u64>,
    /// Range of L1 indices changed since the last flush.
    l1_dirty: Option<(usize, usize)>,
    l2: TableCache,
    rc: Refcounts,
    /// Host byte ranges whose reference was dropped in memory, with the
    /// I/O epoch they were dropped in; their refcounts are decreased after
    /// a flush, once no I/O that started before them is still running.
    pending_free: Vec<(u64, u64, u64)>,
    /// Guest clusters whose allocation is in progress.
    inflight: HashSet<u64>,
    /// Callers refused by `try_begin_write`, woken when the cluster they
    /// found in `inflight` leaves it (see [`crate::sync`]).
    waiters: Waiters,
    snapshots: Vec<Snapshot>,
    snapshot_table_bytes: u64,
    /// Next free byte in the host cluster that compressed clusters are
    /// being packed into (0: none).
    compressed_tail: u64,
    /// Host bytes below this are reserved in the file (its length at
    /// open, then the end of the last `preallocate_ahead` extension).
    reserved_end: u64,
    /// The file's length at open: never trimmed below.
    len_at_open: u64,
    /// The file was extended ahead of its data (to be trimmed at drop);
    /// None after a failed extension (not tried again).
    preallocated: Option<bool>,
}

/// Data I/O epochs: which epochs have I/O running outside the lock.
#[derive(Default)]
struct Epochs {
    current: u64,
    /// Epoch -> number of tickets taken in it and not yet returned.
    active: std::collections::BTreeMap<u64, u32>,
}

/// Held by data I/O that maps guest ranges and accesses host clusters
/// outside the metadata lock (see [`Qcow2::io_begin`]).
#[must_use = "an I/O ticket must be returned with io_end"]
#[derive(Debug)]
pub struct IoTicket {
    epoch: u64,
}

/// What a run of guest bytes maps to in this layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Stored at this host file offset.
    Data(u64),
    /// Reads as zeros (with the preallocated host offset, if any).
    Zero(Option<u64>),
    /// Not stored here: the backing image, or zeros.
    Unallocated,
    /// Inside a compressed cluster.
    Compressed(L2Entry),
}

/// A guest write mapped to one host extent, between
/// [`Qcow2::begin_write`] and [`Qcow2::end_write`].
#[must_use = "a mapped write must be finished with end_write"]
pub struct WriteIo {
    /// Host file offset where the data goes.
    pub host: u64,
    /// Bytes of the request this extent covers.
    pub len: usize,
    alloc: Option<Alloc>,
}

/// An allocation handed out by `plan_write` and finished by `commit`.
struct Alloc {
    /// First guest cluster and count.
    gc: u64,
    n: u64,
    /// Host offset of the first new cluster (contiguous).
    host: u64,
    /// The existing preallocated zero cluster is reused (n == 1).
    reuse: bool,
    /// The new clusters lie past everything ever written: they read as
    /// zeros without being written.
    fresh: bool,
    /// Old entries of the first and last cluster: copy-on-write sources.
    first_old: L2Entry,
    last_old: L2Entry,
    /// Extended L2 entries: the subclusters [a, b) the write touches
    /// (None: the whole cluster is copied), see [`subcluster`].
    sub: Option<(u32, u32)>,
    /// Extended L2 entries: whether the head and tail subclusters need
    /// copy-on-write fill.
    cow_ends: (bool, bool),
}

enum WritePlan {
    InPlace { host: u64, len: usize },
    Alloc(Alloc),
}

thread_local! {
    /// Cluster-sized buffer for copy-on-write of partial clusters.
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Input and output buffers for compressed cluster reads.
    static DECOMP: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

pub struct Qcow2 {
    st: Storage,
    cluster_bits: u32,
    geom: CompressedGeometry,
    version: u32,
    compression: crate::header::CompressionType,
    size: AtomicU64,
    backing: Option<Arc<dyn Image>>,
    /// The header names a backing file (whether or not it was opened):
    /// decides zero clusters versus deallocation, so that data of the
    /// backing file never shows through where zeros were written.
    has_backing_file: bool,
    meta: Mutex<Meta>,
    /// Lock order: `meta` before `epochs`.
    epochs: Mutex<Epochs>,
    alloc_done: Condvar,
    opts: Qcow2Options,
    /// crypt_method of the header (0: clear).
    crypt_method: u32,
    /// The data cipher of an unlocked encrypted image.
    cipher: Option<crate::encrypt::DataCipher>,
    /// The external data file guest data lives in, if any.
    data: Option<DataFile>,
    /// L2 entries carry subcluster bitmaps (see [`subcluster`]).
    extl2: bool,
    /// Lines of the repair a dirty image had at open (see `dirty_open`).
    open_messages: Mutex<Vec<String>>,
    /// Persistent dirty bitmaps of a writable image (see
    /// [`crate::bitmap::track`]).
    bitmaps: std::sync::OnceLock<crate::bitmap::track::Tracker>,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("path", &self.st.path())
            .finish()
    }
}

impl Qcow2 {
    /// Opens a qcow2 image on `st`. `backing` is the already opened backing
    /// image (or None to read unallocated clusters as zeros).
    pub fn open(st: Storage, backing: Option<Arc<dyn Image>>, opts: Qcow2Options) -> Result<Qcow2> {
        let mut first = vec![0u8; 1 << crate::header::MAX_CLUSTER_BITS];
        let file_len = st.len()?;
        first.truncate(file_len.min(first.len() as u64) as usize);
        st.read_at(&mut first, 0)?;
        // Parse from at most one cluster of the file.
        let mut header = Header::parse(&first)?;
        let cs = header.cluster_size();
        if (first.len() as u64) > cs {
            first.truncate(cs as usize);
            header = Header::parse(&first)?;
        }
        if st.writable() && header.is_corrupt() && !opts.repair {
            return Err(Error::MarkedCorrupt);
        }
        let max = crate::header::MAX_SNAPSHOTS;
        let too_many = header.nb_snapshots.saturating_sub(max);
        if too_many > 0 {
            if !opts.repair {
                return Err(Error::SnapshotTableLimit {
                    open: "Snapshot table too large".into(),
                    check: format!(
                        "ERROR snapshot table too large\nYou can force-remove all {too_many} overhanging snapshots with qemu-img check -r all"
                    ),
                });
            }
            // The repair reads the first MAX_SNAPSHOTS entries and drops
            // the others from the header (check_snapshot_table).
            header.nb_snapshots = max;
        }
        // The encrypted data paths know neither subclusters nor a data
        // file: the combinations are refused rather than written in clear.
        if header.crypt_method != 0
            && (header.extended_l2() || header.has_data_file())
            && !opts.no_io
        {
            return Err(Error::UnsupportedFeature(
                "encryption with extended L2 entries or an external data file".into(),
            ));
        }
        let cipher = crate::encrypt::unlock(&st, &header, opts.encrypt_key.as_ref(), opts.no_io)?;
        let cb = header.cluster_bits;
        let data =
            DataFile::open_for(st.path(), &header, st.writable(), opts.data_file.as_deref())?;
        let l1 = crate::l2::read_l1(&st, header.l1_table_offset, header.l1_size)?;
        let rc = Refcounts::load(
            &st,
            header.refcount_table_offset,
            header.refcount_table_clusters as u64,
            header.refcount_order,
            cb,
            opts.refcount_cache_bytes,
        )?;
        // A repair opens tables over QEMU's limits (check -r all fixes them).
        let (snapshots, snapshot_table_bytes, _) =
            Snapshot::read_table_repairing(&st, &header, opts.repair)?;
        let meta = Meta {
            l2_stride: if header.extended_l2() { 16 } else { 8 },
            reserved_end: file_len,
            len_at_open: file_len,
            preallocated: Some(false),
            l1,
            l1_dirty: None,
            l2: TableCache::new(cs as usize, opts.l2_cache_bytes),
            rc,
            pending_free: Vec::new(),
            inflight: HashSet::new(),
            waiters: Waiters::default(),
            snapshots,
            snapshot_table_bytes,
            compressed_tail: 0,
            header: header.clone(),
        };
        let mut meta = meta;
        Self::rebuild_overlap(&mut meta, None);
        let q = Qcow2 {
            cluster_bits: cb,
            geom: CompressedGeometry::new(cb),
            version: header.version,
            compression: header.compression_type,
            size: AtomicU64::new(header.size),
            has_backing_file: header.backing_file.is_some(),
            backing,
            meta: Mutex::new(meta),
            epochs: Mutex::new(Epochs::default()),
            alloc_done: Condvar::new(),
            opts,
            st,
            crypt_method: header.crypt_method,
            cipher,
            data,
            extl2: header.extended_l2(),
            open_messages: Mutex::new(Vec::new()),
            bitmaps: std::sync::OnceLock::new(),
        };
        if q.st.writable() {
            q.prepare_for_writing()?;
            q.load_bitmaps()?;
        }
        Ok(q)
    }

    /// The lines of the repair a dirty image had when opened (qemu-img
    /// prints them on stderr); empty after the first call.
    pub fn take_open_messages(&self) -> Vec<String> {
        std::mem::take(&mut *self.open_messages.lock().unwrap())
    }

    /// Before the first write: rebuild refcounts of a dirty image and clear
    /// autoclear bits whose structures this crate does not maintain.
    fn prepare_for_writing(&self) -> Result<()> {
        let mut m = self.lock();
        if m.header.is_dirty() && !self.opts.repair {
            let (lines, clean) = crate::dirty_open::repair(self, &mut m.header_mut_ctx())?;
            *self.open_messages.lock().unwrap() = lines;
            if !clean {
                return Ok(());
            }
            m.header.incompatible_features &= !incompat::DIRTY;
            let bits = m.header.incompatible_features.to_be_bytes();
            m.rc.overlap.write(
                &self.st,
                &bits,
                field::INCOMPATIBLE,
                Allow::only(Kind::Header),
            )?;
            self.st.sync()?;
        }
        // The raw data file bit is kept: every write here keeps the data
        // file a raw image of the disk (guest offset == host offset).
        let keep = if self.data.is_some() {
            m.header.autoclear_features & crate::header::autoclear::DATA_FILE_RAW
        } else {
            0
        };
        // So is the bitmaps bit: the bitmaps are kept right (bitmap::track).
        let keep = keep | crate::bitmap::autoclear_to_keep(&m.header, self.opts.repair)?;
        if m.header.version == 3 && m.header.autoclear_features != keep {
            m.header.autoclear_features = keep;
            m.rc.overlap.write(
                &self.st,
                &keep.to_be_bytes(),
                field::AUTOCLEAR,
                Allow::only(Kind::Header),
            )?;
            self.st.sync()?;
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        // A panic while holding the lock leaves metadata in an unknown
        // state; continuing would risk writing it, so propagate.
        self.meta.lock().expect("qcow2 metadata lock poisoned")
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The allocation unit of guest data: the cluster, or with extended
    /// L2 entries one of its 32 subclusters.
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() >> if self.extl2 { 5 } else { 0 }
    }

    /// The file guest data clusters live in: the external data file, or
    /// the image file itself.
    pub fn data_storage(&self) -> &Storage {
        self.data.as_ref().map_or(&self.st, |d| &d.st)
    }

    /// The external data file's name as stored, if the image has one.
    pub fn data_file_name(&self) -> Option<&str> {
        self.data.as_ref().map(|d| d.name.as_str())
    }

    /// Internal snapshots would share data clusters, which a data file
    /// (one cluster per guest offset, no refcounts) cannot: QEMU refuses
    /// them too.
    fn refuse_snapshots_with_data_file(&self) -> Result<()> {
        if self.data.is_some() {
            return Err(Error::UnsupportedFeature(
                "internal snapshots of an image with an external data file".into(),
            ));
        }
        Ok(())
    }

    /// Checks that guest data at host [off, off + len) lands on no
    /// metadata: only possible when data shares the image file.
    fn check_data_overlap(&self, m: &mut Meta, off: u64, len: u64) -> Result<()> {
        if self.data.is_some() {
            return Ok(());
        }
        m.rc.overlap.check(&self.st, off, len, Allow::NOTHING)
    }
    /// The header as it stands now (fields the engine moved, such as the
    /// refcount table, included).
    pub fn header(&self) -> Header {
        Self::current_header(&self.lock())
    }

    fn current_header(m: &Meta) -> Header {
        let mut h = m.header.clone();
        h.refcount_table_offset = m.rc.table_offset();
        h.refcount_table_clusters = m.rc.table_clusters() as u32;
        if m.rc.overlap.refused().is_some() && h.version >= 3 {
            h.incompatible_features |= incompat::CORRUPT;
        }
        h
    }

    /// Why this image refuses writes, if a write was refused for
    /// overlapping metadata (the image is then marked corrupt).
    pub fn overlap_refused(&self) -> Option<String> {
        self.lock().rc.overlap.refused().map(str::to_string)
    }

    /// Builds the metadata overlap map from the metadata as it stands
    /// (open, and after changes made outside the usual paths: repair,
    /// header rewrites). `refused` carries an earlier refusal over.
    fn rebuild_overlap(m: &mut Meta, refused: Option<String>) {
        let cb = m.header.cluster_bits;
        let cs = 1u64 << cb;
        let mut map = MetadataMap::new(cb, m.header.version >= 3);
        if let Some(r) = refused {
            map.set_refused(r);
        }
        map.add(Kind::Header, 0, cs);
        map.add(
            Kind::ActiveL1,
            m.header.l1_table_offset,
            m.l1.len() as u64 * 8,
        );
        let l2s =
            m.l1.iter()
                .map(|&e| L1Entry(e).l2_offset())
                .filter(|&o| o != 0)
                .map(|o| (o, cs));
        map.extend(Kind::ActiveL2, l2s);
        Self::register_snapshots(
            &mut map,
            m.header.snapshots_offset,
            m.snapshot_table_bytes,
            &m.snapshots,
        );
        m.rc.install_overlap(map);
    }

    /// Rebuilds the overlap map after a repair; `repaired` forgets an
    /// earlier refusal.
    pub(crate) fn refresh_overlap(&self, repaired: bool) {
        let mut m = self.lock();
        let refused = if repaired {
            None
        } else {
            m.rc.overlap.refused().map(str::to_string)
        };
        Self::rebuild_overlap(&mut m, refused);
    }

    /// Registers the snapshot table and the snapshots' L1 tables in place
    /// of those registered before.
    fn register_snapshots(map: &mut MetadataMap, table: u64, bytes: u64, snaps: &[Snapshot]) {
        map.clear_kind(Kind::SnapshotTable);
        map.clear_kind(Kind::SnapshotL1);
        if !snaps.is_empty() {
            map.add(Kind::SnapshotTable, table, bytes);
        }
        map.extend(Kind::SnapshotL1, snaps.iter().filter_map(|s| s.l1_range()));
    }

    /// Rewrites the header cluster after applying `f` (backing file,
    /// feature bits). Extensions this crate does not interpret are kept.
    /// The first cluster holds nothing else, and QEMU rewrites it the same
    /// way.
    pub fn update_header(&self, f: impl FnOnce(&mut Header) -> Result<()>) -> Result<()> {
        self.check_writable()?;
        let m = self.lock();
        let mut m = self.quiesce(m);
        self.flush_locked(&mut m)?;
        let mut h = Self::current_header(&m);
        f(&mut h)?;
        let first = h.encode()?;
        m.rc.overlap
            .write(&self.st, &first, 0, Allow::only(Kind::Header))?;
        self.st.sync()?;
        m.header = h;
        // The version (whether there is a corrupt bit) may have changed.
        let refused = m.rc.overlap.refused().map(str::to_string);
        Self::rebuild_overlap(&mut m, refused);
        Ok(())
    }

    /// Makes the whole clusters of [off, off + len) unallocated in this
    /// layer, so that the backing file shows through (commit, rebase).
    pub fn deallocate(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len)?;
        let cs = self.cluster_size();
        let end = off + len;
        let first = off.next_multiple_of(cs);
        let last = if end == self.size() {
            end.next_multiple_of(cs)
        } else {
            end - end % cs
        };
        if first < last {
            self.unmap_clusters(first / cs, (last - first) / cs, false, false)?;
        }
        Ok(())
    }
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.lock().snapshots.clone()
    }

    fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extl2 { 4 } else { 3 }
    }

    // ----- metadata access (lock held) -----

    /// Writes back a dirty L2 table: refcounts first (see module docs).
    fn writeback_l2(&self, m: &mut Meta, i: usize) -> Result<()> {
        if m.l2.is_dirty(i) {
            m.rc.flush(&self.st)?;
            Self::write_l2(&self.st, m, i)?;
        }
        Ok(())
    }

    /// Writes the L2 table in cache slot `i` (overlap checked).
    fn write_l2(st: &Storage, m: &mut Meta, i: usize) -> Result<()> {
        let key = m.l2.key(i);
        m.rc.overlap
            .write(st, m.l2.data(i), key, Allow::only(Kind::ActiveL2))?;
        m.l2.mark_clean(i);
        Ok(())
    }

    /// Cache slot of the L2 table at host offset `off`.
    fn l2_slot(&self, m: &mut Meta, off: u64) -> Result<usize> {
        if let Some(i) = m.l2.lookup(off) {
            return Ok(i);
        }
        if off & (self.cluster_size() - 1) != 0 {
            return Err(Error::Corrupt(format!(
                "L2 table offset {off:#x} is not cluster aligned"
            )));
        }
        if off == 0 {
            return Err(Error::Corrupt("L2 table at offset 0 (the header)".into()));
        }
        let i = m.l2.victim();
        self.writeback_l2(m, i)?;
        self.st.read_at(m.l2.buffer(i), off)?;
        m.l2.assign(i, off, false);
        Ok(i)
    }

    fn l2_get(m: &Meta, slot: usize, idx: usize) -> u64 {
        let d = m.l2.data(slot);
        let at = idx * m.l2_stride;
        u64::from_be_bytes(d[at..at + 8].try_into().unwrap())
    }

    fn l2_set(m: &mut Meta, slot: usize, idx: usize, v: u64) {
        let at = idx * m.l2_stride;
        m.l2.data_mut(slot)[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    /// Sets an active L1 entry (in memory; written at the next flush) and
    /// keeps the overlap map's active L2 tables in step.
    fn set_l1(m: &mut Meta, idx: usize, v: u64) {
        let (old, new) = (L1Entry(m.l1[idx]).l2_offset(), L1Entry(v).l2_offset());
        if old != new {
            let cs = m.rc.overlap.cluster_size();
            if old != 0 {
                m.rc.overlap.remove(Kind::ActiveL2, old, cs);
            }
            if new != 0 {
                m.rc.overlap.add(Kind::ActiveL2, new, cs);
            }
        }
        m.l1[idx] = v;
        m.l1_dirty = Some(match m.l1_dirty {
            None => (idx, idx),
            Some((a, b)) => (a.min(idx), b.max(idx)),
        });
    }

    fn decode(&self, raw: u64) -> Result<L2Entry> {
        // Bit 0 is no zero flag with extended L2 entries: the bitmap
        // says which subclusters read as zeros.
        let raw = if self.extl2 {
            raw & !crate::l2::ZERO
        } else {
            raw
        };
        let e = L2Entry::decode_in(raw, self.geom, self.data.is_some());
        match e {
            L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            } if host & (self.cluster_size() - 1) != 0 => Err(Error::Corrupt(format!(
                "cluster offset {host:#x} is not cluster aligned"
            ))),
            L2Entry::Zero { .. } if self.version < 3 => Err(Error::Corrupt(
                "zero cluster flag in a version 2 image".into(),
            )),
            _ => Ok(e),
        }
    }

    /// Slot of the L2 table for L1 index `l1i`, if one is allocated.
    fn l2_for(&self, m: &mut Meta, l1i: usize) -> Result<Option<usize>> {
        let Some(&e) = m.l1.get(l1i) else {
            return Ok(None);
        };
        let off = L1Entry(e).l2_offset();
        if off == 0 {
            return Ok(None);
        }
        self.l2_slot(m, off).map(Some)
    }

    /// Maps the run of guest bytes starting at `off` (at most `len`) that
    /// share one kind of mapping in this layer.
    fn map_run(&self, m: &mut Meta, off: u64, len: u64) -> Result<(Mapping, u64)> {
        if self.extl2 {
            return self.map_run_ext(m, off, len);
        }
        let cs = self.cluster_size();
        let cb = self.cluster_bits;
        let l2n = 1u64 << self.l2_bits();
        let gc = off >> cb;
        let in_cl = off & (cs - 1);
        let l1i = (gc >> self.l2_bits()) as usize;
        let l2i = gc & (l2n - 1);
        // Clusters this request may span within the current L2 table.
        let want = (in_cl + len).div_ceil(cs).min(l2n - l2i);
        let Some(slot) = self.l2_for(m, l1i)? else {
            return Ok((Mapping::Unallocated, (want * cs - in_cl).min(len)));
        };
        let first = self.decode(Self::l2_get(m, slot, l2i as usize))?;
        // A bad entry further on ends the run instead of failing it: it
        // fails only the request that starts on it. (Failing the run
        // would make a caller stepping past the error rescan the same
        // entries for every cluster before it: quadratic on a corrupt
        // table.)
        let entry = |m: &Meta, n: u64| self.decode(Self::l2_get(m, slot, (l2i + n) as usize)).ok();
        let mut n = 1;
        let run = match first {
            L2Entry::Normal { host, .. } => {
                while n < want {
                    match entry(m, n) {
                        Some(L2Entry::Normal { host: h, .. }) if h == host + n * cs => n += 1,
                        _ => break,
                    }
                }
                Mapping::Data(host + in_cl)
            }
            L2Entry::Zero { host, .. } => {
                // A run is either all plain zero clusters or preallocated
                // ones at contiguous host offsets, as QEMU counts them
                // (so that block status and `map` report the same runs).
                while n < want {
                    match entry(m, n) {
                        Some(L2Entry::Zero { host: h, .. })
                            if h == host.map(|first| first + n * cs) =>
                        {
                            n += 1
                        }
                        _ => break,
                    }
                }
                Mapping::Zero(host.map(|h| h + in_cl))
            }
            L2Entry::Unallocated => {
                while n < want {
                    match entry(m, n) {
                        Some(L2Entry::Unallocated) => n += 1,
                        _ => break,
                    }
                }
                Mapping::Unallocated
            }
            c @ L2Entry::Compressed { .. } => Mapping::Compressed(c),
        };
        Ok((run, (n * cs - in_cl).min(len)))
    }

    // ----- reads -----

    fn read_unallocated(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match &self.backing {
            Some(b) => read_backing(b.as_ref(), buf, off),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Decompresses the cluster described by `e` and hands it to `f`.
    fn with_decompressed<R>(&self, e: L2Entry, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let L2Entry::Compressed { offset, len, .. } = e else {
            unreachable!("with_decompressed takes compressed entries")
        };
        if self.data.is_some() {
            return Err(Error::Corrupt(
                "compressed cluster entry found in an image with an external data file".into(),
            ));
        }
        DECOMP.with(|d| {
            let (input, out) = &mut *d.borrow_mut();
            input.resize(len as usize, 0);
            out.resize(self.cluster_size() as usize, 0);
            self.st.read_at(input, offset)?;
            compress::decompress(self.compression, input, out)
                .map_err(|reason| Error::Decompress { offset, reason })?;
            Ok(f(out))
        })
    }

    /// Reads guest data into `buf` from guest offset `off` (which must lie
    /// within the image).
    fn read_inner(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let (run, n) = {
                let mut m = self.lock();
                self.map_run(&mut m, pos, (buf.len() - done) as u64)?
            };
            self.read_mapped(run, &mut buf[done..done + n as usize], pos)?;
            done += n as usize;
        }
        Ok(())
    }

    // ----- writes -----

    /// Makes the L2 table for `l1i` exclusively ours (allocating it, or
    /// copying a table shared with a snapshot) and returns its slot.
    fn l2_writable(&self, m: &mut Meta, l1i: usize) -> Result<usize> {
        let e = L1Entry(m.l1[l1i]);
        let old = e.l2_offset();
        if old != 0 && e.copied() {
            return self.l2_slot(m, old);
        }
        let cs = self.cluster_size();
        if old != 0 && m.rc.get(&self.st, old >> self.cluster_bits)? == 1 {
            // Only the active L1 references it after all: just mark it.
            Self::set_l1(m, l1i, L1Entry::new(old, true).0);
            return self.l2_slot(m, old);
        }
        let content = if old != 0 {
            let s = self.l2_slot(m, old)?;
            Some(m.l2.data(s).to_vec())
        } else {
            None
        };
        let new = m.rc.alloc(&self.st, 1)?;
        let i = m.l2.victim();
        self.writeback_l2(m, i)?;
        match &content {
            Some(c) => m.l2.buffer(i).copy_from_slice(c),
            None => m.l2.buffer(i).fill(0),
        }
        m.l2.assign(i, new, true);
        Self::set_l1(m, l1i, L1Entry::new(new, true).0);
        if old != 0 {
            self.queue_free(m, (old, cs));
        }
        Ok(i)
    }

    /// Decides how to write `len` bytes at guest offset `pos`: in place
    /// into clusters we own, or into newly allocated clusters. Called with
    /// the lock held and the first cluster not in flight.
    fn plan_write(&self, m: &mut Meta, pos: u64, len: usize) -> Result<WritePlan> {
        if self.extl2 {
            return self.plan_write_ext(m, pos, len);
        }
        let cs = self.cluster_size();
        let cb = self.cluster_bits;
        let l2n = 1u64 << self.l2_bits();
        let gc = pos >> cb;
        let in_cl = pos & (cs - 1);
        let l1i = (gc >> self.l2_bits()) as usize;
        let l2i = gc & (l2n - 1);
        let want = (in_cl + len as u64).div_ceil(cs).min(l2n - l2i);
        if let Some(slot) = self.l2_for(m, l1i)? {
            if let L2Entry::Normal { host, copied: true } =
                self.decode(Self::l2_get(m, slot, l2i as usize))?
            {
                let mut n = 1;
                while n < want {
                    match self.decode(Self::l2_get(m, slot, (l2i + n) as usize))? {
                        L2Entry::Normal {
                            host: h,
                            copied: true,
                        } if h == host + n * cs => n += 1,
                        _ => break,
                    }
                }
                let bytes = ((n * cs - in_cl) as usize).min(len);
                // The mapping may point at metadata (a corrupt image).
                self.check_data_overlap(m, host + in_cl, bytes as u64)?;
                return Ok(WritePlan::InPlace {
                    host: host + in_cl,
                    len: bytes,
                });
            }
        }
        let slot = self.l2_writable(m, l1i)?;
        let first_old = self.decode(Self::l2_get(m, slot, l2i as usize))?;
        // A preallocated zero cluster we own is reused in place.
        if let L2Entry::Zero {
            host: Some(h),
            copied: true,
        } = first_old
        {
            self.check_data_overlap(m, h, cs)?;
            m.inflight.insert(gc);
            return Ok(WritePlan::Alloc(Alloc {
                gc,
                n: 1,
                host: h,
                reuse: true,
                fresh: false,
                first_old,
                last_old: first_old,
                sub: None,
                cow_ends: (true, true),
            }));
        }
        let mut n = 1;
        let mut last_old = first_old;
        while n < want {
            if m.inflight.contains(&(gc + n)) {
                break;
            }
            match self.decode(Self::l2_get(m, slot, (l2i + n) as usize))? {
                L2Entry::Normal { copied: true, .. }
                | L2Entry::Zero {
                    host: Some(_),
                    copied: true,
                } => break,
                e => last_old = e,
            }
            n += 1;
        }
        if self.data.is_some() {
            // Data clusters of a data file sit at the guest offset and
            // have no refcounts (qcow2.rst, "External data file").
            for k in 0..n {
                m.inflight.insert(gc + k);
            }
            return Ok(WritePlan::Alloc(Alloc {
                gc,
                n,
                host: gc << cb,
                reuse: false,
                fresh: false,
                first_old,
                last_old,
                sub: None,
                cow_ends: (true, true),
            }));
        }
        let fresh_from = m.rc.end();
        let host = m.rc.alloc(&self.st, n)?;
        for k in 0..n {
            m.inflight.insert(gc + k);
        }
        let fresh = host >> self.cluster_bits >= fresh_from;
        if fresh {
            self.reserve_ahead(m, host + n * cs);
        }
        Ok(WritePlan::Alloc(Alloc {
            gc,
            n,
            host,
            reuse: false,
            fresh,
            first_old,
            last_old,
            sub: None,
            cow_ends: (true, true),
        }))
    }

    /// With `preallocate_ahead`, makes sure the file has space reserved up
    /// to `end`, reserving `preallocate_ahead` bytes past it when not.
    /// Only an optimization: a filesystem that cannot reserve space is not
    /// asked again, and the data writes report any real lack of space.
    fn reserve_ahead(&self, m: &mut Meta, end: u64) {
        let ahead = self.opts.preallocate_ahead;
        if ahead == 0 || end <= m.reserved_end || m.preallocated.is_none() {
            return;
        }
        let cs = self.cluster_size();
        let to = end.saturating_add(ahead).next_multiple_of(cs);
        // Space already reserved or written stays as it is (mode 0).
        match self.st.allocate(m.reserved_end, to - m.reserved_end) {
            Ok(()) => {
                m.reserved_end = to;
                m.preallocated = Some(true);
            }
            Err(_) => m.preallocated = None,
        }
    }

    /// Cuts off the space `reserve_ahead` reserved past the last cluster
    /// in use (at drop). Clusters there have no refcount and nothing
    /// points at them.
    fn trim_reserved(&self, m: &mut Meta) -> Result<()> {
        if m.preallocated != Some(true) {
            return Ok(());
        }
        let end = (m.rc.end() * self.cluster_size()).max(m.len_at_open);
        if self.st.len()? > end {
            self.st.set_len(end)?;
        }
        m.preallocated = Some(false);
        m.reserved_end = end;
        Ok(())
    }

    /// Fills `out` (one cluster) with what guest cluster `gc` reads as in
    /// the mapping `old`: the copy-on-write source.
    fn cow_source(&self, gc: u64, old: L2Entry, out: &mut [u8]) -> Result<()> {
        match old {
            // Copy-on-write needs the real backing data.
            L2Entry::Unallocated if self.has_backing_file && self.backing.is_none() => {
                Err(Error::Backing(
                    "the backing file is not open: cannot fill a partial cluster from it".into(),
                ))
            }
            L2Entry::Unallocated => self.read_unallocated(out, gc << self.cluster_bits),
            L2Entry::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            L2Entry::Normal { host, .. } if self.crypt_method != 0 => {
                self.st.debug_event("read_aio");
                self.read_encrypted(out, host, gc << self.cluster_bits)
            }
            L2Entry::Normal { host, .. } => {
                self.st.debug_event("read_aio");
                self.data_storage().read_at(out, host)
            }
            L2Entry::Compressed { .. } => self.with_decompressed(old, |c| out.copy_from_slice(c)),
        }
    }

    /// Whether guest cluster `gc` read as zeros under mapping `old`.
    fn reads_zero(&self, old: L2Entry) -> bool {
        matches!(old, L2Entry::Zero { .. })
            || (old == L2Entry::Unallocated && !self.has_backing_file)
    }

    /// Copy-on-write fill of the parts of newly allocated clusters that the
    /// guest write [pos, pos + len) does not cover: the head of the first
    /// cluster and the tail of the last, from what they read as before.
    fn cow_fill(&self, a: &Alloc, pos: u64, len: u64) -> Result<()> {
        if self.extl2 {
            return self.cow_fill_ext(a, pos, len);
        }
        let cs = self.cluster_size();
        let in_cl = pos - (a.gc << self.cluster_bits);
        let end = in_cl + len; // relative to the first cluster
        let last = a.n - 1;
        let mut regions: [(u64, L2Entry, u64, u64); 2] = [(0, a.first_old, 0, 0); 2];
        let mut count = 0;
        if in_cl > 0 {
            regions[count] = (0, a.first_old, 0, in_cl);
            count += 1;
        }
        if end < a.n * cs {
            regions[count] = (last, a.last_old, end - last * cs, cs);
            count += 1;
        }
        for &(k, old, from, to) in &regions[..count] {
            let host = a.host + k * cs;
            if let Some(c) = &self.cipher {
                // Encrypted: even zeros are written, encrypted for here.
                let guest = (a.gc + k) << self.cluster_bits;
                BOUNCE.with(|b| -> Result<()> {
                    let mut bounce = b.borrow_mut();
                    bounce.resize(cs as usize, 0);
                    if self.reads_zero(old) {
                        bounce.fill(0);
                    } else {
                        self.cow_source(a.gc + k, old, &mut bounce)?;
                    }
                    let part = &mut bounce[from as usize..to as usize];
                    c.encrypt(host + from, guest + from, part);
                    self.data_storage().write_data_at(part, host + from)
                })?;
                continue;
            }
            if self.reads_zero(old) {
                if !a.fresh {
                    self.data_storage()
                        .write_data_zeroes(host + from, to - from)?;
                }
                continue;
            }
            BOUNCE.with(|b| -> Result<()> {
                let mut bounce = b.borrow_mut();
                bounce.resize(cs as usize, 0);
                self.cow_source(a.gc + k, old, &mut bounce)?;
                self.data_storage()
                    .write_data_at(&bounce[from as usize..to as usize], host + from)
            })?;
        }
        Ok(())
    }

    /// Gives back clusters of an allocation that was never committed (a
    /// failed `commit_alloc` set no entry, so nothing points at them).
    fn rollback_alloc(&self, m: &mut Meta, a: &Alloc) {
        if !a.reuse && self.data.is_none() {
            // Nothing points at the new clusters yet, so they can be freed
            // at once. On failure they stay allocated: a leak, not damage.
            let _ =
                m.rc.update_range(&self.st, a.host, a.n * self.cluster_size(), -1, |_| {});
        }
    }

    /// Points the L2 entries at the new clusters and queues the old
    /// clusters' references for release. All or nothing: on error no
    /// entry has changed, so `rollback_alloc` frees clusters nothing
    /// points at.
    fn commit_alloc(&self, m: &mut Meta, a: &Alloc) -> Result<()> {
        let cs = self.cluster_size();
        let l2n = 1u64 << self.l2_bits();
        let l1i = (a.gc >> self.l2_bits()) as usize;
        let slot = self.l2_writable(m, l1i)?;
        let idx = |k: u64| ((a.gc + k) & (l2n - 1)) as usize;
        // The table may have been evicted and read back since plan_write
        // decoded the entries: decode them all before changing any.
        for k in 0..a.n {
            self.decode(Self::l2_get(m, slot, idx(k)))?;
        }
        for k in 0..a.n {
            let idx = idx(k);
            // Cannot fail: the same entry decoded above, lock held.
            let old = self.decode(Self::l2_get(m, slot, idx))?;
            let new = L2Entry::Normal {
                host: a.host + k * cs,
                copied: true,
            };
            Self::l2_set(m, slot, idx, new.encode(self.geom));
            if self.extl2 {
                Self::commit_bitmap(m, slot, idx, a);
            }
            // Data file clusters have no refcounts (and stay where they are).
            if !a.reuse && self.data.is_none() {
                if let Some(r) = old.host_range(cs) {
                    self.queue_free(m, r);
                }
            }
        }
        Ok(())
    }

    fn finish_alloc(&self, m: MutexGuard<'_, Meta>, a: &Alloc) {
        self.release_inflight(m, a.gc, a.n);
    }

    /// Ends the allocation of guest clusters [gc, gc + n): they leave the
    /// in-flight set, and whoever waits for them (blocked in
    /// `wait_inflight`, or refused by `try_begin_write`) is woken. The one
    /// place an allocation ends (see [`crate::sync`]).
    fn release_inflight(&self, mut m: MutexGuard<'_, Meta>, gc: u64, n: u64) {
        for k in 0..n {
            m.inflight.remove(&(gc + k));
        }
        let wake = m.waiters.take(gc, n);
        drop(m);
        self.alloc_done.notify_all();
        for w in wake {
            w.wake();
        }
    }

    /// Waits until none of the guest clusters [gc, gc + n) is being
    /// allocated; in non-blocking mode ([`crate::sync::without_blocking`])
    /// registers the thread's waker on a busy one and fails instead.
    fn wait_inflight<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        gc: u64,
        n: u64,
    ) -> Result<MutexGuard<'a, Meta>> {
        while !m.inflight.is_empty() {
            let Some(busy) = (gc..gc + n).find(|c| m.inflight.contains(c)) else {
                break;
            };
            if let Some(w) = crate::sync::nonblocking_waker() {
                m.waiters.register(busy, &w);
                return Err(Error::WouldBlock);
            }
            m = self
                .alloc_done
                .wait(m)
                .expect("qcow2 metadata lock poisoned");
        }
        Ok(m)
    }

    /// Maps the write after the lock was taken and the first cluster is
    /// known not to be in flight.
    fn begin_locked(&self, mut m: MutexGuard<'_, Meta>, pos: u64, len: usize) -> Result<WriteIo> {
        self.mark_dirty(pos, len as u64)?;
        match self.plan_write(&mut m, pos, len)? {
            WritePlan::InPlace { host, len } => Ok(WriteIo {
                host,
                len,
                alloc: None,
            }),
            WritePlan::Alloc(a) => {
                drop(m);
                let in_cl = pos - (a.gc << self.cluster_bits);
                let n = (len as u64).min(a.n * self.cluster_size() - in_cl);
                if let Err(e) = self.cow_fill(&a, pos, n) {
                    let mut m = self.lock();
                    self.rollback_alloc(&mut m, &a);
                    self.finish_alloc(m, &a);
                    return Err(e);
                }
                Ok(WriteIo {
                    host: a.host + in_cl,
                    len: n as usize,
                    alloc: Some(a),
                })
            }
        }
    }

    /// First step of a guest write, for callers that do the data I/O
    /// themselves (io_uring): maps a prefix of [off, off + len) to one host
    /// extent, allocating and doing copy-on-write fill where needed. The
    /// caller writes `io.len` bytes of its data at `io.host`, then calls
    /// [`end_write`](Self::end_write) with the outcome. Blocks while
    /// another request is allocating the same guest cluster.
    pub fn begin_write(&self, off: u64, len: usize) -> Result<WriteIo> {
        self.check_writable()?;
        self.check_clear()?;
        self.check_range(off, len as u64)?;
        let m = self.lock();
        let m = self.wait_inflight(m, off >> self.cluster_bits, 1)?;
        self.begin_locked(m, off, len)
    }

    /// As [`begin_write`](Self::begin_write), but returns `Ok(None)`
    /// instead of waiting when another request is allocating the cluster
    /// (for event loops that must not block on another queue). `waker` is
    /// then registered on that cluster and called once its allocation
    /// ends: retry after that (the protocol is in [`crate::sync`]).
    pub fn try_begin_write(
        &self,
        off: u64,
        len: usize,
        waker: &Arc<dyn AllocWaker>,
    ) -> Result<Option<WriteIo>> {
        self.check_writable()?;
        self.check_clear()?;
        self.check_range(off, len as u64)?;
        let mut m = self.lock();
        let gc = off >> self.cluster_bits;
        if m.inflight.contains(&gc) {
            m.waiters.register(gc, waker);
            return Ok(None);
        }
        self.begin_locked(m, off, len).map(Some)
    }

    /// Waits until some allocation ends, or `timeout` passes (for callers
    /// that poll with `try_begin_write` and may not block for good).
    pub fn wait_for_allocations(&self, timeout: std::time::Duration) {
        let m = self.lock();
        if !m.inflight.is_empty() {
            let _ = self.alloc_done.wait_timeout(m, timeout);
        }
    }

    /// The allocation state, for a daemon's state dump: guest clusters
    /// being allocated, and those that refused callers wait on. Never
    /// blocks: a busy metadata lock is reported as such.
    pub fn alloc_state(&self) -> String {
        let m = match self.meta.try_lock() {
            Ok(m) => m,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return "metadata lock held (busy or stuck)".into()
            }
        };
        let mut inflight: Vec<u64> = m.inflight.iter().copied().collect();
        inflight.sort_unstable();
        let active: u32 = self.epochs().active.values().sum();
        format!(
            "clusters being allocated {:?}; waiters {} on clusters {:?}; \
             I/O tickets held {active}; frees pending {}",
            inflight,
            m.waiters.len(),
            m.waiters.clusters(),
            m.pending_free.len()
        )
    }

    /// Second step of a guest write: once the data write completed
    /// (`ok`), points the L2 entries at the new clusters; otherwise gives
    /// the clusters back.
    pub fn end_write(&self, io: WriteIo, ok: bool) -> Result<()> {
        let Some(a) = io.alloc else {
            return Ok(());
        };
        let mut m = self.lock();
        let r = if ok {
            self.commit_alloc(&mut m, &a)
        } else {
            Ok(())
        };
        if !ok || r.is_err() {
            self.rollback_alloc(&mut m, &a);
        }
        self.finish_alloc(m, &a);
        r
    }

    /// Ends a write whose data I/O may still be running and will never be
    /// waited for (its io_uring could not be waited on). The guest cluster
    /// keeps its old mapping and the host clusters the write went to are
    /// leaked, never referenced nor reused, so a late write into them
    /// damages nothing; whoever waits for the guest clusters goes on.
    pub fn abandon_write(&self, io: WriteIo) {
        let Some(a) = io.alloc else {
            // In place: the late write lands in the request's own range.
            return;
        };
        let mut m = self.lock();
        if a.reuse && self.extl2 {
            // Our own cluster, with other subclusters' data: it cannot be
            // unmapped, so the guest cluster stays in flight for good
            // (writes to it wait) and the late write lands on nothing
            // that is read.
            return;
        }
        if a.reuse {
            // The preallocated cluster stays allocated but is no longer
            // this guest cluster's: unmap it (zero without a host).
            let l2n = 1u64 << self.l2_bits();
            let idx = (a.gc & (l2n - 1)) as usize;
            let unmapped = L2Entry::Zero {
                host: None,
                copied: false,
            };
            match self.l2_writable(&mut m, (a.gc >> self.l2_bits()) as usize) {
                Ok(slot) => Self::l2_set(&mut m, slot, idx, unmapped.encode(self.geom)),
                Err(_) => {
                    // Cannot unmap it: the guest cluster stays in flight
                    // for good (writes to it wait) rather than risk reuse.
                    return;
                }
            }
        }
        self.finish_alloc(m, &a);
    }

    /// Starts data I/O that maps guest ranges ([`map_read`](Self::map_read),
    /// [`begin_write`](Self::begin_write)) and then reads or writes the
    /// host clusters outside the metadata lock. Until the ticket is
    /// returned with [`io_end`](Self::io_end), no cluster freed after this
    /// call is reused, so the I/O cannot touch another guest range's data
    /// even when the guest discards the range concurrently.
    pub fn io_begin(&self) -> IoTicket {
        let mut e = self.epochs();
        let epoch = e.current;
        *e.active.entry(epoch).or_default() += 1;
        IoTicket { epoch }
    }

    /// Ends the data I/O started with [`io_begin`](Self::io_begin).
    pub fn io_end(&self, t: IoTicket) {
        let mut e = self.epochs();
        if let Some(n) = e.active.get_mut(&t.epoch) {
            *n -= 1;
            if *n == 0 {
                e.active.remove(&t.epoch);
            }
        }
    }

    fn epochs(&self) -> MutexGuard<'_, Epochs> {
        self.epochs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a host range whose last reference was just dropped in
    /// memory, tagged with the current epoch (then advanced).
    fn queue_free(&self, m: &mut Meta, (off, len): (u64, u64)) {
        let mut e = self.epochs();
        m.pending_free.push((off, len, e.current));
        e.current += 1;
    }

    fn write_inner(&self, buf: &[u8], off: u64) -> Result<()> {
        let t = self.io_begin();
        let r = if self.crypt_method != 0 {
            self.write_encrypted(buf, off)
        } else {
            self.write_inner_ticketed(buf, off)
        };
        self.io_end(t);
        r
    }

    fn write_inner_ticketed(&self, buf: &[u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let m = self.lock();
            let m = self.wait_inflight(m, pos >> self.cluster_bits, 1)?;
            let io = self.begin_locked(m, pos, buf.len() - done)?;
            let n = io.len;
            self.st.debug_event("write_aio");
            let r = self
                .data_storage()
                .write_data_at(&buf[done..done + n], io.host);
            self.end_write(io, r.is_ok())?;
            r?;
            done += n;
        }
        Ok(())
    }

    /// Writes to an encrypted image: whole 512-byte sectors (partial ones
    /// read, decrypted and merged first), each host extent encrypted for
    /// where it lands. Not atomic against a concurrent writer of the same
    /// sector; vhost-blk, the one concurrent user, refuses encrypted
    /// images.
    fn write_encrypted(&self, buf: &[u8], off: u64) -> Result<()> {
        let c = self.data_cipher()?;
        let sec = crate::crypto::SECTOR;
        let start = off - off % sec;
        let end = (off + buf.len() as u64).next_multiple_of(sec);
        let mut plain = vec![0u8; (end - start) as usize];
        // The image size is a multiple of 512 (create rounds it), so the
        // merged sectors lie inside it.
        if start < off {
            self.read_inner(&mut plain[..sec as usize], start)?;
        }
        if end > off + buf.len() as u64 {
            let tail = end - sec;
            self.read_inner(&mut plain[(tail - start) as usize..], tail)?;
        }
        let skip = (off - start) as usize;
        plain[skip..skip + buf.len()].copy_from_slice(buf);
        let mut done = 0usize;
        while done < plain.len() {
            let pos = start + done as u64;
            let m = self.lock();
            let m = self.wait_inflight(m, pos >> self.cluster_bits, 1)?;
            let io = self.begin_locked(m, pos, plain.len() - done)?;
            let n = io.len;
            let chunk = &mut plain[done..done + n];
            c.encrypt(io.host, pos, chunk);
            let r = self.data_storage().write_data_at(chunk, io.host);
            self.end_write(io, r.is_ok())?;
            r?;
            done += n;
        }
        Ok(())
    }

    /// Maps a prefix of the guest range [off, off + len) for reading:
    /// returns how it is stored in this layer and the prefix length. Data
    /// can be read from the host file directly at the returned offset; the
    /// other kinds go through [`read_mapped`](Self::read_mapped).
    pub fn map_read(&self, off: u64, len: u64) -> Result<(Mapping, u64)> {
        self.check_clear()?;
        self.check_range(off, len)?;
        let mut m = self.lock();
        self.map_run(&mut m, off, len)
    }

    /// Reads guest bytes at `off` that [`map_read`](Self::map_read) mapped
    /// as `mapping` (any kind).
    pub fn read_mapped(&self, mapping: Mapping, buf: &mut [u8], off: u64) -> Result<()> {
        match mapping {
            Mapping::Data(host) if self.crypt_method != 0 => {
                self.st.debug_event("read_aio");
                self.read_encrypted(buf, host, off)
            }
            Mapping::Data(host) => {
                self.st.debug_event("read_aio");
                self.data_storage().read_at(buf, host)
            }
            Mapping::Zero(_) => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Unallocated => self.read_unallocated(buf, off),
            Mapping::Compressed(e) => {
                let in_cl = (off & (self.cluster_size() - 1)) as usize;
                self.with_decompressed(e, |c| buf.copy_from_slice(&c[in_cl..in_cl + buf.len()]))
            }
        }
    }

    /// Changes whole guest clusters [gc, gc + n) to zero clusters
    /// (`zero`) or deallocates them, dropping their host clusters.
    fn unmap_clusters(&self, gc: u64, n: u64, zero: bool, keep_alloc: bool) -> Result<()> {
        let cs = self.cluster_size();
        self.mark_dirty(gc * cs, n * cs)?;
        let mut keep_alloc = keep_alloc;
        if let Some(d) = self.data.as_ref().filter(|d| d.raw) {
            // The raw data file must read as the disk does: zeros go into
            // it, and its clusters stay mapped.
            if !zero {
                return Ok(()); // Discard is advisory.
            }
            let end = ((gc + n) * cs).min(self.size());
            d.st.write_zeroes(gc * cs, end - gc * cs)?;
            keep_alloc = true;
        }
        let l2n = 1u64 << self.l2_bits();
        let mut c = gc;
        while c < gc + n {
            let l1i = (c >> self.l2_bits()) as usize;
            let chunk = (l2n - (c & (l2n - 1))).min(gc + n - c);
            let m = self.lock();
            let mut m = self.wait_inflight(m, c, chunk)?;
            let has_table = L1Entry(m.l1[l1i]).l2_offset() != 0;
            if !has_table && !zero {
                // Unallocated already reads as zeros without a backing file;
                // zero clusters are still written (QEMU's write-zeroes sets
                // the flag in version 3, table or not).
                c += chunk;
                continue;
            }
            let slot = self.l2_writable(&mut m, l1i)?;
            for k in 0..chunk {
                let idx = ((c + k) & (l2n - 1)) as usize;
                let old = self.decode(Self::l2_get(&m, slot, idx))?;
                if self.extl2 {
                    let (new, bm) = Self::unmapped_ext(old, zero, keep_alloc);
                    if new == old && bm == Self::l2_bitmap_get(&m, slot, idx) {
                        continue;
                    }
                    Self::l2_set(&mut m, slot, idx, new.encode(self.geom));
                    Self::l2_bitmap_set(&mut m, slot, idx, bm);
                    if new == old {
                        continue; // The host cluster is kept.
                    }
                    if let Some(r) = old.host_range(cs) {
                        self.release_data(&mut m, r)?;
                    }
                    continue;
                }
                let new = match (zero, old) {
                    (true, L2Entry::Normal { host, copied: true }) if keep_alloc => L2Entry::Zero {
                        host: Some(host),
                        copied: true,
                    },
                    (
                        true,
                        L2Entry::Zero {
                            host: Some(h),
                            copied: true,
                        },
                    ) if keep_alloc => L2Entry::Zero {
                        host: Some(h),
                        copied: true,
                    },
                    (true, _) => L2Entry::Zero {
                        host: None,
                        copied: false,
                    },
                    (false, _) => L2Entry::Unallocated,
                };
                if new == old {
                    continue;
                }
                Self::l2_set(&mut m, slot, idx, new.encode(self.geom));
                let kept = matches!(new, L2Entry::Zero { host: Some(_), .. });
                if !kept {
                    if let Some(r) = old.host_range(cs) {
                        self.release_data(&mut m, r)?;
                    }
                }
            }
            drop(m);
            c += chunk;
        }
        Ok(())
    }

    /// Drops the reference of an unmapped entry to its host range.
    fn release_data(&self, m: &mut Meta, r: (u64, u64)) -> Result<()> {
        match &self.data {
            None => self.queue_free(m, r),
            // No refcounts there: only give the space back.
            Some(d) if self.opts.discard_passthrough => d.st.punch_hole(r.0, r.1)?,
            Some(_) => {}
        }
        Ok(())
    }

    /// Writes zeros through the normal write path, in bounded pieces.
    fn write_zero_bytes(&self, off: u64, len: u64) -> Result<()> {
        let zeros = crate::zero_buf();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_inner(&zeros[..n as usize], off + done)?;
            done += n;
        }
        Ok(())
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        let size = self.size();
        if off.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange {
                offset: off,
                len,
                size,
            });
        }
        Ok(())
    }

    /// Reads and decrypts data at `host` (guest offset `off`), whole
    /// 512-byte sectors around it.
    fn read_encrypted(&self, buf: &mut [u8], host: u64, off: u64) -> Result<()> {
        let c = self.data_cipher()?;
        let skip = host % crate::crypto::SECTOR;
        let len = (skip + buf.len() as u64).next_multiple_of(crate::crypto::SECTOR);
        let mut tmp = vec![0u8; len as usize];
        self.data_storage().read_at(&mut tmp, host - skip)?;
        c.decrypt(host - skip, off - skip, &mut tmp);
        buf.copy_from_slice(&tmp[skip as usize..skip as usize + buf.len()]);
        Ok(())
    }

    /// The cipher of an encrypted image opened with its key.
    fn data_cipher(&self) -> Result<&crate::encrypt::DataCipher> {
        self.cipher.as_ref().ok_or_else(|| {
            Error::Crypto("Parameter 'encrypt.key-secret' is required for cipher".into())
        })
    }

    /// Allocates zeroed host clusters for `len` bytes (the LUKS header
    /// area) and returns their offset.
    pub fn alloc_clusters_zeroed(&self, len: u64) -> Result<u64> {
        self.check_writable()?;
        let cs = self.cluster_size();
        let n = len.div_ceil(cs);
        let off = {
            let mut m = self.lock();
            m.rc.alloc(&self.st, n)?
        };
        let zeros = crate::zero_buf();
        let mut done = 0;
        while done < n * cs {
            let k = (n * cs - done).min(zeros.len() as u64) as usize;
            self.st.write_at(&zeros[..k], off + done)?;
            done += k as u64;
        }
        Ok(off)
    }

    /// The password the image was opened with.
    pub fn encrypt_key(&self) -> Option<&crate::encrypt::Secret> {
        self.opts.encrypt_key.as_ref()
    }

    /// Whether the image's data is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.crypt_method != 0
    }

    /// Refuses paths that move guest data without the cipher: writes
    /// (rimg does not encrypt data yet) and raw host mappings.
    fn check_clear(&self) -> Result<()> {
        if self.crypt_method != 0 {
            return Err(Error::Crypto(
                "encrypted images need the engine's own read and write paths (no raw host access, no compression)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.st.writable() {
            Ok(())
        } else {
            Err(Error::ReadOnly)
        }
    }

    /// Flushes metadata in the order described in the module docs and
    /// releases queued frees.
    fn flush_locked(&self, m: &mut Meta) -> Result<()> {
        if !self.st.writable() {
            return Ok(());
        }
        m.rc.overlap.usable()?;
        m.rc.flush(&self.st)?;
        let dirty = m.l2.dirty_slots();
        for &i in &dirty {
            Self::write_l2(&self.st, m, i)?;
        }
        if let Some((a, b)) = m.l1_dirty.take() {
            if !dirty.is_empty() {
                self.st.sync()?;
            }
            let mut raw = Vec::with_capacity((b - a + 1) * 8);
            for e in &m.l1[a..=b] {
                raw.extend_from_slice(&e.to_be_bytes());
            }
            let at = m.header.l1_table_offset + a as u64 * 8;
            if let Err(e) =
                m.rc.overlap
                    .write(&self.st, &raw, at, Allow::only(Kind::ActiveL1))
            {
                m.l1_dirty = Some((a, b));
                return Err(e);
            }
        }
        self.st.sync()?;
        if let Some(d) = &self.data {
            d.st.sync()?;
        }
        if !m.pending_free.is_empty() {
            // Only frees queued after every running I/O began: older I/O
            // may still read or write the cluster it mapped before.
            let oldest = self.epochs().active.keys().next().copied();
            let (frees, later): (Vec<_>, Vec<_>) = std::mem::take(&mut m.pending_free)
                .into_iter()
                .partition(|&(_, _, ep)| oldest.is_none_or(|o| ep < o));
            m.pending_free = later;
            let mut freed = Vec::new();
            for &(off, len, _) in &frees {
                // A freed L2 table must not be found in the cache again.
                m.l2.remove(off);
                m.rc.update_range(&self.st, off, len, -1, |c| freed.push(c))?;
            }
            if self.opts.discard_passthrough {
                freed.sort_unstable();
                let cs = self.cluster_size();
                let mut k = 0;
                while k < freed.len() {
                    let mut j = k + 1;
                    while j < freed.len() && freed[j] == freed[j - 1] + 1 {
                        j += 1;
                    }
                    // A freed cluster must be no metadata any more.
                    m.rc.overlap
                        .punch_hole(&self.st, freed[k] * cs, (j - k) as u64 * cs)?;
                    k = j;
                }
            }
            m.rc.flush(&self.st)?;
        }
        Ok(())
    }

    /// Grows the virtual size, growing the L1 table if needed.
    fn grow(&self, m: &mut Meta, new_size: u64) -> Result<()> {
        let cb = self.cluster_bits;
        if new_size > Header::max_size_with(cb, self.l2_bits()) {
            return Err(Error::TooLarge(format!(
                "virtual size {new_size} for cluster size {}",
                1u64 << cb
            )));
        }
        let need = Header::l1_entries_with(cb, self.l2_bits(), new_size) as usize;
        if need > m.l1.len() {
            let cs = self.cluster_size();
            let have_bytes = (m.l1.len() as u64 * 8).next_multiple_of(cs);
            // Everything the current L1 points to must be durable before a
            // copy of it becomes the table of record.
            self.flush_locked(m)?;
            if (need as u64 * 8) <= have_bytes && m.header.l1_table_offset != 0 {
                // Room in the current clusters: zero the new entries, then
                // publish the size.
                let old = m.l1.len();
                let l1_off = m.header.l1_table_offset;
                m.rc.overlap.write(
                    &self.st,
                    &vec![0u8; (need - old) * 8],
                    l1_off + old as u64 * 8,
                    Allow::only(Kind::ActiveL1),
                )?;
                self.st.sync()?;
                m.rc.overlap.write(
                    &self.st,
                    &(need as u32).to_be_bytes(),
                    field::L1_SIZE,
                    Allow::only(Kind::Header),
                )?;
                m.rc.overlap.remove(Kind::ActiveL1, l1_off, old as u64 * 8);
                m.rc.overlap.add(Kind::ActiveL1, l1_off, need as u64 * 8);
                m.l1.resize(need, 0);
            } else {
                let clusters = (need as u64 * 8).div_ceil(cs);
                let new_off = m.rc.alloc(&self.st, clusters)?;
                m.rc.flush(&self.st)?;
                // Exactly the table, as QEMU writes it: a new image's file
                // ends with its L1 table.
                let mut raw = vec![0u8; need * 8];
                for (k, e) in m.l1.iter().enumerate() {
                    raw[k * 8..k * 8 + 8].copy_from_slice(&e.to_be_bytes());
                }
                m.rc.overlap
                    .write(&self.st, &raw, new_off, Allow::NOTHING)?;
                self.st.sync()?;
                let mut hdr = [0u8; 12];
                hdr[..4].copy_from_slice(&(need as u32).to_be_bytes());
                hdr[4..].copy_from_slice(&new_off.to_be_bytes());
                m.rc.overlap
                    .write(&self.st, &hdr, field::L1_SIZE, Allow::only(Kind::Header))?;
                self.st.sync()?;
                let (old_off, old_len) = (m.header.l1_table_offset, m.l1.len() as u64);
                m.rc.overlap.remove(Kind::ActiveL1, old_off, old_len * 8);
                m.rc.overlap.add(Kind::ActiveL1, new_off, need as u64 * 8);
                m.header.l1_table_offset = new_off;
                m.l1.resize(need, 0);
                if old_off != 0 && old_len != 0 {
                    m.rc.update_range(
                        &self.st,
                        old_off,
                        (old_len * 8).next_multiple_of(cs),
                        -1,
                        |_| {},
                    )?;
                }
            }
            m.header.l1_size = need as u32;
        }
        m.rc.overlap.write(
            &self.st,
            &new_size.to_be_bytes(),
            field::SIZE,
            Allow::only(Kind::Header),
        )?;
        self.st.sync()?;
        m.header.size = new_size;
        self.size.store(new_size, Ordering::Release);
        self.resize_bitmaps(new_size);
        Ok(())
    }

    /// Shrinks the virtual size to `new_size`, dropping every cluster
    /// mapped past the new end (qcow2.rst, "Cluster mapping"). Order:
    /// 1. the new size is written to the header and synced: from then on
    ///    the image is the shrunken disk, and the mappings past its end are
    ///    unreachable but still counted (a crash leaves a clean image);
    /// 2. L2 entries past the end in the last L2 table that stays are
    ///    cleared, and L1 entries whose whole table lies past the end are
    ///    zeroed (the L1 keeps its length, as QEMU keeps it); the tables
    ///    and then the L1 reach the disk;
    /// 3. only then do the refcounts of the dropped clusters and tables
    ///    decrease (the usual deferred frees, applied after that flush), so
    ///    a crash in between leaks clusters and never corrupts;
    /// 4. refcount blocks left counting only themselves are dropped, and
    ///    the file is cut after the last cluster still in use.
    ///
    /// Clusters shared with internal snapshots keep the snapshots'
    /// references: a shared L2 table is copied before it is changed, and a
    /// dropped shared table loses only the active L1's reference (and its
    /// entries one reference each, as they were counted once per table
    /// reference when the snapshot was taken).
    fn shrink(&self, new_size: u64) -> Result<()> {
        let cs = self.cluster_size();
        let l2n = 1u64 << self.l2_bits();
        let old_clusters = {
            let m = self.lock();
            let mut m = self.quiesce(m);
            self.flush_locked(&mut m)?;
            let old_clusters = m.header.size.div_ceil(cs);
            m.rc.overlap.write(
                &self.st,
                &new_size.to_be_bytes(),
                field::SIZE,
                Allow::only(Kind::Header),
            )?;
            self.st.sync()?;
            m.header.size = new_size;
            // A packing cluster for compressed data may be freed below.
            m.compressed_tail = 0;
            self.size.store(new_size, Ordering::Release);
            self.resize_bitmaps(new_size);
            old_clusters
        };
        // The partial cluster at the new end keeps its data, as in QEMU
        // (which discards from the next cluster boundary on).
        let first = new_size.div_ceil(cs);
        let keep_l1 = Header::l1_entries_with(self.cluster_bits, self.l2_bits(), new_size);
        let partial_end = (keep_l1 * l2n).min(old_clusters);
        if first < partial_end {
            self.unmap_clusters(first, partial_end - first, false, false)?;
        }
        let m = self.lock();
        let mut m = self.quiesce(m);
        for i in keep_l1 as usize..m.l1.len() {
            let table = L1Entry(m.l1[i]).l2_offset();
            if table == 0 {
                continue;
            }
            let slot = self.l2_slot(&mut m, table)?;
            // Coalesce contiguous host ranges: one queued free each.
            let mut run: Option<(u64, u64)> = None;
            let mut ranges = Vec::new();
            for k in 0..l2n as usize {
                let e = self.decode(Self::l2_get(&m, slot, k))?;
                let Some((off, len)) = e.host_range(cs) else {
                    continue;
                };
                match &mut run {
                    Some((s, l)) if *s + *l == off => *l += len,
                    _ => {
                        if let Some(r) = run.replace((off, len)) {
                            ranges.push(r);
                        }
                    }
                }
            }
            ranges.extend(run);
            for r in ranges {
                self.queue_free(&mut m, r);
            }
            self.queue_free(&mut m, (table, cs));
            Self::set_l1(&mut m, i, 0);
        }
        // L2 tables, then the L1, durable; then the queued frees.
        self.flush_locked(&mut m)?;
        m.rc.drop_unused_blocks(&self.st)?;
        let file_len = self.st.len()?;
        let mut last = file_len.div_ceil(cs);
        while last > 0 && m.rc.get(&self.st, last - 1)? == 0 {
            last -= 1;
        }
        if last * cs < file_len {
            self.st.set_len(last * cs)?;
            self.st.sync()?;
        }
        Ok(())
    }

    /// Whether the image looks created with preallocation=metadata: at
    /// least about 10/9 as many clusters carry a refcount as the host file
    /// has blocks allocated. QEMU makes this same test
    /// (qcow2_detect_metadata_preallocation) and then reports data
    /// clusters that are holes in the host file as reading zeros; `map`
    /// and `compare` follow it.
    pub fn metadata_preallocation_detected(&self) -> Result<bool> {
        let cs = self.cluster_size();
        let end = self.st.len()?.div_ceil(cs);
        let real = self.st.allocated_bytes()? / cs;
        let threshold = (real * 10 / 9).max(real + 2);
        let mut m = self.lock();
        let mut count = 0;
        let mut c = 0;
        while c < end && count < threshold {
            if m.rc.get(&self.st, c)? != 0 {
                count += 1;
            }
            c += 1;
        }
        Ok(count >= threshold)
    }

    /// Allocates every cluster of [0, size) that is not allocated yet, in
    /// large contiguous runs (preallocation=metadata). Data clusters are
    /// left unwritten: they read as zeros from the sparse file.
    pub fn preallocate_metadata(&self) -> Result<()> {
        self.preallocate_metadata_range(0, self.size())
    }

    /// Version 2 snapshots do not record their disk size, so a snapshot
    /// taken at another size could not be applied: QEMU refuses any resize
    /// of such an image, even to the same size. Version 3 records it per
    /// snapshot.
    fn check_resizable(&self, m: &Meta) -> Result<()> {
        crate::bitmap::track::check_resizable(self.bitmaps.get(), &m.header)?;
        // The header's version: an amend may have upgraded it since open.
        if !m.snapshots.is_empty() && m.header.version < 3 {
            return Err(Error::InvalidArgument(
                "Can't resize a v2 image which has snapshots".into(),
            ));
        }
        Ok(())
    }

    /// Grows the image to `new_size` with host space for the new area
    /// (`qemu-img resize --preallocation`). The new area reads as zeros from
    /// its own clusters, which also hides a longer backing file; version 2
    /// can do that only with data (falloc/full), as in QEMU.
    pub fn resize_preallocated(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        if prealloc == Preallocation::Off {
            return Image::resize(self, new_size);
        }
        self.check_writable()?;
        self.prepare_bitmaps_for_resize()?;
        let cs = self.cluster_size();
        let m = self.lock();
        let mut m = self.quiesce(m);
        let old = m.header.size;
        self.check_resizable(&m)?;
        if new_size <= old {
            return Err(Error::InvalidArgument(
                "Preallocation can only be used for growing images".into(),
            ));
        }
        let hide_backing = self.backing.as_ref().is_some_and(|b| b.size() > old);
        if hide_backing && self.version < 3 && prealloc == Preallocation::Metadata {
            return Err(Error::InvalidArgument(
                "Failed to zero out new clusters: Operation not supported".into(),
            ));
        }
        self.grow(&mut m, new_size)?;
        drop(m);
        // The cluster holding the old end: a normal write of zeros over its
        // new part allocates it with its head copied (from the backing file
        // too), which mapping a fresh cluster there would lose.
        let head_end = old.next_multiple_of(cs).min(new_size);
        if head_end > old {
            let zeros = vec![0u8; (head_end - old) as usize];
            self.write_at(&zeros, old)?;
        }
        let bitmap = match prealloc {
            Preallocation::Metadata => subcluster::ALL_ZERO,
            _ => subcluster::ALL_ALLOC,
        };
        self.preallocate_with(head_end, new_size, bitmap)?;
        if prealloc != Preallocation::Metadata {
            for (off, len) in self.data_extents_range(head_end, new_size)? {
                self.check_data_overlap(&mut self.lock(), off, len)?;
                let st = self.data_storage();
                match prealloc {
                    Preallocation::Falloc => st.allocate(off, len)?,
                    // Real zeros: full promises allocated blocks, not holes.
                    _ => st.write_zeroes(off, len)?,
                }
            }
        }
        self.flush()
    }

    /// As [`preallocate_metadata`](Self::preallocate_metadata), for the
    /// clusters touching guest bytes [from, to) only (resize of a
    /// preallocated image).
    pub fn preallocate_metadata_range(&self, from: u64, to: u64) -> Result<()> {
        self.preallocate_with(from, to, 0)
    }

    /// Preallocation of [from, to) whose new extended L2 entries get
    /// `bitmap`: 0 leaves the subclusters unallocated (the backing file
    /// shows through, as after create), all-zero or all-allocated make
    /// them read as zeros (the new area of a resize).
    fn preallocate_with(&self, from: u64, to: u64, bitmap: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(from, to.saturating_sub(from))?;
        let cs = self.cluster_size();
        let l2n = 1u64 << self.l2_bits();
        let total = to.div_ceil(cs);
        let mut gc = from / cs;
        while gc < total {
            let l1i = (gc >> self.l2_bits()) as usize;
            let chunk = (l2n - (gc & (l2n - 1))).min(total - gc);
            let mut m = self.lock();
            let slot = self.l2_writable(&mut m, l1i)?;
            // Only clusters that are not mapped yet get new space.
            let mut k = 0;
            while k < chunk {
                let idx = ((gc + k) & (l2n - 1)) as usize;
                let mapped = |m: &Meta, i: usize| {
                    let raw = Self::l2_get(m, slot, i);
                    raw & OFFSET_MASK != 0
                        || self.data.is_some()
                            && matches!(self.decode(raw), Ok(L2Entry::Normal { .. }))
                };
                if mapped(&m, idx) {
                    k += 1;
                    continue;
                }
                let mut run = 1;
                while k + run < chunk && !mapped(&m, idx + run as usize) {
                    run += 1;
                }
                // The refcount allocator does not touch the L2 cache, so
                // `slot` stays valid.
                let fresh_from = m.rc.end();
                let host = if self.data.is_some() {
                    (gc + k) * cs
                } else {
                    m.rc.alloc(&self.st, run)?
                };
                if self.data.is_none() && host >> self.cluster_bits < fresh_from {
                    // Reused clusters may hold old bytes: they must read
                    // as zeros before an L2 entry maps them.
                    m.rc.overlap
                        .write_zeroes(&self.st, host, run * cs, Allow::NOTHING)?;
                }
                for j in 0..run {
                    let e = L2Entry::Normal {
                        host: host + j * cs,
                        copied: true,
                    };
                    Self::l2_set(&mut m, slot, idx + j as usize, e.encode(self.geom));
                    if self.extl2 {
                        Self::l2_bitmap_set(&mut m, slot, idx + j as usize, bitmap);
                    }
                }
                k += run;
            }
            gc += chunk;
        }

        let mut m = self.lock();
        self.flush_locked(&mut m)?;
        // The file covers every allocated cluster, as QEMU leaves it.
        let end = m.rc.end() * cs;
        if self.st.len()? < end {
            self.st.set_len(end)?;
        }
        Ok(())
    }

    /// Host extents of allocated data clusters, in host order (for
    /// falloc/full preallocation).
    pub fn data_extents(&self) -> Result<Vec<(u64, u64)>> {
        self.data_extents_range(0, self.size())
    }

    /// Host extents of the data clusters mapping guest bytes [from, to).
    pub fn data_extents_range(&self, from: u64, to: u64) -> Result<Vec<(u64, u64)>> {
        self.check_range(from, to.saturating_sub(from))?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = from;
        while pos < to {
            let (run, n) = {
                let mut m = self.lock();
                self.map_run(&mut m, pos, to - pos)?
            };
            if let Mapping::Data(h) = run {
                match out.last_mut() {
                    Some((s, l)) if *s + *l == h => *l += n,
                    _ => out.push((h, n)),
                }
            }
            pos += n;
        }
        Ok(out)
    }

    /// Host bytes for `len` bytes of compressed data, packed after the
    /// previous compressed cluster as QEMU packs them: each host cluster
    /// the data touches gets one more reference.
    fn alloc_bytes(&self, m: &mut Meta, len: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let tail = m.compressed_tail;
        let room = if tail == 0 { 0 } else { cs - (tail & (cs - 1)) };
        let off = if tail != 0 && room >= len {
            // Fits in the current cluster.
            m.rc.update_range(&self.st, tail, 1, 1, |_| {})?;
            tail
        } else {
            let new = m.rc.alloc(&self.st, 1)?;
            if tail != 0 && new == tail + room && room > 0 {
                // The next cluster is contiguous: spill over into it.
                m.rc.update_range(&self.st, tail, 1, 1, |_| {})?;
                tail
            } else {
                new
            }
        };
        let end = off + len;
        m.compressed_tail = if end & (cs - 1) == 0 { 0 } else { end };
        Ok(off)
    }

    /// Writes one whole guest cluster compressed (for `convert -c`). The
    /// guest cluster must not be allocated yet (compressed clusters never
    /// overwrite data, as in QEMU). Data that does not compress is written
    /// normally.
    pub fn write_compressed(&self, off: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_clear()?;
        // Checked first: `size - off` and the L1 index below need
        // `off` inside the image.
        if off >= self.size() {
            return Err(Error::OutOfRange {
                offset: off,
                len: data.len() as u64,
                size: self.size(),
            });
        }
        self.check_range(off, data.len() as u64)?;
        let cs = self.cluster_size();
        if self.data.is_some() {
            return Err(Error::InvalidArgument(
                "compression is not supported with an external data file".into(),
            ));
        }
        if off & (cs - 1) != 0 || data.len() as u64 != cs.min(self.size() - off) {
            return Err(Error::InvalidArgument(
                "compressed writes take whole clusters".into(),
            ));
        }
        self.mark_dirty(off, data.len() as u64)?;
        let padded;
        let cluster: &[u8] = if data.len() as u64 == cs {
            data
        } else {
            // The image's last, partial cluster is compressed zero-padded.
            let mut v = vec![0u8; cs as usize];
            v[..data.len()].copy_from_slice(data);
            padded = v;
            &padded
        };
        let Some(z) = compress::compress(self.compression, cluster) else {
            return self.write_at(data, off);
        };
        let gc = off >> self.cluster_bits;
        let l2n = 1u64 << self.l2_bits();
        let l1i = (gc >> self.l2_bits()) as usize;
        let idx = (gc & (l2n - 1)) as usize;
        let m = self.lock();
        let mut m = self.wait_inflight(m, gc, 1)?;
        let slot = self.l2_writable(&mut m, l1i)?;
        match self.decode(Self::l2_get(&m, slot, idx))? {
            L2Entry::Unallocated | L2Entry::Zero { host: None, .. } => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "cannot write a compressed cluster over allocated data at {off:#x}"
                )))
            }
        }
        let host = self.alloc_bytes(&mut m, z.len() as u64)?;
        m.rc.overlap
            .check(&self.st, host, z.len() as u64, Allow::NOTHING)?;
        m.inflight.insert(gc);
        drop(m);
        let r = self.st.write_at(&z, host);
        let mut m = self.lock();
        let r = r.map(|_| {
            let sectors = ((host + z.len() as u64 - 1) >> 9) - (host >> 9) + 1;
            let e = L2Entry::Compressed {
                offset: host,
                len: sectors * 512 - (host & 511),
                sectors,
            };
            // The table may have been evicted meanwhile: look it up again.
            let slot = self.l2_writable(&mut m, l1i)?;
            Self::l2_set(&mut m, slot, idx, e.encode(self.geom));
            if self.extl2 {
                // Compressed clusters have no subclusters.
                Self::l2_bitmap_set(&mut m, slot, idx, 0);
            }
            Ok::<(), Error>(())
        });
        let r = match r {
            Ok(inner) => inner,
            Err(e) => {
                let _ =
                    m.rc.update_range(&self.st, host, z.len() as u64, -1, |_| {});
                Err(e)
            }
        };
        self.release_inflight(m, gc, 1);
        r
    }

    // ----- used by check/rebuild -----

    pub(crate) fn with_meta<R>(&self, f: impl FnOnce(&mut MetaCtx<'_>) -> R) -> R {
        let mut m = self.lock();
        f(&mut m.header_mut_ctx())
    }
}

/// Access to metadata for the check module, with the lock held.
pub(crate) struct MetaCtx<'a> {
    pub header: &'a mut Header,
    pub l1: &'a mut Vec<u64>,
    pub snapshots: &'a [Snapshot],
    pub snapshot_table_bytes: u64,
    l2: &'a mut TableCache,
    pub rc: &'a mut Refcounts,
}

impl Meta {
    fn header_mut_ctx(&mut self) -> MetaCtx<'_> {
        MetaCtx {
            header: &mut self.header,
            l1: &mut self.l1,
            snapshots: &self.snapshots,
            snapshot_table_bytes: self.snapshot_table_bytes,
            l2: &mut self.l2,
            rc: &mut self.rc,
        }
    }
}

impl MetaCtx<'_> {
    /// Forgets cached L2 tables (all were flushed before a rebuild).
    pub fn drop_l2_cache(&mut self) {
        self.l2.clear();
    }
}

/// Reads from a backing image; bytes past its end read as zeros.
fn read_backing(b: &dyn Image, buf: &mut [u8], off: u64) -> Result<()> {
    let bsize = b.size();
    if off >= bsize {
        buf.fill(0);
        return Ok(());
    }
    let n = ((bsize - off) as usize).min(buf.len());
    b.read_at(&mut buf[..n], off)?;
    buf[n..].fill(0);
    Ok(())
}

impl Image for Qcow2 {
    fn storage(&self) -> &Storage {
        &self.st
    }
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn path(&self) -> &Path {
        self.st.path()
    }
    fn is_writable(&self) -> bool {
        self.st.writable()
    }
    fn backing(&self) -> Option<&Arc<dyn Image>> {
        self.backing.as_ref()
    }
    fn as_qcow2(&self) -> Option<&Qcow2> {
        Some(self)
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        let t = self.io_begin();
        let r = self.read_inner(buf, off);
        self.io_end(t);
        r
    }

    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, buf.len() as u64)?;
        self.write_inner(buf, off)
    }

    fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len)?;
        let cs = self.cluster_size();
        let first_full = off.next_multiple_of(cs);
        let end = off + len;
        // The image's last cluster may be partial: it counts as whole.
        let last_full = if end == self.size() {
            end.next_multiple_of(cs)
        } else {
            end - end % cs
        };
        if first_full >= last_full {
            return self.write_zero_bytes(off, len);
        }
        if off < first_full {
            self.write_zero_bytes(off, first_full - off)?;
        }
        let (gc, n) = (first_full / cs, (last_full - first_full) / cs);
        if self.version >= 3 {
            self.unmap_clusters(gc, n, true, !unmap)?;
        } else if !self.has_backing_file {
            // Version 2 has no zero flag; unallocated reads as zeros only
            // without a backing file.
            self.unmap_clusters(gc, n, false, false)?;
        } else {
            self.write_zero_bytes(first_full, last_full.min(end) - first_full)?;
        }
        if last_full < end {
            self.write_zero_bytes(last_full, end - last_full)?;
        }
        Ok(())
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len)?;
        let cs = self.cluster_size();
        let end = off + len;
        let first_full = off.next_multiple_of(cs);
        let last_full = if end == self.size() {
            end.next_multiple_of(cs)
        } else {
            end - end % cs
        };
        if first_full >= last_full {
            return Ok(()); // Discard is advisory; partial clusters stay.
        }
        // With a backing file, deallocating would expose its data: use
        // zero clusters where the format has them (as QEMU does).
        let zero = self.version >= 3 && self.has_backing_file;
        if self.version < 3 && self.has_backing_file {
            return Ok(());
        }
        self.unmap_clusters(first_full / cs, (last_full - first_full) / cs, zero, false)
    }

    fn flush(&self) -> Result<()> {
        let mut m = self.lock();
        self.flush_locked(&mut m)
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Extent> {
        self.check_range(off, len)?;
        let mut m = self.lock();
        let (run, n) = self.map_run(&mut m, off, len)?;
        Ok(match run {
            // Encrypted data has no offset where its guest bytes can be
            // read (QEMU reports none either).
            Mapping::Data(h) => Extent {
                len: n,
                kind: ExtentKind::Data,
                offset: (self.crypt_method == 0).then_some(h),
                compressed: false,
            },
            Mapping::Zero(h) => Extent {
                len: n,
                kind: ExtentKind::Zero,
                offset: h,
                compressed: false,
            },
            Mapping::Unallocated => Extent {
                len: n,
                kind: ExtentKind::Unallocated,
                offset: None,
                compressed: false,
            },
            Mapping::Compressed(_) => Extent {
                len: n,
                kind: ExtentKind::Data,
                offset: None,
                compressed: true,
            },
        })
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        self.prepare_bitmaps_for_resize()?;
        let m = self.lock();
        let mut m = self.quiesce(m);
        let old = m.header.size;
        self.check_resizable(&m)?;
        if new_size < old {
            drop(m);
            return self.shrink(new_size);
        }
        // A backing file longer than the old size would show through the
        // new area: it must read as zeros instead (QEMU's bdrv_co_truncate
        // zero-fills it the same way). Version 2 has no zero clusters;
        // QEMU refuses there, before changing anything.
        let hide_backing = new_size > old && self.backing.as_ref().is_some_and(|b| b.size() > old);
        if hide_backing && self.version < 3 {
            return Err(Error::InvalidArgument(
                "Failed to zero out new clusters: Operation not supported".into(),
            ));
        }
        self.grow(&mut m, new_size)?;
        drop(m);
        if let Some(d) = &self.data {
            // The data file covers the disk, as QEMU resizes it; a raw one
            // keeps mapping every cluster (QEMU preallocates the metadata).
            if d.st.len()? < new_size {
                d.st.set_len(new_size)?;
            }
            if d.raw && new_size > old {
                self.preallocate_metadata_range(old, new_size)?;
            }
        }
        if hide_backing {
            self.write_zeroes(old, new_size - old, false)?;
            self.flush()?;
        }
        Ok(())
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // Errors leave the bitmaps marked in use (inconsistent), never
        // wrong; `store_bitmaps` reports them.
        let _ = self.store_bitmaps();
        if self.st.writable() {
            if let Ok(mut m) = self.meta.lock() {
                // Errors here cannot be reported; callers that care flush
                // explicitly before dropping.
                let _ = self.flush_locked(&mut m);
                let _ = self.trim_reserved(&mut m);
            }
        }
    }
}

// ----- persistent dirty bitmaps: hooks into crate::bitmap::track -----

impl Qcow2 {
    /// At a writable open, after `prepare_for_writing`.
    fn load_bitmaps(&self) -> Result<()> {
        if self.opts.repair {
            return Ok(());
        }
        let t = crate::bitmap::track::load(self)?;
        let _ = self.bitmaps.set(t);
        Ok(())
    }

    /// Records a change of guest bytes [off, off + len) in the enabled
    /// bitmaps; every path that changes guest data calls it first.
    fn mark_dirty(&self, off: u64, len: u64) -> Result<()> {
        match self.bitmaps.get() {
            Some(t) => t.mark(off, len.min(self.size().saturating_sub(off))),
            None => Ok(()),
        }
    }

    /// Stores the bitmaps and clears their in-use flags (done at drop
    /// too, where errors cannot be reported). Later writes fail.
    pub fn store_bitmaps(&self) -> Result<()> {
        match self.bitmaps.get() {
            Some(t) => t.store(self),
            None => Ok(()),
        }
    }

    /// Before a resize, without the metadata lock (see
    /// `Tracker::prepare_resize`).
    fn prepare_bitmaps_for_resize(&self) -> Result<()> {
        match self.bitmaps.get() {
            Some(t) => t.prepare_resize(self),
            None => Ok(()),
        }
    }

    /// After the virtual size changed (metadata lock held).
    fn resize_bitmaps(&self, new_size: u64) {
        if let Some(t) = self.bitmaps.get() {
            t.resize(new_size);
        }
    }

    /// Applying a snapshot rewrites the whole disk behind the bitmaps'
    /// back: refused while the image has any (as QEMU refuses).
    fn refuse_with_bitmaps(&self) -> Result<()> {
        match self.bitmaps.get() {
            Some(t) => t.refuse_snapshot_apply(),
            None => Ok(()),
        }
    }

    /// The bitmaps of this writable image (None when read-only or opened
    /// for repair), for edits (`crate::bitmap::edit`).
    pub fn bitmap_tracker(&self) -> Option<&crate::bitmap::track::Tracker> {
        self.bitmaps.get()
    }
}

// ----- internal snapshots (qcow2.rst, "Snapshots") -----
//
// Ordering: references a snapshot adds are durable before the snapshot
// table that names it; a snapshot is removed from the table (durably)
// before the references it held are dropped; when applying one, its
// references are added and durable before the active L1 switches to it,
// and the old active references are dropped only after the switch.

impl Qcow2 {
    /// Waits until no allocation is in flight (metadata can then be walked
    /// and changed as a whole).
    fn quiesce<'a>(&'a self, mut m: MutexGuard<'a, Meta>) -> MutexGuard<'a, Meta> {
        while !m.inflight.is_empty() {
            m = self
                .alloc_done
                .wait(m)
                .expect("qcow2 metadata lock poisoned");
        }
        m
    }

    /// Adds `delta` to the refcount of every L2 table under `l1` and every
    /// cluster those tables reference.
    fn update_l1_refcounts(&self, m: &mut Meta, l1: &[u64], delta: i64) -> Result<()> {
        let cs = self.cluster_size();
        let mut table = vec![0u8; cs as usize];
        let mut freed = Vec::new();
        for &e in l1 {
            let off = L1Entry(e).l2_offset();
            if off == 0 {
                continue;
            }
            let slot = self.l2_slot(m, off)?;
            table.copy_from_slice(m.l2.data(slot));
            for raw in table.chunks_exact(m.l2_stride) {
                let raw = &raw[..8];
                let entry = self.decode(u64::from_be_bytes(raw.try_into().unwrap()))?;
                if let Some((o, l)) = entry.host_range(cs) {
                    m.rc.update_range(&self.st, o, l, delta, |_| {})?;
                }
            }
            m.rc.update_range(&self.st, off, cs, delta, |c| freed.push(c))?;
        }
        for c in freed {
            m.l2.remove(c << self.cluster_bits);
        }
        Ok(())
    }

    /// Sets the COPIED flags of the active L1 and L2 entries from the
    /// refcounts (qcow2.rst: set exactly when the refcount is 1).
    fn refresh_copied(&self, m: &mut Meta) -> Result<()> {
        let l2n = 1usize << self.l2_bits();
        for i in 0..m.l1.len() {
            let e = L1Entry(m.l1[i]);
            let off = e.l2_offset();
            if off == 0 {
                continue;
            }
            let own = m.rc.get(&self.st, off >> self.cluster_bits)? == 1;
            if own != e.copied() {
                Self::set_l1(m, i, L1Entry::new(off, own).0);
            }
            let slot = self.l2_slot(m, off)?;
            for k in 0..l2n {
                let raw = Self::l2_get(m, slot, k);
                let host = match self.decode(raw)? {
                    L2Entry::Normal { host, .. }
                    | L2Entry::Zero {
                        host: Some(host), ..
                    } => host,
                    _ => continue,
                };
                let own = m.rc.get(&self.st, host >> self.cluster_bits)? == 1;
                let want = if own {
                    raw | crate::l2::COPIED
                } else {
                    raw & !crate::l2::COPIED
                };
                if want != raw {
                    // The refcount lookups above do not touch the L2 cache.
                    Self::l2_set(m, slot, k, want);
                }
            }
        }
        Ok(())
    }

    fn read_l1_at(&self, off: u64, entries: u32) -> Result<Vec<u64>> {
        crate::l2::read_l1(&self.st, off, entries)
    }

    /// Writes a new snapshot table and switches the header to it.
    fn replace_snapshot_table(&self, m: &mut Meta, snaps: Vec<Snapshot>) -> Result<()> {
        self.write_snapshot_table(m, snaps, true)
    }

    /// As [`Self::replace_snapshot_table`]; without `free_old` only the
    /// old table's clusters that have a refcount are freed (a repair).
    fn write_snapshot_table(
        &self,
        m: &mut Meta,
        mut snaps: Vec<Snapshot>,
        free_old: bool,
    ) -> Result<()> {
        let cs = self.cluster_size();
        // Every entry is written complete (what version 3 requires).
        for s in &mut snaps {
            s.fill_missing(m.header.size);
        }
        let raw = Snapshot::encode_table(&snaps);
        let new_off = if raw.is_empty() {
            0
        } else {
            let off = m.rc.alloc(&self.st, (raw.len() as u64).div_ceil(cs))?;
            m.rc.overlap.write(&self.st, &raw, off, Allow::NOTHING)?;
            off
        };
        // The table and its refcount are durable before the header names it.
        m.rc.flush(&self.st)?;
        self.st.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(snaps.len() as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&new_off.to_be_bytes());
        m.rc.overlap.write(
            &self.st,
            &hdr,
            field::NB_SNAPSHOTS,
            Allow::only(Kind::Header),
        )?;
        self.st.sync()?;
        Self::register_snapshots(&mut m.rc.overlap, new_off, raw.len() as u64, &snaps);
        let (old_off, old_len) = (m.header.snapshots_offset, m.snapshot_table_bytes);
        if m.header.nb_snapshots > 0 && old_len > 0 {
            if free_old {
                // As qemu-img: a table that cannot be freed is leaked (the
                // new one is in place already), not a failure.
                self.st.debug_event("cluster_free");
                if let Err(e) =
                    m.rc.update_range(&self.st, old_off, old_len, -1, |_| {})
                        .and_then(|()| m.rc.flush(&self.st))
                {
                    self.st.report_swallowed("qcow2_free_clusters failed", &e);
                }
            } else {
                // A repair: refcounts may be wrong; what is off is left to
                // the refcount repair that follows.
                let cs = self.cluster_size();
                let first = old_off / cs;
                for c in first..(old_off + old_len).div_ceil(cs) {
                    if m.rc.get(&self.st, c)? > 0 {
                        m.rc.update_range(&self.st, c * cs, cs, -1, |_| {})?;
                    }
                }
            }
        }
        m.header.nb_snapshots = snaps.len() as u32;
        m.header.snapshots_offset = new_off;
        m.snapshot_table_bytes = raw.len() as u64;
        m.snapshots = snaps;
        Ok(())
    }

    /// Rewrites the snapshot table with every entry complete, if one is not
    /// (before an upgrade to version 3, which requires them complete).
    pub(crate) fn complete_snapshot_table(&self) -> Result<()> {
        let m = self.lock();
        let mut m = self.quiesce(m);
        if m.snapshots.iter().all(Snapshot::complete_for_v3) {
            return Ok(());
        }
        self.flush_locked(&mut m)?;
        let snaps = m.snapshots.clone();
        self.replace_snapshot_table(&mut m, snaps)
    }

    /// The snapshot table's part of `check`: entries over QEMU's limits
    /// (left out when the image was opened for repair) and, in version 3,
    /// incomplete entries. With `fix` the table is written back without
    /// them. Returns the messages and the number of problems found.
    ///
    /// As qemu-img, dropping overhanging entries (a header update) comes
    /// before the refcount check, so that it finds their clusters leaked;
    /// rewriting the table comes after it (`rewrite`), like the messages.
    pub(crate) fn check_snapshot_table(
        &self,
        fix: bool,
        rewrite: bool,
    ) -> Result<(Vec<String>, u64)> {
        let m = self.lock();
        let mut m = self.quiesce(m);
        let mut msgs = Vec::new();
        let mut found = 0;
        let mut overhanging = 0;
        let snaps = m.snapshots.clone();
        // The header on disk: the open may have cut its count down.
        let mut raw = [0u8; 4];
        self.st.read_at(&mut raw, field::NB_SNAPSHOTS)?;
        let on_disk = u32::from_be_bytes(raw);
        if self.opts.repair {
            let too_many = on_disk.saturating_sub(crate::header::MAX_SNAPSHOTS);
            if too_many > 0 {
                msgs.push(format!(
                    "{} {too_many} overhanging snapshots",
                    if fix { "Discarding" } else { "ERROR" }
                ));
                overhanging += too_many as u64;
                found += too_many as u64;
            }
            let (_, _, fixes) = Snapshot::read_table_repairing(&self.st, &m.header, true)?;
            for &(n, len) in &fixes.extra_dropped {
                msgs.push(format!(
                    "{} too much extra metadata in snapshot table entry {n} ({len} > {})",
                    if fix { "Discarding" } else { "ERROR" },
                    crate::snapshot::MAX_EXTRA_DATA
                ));
                found += 1;
            }
            if fixes.overhanging > 0 {
                msgs.push(format!(
                    "{} {} overhanging snapshots (snapshot table is too big)",
                    if fix { "Discarding" } else { "ERROR" },
                    fixes.overhanging
                ));
                overhanging += fixes.overhanging as u64;
                found += fixes.overhanging as u64;
            }
        }
        if m.header.version >= 3 {
            for (i, s) in snaps.iter().enumerate() {
                if !s.complete_for_v3() {
                    msgs.push(format!(
                        "{} snapshot table entry {i} is incomplete",
                        if fix { "Repairing" } else { "ERROR" }
                    ));
                    found += 1;
                }
            }
        }
        if rewrite {
            if fix && found > overhanging {
                self.flush_locked(&mut m)?;
                self.write_snapshot_table(&mut m, snaps, false)?;
            }
        } else if fix && overhanging > 0 && on_disk != snaps.len() as u32 {
            // Only entries at the end go: the table stays where it is and
            // the header counts fewer (as QEMU repairs it).
            m.rc.overlap.write(
                &self.st,
                &(snaps.len() as u32).to_be_bytes(),
                field::NB_SNAPSHOTS,
                Allow::only(Kind::Header),
            )?;
            self.st.sync()?;
            m.header.nb_snapshots = snaps.len() as u32;
        }
        Ok((msgs, found))
    }

    /// What makes the active tables unfit to be snapshotted, if anything:
    /// an L2 table or data cluster past the end of the file, or a data
    /// cluster on metadata.
    fn snapshot_blocker(&self, m: &mut Meta, l1: &[u64]) -> Result<Option<String>> {
        let cs = self.cluster_size();
        // In whole clusters: a compressed cluster's last sector may end
        // past the last byte of the file.
        let file_end = self.st.len()?.next_multiple_of(cs);
        for (i, &e) in l1.iter().enumerate() {
            let off = L1Entry(e).l2_offset();
            if off == 0 {
                continue;
            }
            if off.checked_add(cs).is_none_or(|end| end > file_end) {
                return Ok(Some(format!(
                    "L1 entry {i} names an L2 table at {off:#x}, past the end of the file"
                )));
            }
            let slot = self.l2_slot(m, off)?;
            for k in 0..1usize << self.l2_bits() {
                let entry = self.decode(Self::l2_get(m, slot, k))?;
                let Some((o, l)) = entry.host_range(cs) else {
                    continue;
                };
                if o.checked_add(l).is_none_or(|end| end > file_end) {
                    // qemu-img's errno where it fails before any corruption.
                    if let Some(e) =
                        crate::snapshot_refs::past_eof_error(&m.rc, m.header.cluster_bits, o)
                    {
                        return Err(e);
                    }
                    return Ok(Some(format!(
                        "L2 entry {k} of the table at {off:#x} maps a cluster at {o:#x}, past the end of the file"
                    )));
                }
                if let Some((kind, at)) = m.rc.overlap.find(o, l, Allow::NOTHING) {
                    return Ok(Some(format!(
                        "L2 entry {k} of the table at {off:#x} maps a cluster at {o:#x}, onto {} at {at:#x}",
                        kind.name()
                    )));
                }
            }
        }
        Ok(None)
    }

    /// Creates an internal snapshot of the current disk state.
    pub fn snapshot_create(&self, name: &str) -> Result<Snapshot> {
        self.check_writable()?;
        self.refuse_snapshots_with_data_file()?;
        if name.len() > u16::MAX as usize {
            return Err(Error::InvalidArgument("snapshot name is too long".into()));
        }
        let m = self.lock();
        let mut m = self.quiesce(m);
        if m.snapshots.len() as u32 >= crate::header::MAX_SNAPSHOTS {
            return Err(Error::TooLarge("too many snapshots".into()));
        }
        self.flush_locked(&mut m)?;
        let cs = self.cluster_size();
        let l1 = m.l1.clone();
        // The snapshot takes a reference to every cluster the tables map:
        // one past the end of the file or onto metadata would have its
        // refcount raised where there is no such cluster to count.
        if let Some(msg) = self.snapshot_blocker(&mut m, &l1)? {
            return Err(m.rc.overlap.refuse_corrupt(&self.st, msg));
        }
        let l1_off = if l1.is_empty() {
            0
        } else {
            let off = m.rc.alloc(&self.st, (l1.len() as u64 * 8).div_ceil(cs))?;
            let mut raw = vec![0u8; (l1.len() * 8).next_multiple_of(512)];
            for (k, e) in l1.iter().enumerate() {
                raw[k * 8..k * 8 + 8].copy_from_slice(&e.to_be_bytes());
            }
            m.rc.overlap.write(&self.st, &raw, off, Allow::NOTHING)?;
            off
        };
        self.update_l1_refcounts(&mut m, &l1, 1)?;
        self.refresh_copied(&mut m)?;
        self.flush_locked(&mut m)?;
        let id = m
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let sn = Snapshot {
            l1_table_offset: l1_off,
            l1_size: l1.len() as u32,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(m.header.size),
            icount: Some(0),
            extra_unknown: Vec::new(),
        };
        let mut snaps = m.snapshots.clone();
        snaps.push(sn.clone());
        self.replace_snapshot_table(&mut m, snaps)?;
        Ok(sn)
    }

    /// Deletes an internal snapshot (by ID or name).
    pub fn snapshot_delete(&self, key: &str) -> Result<()> {
        self.check_writable()?;
        self.refuse_snapshots_with_data_file()?;
        let m = self.lock();
        let mut m = self.quiesce(m);
        let Some((idx, sn)) = Snapshot::find(&m.snapshots, key).map(|(i, s)| (i, s.clone())) else {
            return Err(Error::InvalidArgument(format!(
                "snapshot '{key}' not found"
            )));
        };
        sn.check_l1(self.cluster_size())?;
        self.flush_locked(&mut m)?;
        let mut snaps = m.snapshots.clone();
        snaps.remove(idx);
        self.replace_snapshot_table(&mut m, snaps)?;
        let l1 = self
            .read_l1_at(sn.l1_table_offset, sn.l1_size)
            .and_then(|l1| self.update_l1_refcounts(&mut m, &l1, -1))
            .map_err(|e| match e {
                Error::Io { source, .. } => {
                    Error::io("Failed to free the cluster and L1 table", source)
                }
                e => e,
            });
        l1?;
        if sn.l1_size > 0 {
            self.st.debug_event("cluster_free");
            let cs = self.cluster_size();
            let bytes = (sn.l1_size as u64 * 8).next_multiple_of(cs);
            m.rc.update_range(&self.st, sn.l1_table_offset, bytes, -1, |_| {})?;
        }
        self.refresh_copied(&mut m)?;
        self.flush_locked(&mut m)
    }

    /// Makes this read-only image read as an internal snapshot (by ID or
    /// name, or both when `id` is given): its L1 table replaces the active
    /// one in memory only, as qemu-img convert -l does.
    pub fn snapshot_load_tmp(&self, key: &str, id: Option<&str>) -> Result<()> {
        if self.st.writable() {
            return Err(Error::InvalidArgument(
                "a snapshot is loaded only into a read-only image".into(),
            ));
        }
        let m = self.lock();
        let mut m = self.quiesce(m);
        let found = match id {
            Some(id) => m
                .snapshots
                .iter()
                .find(|s| s.id == id && (key.is_empty() || s.name == key))
                .cloned(),
            None => Snapshot::find(&m.snapshots, key).map(|(_, s)| s.clone()),
        };
        let Some(sn) = found else {
            return Err(Error::SnapshotLoad("Can't find snapshot".into()));
        };
        // qemu-img's checks of the table (qcow2_validate_table's wording).
        if sn.l1_size as u64 > crate::header::MAX_L1_BYTES / 8 {
            return Err(Error::SnapshotLoad("Snapshot L1 table too large".into()));
        }
        let cs = self.cluster_size();
        if sn.l1_table_offset & (cs - 1) != 0
            || sn
                .l1_table_offset
                .checked_add(sn.l1_size as u64 * 8)
                .is_none_or(|e| e > i64::MAX as u64)
        {
            return Err(Error::SnapshotLoad(
                "Snapshot L1 table offset invalid".into(),
            ));
        }
        let mut l1 = self.read_l1_at(sn.l1_table_offset, sn.l1_size)?;
        // Reads past the snapshot's table find nothing allocated.
        l1.resize(l1.len().max(m.l1.len()), 0);
        m.l1 = l1;
        m.l1_dirty = None;
        Ok(())
    }

    /// Reverts the disk to an internal snapshot (by ID or name).
    pub fn snapshot_apply(&self, key: &str) -> Result<()> {
        self.check_writable()?;
        self.refuse_with_bitmaps()?;
        self.refuse_snapshots_with_data_file()?;
        let m = self.lock();
        let mut m = self.quiesce(m);
        let Some((_, sn)) = Snapshot::find(&m.snapshots, key).map(|(i, s)| (i, s.clone())) else {
            return Err(Error::InvalidArgument(format!(
                "snapshot '{key}' not found"
            )));
        };
        sn.check_l1(self.cluster_size())?;
        if sn.disk_size.is_some_and(|s| s != m.header.size) || sn.l1_size as usize > m.l1.len() {
            return Err(Error::InvalidArgument(
                "applying a snapshot taken at another disk size is not supported".into(),
            ));
        }
        self.flush_locked(&mut m)?;
        let mut new_l1 = self.read_l1_at(sn.l1_table_offset, sn.l1_size)?;
        new_l1.resize(m.l1.len(), 0);
        self.update_l1_refcounts(&mut m, &new_l1, 1)?;
        m.rc.flush(&self.st)?;
        // Switch the active L1 in place, durably.
        let mut raw = vec![0u8; new_l1.len() * 8];
        for (k, e) in new_l1.iter().enumerate() {
            raw[k * 8..k * 8 + 8].copy_from_slice(&(e & !crate::l2::COPIED).to_be_bytes());
        }
        let l1_off = m.header.l1_table_offset;
        m.rc.overlap
            .write(&self.st, &raw, l1_off, Allow::only(Kind::ActiveL1))?;
        self.st.sync()?;
        let old = std::mem::replace(
            &mut m.l1,
            new_l1.iter().map(|e| e & !crate::l2::COPIED).collect(),
        );
        m.l1_dirty = None;
        // The old active tables are active no more (those the snapshot
        // shares are named again by the new L1).
        let cs = self.cluster_size();
        m.rc.overlap.clear_kind(Kind::ActiveL2);
        let l2s: Vec<(u64, u64)> =
            m.l1.iter()
                .map(|&e| L1Entry(e).l2_offset())
                .filter(|&o| o != 0)
                .map(|o| (o, cs))
                .collect();
        m.rc.overlap.extend(Kind::ActiveL2, l2s);
        self.update_l1_refcounts(&mut m, &old, -1)?;
        self.refresh_copied(&mut m)?;
        self.flush_locked(&mut m)
    }
}

#[cfg(test)]
mod tests {
    //! The overlap checks seen from the outside: writes that would land on
    //! metadata are refused, the image is marked corrupt, and the file is
    //! otherwise left exactly as it was.
    use super::*;
    use crate::create::{create, CreateOptions};
    use crate::header::incompat;
    use crate::Repair;
    use std::path::PathBuf;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let d = std::env::temp_dir().join(format!(
                "rimg-qcow-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn open(p: &Path, repair: bool) -> Result<Qcow2> {
        let st = Storage::open(p, true)?;
        Qcow2::open(
            st,
            None,
            Qcow2Options {
                repair,
                ..Default::default()
            },
        )
    }

    fn be64(b: &[u8], at: u64) -> u64 {
        u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
    }

    /// A 16 MiB image with guest clusters 0 and 1 written (one L2 table).
    fn image(dir: &TempDir, version: u32, cs: u64) -> (PathBuf, Header) {
        let p = dir.0.join("t.qcow2");
        create(
            &p,
            &CreateOptions {
                size: 16 << 20,
                cluster_size: cs,
                version,
                ..Default::default()
            },
        )
        .unwrap();
        let q = open(&p, false).unwrap();
        q.write_at(&vec![0x11; cs as usize], 0).unwrap();
        q.write_at(&vec![0x22; cs as usize], cs).unwrap();
        q.flush().unwrap();
        let h = q.header();
        drop(q);
        (p, h)
    }

    fn l2_of(file: &[u8], h: &Header) -> u64 {
        be64(file, h.l1_table_offset) & OFFSET_MASK
    }

    fn patch(p: &Path, at: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    /// The file is `before` with the corrupt bit set (version 3) or
    /// unchanged (version 2).
    fn assert_only_corrupt_bit(p: &Path, before: &[u8], version: u32) {
        let after = std::fs::read(p).unwrap();
        let mut want = before.to_vec();
        if version >= 3 {
            let bits = be64(before, field::INCOMPATIBLE) | incompat::CORRUPT;
            want[72..80].copy_from_slice(&bits.to_be_bytes());
        }
        assert_eq!(after.len(), want.len(), "file length");
        let diff = after.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(diff, None, "first differing byte");
    }

    #[test]
    fn in_place_write_onto_an_l2_table_is_refused() {
        for (version, cs) in [(3, 65536), (2, 65536), (3, 512)] {
            let dir = TempDir::new("inplace");
            let (p, h) = image(&dir, version, cs);
            let file = std::fs::read(&p).unwrap();
            let l2 = l2_of(&file, &h);
            // Guest cluster 1 now maps (COPIED, so in place) onto its own
            // L2 table.
            patch(&p, l2 + 8, &(l2 | crate::l2::COPIED).to_be_bytes());
            let before = std::fs::read(&p).unwrap();
            let q = open(&p, false).unwrap();
            let e = q.write_at(&[0xee; 512], cs).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, Error::OverlapRefused(_)), "{msg}");
            assert!(
                msg.contains(&format!("active L2 table at {l2:#x}")),
                "{msg}"
            );
            assert!(q.overlap_refused().is_some());
            // Nothing else gets written through this image either.
            assert!(q.write_at(&[1; 512], 2 * cs).is_err());
            assert!(q.flush().is_err());
            if version >= 3 {
                assert!(q.header().is_corrupt());
            }
            drop(q);
            assert_only_corrupt_bit(&p, &before, version);
            if version >= 3 {
                assert!(matches!(open(&p, false), Err(Error::MarkedCorrupt)));
            }
            // Repair drops the entry and clears the bit; writes work again.
            let q = open(&p, true).unwrap();
            let rep = q.check_repair(Repair::All).unwrap();
            assert!(rep.corruptions_fixed > 0, "{rep:?}");
            assert_eq!(rep.corruptions, 0, "{rep:?}");
            q.write_at(&[0x33; 512], cs).unwrap();
            q.flush().unwrap();
            drop(q);
            let q = open(&p, false).unwrap();
            assert!(!q.header().is_corrupt());
            let mut b = [0u8; 512];
            q.read_at(&mut b, cs).unwrap();
            assert_eq!(b, [0x33; 512]);
            q.read_at(&mut b, 0).unwrap();
            assert_eq!(b, [0x11; 512]);
            assert_eq!(q.check().unwrap().corruptions, 0);
        }
    }

    #[test]
    fn in_place_writes_onto_each_kind_are_refused() {
        let dir = TempDir::new("kinds");
        let (p0, h) = image(&dir, 3, 65536);
        let file = std::fs::read(&p0).unwrap();
        let refblock = be64(&file, h.refcount_table_offset) & !511;
        let targets = [
            ("active L1 table", h.l1_table_offset),
            ("refcount table", h.refcount_table_offset),
            ("refcount block", refblock),
        ];
        for (name, at) in targets {
            let p = dir.0.join("k.qcow2");
            std::fs::copy(&p0, &p).unwrap();
            let l2 = l2_of(&file, &h);
            patch(&p, l2 + 8, &(at | crate::l2::COPIED).to_be_bytes());
            let before = std::fs::read(&p).unwrap();
            let q = open(&p, false).unwrap();
            let msg = q
                .write_at(&[0xee; 4096], 65536 + 4096)
                .unwrap_err()
                .to_string();
            assert!(msg.contains(&format!("{name} at {at:#x}")), "{name}: {msg}");
            drop(q);
            assert_only_corrupt_bit(&p, &before, 3);
        }
    }

    #[test]
    fn allocation_of_metadata_with_refcount_zero_is_refused() {
        let dir = TempDir::new("alloc");
        let (p, h) = image(&dir, 3, 65536);
        let file = std::fs::read(&p).unwrap();
        let l2 = l2_of(&file, &h);
        let refblock = be64(&file, h.refcount_table_offset) & !511;
        // The L2 table's refcount (16 bits) drops to 0: the allocator would
        // hand it out as the next data cluster.
        patch(&p, refblock + (l2 >> 16) * 2, &[0, 0]);
        let before = std::fs::read(&p).unwrap();
        let q = open(&p, false).unwrap();
        let msg = q.write_at(&[0xee; 4096], 8 << 20).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("active L2 table at {l2:#x}")),
            "{msg}"
        );
        drop(q);
        assert_only_corrupt_bit(&p, &before, 3);
    }

    #[test]
    fn discarding_a_cluster_that_is_metadata_is_refused() {
        let dir = TempDir::new("discard");
        let (p, h) = image(&dir, 3, 65536);
        let file = std::fs::read(&p).unwrap();
        let l2 = l2_of(&file, &h);
        let refblock = be64(&file, h.refcount_table_offset) & !511;
        // Guest cluster 1 maps onto the refcount block, whose refcount is
        // 1: discarding it would free and punch the block.
        patch(&p, l2 + 8, &(refblock | crate::l2::COPIED).to_be_bytes());
        let before = std::fs::read(&p).unwrap();
        let q = open(&p, false).unwrap();
        q.discard(65536, 65536).unwrap();
        let msg = q.flush().unwrap_err().to_string();
        assert!(msg.contains("refcount block"), "{msg}");
        drop(q);
        // The L2 change never reached the disk either (the refused punch
        // came after it was written, so only compare the refcount block).
        let after = std::fs::read(&p).unwrap();
        let rb = refblock as usize;
        assert_eq!(after[rb..rb + 65536], before[rb..rb + 65536]);
        assert_ne!(be64(&after, field::INCOMPATIBLE) & incompat::CORRUPT, 0);
    }

    /// No false alarms: everything that moves metadata around (refcount
    /// table growth, L1 growth, snapshots, shrink) keeps the map right.
    #[test]
    fn metadata_moves_keep_the_map_right() {
        use rand::{Rng, SeedableRng};
        let dir = TempDir::new("moves");
        let p = dir.0.join("m.qcow2");
        create(
            &p,
            &CreateOptions {
                size: 4 << 20,
                cluster_size: 512,
                lazy_refcounts: true,
                ..Default::default()
            },
        )
        .unwrap();
        let q = open(&p, false).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut model = vec![0u8; 64 << 20];
        fn write(q: &Qcow2, rng: &mut rand::rngs::StdRng, model: &mut [u8], size: u64) {
            for _ in 0..400 {
                let len = rng.random_range(1..4096usize);
                let off = rng.random_range(0..size - len as u64);
                let v: u8 = rng.random();
                q.write_at(&vec![v; len], off).unwrap();
                model[off as usize..off as usize + len].fill(v);
            }
        }
        write(&q, &mut rng, &mut model, 4 << 20);
        q.snapshot_create("a").unwrap();
        write(&q, &mut rng, &mut model, 4 << 20);
        // Growing moves the L1; the refcount table grows on the way.
        Image::resize(&q, 64 << 20).unwrap();
        write(&q, &mut rng, &mut model, 64 << 20);
        q.snapshot_create("b").unwrap();
        write(&q, &mut rng, &mut model, 64 << 20);
        q.snapshot_delete("a").unwrap();
        q.discard(0, 32 << 20).unwrap();
        model[..32 << 20].fill(0);
        write(&q, &mut rng, &mut model, 64 << 20);
        q.flush().unwrap();
        assert_eq!(q.overlap_refused(), None);
        let rep = q.check().unwrap();
        assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.messages);
        let mut got = vec![0u8; 64 << 20];
        q.read_at(&mut got, 0).unwrap();
        assert!(got == model, "content");
        q.snapshot_apply("b").unwrap();
        Image::resize(&q, 8 << 20).unwrap();
        q.write_at(&[5; 4096], 0).unwrap();
        q.flush().unwrap();
        assert_eq!(q.overlap_refused(), None);
        assert_eq!(q.check().unwrap().corruptions, 0);
    }
}
