//! Formats other than qcow2, raw and luks ("foreign" formats: VDI, VHD,
//! VMDK and VHDX).
//!
//! Each format decodes its header and tables into a [`Layout`]: how a
//! guest range is stored. [`ForeignImage`] turns a layout into an
//! [`Image`], the one interface every tool uses, so reads, block status
//! and the split data path work the same way for all of them, and every
//! write path is refused in one place.
//!
//! Rules every format here follows, as QEMU's drivers do:
//! - Bytes past the end of the file read as zeros, tables included: a
//!   table that runs past the end of the file has zero entries there
//!   (`table.rs`). Only its in-file part is held in memory, so opening a
//!   hostile image allocates at most about the size of the file.
//! - A format rimg writes allocates in whole units ([`Layout::alloc_unit`]):
//!   a write into a unit the tables do not place yet stores the unit whole
//!   (zeros around the written bytes, as QEMU's drivers pad) and then
//!   records it, so a reader never finds a table entry before its data.
//!   Other formats refuse a writable open ([`Error::ReadOnlyFormat`]).

pub mod crc32c;
pub mod probe;
pub(crate) mod table;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

use std::path::Path;
use std::sync::Arc;

use crate::check::report::CheckReport;
use crate::datapath::{IoEpoch, Mapping, PendingWrite};
use crate::error::{Error, Result};
use crate::image::{Extent, ExtentKind, Format, Image};
use crate::l2::L2Entry;
use crate::storage::Storage;
use crate::sync::AllocWaker;
use crate::units::HostOffset;

/// Creation options of the formats here that rimg writes (qemu-img's
/// `-o` names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// VDI `static`: every block allocated when the image is made.
    pub is_static: bool,
    /// VHD `subformat` (`dynamic` or `fixed`), as given: judged when the
    /// image is made, as QEMU judges it.
    pub subformat: Option<String>,
    /// VHD `force_size`: the size as given, not rounded to a geometry.
    pub force_size: bool,
    /// VMDK `adapter_type` (ide, buslogic, lsilogic, legacyESX).
    pub adapter_type: Option<String>,
    /// VMDK `hwversion` (written as given).
    pub hwversion: Option<String>,
    /// VMDK `compat6`: hardware version 6.
    pub compat6: bool,
    /// VMDK `toolsversion` (written as given).
    pub toolsversion: Option<String>,
    /// VMDK `zeroed_grain`: the zeroed-grain flag (version 2).
    pub zeroed_grain: bool,
    /// VHDX `log_size` in bytes, as given (rounded when the image is made).
    pub log_size: Option<u64>,
    /// VHDX `block_size` in bytes, as given (0: chosen by size).
    pub block_size: Option<u64>,
    /// VHDX `block_state_zero` (default on): new blocks' BAT entries say
    /// ZERO rather than NOT_PRESENT.
    pub block_state_zero: Option<bool>,
}

/// QEMU's largest byte offset (2^63 - 2^30): its block layer refuses I/O
/// past it.
pub(crate) const MAX_OFFSET: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

/// Where a run of guest bytes is stored in a foreign image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Where {
    /// In file `file` at `host` (file 0 is the image file, k > 0 the
    /// format's k-th other file, [`Layout::files`]). With `recurse`, the
    /// format preallocated the run and the file's own holes read as zeros
    /// (reported as QEMU's BDRV_BLOCK_RECURSE).
    Data { file: u32, host: u64, recurse: bool },
    /// Compressed (VMDK stream grains): the unit stored in file `file` at
    /// `host`, the run starting `skip` bytes into its uncompressed data.
    Compressed { file: u32, host: u64, skip: u64 },
    /// Reads as zeros, decided by the format (a hole in its tables).
    Zero,
    /// Not stored in this image (VMDK's unallocated grains): the parent's
    /// bytes, zeros without one.
    Unallocated,
    /// The format cannot say (a VMDK grain directory index past the
    /// table): reads as [`Where::Unallocated`], block status fails with
    /// EIO, as QEMU's vmdk driver answers.
    Broken,
    /// Reads fail with EIO (a VHDX block state QEMU does not read).
    Eio,
}

/// How a foreign format maps guest bytes: what [`ForeignImage`] needs of
/// a format once its header and tables are decoded.
pub trait Layout: Send + Sync + std::fmt::Debug + 'static {
    fn format(&self) -> Format;
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;
    /// The unit the format allocates in, as qemu-img info reports it.
    fn cluster_size(&self) -> Option<u64>;
    /// Block status is the block layer's default, not the format's
    /// (QEMU's driver has none: VHDX): all data, no offset.
    fn opaque_status(&self) -> bool {
        false
    }
    /// Where [off, off + len) starts, and how much of it (at least one
    /// byte) is stored the same way, contiguously, as far as the format's
    /// QEMU driver answers in one block status (VDI: one block; VHD: one
    /// block of data, or a run of holes). Called with a non-empty range
    /// inside the disk. `st` is the image file, for tables read on demand.
    fn lookup(&self, st: &Storage, off: u64, len: u64) -> Result<(Where, u64)>;
    /// The files other than the image file that hold guest data (VMDK
    /// extent files): file k of [`Where`] is `files()[k - 1]`.
    fn files(&self) -> &[Storage] {
        &[]
    }
    /// Whether guest data may be read from `backing` through this image
    /// (VMDK compares its parent's CID); an error says why not.
    fn backing_readable(&self, _backing: &dyn Image) -> Result<()> {
        Ok(())
    }
    /// Reads `buf.len()` bytes from `skip` on of the compressed unit at
    /// `host` in file `file` (formats whose lookups answer
    /// [`Where::Compressed`]). `st` is the image file.
    fn read_compressed(
        &self,
        _st: &Storage,
        _file: u32,
        _host: u64,
        _skip: u64,
        _buf: &mut [u8],
    ) -> Result<()> {
        Err(Error::Format(format!(
            "{} has no compressed data",
            self.format().name()
        )))
    }
    /// The unit new data is allocated in, for a format rimg writes; None
    /// for one it only reads (its writable opens are refused).
    fn alloc_unit(&self) -> Option<u64> {
        None
    }
    /// A new unit's unwritten bytes read as zeros without being written
    /// (VHDX: the file's holes), so [`Layout::allocate`] gets only the
    /// written bytes of a unit that read as zeros.
    fn sparse_units(&self) -> bool {
        false
    }
    /// Units are stored compressed, whole (VMDK streams): a write that is
    /// not a whole unit is refused, and placed units are never rewritten.
    fn compressed_writes_only(&self) -> bool {
        false
    }
    /// What [`Layout::allocate`] is to store for unit `index` (its whole
    /// new contents `data`, of which a write gave `written`), made before
    /// the allocation lock is taken; None: `data` itself. VMDK streams
    /// compress here, and refuse what is not a whole grain.
    fn encode(
        &self,
        _index: u64,
        _data: &[u8],
        _written: std::ops::Range<usize>,
    ) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
    /// Called before guest bytes at `off` are written into a unit the
    /// tables already place (VHD marks the block's sectors present).
    fn before_write(&self, _st: &Storage, _off: u64) -> Result<()> {
        Ok(())
    }
    /// Stores `data`, the whole new contents of allocation unit `index`
    /// (one [`Layout::alloc_unit`] long, of which the write that asks
    /// gave `written`; or what [`Layout::encode`] made of it; with
    /// [`Layout::sparse_units`], of a unit that read as zeros, only the
    /// written bytes), in new space of the image file and records it in
    /// the tables, on disk and then in memory. Called one at a time
    /// (under [`ForeignImage`]'s allocation lock), only for a unit whose
    /// lookup answers [`Where::Zero`] or [`Where::Unallocated`].
    fn allocate(
        &self,
        _st: &Storage,
        _index: u64,
        _data: &[u8],
        _written: std::ops::Range<usize>,
    ) -> Result<()> {
        Err(Error::ReadOnlyFormat(self.format().name()))
    }
}

/// An image over a format's [`Layout`], and its backing image (VMDK's
/// parent), if any.
#[derive(Debug)]
pub struct ForeignImage<L> {
    st: Storage,
    layout: L,
    backing: Option<Arc<dyn Image>>,
    /// Held while a unit is allocated: two writers into one new unit
    /// must not both allocate it.
    alloc: crate::sync::Mutex<()>,
}

impl<L: Layout> ForeignImage<L> {
    /// The image of `layout` over its file `st`; a file opened for
    /// writing is refused for a format rimg only reads.
    pub(crate) fn new(st: Storage, layout: L) -> Result<ForeignImage<L>> {
        if st.writable() && layout.alloc_unit().is_none() {
            return Err(Error::ReadOnlyFormat(layout.format().name()));
        }
        Ok(ForeignImage {
            st,
            layout,
            backing: None,
            alloc: crate::sync::Mutex::new(()),
        })
    }

    /// This image over `backing`: unallocated ranges read from it.
    pub(crate) fn with_backing(mut self, backing: Option<Arc<dyn Image>>) -> Self {
        self.backing = backing;
        self
    }

    /// Reads unallocated guest bytes at `off`: the backing image's (zeros
    /// past its end, as QEMU's block layer pads), zeros without one.
    fn read_unallocated(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        self.layout.backing_readable(b.as_ref())?;
        let n = (buf.len() as u64).min(b.size().saturating_sub(off)) as usize;
        b.read_at(&mut buf[..n], off)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// The decoded header and tables.
    pub fn layout(&self) -> &L {
        &self.layout
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        crate::image::check_range(off, len, self.size())
    }

    /// File `file` of a [`Where`].
    fn file(&self, file: u32) -> &Storage {
        match file {
            0 => &self.st,
            k => &self.layout.files()[k as usize - 1],
        }
    }

    fn refuse<T>(&self) -> Result<T> {
        Err(Error::ReadOnlyFormat(self.layout.format().name()))
    }

    /// The allocation unit of an image open for writing; refused for an
    /// image open read-only (or a format rimg only reads).
    fn unit(&self) -> Result<u64> {
        match self.layout.alloc_unit() {
            Some(u) if self.st.writable() => Ok(u),
            Some(_) => Err(Error::ReadOnly),
            None => self.refuse(),
        }
    }

    /// Writes `data` at `at`, a range within one allocation unit of
    /// `unit` bytes.
    fn write_in_unit(&self, data: &[u8], at: u64, unit: u64) -> Result<()> {
        let (w, n) = self.layout.lookup(&self.st, at, data.len() as u64)?;
        match w {
            // Placed already (so for good: nothing here is ever freed).
            Where::Data { file, host, .. } => {
                if host.checked_add(n).is_none_or(|end| end > MAX_OFFSET) {
                    return Err(eio("write"));
                }
                self.layout.before_write(&self.st, at)?;
                self.file(file).write_at(&data[..n as usize], host)?;
                if (n as usize) < data.len() {
                    return self.write_in_unit(&data[n as usize..], at + n, unit);
                }
                Ok(())
            }
            Where::Zero if self.layout.sparse_units() => {
                let start = at - at % unit;
                let skip = (at - start) as usize;
                let _held = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
                let (again, _) = self.layout.lookup(&self.st, at, data.len() as u64)?;
                if again != Where::Zero {
                    drop(_held);
                    return self.write_in_unit(data, at, unit);
                }
                self.layout
                    .allocate(&self.st, start / unit, data, skip..skip + data.len())
            }
            Where::Zero | Where::Unallocated => {
                // The unit's new contents, made (and encoded: VMDK streams
                // compress) before the lock, so writers of different
                // units do that work in parallel.
                let start = at - at % unit;
                let mut whole = vec![0u8; unit as usize];
                if w == Where::Unallocated {
                    let n = unit.min(self.size() - start) as usize;
                    self.read_unallocated(&mut whole[..n], start)?;
                }
                let skip = (at - start) as usize;
                whole[skip..skip + data.len()].copy_from_slice(data);
                let written = skip..skip + data.len();
                let stored = self.layout.encode(start / unit, &whole, written.clone())?;
                let _held = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
                // Another writer may have placed the unit meanwhile.
                let (again, _) = self.layout.lookup(&self.st, at, data.len() as u64)?;
                match again {
                    Where::Zero | Where::Unallocated => {}
                    _ => {
                        drop(_held);
                        return self.write_in_unit(data, at, unit);
                    }
                }
                let stored = stored.as_deref().unwrap_or(&whole);
                self.layout
                    .allocate(&self.st, start / unit, stored, written)
            }
            // Compressed units are never rewritten in place (as QEMU's
            // vmdk driver refuses); the others fail as reads do.
            Where::Compressed { .. } | Where::Broken | Where::Eio => Err(eio("write")),
        }
    }
}

impl<L: Layout> Image for ForeignImage<L> {
    fn format(&self) -> Format {
        self.layout.format()
    }
    fn size(&self) -> u64 {
        self.layout.size()
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
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn storage(&self) -> &Storage {
        &self.st
    }
    fn data_file(&self, file: u32) -> &Storage {
        self.file(file)
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let (w, n) = self
                .layout
                .lookup(&self.st, at, (buf.len() - done) as u64)?;
            let piece = &mut buf[done..done + n as usize];
            match w {
                Where::Data { file, host, .. } => {
                    // QEMU's block layer refuses offsets past its largest.
                    if host.checked_add(n).is_none_or(|end| end > MAX_OFFSET) {
                        return Err(eio("read"));
                    }
                    self.file(file).read_at(piece, host)?
                }
                Where::Compressed { file, host, skip } => self
                    .layout
                    .read_compressed(&self.st, file, host, skip, piece)?,
                Where::Zero => piece.fill(0),
                Where::Eio => return Err(eio("read")),
                // QEMU reads a grain its GD cannot place from the parent
                // too.
                Where::Unallocated | Where::Broken => self.read_unallocated(piece, at)?,
            }
            done += n as usize;
        }
        Ok(())
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Extent> {
        self.check_range(off, len)?;
        if self.layout.opaque_status() {
            return Ok(Extent {
                len,
                kind: ExtentKind::Data,
                offset: None,
                file: 0,
                compressed: false,
                recurse: false,
            });
        }
        // One lookup, as QEMU's driver answers: qemu-img map's merging
        // (and the recursion into the file) see the same pieces.
        let (w, n) = self.layout.lookup(&self.st, off, len)?;
        Ok(match w {
            Where::Data {
                file,
                host,
                recurse,
            } => Extent {
                len: n,
                kind: ExtentKind::Data,
                offset: Some(host),
                file,
                compressed: false,
                recurse,
            },
            // Data with no offset a reader could use, as QEMU answers.
            Where::Compressed { file, .. } => Extent {
                len: n,
                kind: ExtentKind::Data,
                offset: None,
                file,
                compressed: true,
                recurse: false,
            },
            Where::Zero | Where::Unallocated => Extent {
                len: n,
                kind: match w {
                    Where::Zero => ExtentKind::Zero,
                    _ => ExtentKind::Unallocated,
                },
                offset: None,
                file: 0,
                compressed: false,
                recurse: false,
            },
            Where::Broken | Where::Eio => return Err(eio("block status")),
        })
    }

    fn map_read(&self, off: u64, len: u64) -> Result<(Mapping, u64)> {
        self.check_range(off, len)?;
        let (w, n) = self.layout.lookup(&self.st, off, len)?;
        Ok(match w {
            Where::Data { host, .. } if host.checked_add(n).is_none_or(|e| e > MAX_OFFSET) => {
                return Err(eio("read"))
            }
            Where::Data { file: 0, host, .. } => (Mapping::Data(HostOffset(host)), n),
            // Read through read_at (see read_mapped): the split data path
            // reads only the image file.
            Where::Data { host, .. } | Where::Compressed { host, .. } => (
                Mapping::Compressed(L2Entry::Compressed {
                    offset: host,
                    len: 0,
                    sectors: 0,
                }),
                n,
            ),
            Where::Zero => (Mapping::Zero(None), n),
            Where::Unallocated | Where::Broken => (Mapping::Unallocated, n),
            Where::Eio => return Err(eio("read")),
        })
    }
    fn read_mapped(&self, mapping: Mapping, buf: &mut [u8], off: u64) -> Result<()> {
        match mapping {
            Mapping::Data(host) => self.st.read_at(buf, host.0),
            Mapping::Zero(_) => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Unallocated => self.read_unallocated(buf, off),
            // Compressed grains and other files: read_at reads them.
            Mapping::Compressed(_) => self.read_at(buf, off),
        }
    }
    fn io_epoch(&self) -> IoEpoch {
        // Nothing is ever freed: no mapping can go stale.
        IoEpoch::none()
    }
    fn cluster_size(&self) -> Option<u64> {
        self.layout.cluster_size()
    }
    fn supports_compression(&self) -> bool {
        self.st.writable() && self.layout.compressed_writes_only()
    }
    fn compressed_writes_only(&self) -> bool {
        self.supports_compression()
    }
    fn write_compressed(&self, off: u64, data: &[u8]) -> Result<()> {
        // Every new unit of such a format is stored compressed.
        match self.supports_compression() {
            true => self.write_at(data, off),
            false => Err(Error::NotSupportedByFormat("Compression")),
        }
    }
    fn data_in_clear(&self) -> bool {
        // A writable image places a unit only once its data is known
        // (write_at stores it whole): there is no split write path to
        // hand callers that move data themselves.
        !self.st.writable()
    }

    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        let unit = self.unit()?;
        self.check_range(off, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let n = ((buf.len() - done) as u64).min(unit - at % unit) as usize;
            self.write_in_unit(&buf[done..done + n], at, unit)?;
            done += n;
        }
        Ok(())
    }
    fn write_zeroes(&self, off: u64, len: u64, _unmap: bool) -> Result<()> {
        let unit = self.unit()?;
        self.check_range(off, len)?;
        let mut done = 0u64;
        while done < len {
            let at = off + done;
            let (w, n) = self.layout.lookup(&self.st, at, (len - done).min(unit))?;
            let reads_zero =
                w == Where::Zero || (w == Where::Unallocated && self.backing.is_none());
            if !reads_zero {
                // Zeros stored as data (QEMU's drivers have no cheaper
                // way either), from the page-aligned zero buffer.
                crate::pagebuf::zero_pieces(at, n, |z, p| self.write_at(z, p))?;
            }
            done += n;
        }
        Ok(())
    }
    fn discard(&self, _off: u64, _len: u64) -> Result<()> {
        // A hint the formats here have no way to take (QEMU's drivers
        // ignore it too).
        self.unit().map(|_| ())
    }
    fn resize(&self, _new_size: u64) -> Result<()> {
        self.unit()?;
        Err(Error::ResizeUnsupported)
    }
    fn begin_write(self: Arc<Self>, _off: u64, _len: usize) -> Result<PendingWrite> {
        self.refuse()
    }
    fn try_begin_write(
        self: Arc<Self>,
        _off: u64,
        _len: usize,
        _waker: &Arc<dyn AllocWaker>,
    ) -> Result<Option<PendingWrite>> {
        self.refuse()
    }
    fn flush(&self) -> Result<()> {
        self.st.sync()
    }
}

/// The format's consistency check (qemu-img check without repair); None
/// for images whose format has none here.
pub fn check(img: &dyn Image) -> Option<Result<CheckReport>> {
    let any = img.as_any();
    if let Some(v) = any.downcast_ref::<vdi::Vdi>() {
        return Some(Ok(v.layout().check()));
    }
    if let Some(v) = any.downcast_ref::<vmdk::Vmdk>() {
        return Some(v.layout().check(v.storage()));
    }
    if let Some(v) = any.downcast_ref::<vhdx::Vhdx>() {
        return Some(v.layout().check(v.storage()));
    }
    None
}

/// QEMU's EIO for `what`.
fn eio(what: &str) -> Error {
    Error::io(what, std::io::Error::from_raw_os_error(libc::EIO))
}

/// A file to hand the lookups of formats whose tables are all in memory.
#[cfg(test)]
pub(crate) fn tests_null() -> Storage {
    Storage::open(Path::new("/dev/null"), false).unwrap()
}
