//! QEMU's bounds on the bitmaps extension, directory and tables, and the
//! errors that say one does not hold (its messages are QEMU's). A leaf:
//! the crate's `Error` wraps `BitmapError` without importing the parser.

/// Most bitmaps an image may have.
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory.
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Most entries in one bitmap table.
pub const MAX_TABLE_SIZE: u32 = 0x800_0000;
/// Most bytes of bitmap data (the table size times the cluster size).
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
pub const MIN_GRANULARITY_BITS: u8 = 9;
pub const MAX_GRANULARITY_BITS: u8 = 31;
pub const MAX_NAME_SIZE: usize = 1023;

/// A bitmaps extension, directory or table that does not hold; the
/// messages are QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    #[error("bitmaps_ext: Invalid extension length")]
    ExtLength(usize),
    #[error("bitmaps_ext: Reserved field is not zero")]
    ExtReserved,
    #[error(
        "bitmaps_ext: Image has {0} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}"
    )]
    TooMany(u32),
    #[error("found bitmaps extension with zero bitmaps")]
    NoBitmaps,
    #[error("bitmaps_ext: invalid bitmap directory offset")]
    DirectoryOffset(u64),
    #[error(
        "bitmaps_ext: bitmap directory size ({0}) exceeds the maximum supported size ({MAX_DIRECTORY_SIZE})"
    )]
    DirectoryTooBig(u64),
    #[error("Requested bitmap directory size is zero")]
    DirectoryEmpty,
    #[error("Failed to read bitmap directory: it lies past the end of the file")]
    DirectoryPastEnd { offset: u64, size: u64 },
    #[error("More bitmaps found than specified in header extension")]
    MoreThanHeader,
    #[error("Less bitmaps found than specified in header extension")]
    FewerThanHeader,
    #[error("Broken bitmap directory")]
    BrokenDirectory,
    #[error("Bitmap extra data is not supported")]
    ExtraData,
    #[error("Bitmap '{0}' doesn't satisfy the constraints")]
    Constraints(String),
    #[error("Bitmap '{name}': table entry {index} ({entry:#x}) is invalid")]
    TableEntry {
        name: String,
        index: usize,
        entry: u64,
    },
    /// A table entry is invalid (QEMU: EINVAL loading the table).
    #[error("Could not read bitmap_table table from image for bitmap '{0}': Invalid argument")]
    TableLoad(String),
    /// The table does not cover the disk exactly (QEMU: EINVAL loading
    /// the data).
    #[error("Could not read bitmap '{0}' from image: Invalid argument")]
    DataLoad(String),
    #[error("Cannot resize qcow2 with persistent bitmaps that were not loaded into memory")]
    Resize,
    #[error("Device has active dirty bitmaps")]
    ActiveBitmaps,
    /// An edit (`qemu-img bitmap`) refused, in QEMU's words.
    #[error("{0}")]
    Edit(String),
}
