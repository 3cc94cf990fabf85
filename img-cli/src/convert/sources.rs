//! The sources of a conversion, read as one disk, one after the other.
//!
//! Data a layer stores in clear in a file is borrowed from a read-only
//! mapping of that file instead of being copied out of the page cache:
//! a buffered convert otherwise spends about half its time in that copy
//! (the other half is the copy into the target's page cache, which
//! remains). Everything else (zeros, backing layers, compressed or
//! encrypted clusters, files that cannot be mapped) is read as usual.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use qcow2::storage::Storage;
use qcow2::{chain_status, ChainStatus, Image, Mapping};

use crate::CliError;

pub(super) struct Sources {
    parts: Vec<Part>,
    pub(super) size: u64,
    /// The last run [from, to) that status found, whole: a qcow2 target
    /// asks once per target cluster, inside the same run each time (for a
    /// raw source two lseeks per ask, 32k per GiB with 64 KiB clusters).
    /// The sources are not written during a conversion.
    last: Mutex<Option<(u64, u64, ChainStatus)>>,
    /// `--salvage`: read errors are reported (unless quiet) and read as
    /// zeros, sector by sector, as qemu-img's convert does.
    salvage: Option<Salvage>,
}

#[derive(Clone, Copy)]
struct Salvage {
    quiet: bool,
}

/// The unit a salvaging read retries in (qemu-img's BDRV_SECTOR_SIZE).
const SECTOR: u64 = 512;

struct Part {
    /// First byte of this image in the concatenation.
    start: u64,
    img: Arc<dyn Image>,
    /// The image's data is in clear in a file, read without injected
    /// faults: copies of it may bypass the engine (mapped, offloaded).
    clear: bool,
    /// The file holding the image's data in clear, mapped.
    map: Option<FileMap>,
}

impl Sources {
    pub(super) fn new(images: Vec<Arc<dyn Image>>) -> Sources {
        let mut parts = Vec::with_capacity(images.len());
        let mut size = 0;
        for img in images {
            let n = img.size();
            // Injected faults (blkdebug) apply to reads through the file.
            let faults = img.storage().has_faults() || img.data_storage().has_faults();
            let clear = img.data_in_clear() && !faults;
            let map = clear
                .then(|| img.data_storage().file())
                .flatten()
                .and_then(FileMap::new);
            parts.push(Part {
                start: size,
                img,
                clear,
                map,
            });
            size += n;
        }
        Sources {
            parts,
            size,
            last: Mutex::new(None),
            salvage: None,
        }
    }

    /// Turns on `--salvage`.
    pub(super) fn salvage(&mut self, quiet: bool) {
        self.salvage = Some(Salvage { quiet });
    }

    /// A failure `--salvage` carries on after, reported as qemu-img
    /// words it: the system's text of an I/O error, else EIO's (the
    /// errno QEMU's drivers give a corrupt image; one line a sector, the
    /// engine's own account would repeat on each).
    fn warn(&self, what: &str, at: u64, e: &qcow2::Error) {
        if self.salvage.is_some_and(|s| !s.quiet) {
            let text = match e {
                qcow2::Error::Io { .. } => crate::common::os_error_text(e),
                _ => std::io::Error::from_raw_os_error(libc::EIO).to_string(),
            };
            eprintln!(
                "{}: warning: error while reading {what}{at}: {}",
                crate::prog_name(),
                qcow2::error::without_os_code(text)
            );
        }
    }

    /// The part holding byte `pos`, the offset in it, and how far it
    /// goes from there.
    fn part(&self, pos: u64) -> (&Part, u64, u64) {
        let i = self.parts.partition_point(|p| p.start <= pos) - 1;
        let p = &self.parts[i];
        (p, pos - p.start, p.start + p.img.size() - pos)
    }

    /// As [`chain_status`], within one part.
    pub(super) fn status(&self, pos: u64, len: u64) -> Result<(ChainStatus, u64), CliError> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((from, to, st)) = *last {
            if (from..to).contains(&pos) {
                return Ok((st, (to - pos).min(len)));
            }
        }
        let (p, at, left) = self.part(pos);
        let status = chain_status(p.img.as_ref(), at, left);
        if let (Err(e), Some(_)) = (&status, self.salvage) {
            // Then read it: one sector taken for data.
            self.warn("block status at offset ", at, e);
            return Ok((ChainStatus::Data, SECTOR.min(len)));
        }
        let (st, n) = status.map_err(|e| match e {
            // A format's block status that fails with an errno (vmdk):
            // qemu-img's words.
            qcow2::Error::Io { .. } => CliError::new(format!(
                "error while reading block status at offset {pos}: {}",
                crate::common::os_error_text(&e)
            )),
            e => e.into(),
        })?;
        *last = Some((pos, pos + n, st));
        Ok((st, n.min(len)))
    }

    /// Bytes of [from, to) some layer stores data for (what qemu-img's
    /// progress counts).
    pub(super) fn data_bytes(&self, from: u64, to: u64) -> Result<u64, CliError> {
        let mut n = 0;
        let mut pos = from;
        while pos < to {
            let (st, len) = self.status(pos, to - pos)?;
            if st == ChainStatus::Data {
                n += len;
            }
            pos += len;
        }
        Ok(n)
    }

    /// The bytes [pos, pos + buf.len()): borrowed from a mapping when one
    /// extent of one file holds them all, otherwise read into `buf`.
    pub(super) fn bytes<'a>(&'a self, pos: u64, buf: &'a mut [u8]) -> Result<&'a [u8], CliError> {
        let (p, at, left) = self.part(pos);
        if let Some(map) = &p.map {
            if buf.len() as u64 <= left {
                if let Ok((Mapping::Data(host), n)) = p.img.map_read(at, buf.len() as u64) {
                    if n == buf.len() as u64 {
                        if let Some(b) = map.get(host.0, buf.len()) {
                            return Ok(b);
                        }
                    }
                }
            }
        }
        self.read_at(buf, pos)?;
        Ok(buf)
    }

    /// Where a layer's file holds the bytes from `pos` on in clear, as
    /// they are (for a copy the kernel makes, -C): Ok((that file, the
    /// offset there, how many bytes, at most `len`)). Otherwise Err(how
    /// many bytes from `pos` are something else: zeros, a backing
    /// layer's, compressed or encrypted data, behind injected faults).
    pub(super) fn in_file(&self, pos: u64, len: u64) -> Result<(&Storage, u64, u64), u64> {
        let (p, at, left) = self.part(pos);
        let len = len.min(left);
        if !p.clear {
            return Err(len);
        }
        match p.img.map_read(at, len) {
            Ok((Mapping::Data(host), n)) => Ok((p.img.data_storage(), host.0, n)),
            Ok((_, n)) => Err(n.clamp(1, len)),
            Err(_) => Err(len),
        }
    }

    fn read_at(&self, buf: &mut [u8], pos: u64) -> Result<(), CliError> {
        let mut done = 0;
        while done < buf.len() {
            let (p, at, left) = self.part(pos + done as u64);
            let n = (left as usize).min(buf.len() - done);
            let part = &mut buf[done..done + n];
            match p.img.read_at(part, at) {
                Ok(()) => {}
                Err(_) if self.salvage.is_some() => self.salvage_read(p, part, at),
                Err(e) => return Err(read_error(pos, e)),
            }
            done += n;
        }
        Ok(())
    }

    /// Reads `buf` from `p` at `at` a sector at a time; a sector that
    /// fails is reported and reads as zeros.
    fn salvage_read(&self, p: &Part, buf: &mut [u8], at: u64) {
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let off = at + i as u64 * SECTOR;
            if let Err(e) = p.img.read_at(sector, off) {
                self.warn("offset ", off, &e);
                sector.fill(0);
            }
        }
    }
}

/// A failed source read, as qemu-img reports it (where the read began,
/// the system's text of the error).
fn read_error(pos: u64, e: qcow2::Error) -> CliError {
    match e {
        qcow2::Error::Io { .. } => CliError::new(format!(
            "error while reading at byte {pos}: {}",
            crate::common::os_error_text(&e)
        )),
        e => e.into(),
    }
}

/// A whole file mapped read-only and shared: its page cache pages, seen
/// without a copy.
struct FileMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value until Drop;
// reading it from several threads is reading shared memory.
unsafe impl Send for FileMap {}
// SAFETY: as above: only shared reads, never a write through it.
unsafe impl Sync for FileMap {}

impl FileMap {
    /// Maps `file` whole. None (the copying path then serves it) unless
    /// it is a non-empty regular file outside tmpfs: a block device's
    /// media error would arrive as SIGBUS instead of EIO, and a read
    /// fault on a tmpfs or memfd hole allocates memory (read(2) returns
    /// the zero page).
    fn new(file: &std::fs::File) -> Option<FileMap> {
        let meta = file.metadata().ok()?;
        if !meta.is_file() || meta.len() == 0 {
            return None;
        }
        let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
        // SAFETY: fstatfs fills the struct it is given, for a descriptor
        // the caller holds open.
        if unsafe { libc::fstatfs(file.as_raw_fd(), fs.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: fstatfs succeeded, so the struct is initialised.
        let fs = unsafe { fs.assume_init() };
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        // f_type is i64 here, narrower on other architectures.
        #[allow(clippy::unnecessary_cast)]
        if fs.f_type as i64 == TMPFS_MAGIC {
            return None;
        }
        let len = usize::try_from(meta.len()).ok()?;
        // SAFETY: a new read-only shared mapping of `len` bytes of an open
        // file at an address the kernel picks; nothing else is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(FileMap {
            ptr: NonNull::new(p.cast())?,
            len,
        })
    }

    /// Bytes [off, off + len) of the file, read in and their page tables
    /// filled in one call (MADV_POPULATE_READ, Linux 5.14) rather than
    /// one fault per few pages. None when that fails: a read error then
    /// reaches the copying path as EIO, where touching the mapping would
    /// raise SIGBUS; older kernels take the copying path too.
    fn get(&self, off: u64, len: usize) -> Option<&[u8]> {
        let off = usize::try_from(off).ok()?;
        if off.checked_add(len)? > self.len {
            return None;
        }
        const MADV_POPULATE_READ: i32 = 22;
        // SAFETY: sysconf has no memory effects.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let page = off & !(page_size - 1);
        // SAFETY: advice on a range inside this mapping; it only reads
        // the file's pages in and fills page tables.
        let r = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(page).cast(),
                off + len - page,
                MADV_POPULATE_READ,
            )
        };
        if r != 0 {
            return None;
        }
        // SAFETY: the range is inside the mapping, which lives as long as
        // `self`. The bytes are the file's: the source is opened read-only
        // and locked against writers (QEMU's shared locks), and any value
        // is a valid u8; a writer that ignores the locks can at worst
        // make them torn, as with read(2). Truncating the file under a
        // running convert is not defended against (SIGBUS).
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) })
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no slice of it
        // outlives `self` (they borrow it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
