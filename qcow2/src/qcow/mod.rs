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
//! An in-place write counts itself in `inplace` (per guest cluster) until
//! its data is written. Write-zeroes that keeps the host cluster allocated
//! (no unmap) waits for those writes too: otherwise a late one would land
//! in a cluster that now reads as zeros, and reappear when a later write
//! reuses the cluster and commits (the zeroing frees nothing, so the I/O
//! epochs below do not cover it).
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
//! - With [`MetadataPersistence::ProcessDeath`], each operation also
//!   writes (pwrite, no fsync) the metadata it changed before it returns,
//!   in the order above, so that a killed process loses no completed
//!   write. For a power loss the order must hold on disk too: guest data
//!   clusters come from a reserve whose refcounts were made durable when
//!   it was taken, and a new L2 table is synced before its L1 entry (see
//!   [`persist`]).
//! - A freed cluster is not reused while data I/O that may have mapped it
//!   is still running outside the lock: such I/O holds an [`IoEpoch`]
//!   guard ([`Image::io_epoch`]) until it ends, frees are tagged with the
//!   epoch they were queued in, and a flush applies only frees queued
//!   after every live guard was taken (the rest wait for a later flush).
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
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::cache::TableCache;
use crate::compress;
use crate::datafile::DataFile;
use crate::datapath::{IoEpoch, Mapping, PendingWrite, SharedEpochs, WriteEnd};
use crate::error::{Error, Result};
use crate::header::{field, incompat, Header};
use crate::image::{Extent, ExtentKind, Format, Image};
use crate::l2::{CompressedGeometry, L1Entry, L2Entry, OFFSET_MASK};
use crate::overlap::{Allow, Kind, MetadataMap};
use crate::preallocation::Preallocation;
use crate::refcount::Refcounts;
use crate::snapshot::Snapshot;
use crate::storage::Storage;
use crate::sync::{AllocWaker, Condvar, Mutex, MutexGuard, Waiters};
use crate::units::{GuestCluster, GuestOffset, HostOffset};

mod bitmaps;
mod compact;
mod compressed;
mod discard;
mod flush;
mod ilog;
mod image;
mod inflight;
mod options;
mod persist;
mod read;
mod resize;
mod snapshots;
mod subcluster;
mod tables;
#[cfg(test)]
mod tests;
mod write;

pub use compact::{CompactOptions, CompactStats, DEFAULT_BATCH};
pub use options::{MetadataPersistence, Qcow2Options};

struct Meta {
    header: Header,
    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    l2_stride: usize,
    l1: Vec<u64>,
    /// Range of L1 indices changed since the last flush.
    l1_dirty: Option<(usize, usize)>,
    l2: TableCache,
    /// L2 tables were written since the last sync: an L1 entry may point
    /// at one only after a sync.
    l2_unsynced: bool,
    /// Data of an allocation whose entry is now in the L2 cache may not
    /// be durable yet (Flush mode): synced before any L2 table is written,
    /// unless a refcount sync after the commit covered it.
    data_unsynced: bool,
    /// Guest data clusters with durable refcounts, not yet used
    /// ([`MetadataPersistence::ProcessDeath`] only).
    reserve: persist::Reserve,
    rc: Refcounts,
    /// Host byte ranges whose reference was dropped in memory; their
    /// refcounts are decreased after a flush, once no I/O that started
    /// before them is still running.
    pending_free: Vec<QueuedFree>,
    /// Guest clusters whose allocation is in progress.
    inflight: HashSet<GuestCluster>,
    /// Guest clusters with in-place writes in progress, and how many.
    inplace: HashMap<GuestCluster, u32>,
    /// Threads blocked on `alloc_done` (in `wait_busy`).
    sleepers: u32,
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
    /// The intent log of copying writes (see [`ilog`]).
    ilog: ilog::Log,
}

/// A guest write mapped to one host extent, between `map_write` and
/// `end_write` (or `abandon_write`). Callers outside the engine hold it
/// inside a [`PendingWrite`], which ends it.
pub(crate) struct WriteIo {
    /// Host file offset where the data goes.
    pub(crate) host: HostOffset,
    /// Bytes of the request this extent covers.
    pub(crate) len: usize,
    alloc: Option<Alloc>,
    /// An in-place write: the guest clusters [first, first + n) it
    /// counts itself in (`Meta::inplace`) until it ends.
    inplace: Option<(GuestCluster, u64)>,
    /// The allocation's data must be on disk before the L2 entries
    /// mapping it (`end_write`): copy-on-write fill was written (data the
    /// guest did not write), or a zero cluster is reused in place (an
    /// entry that reached the disk first would show its old data after a
    /// power loss).
    data_first: bool,
}

/// An allocation handed out by `plan_write` and finished by `commit`.
struct Alloc {
    /// First guest cluster and count.
    gc: GuestCluster,
    n: u64,
    /// Host offset of the first new cluster (contiguous).
    host: HostOffset,
    /// The existing preallocated zero cluster is reused (n == 1).
    reuse: bool,
    /// The new clusters read as zeros without being written (they lie
    /// past everything ever written, or a reserve zeroed them).
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
    /// Whether its entries may go to the intent log.
    log: ilog::Slot,
}

enum WritePlan {
    InPlace { host: HostOffset, len: usize },
    Alloc(Alloc),
}

/// A host byte range whose last reference was dropped in memory, queued
/// until a flush has made the dropping durable (see the write ordering
/// above).
struct QueuedFree {
    host: HostOffset,
    len: u64,
    /// The I/O epoch it was queued in: applied only once every I/O that
    /// began before it has ended.
    epoch: u64,
}

thread_local! {
    /// Cluster-sized buffer for copy-on-write of partial clusters
    /// (page-aligned: see `crate::pagebuf`).
    static BOUNCE: RefCell<crate::pagebuf::PageBuf> =
        const { RefCell::new(crate::pagebuf::PageBuf::new()) };
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
    /// Lock order: `meta` before `epochs`. Shared with the epoch guards
    /// of running I/O ([`IoEpoch`]).
    epochs: SharedEpochs,
    alloc_done: Condvar,
    /// Guest clusters where abandoned writes may still land: no change
    /// goes there (checked and added under `meta`).
    fence: crate::datapath::Fence,
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
    /// The repair's lines when the image was dirty at open (None: clean).
    open_messages: Mutex<Option<Vec<String>>>,
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
        let file_len = st.len()?;
        let mut header = Header::parse(&crate::open::first_cluster(&st, file_len)?)?;
        // QEMU sees the disk in whole sectors (its total_sectors is the
        // size / 512) and writes that size back with the header; a size
        // another tool left odd would also end in a partial sector, which
        // an encrypted image cannot hold.
        header.size &= !511;
        let cs = header.cluster_size();
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
        let cipher = crate::encrypt::unlock(&st, &header, opts.encrypt_key.as_ref(), opts.no_io)?;
        let cb = header.cluster_bits;
        let data = DataFile::open_for(&header, st.writable(), opts.data_file.as_deref())?;
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
            l2_unsynced: false,
            data_unsynced: false,
            reserve: Default::default(),
            rc,
            pending_free: Vec::new(),
            inflight: HashSet::new(),
            inplace: HashMap::new(),
            sleepers: 0,
            waiters: Waiters::default(),
            snapshots,
            snapshot_table_bytes,
            compressed_tail: 0,
            header: header.clone(),
            ilog: Default::default(),
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
            epochs: Arc::new(Mutex::new(Default::default())),
            alloc_done: Condvar::new(),
            fence: Default::default(),
            opts,
            st,
            crypt_method: header.crypt_method,
            cipher,
            data,
            extl2: header.extended_l2(),
            open_messages: Mutex::new(None),
            bitmaps: std::sync::OnceLock::new(),
        };
        // QEMU loads the bitmaps at every open: one that cannot be loaded
        // refuses the image, read-only and for a check too.
        crate::bitmap::track::validate(&q.st, &header)?;
        if q.st.writable() {
            q.prepare_for_writing()?;
            q.load_bitmaps()?;
        } else {
            q.log_load_read_only();
        }
        Ok(q)
    }

    /// The lines of the repair a dirty image had when opened (qemu-img
    /// prints them on stderr; none when it found nothing to repair), or
    /// None when the image was clean; None after the first call.
    pub fn take_open_messages(&self) -> Option<Vec<String>> {
        self.open_messages.lock().unwrap().take()
    }

    /// The header's incompatible feature bits, in the file (unsynced) and
    /// in memory.
    fn write_incompatible(&self, m: &mut Meta, bits: u64) -> Result<()> {
        m.rc.overlap.write(
            &self.st,
            &bits.to_be_bytes(),
            field::INCOMPATIBLE,
            Allow::only(Kind::Header),
        )?;
        m.header.incompatible_features = bits;
        Ok(())
    }

    /// Before the first write: rebuild refcounts of a dirty image and clear
    /// autoclear bits whose structures this crate does not maintain.
    fn prepare_for_writing(&self) -> Result<()> {
        let mut m = self.lock();
        // Before the repair: it would free what the log maps.
        self.log_recover(&mut m)?;
        if m.header.is_dirty() && !self.opts.repair {
            let (lines, clean) = crate::dirty_open::repair(self, &mut m.header_mut_ctx())?;
            *self.open_messages.lock().unwrap() = Some(lines);
            if !clean {
                return Ok(());
            }
            let bits = m.header.incompatible_features & !incompat::DIRTY;
            self.write_incompatible(&mut m, bits)?;
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
        let keep = keep | crate::bitmap::autoclear_to_keep(&m.header)?;
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
        // A killed process must leave no leak behind, and every change
        // of metadata may leak if the process dies halfway (a refcount
        // written before the entry that uses it, an entry cleared before
        // the refcount it held drops): the dirty bit is durable before
        // the first of them, so the next writer repairs the image.
        if self.opts.metadata_persistence == MetadataPersistence::ProcessDeath
            && self.mark_dirty_while_open(&mut m)?
        {
            self.st.sync()?;
        }
        self.log_open(&mut m);
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
    fn check_data_overlap(&self, m: &mut Meta, off: HostOffset, len: u64) -> Result<()> {
        if self.data.is_some() {
            return Ok(());
        }
        m.rc.overlap.check(&self.st, off.0, len, Allow::NOTHING)
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
        // The directory changes only with the header (bitmap::track).
        if let Ok(Some(e)) = crate::bitmap::BitmapsExt::from_header(&m.header) {
            map.add(Kind::BitmapDirectory, e.directory_offset, e.directory_size);
        }
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
            self.unmap_clusters(GuestCluster(first / cs), (last - first) / cs, false, false)?;
        }
        Ok(())
    }
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.lock().snapshots.clone()
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        crate::image::check_range(off, len, self.size())
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

    /// The refcounts alone, for allocating and freeing structures this
    /// module does not walk (bitmaps).
    pub(crate) fn with_refcounts<R>(&self, f: impl FnOnce(&mut Refcounts) -> R) -> R {
        f(&mut self.lock().rc)
    }

    /// Metadata for walking or rebuilding it as a whole (check, amend,
    /// make_empty).
    pub(crate) fn with_meta<R>(&self, f: impl FnOnce(&mut MetaCtx<'_>) -> R) -> R {
        let mut m = self.lock();
        // Whoever walks or rebuilds the refcounts must not see reserved
        // clusters as leaks (nor free them under the reserve), nor the
        // intent log's area.
        self.release_reserve(&mut m);
        if let Err(e) = self.log_close(&mut m) {
            self.st.report_swallowed("rimg intent log not closed", &e);
        }
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
