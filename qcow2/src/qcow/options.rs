//! How an image is opened: caches, persistence, the intent log.

/// What a completed but unflushed change survives, by when the metadata
/// mapping it (L2 entries, refcounts, the L1 table) reaches the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetadataPersistence {
    /// At flush or cache eviction only (QEMU's writeback cache): a write
    /// completed since the last flush may read back as before when the
    /// process dies.
    #[default]
    Flush,
    /// Before each operation returns (into the page cache, no fsync): a
    /// completed write reads back after the process is killed, as its
    /// data does. A power loss still loses what was not flushed (and
    /// leaves at worst leaked clusters). For a daemon that may be
    /// restarted under a running guest.
    ProcessDeath,
}

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
    /// When changed metadata is written to the file.
    pub metadata_persistence: MetadataPersistence,
    /// Leaves the persistent bitmaps on disk as they are: not loaded,
    /// not marked in use, not stored (for work that does not change
    /// what the guest reads, `compact`: a kill then cannot leave them
    /// inconsistent, and the open allocates nothing).
    pub bitmaps_on_disk: bool,
    /// With [`MetadataPersistence::ProcessDeath`] and a backing file:
    /// copy-on-write fills are not synced per write; an intent log in
    /// the image keeps their entries until a checkpoint (see `ilog`).
    pub intent_log: bool,
    /// The boot id the intent log is written and replayed under (tests
    /// only; None: this machine's).
    #[doc(hidden)]
    pub boot_id: Option<[u8; 16]>,
    /// Records in an intent log (tests only; None: 4032).
    #[doc(hidden)]
    pub intent_log_records: Option<u64>,
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
            metadata_persistence: MetadataPersistence::Flush,
            intent_log: false,
            bitmaps_on_disk: false,
            boot_id: None,
            intent_log_records: None,
        }
    }
}
