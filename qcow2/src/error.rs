//! The crate's one error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong opening, reading or writing an image.
///
/// Variants carry enough context (which field, which offset, which file) for
/// a command-line tool to print one clear line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller in non-blocking mode ([`crate::sync::without_blocking`])
    /// would have waited for another request's allocation; its waker is
    /// registered. Nothing was changed by the step that refused.
    #[error("would wait for another request's cluster allocation")]
    WouldBlock,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// QEMU's words: "Could not open 'x': No such file or directory".
    #[error("Could not open '{}': {}", path.display(), strerror(source))]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Image is not in qcow2 format")]
    NotQcow2,
    #[error("invalid qcow2 header: {0}")]
    InvalidHeader(String),
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    #[error("Unsupported qcow2 feature(s): {0}")]
    UnsupportedFeature(String),
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    /// A write that would have overwritten qcow2 metadata was not made,
    /// and the image was marked corrupt (see the `overlap` module).
    #[error("metadata overlap: {0}")]
    OverlapRefused(String),
    #[error(
        "qcow2 image is marked corrupt and cannot be opened read/write; \
         run 'rimg check -r all' to repair it"
    )]
    MarkedCorrupt,
    #[error("{0}")]
    Locked(String),
    #[error("image is read-only")]
    ReadOnly,
    #[error("request [{offset}, +{len}) is outside the image (size {size})")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A change to a guest range where a write that was given up on (its
    /// I/O could not be waited for) may still land: refused so that the
    /// late write can never overtake a newer one. Lasts until the image
    /// is opened again.
    #[error(
        "[{offset}, +{len}) may still receive an abandoned write: \
         changes there are refused until the image is reopened"
    )]
    Fenced { offset: u64, len: u64 },
    /// An operation the image's format does not have (compressed writes
    /// to a raw image); the text names the operation.
    #[error("{0} not supported for this file format")]
    NotSupportedByFormat(&'static str),
    /// The backing chain could not be opened or used; the text says
    /// why, in QEMU's words where QEMU has them.
    #[error("{0}")]
    Backing(String),
    /// An NBD export that could not be reached or opened, in QEMU's
    /// client's words ("Failed to connect to 'x': ...", "Requested export
    /// not available" and the server's message).
    #[error("{0}")]
    Nbd(String),
    /// An image of a format other than qcow2 that does not hold (a bad
    /// VDI header, ...): QEMU's words for why, printed as they are.
    #[error("{0}")]
    Format(String),
    /// A writable open (or a write) of an image rimg only reads (a VMDK
    /// subformat or extent kind it does not write).
    #[error("{0} images are read-only in rimg (writing them is not supported yet)")]
    ReadOnlyFormat(&'static str),
    /// Resizing an image of a format whose QEMU driver cannot (VDI).
    #[error("Image format driver does not support resize")]
    ResizeUnsupported,
    #[error("compressed cluster at host offset {offset:#x}: {reason}")]
    Decompress { offset: u64, reason: String },
    #[error("refcount overflow for cluster at host offset {0:#x}")]
    RefcountOverflow(u64),
    #[error("image is too large: {0}")]
    TooLarge(String),
    /// Encryption: a bad LUKS header, a wrong password, a missing key.
    /// The message is QEMU's wording, printed as is.
    #[error("{0}")]
    Crypto(String),
    /// The snapshot table is over one of QEMU's limits; `check -r all`
    /// can cut it down (qemu-img's two lines: the problem, the remedy).
    #[error("{open}")]
    SnapshotTableLimit {
        /// What opening the image says.
        open: String,
        /// What `check` (without -r all) says instead.
        check: String,
    },
    /// An internal snapshot could not be loaded for reading (qemu-img's
    /// wording after "Failed to load snapshot: ").
    #[error("{0}")]
    SnapshotLoad(String),
    /// A snapshot's L1 table reference is invalid; found when the table
    /// is used (QEMU opens such images).
    #[error("{0}")]
    SnapshotL1(L1Problem),
    /// The virtual size needs an L1 table of more than 2^31 entries
    /// (qemu-img's wording).
    #[error("Image is too big")]
    ImageTooBig { size: u64 },
    /// A persistent dirty bitmap structure that does not hold, or an
    /// operation bitmaps forbid (QEMU's wording).
    #[error("{0}")]
    Bitmap(crate::bitmap::limits::BitmapError),
    /// A write to the first sector of a raw image whose format was
    /// probed would make it probe as another format (QEMU's EPERM).
    #[error(
        "Operation not permitted: the first sector of a raw image whose format was \
         probed may not look like another format (give the format explicitly)"
    )]
    FirstSectorFormat,
    /// The header's L1 table cannot map the whole virtual size.
    #[error("L1 table is too small")]
    L1TooSmall { entries: u32, size: u64 },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A snapshot table limit error whose check message is the open one
    /// after "ERROR failed to read the snapshot table: ".
    pub fn snapshot_table_limit(open: String) -> Self {
        let check = format!("ERROR failed to read the snapshot table: {open}");
        Error::SnapshotTableLimit { open, check }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds context to `io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

/// What is wrong with a snapshot's L1 table reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L1Problem {
    /// More entries than an L1 table may have.
    TooLarge,
    /// Not cluster aligned, or ending past the largest file offset.
    BadOffset,
}

impl L1Problem {
    /// qemu-img's line for the problem.
    pub fn message(self) -> &'static str {
        match self {
            L1Problem::TooLarge => "Snapshot L1 table too large",
            L1Problem::BadOffset => "Snapshot L1 table offset invalid",
        }
    }

    /// The errno qemu-img reports it as, where it adds one.
    pub fn errno_text(self) -> &'static str {
        match self {
            L1Problem::TooLarge => "File too large",
            L1Problem::BadOffset => "Invalid argument",
        }
    }
}

impl std::fmt::Display for L1Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// An I/O error as C's strerror prints it ("Input/output error"), without
/// Rust's " (os error N)" suffix: QEMU's words in messages.
pub fn strerror(e: &io::Error) -> String {
    without_os_code(e.to_string())
}

/// A message without the " (os error N)" suffix Rust gives an I/O error.
pub fn without_os_code(s: String) -> String {
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}
