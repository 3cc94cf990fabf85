//! The host file under an image: positioned I/O that is safe to call from
//! several threads at once (pread/pwrite take `&self`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

mod lock;

/// What the bytes are in.
#[derive(Debug)]
enum Backend {
    File(File),
    /// An export on an NBD server (`nbd://...`, see [`crate::nbd`]).
    Nbd(Box<crate::nbd::Client>),
}

#[derive(Debug)]
pub struct Storage {
    backend: Backend,
    path: PathBuf,
    writable: bool,
    /// cache=unsafe: flushes are not passed to the host (a crash may lose
    /// or damage the image; for throw-away targets such as convert's).
    no_flush: std::sync::atomic::AtomicBool,
    /// The same file opened with O_DIRECT, when guest data bypasses the
    /// page cache (a block daemon's `--direct`): guest data the engine
    /// writes itself (copy-on-write fill, synchronous writes) goes through
    /// it too, so no page is written both ways (see `write_data_at`).
    direct: std::sync::OnceLock<File>,
    /// Fault injection (qemu-img's blkdebug), when set.
    faults: std::sync::OnceLock<std::sync::Arc<dyn Faults>>,
    /// QEMU's lock bytes were taken ([`Storage::open_locked`]): released
    /// explicitly when dropped (see `Drop`).
    locked: std::sync::atomic::AtomicBool,
}

/// The kinds of I/O a fault rule may fail (blkdebug's iotypes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
}

/// Fault injection under the engine, as QEMU's blkdebug driver: told of
/// the engine's debug events (QEMU's BLKDBG event names) and asked before
/// each I/O whether it fails, and with which errno.
pub trait Faults: Send + Sync + std::fmt::Debug {
    fn event(&self, name: &str);
    fn check(&self, kind: IoKind, off: u64, len: u64) -> Option<i32>;
    /// An I/O failure the engine carried on after (a leak, as QEMU leaks
    /// there), to report as qemu-img does on stderr.
    fn swallowed(&self, what: &str, err: &crate::error::Error);
}

/// Where failures the engine carried on after go when no fault injector
/// is installed (qemu-img prints them on stderr; a library user may not
/// want them).
static SWALLOWED: std::sync::OnceLock<fn(&str, &crate::error::Error)> = std::sync::OnceLock::new();

/// Sets, once per process, the reporter of failures the engine carried
/// on after (`what` names the step, as QEMU's message does).
pub fn set_swallowed_reporter(f: fn(&str, &crate::error::Error)) {
    let _ = SWALLOWED.set(f);
}

/// Where the engine's lines in QEMU's error_report form go (a finding
/// printed before the error it leads to, such as a VHDX BAT entry past
/// the file's end); nowhere until a program sets it.
static REPORT: std::sync::OnceLock<fn(&str)> = std::sync::OnceLock::new();

/// Sets, once per process, where [`error_report`] lines go (qemu-img
/// prints them as "qemu-img: line").
pub fn set_error_reporter(f: fn(&str)) {
    let _ = REPORT.set(f);
}

/// Reports a line as QEMU's error_report does.
pub(crate) fn error_report(msg: &str) {
    if let Some(r) = REPORT.get() {
        r(msg);
    }
}

/// Alignment of buffers, offsets and lengths for O_DIRECT here.
const DIRECT_ALIGN: u64 = 512;

/// Whether O_DIRECT takes sector-sized (512-byte) I/O at sector offsets
/// on `f` (opened with O_DIRECT): some devices need 4 KiB, and a caller
/// that would then fall back to the page cache must not mix the two on
/// one file.
pub fn check_direct_alignment(f: &File) -> io::Result<()> {
    let mut buf = vec![0u8; 2 * DIRECT_ALIGN as usize];
    let at = buf.as_ptr().align_offset(DIRECT_ALIGN as usize);
    match f.read_at(&mut buf[at..at + DIRECT_ALIGN as usize], 0) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(io::Error::other(
            "O_DIRECT does not take 512-byte aligned I/O on this file system",
        )),
        Err(e) => Err(e),
    }
}

thread_local! {
    /// An aligned buffer for O_DIRECT writes of the engine's own data.
    static DIRECT_BUF: std::cell::RefCell<crate::pagebuf::PageBuf> =
        const { std::cell::RefCell::new(crate::pagebuf::PageBuf::new()) };
}

impl Storage {
    pub fn open(path: &Path, writable: bool) -> Result<Storage> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?;
        if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(Error::Open {
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "is a directory"),
            });
        }
        Ok(Storage::from_file(file, path, writable))
    }

    pub fn from_file(file: File, path: &Path, writable: bool) -> Storage {
        Storage::new(Backend::File(file), path.to_path_buf(), writable)
    }

    fn new(backend: Backend, path: PathBuf, writable: bool) -> Storage {
        Storage {
            backend,
            path,
            writable,
            no_flush: Default::default(),
            direct: Default::default(),
            faults: Default::default(),
            locked: Default::default(),
        }
    }

    /// Whether faults are injected into this file's I/O (blkdebug): then
    /// its data must be read through it, never around it.
    pub fn has_faults(&self) -> bool {
        self.faults.get().is_some()
    }

    /// From now on, I/O here may fail as `f` says (once; later calls are
    /// ignored).
    pub fn set_faults(&self, f: std::sync::Arc<dyn Faults>) {
        let _ = self.faults.set(f);
    }

    /// Tells the fault injector, if any, that the engine reached `name`.
    pub fn debug_event(&self, name: &str) {
        if let Some(f) = self.faults.get() {
            f.event(name);
        }
    }

    /// Reports a failure the engine carried on after, to the fault
    /// injector or else to the process's reporter (see
    /// [`set_swallowed_reporter`]).
    pub fn report_swallowed(&self, what: &str, err: &Error) {
        if let Some(f) = self.faults.get() {
            f.swallowed(what, err);
        } else if let Some(r) = SWALLOWED.get() {
            r(what, err);
        }
    }

    fn injected(&self, kind: IoKind, off: u64, len: usize, what: &str) -> Result<()> {
        match self
            .faults
            .get()
            .and_then(|f| f.check(kind, off, len as u64))
        {
            None => Ok(()),
            Some(errno) => Err(Error::io(
                format!("{what} {len} bytes at {off:#x} of {}", self.path.display()),
                io::Error::from_raw_os_error(errno),
            )),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The host file, unless the bytes are on an NBD server.
    pub fn file(&self) -> Option<&File> {
        match &self.backend {
            Backend::File(f) => Some(f),
            Backend::Nbd(_) => None,
        }
    }

    /// The NBD export the bytes are on, if they are.
    pub fn nbd(&self) -> Option<&crate::nbd::Client> {
        match &self.backend {
            Backend::Nbd(c) => Some(c),
            Backend::File(_) => None,
        }
    }

    /// The descriptor for fcntl, lseek and fallocate; -1 (every such call
    /// fails with EBADF) for an NBD export, whose callers go another way
    /// first.
    fn raw_fd(&self) -> i32 {
        self.file().map_or(-1, |f| f.as_raw_fd())
    }

    /// Connects to the NBD export `name` names (see [`crate::nbd::uri`]).
    /// No locks: NBD has none (the server keeps its own image's).
    pub fn open_nbd(name: &str, writable: bool) -> Result<Storage> {
        let addr = crate::nbd::parse(name).map_err(|e| Error::Open {
            path: name.into(),
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
        let client = crate::nbd::Client::connect(&addr, writable)
            .map_err(|e| Error::Nbd(crate::error::strerror(&e)))?;
        Ok(Storage::new(
            Backend::Nbd(Box::new(client)),
            name.into(),
            writable,
        ))
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Length of the file in bytes.
    #[allow(clippy::len_without_is_empty)] // a file's emptiness is not a question we ask
    pub fn len(&self) -> Result<u64> {
        use std::os::unix::fs::FileTypeExt;
        let file = match &self.backend {
            Backend::File(f) => f,
            Backend::Nbd(c) => return Ok(c.size),
        };
        let md = file
            .metadata()
            .ctx(|| format!("stat {}", self.path.display()))?;
        if !md.file_type().is_block_device() {
            return Ok(md.len());
        }
        // stat gives a block device no size: its end does.
        // SAFETY: lseek on a descriptor this Storage owns; it moves only
        // the file position, which nothing here relies on (all I/O is
        // positioned).
        let end = unsafe { libc::lseek(self.raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(Error::io(
                format!("size of {}", self.path.display()),
                io::Error::last_os_error(),
            ));
        }
        Ok(end as u64)
    }

    /// Bytes the file occupies on disk (st_blocks * 512).
    pub fn allocated_bytes(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let Backend::File(file) = &self.backend else {
            return Err(Error::NotSupportedByFormat(
                "the space an NBD export takes is not known",
            ));
        };
        Ok(file
            .metadata()
            .ctx(|| format!("stat {}", self.path.display()))?
            .blocks()
            * 512)
    }

    /// Whether the file holds data at `off` (false: a hole, or past the
    /// end of the file), and for how many of the `len` bytes from there
    /// (at least one) that stays so; the SEEK_DATA/SEEK_HOLE answer QEMU's
    /// file driver gives. Where the file system cannot tell, all is data.
    pub fn data_at(&self, off: u64, len: u64) -> (bool, u64) {
        self.try_data_at(off, len).unwrap_or((true, len.max(1)))
    }

    /// As [`data_at`](Self::data_at), with an NBD server's failure to
    /// answer as the error it is (a file system that cannot tell is
    /// still all data).
    pub fn try_data_at(&self, off: u64, len: u64) -> Result<(bool, u64)> {
        let len = len.max(1);
        if let Backend::Nbd(c) = &self.backend {
            return match off < c.size {
                true => c
                    .data_at(off, len.min(c.size - off))
                    .ctx(|| format!("block status of {}", self.path.display())),
                false => Ok((false, len)),
            };
        }
        Ok(self.file_data_at(off, len))
    }

    fn file_data_at(&self, off: u64, len: u64) -> (bool, u64) {
        let end = off.saturating_add(len);
        let seek = |whence| {
            let off = i64::try_from(off).ok()?;
            // SAFETY: lseek on a descriptor this Storage owns; it moves
            // only the file position, which nothing here relies on (all
            // I/O is positioned).
            let r = unsafe { libc::lseek(self.raw_fd(), off, whence) };
            Some(if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as u64)
            })
        };
        match seek(libc::SEEK_DATA) {
            // Past any file's end.
            None => (false, len),
            // ENXIO: no data at or after `off`.
            Some(Err(e)) if e.raw_os_error() == Some(libc::ENXIO) => (false, len),
            Some(Ok(d)) if d > off => (false, d.min(end) - off),
            Some(Ok(_)) => match seek(libc::SEEK_HOLE) {
                Some(Ok(h)) if h > off => (true, h.min(end) - off),
                _ => (true, len),
            },
            _ => (true, len),
        }
    }

    /// Reads `buf.len()` bytes at `off`; bytes past the end of the file
    /// read as zeros, as QEMU's file driver returns them.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.injected(IoKind::Read, off, buf.len(), "read")?;
        let file = match &self.backend {
            Backend::File(f) => f,
            Backend::Nbd(c) => {
                // Past the export's end reads as zeros, as past a file's.
                let n = c.size.saturating_sub(off).min(buf.len() as u64) as usize;
                buf[n..].fill(0);
                return c
                    .read(&mut buf[..n], off)
                    .ctx(|| format!("read {n} bytes at {off:#x} from {}", self.path.display()));
            }
        };
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!(
                            "read {} bytes at {off:#x} from {}",
                            buf.len(),
                            self.path.display()
                        ),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.injected(IoKind::Write, off, buf.len(), "write")?;
        let res = match &self.backend {
            Backend::File(f) => f.write_all_at(buf, off),
            Backend::Nbd(c) => c.write(buf, off),
        };
        res.ctx(|| {
            format!(
                "write {} bytes at {off:#x} to {}",
                buf.len(),
                self.path.display()
            )
        })
    }

    /// From now on, guest data the engine writes goes through `f`, this
    /// file opened with O_DIRECT (once; later calls are ignored).
    pub fn set_direct(&self, f: File) {
        let _ = self.direct.set(f);
    }

    /// Writes guest data (not metadata) at `off`. With a direct file set,
    /// through it whenever offset and length are aligned for O_DIRECT
    /// (via an aligned buffer): a page written through the cache while
    /// O_DIRECT writes hit it cannot be invalidated, and the kernel then
    /// fails the next fsync with EIO and may keep stale data.
    pub fn write_data_at(&self, buf: &[u8], off: u64) -> Result<()> {
        let Some(direct) = self.direct.get() else {
            return self.write_at(buf, off);
        };
        if !(off | buf.len() as u64).is_multiple_of(DIRECT_ALIGN) || buf.is_empty() {
            return self.write_at(buf, off);
        }
        DIRECT_BUF.with(|b| {
            let mut b = b.borrow_mut();
            b.resize(buf.len());
            b.copy_from_slice(buf);
            direct.write_all_at(&b, off).ctx(|| {
                format!(
                    "write {} bytes at {off:#x} to {} (O_DIRECT)",
                    buf.len(),
                    self.path.display()
                )
            })
        })
    }

    /// Copies up to `len` bytes at `src_off` in `src` to `off` here inside
    /// the kernel (copy_file_range(2): a reflink where the file system
    /// shares extents, a server-side copy over NFS), without passing them
    /// through this process. Returns the bytes copied (0 past the end of
    /// `src`), or None where this pair of files cannot: an NBD export,
    /// injected faults, a direct file set here (its writes bypass the
    /// page cache such a copy fills), or a kernel, file system or
    /// sandbox that refuses. The caller then copies through memory.
    pub fn copy_range_from(
        &self,
        src: &Storage,
        src_off: u64,
        off: u64,
        len: u64,
    ) -> Result<Option<u64>> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        let (Some(from), Some(to)) = (src.file(), self.file()) else {
            return Ok(None);
        };
        if self.has_faults() || src.has_faults() || self.direct.get().is_some() {
            return Ok(None);
        }
        let mut from_off = src_off as libc::loff_t;
        let mut to_off = off as libc::loff_t;
        loop {
            // SAFETY: both descriptors belong to open Files borrowed for
            // the call; the kernel reads and advances the two offsets we
            // pass by pointer, which live on this stack, and touches no
            // other memory of ours.
            let n = unsafe {
                libc::copy_file_range(
                    from.as_raw_fd(),
                    &mut from_off,
                    to.as_raw_fd(),
                    &mut to_off,
                    len.min(1 << 30) as usize,
                    0,
                )
            };
            if n >= 0 {
                return Ok(Some(n as u64));
            }
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // Any failure, as qemu-img takes any: another file system
            // (EXDEV), one that does not copy, a sandbox that forbids the
            // call (EPERM). A real I/O error shows again on the memory
            // path, in its words.
            return Ok(None);
        }
    }

    /// Zeroes guest data at `off`: as `write_zeroes`, but with a direct
    /// file set and aligned ranges, by writing zeros through it (a file
    /// system zeroes the partial blocks of a zero-range request through
    /// the page cache).
    pub fn write_data_zeroes(&self, off: u64, len: u64) -> Result<()> {
        if self.direct.get().is_none() || !(off | len).is_multiple_of(DIRECT_ALIGN) {
            return self.write_zeroes(off, len);
        }
        crate::pagebuf::zero_pieces(off, len, |z, at| self.write_data_at(z, at))
    }

    /// Zeroes a possibly large range of guest data at `off`: by zeroing
    /// the range in the file system (`write_zeroes`), except, with a
    /// direct file set, its edges outside whole 4 KiB pages, which are
    /// written as zeros through the direct file (see
    /// [`write_data_zeroes`](Self::write_data_zeroes)).
    pub fn zero_data_range(&self, off: u64, len: u64) -> Result<()> {
        const PAGE: u64 = 4096;
        if self.direct.get().is_none() {
            return self.write_zeroes(off, len);
        }
        let end = off + len;
        let a = off.next_multiple_of(PAGE).min(end);
        let b = (end - end % PAGE).max(a);
        if a > off {
            self.write_data_zeroes(off, a - off)?;
        }
        if b > a {
            self.write_zeroes(a, b - a)?;
        }
        if end > b {
            self.write_data_zeroes(b, end - b)?;
        }
        Ok(())
    }

    /// Ignore flushes from now on (QEMU's cache=unsafe).
    pub fn set_no_flush(&self, on: bool) {
        self.no_flush
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> Result<()> {
        if !self.writable || self.no_flush.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        self.injected(IoKind::Flush, 0, 0, "flush")?;
        match &self.backend {
            Backend::File(f) => f.sync_data(),
            Backend::Nbd(c) => c.flush(),
        }
        .ctx(|| format!("fdatasync {}", self.path.display()))
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        match &self.backend {
            Backend::File(f) => f.set_len(len),
            Backend::Nbd(c) if c.size == len => Ok(()),
            Backend::Nbd(_) => Err(io::Error::from_raw_os_error(libc::ENOTSUP)),
        }
        .ctx(|| format!("truncate {} to {len}", self.path.display()))
    }

    /// Deallocates a range, keeping the file size; reads then return zeros.
    /// Falls back to writing zeros where the filesystem cannot punch holes.
    pub fn punch_hole(&self, off: u64, len: u64) -> Result<()> {
        if let Backend::Nbd(c) = &self.backend {
            return c
                .write_zeroes(off, len, true)
                .ctx(|| format!("zero {len} bytes at {off:#x} of {}", self.path.display()));
        }
        if self
            .fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
            .is_ok()
        {
            return Ok(());
        }
        self.write_zeroes(off, len)
    }

    /// Reserves disk space for a range (posix_fallocate semantics).
    pub fn allocate(&self, off: u64, len: u64) -> Result<()> {
        if self.nbd().is_some() {
            // The server decides how its export is provisioned.
            return Ok(());
        }
        self.fallocate(0, off, len).ctx(|| {
            format!(
                "fallocate {len} bytes at {off:#x} in {}",
                self.path.display()
            )
        })
    }

    /// Writes zeros over a range, through a bounded buffer.
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        // A write request to the fault injector, as blkdebug counts it.
        self.injected(
            IoKind::Write,
            off,
            len.min(usize::MAX as u64) as usize,
            "write",
        )?;
        if let Backend::Nbd(c) = &self.backend {
            return c
                .write_zeroes(off, len, false)
                .ctx(|| format!("zero {len} bytes at {off:#x} of {}", self.path.display()));
        }
        if self.fallocate(libc::FALLOC_FL_ZERO_RANGE, off, len).is_ok() {
            return Ok(());
        }
        crate::pagebuf::zero_pieces(off, len, |z, at| self.write_at(z, at))
    }

    fn fallocate(&self, mode: i32, off: u64, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        // SAFETY: fallocate takes a file descriptor we own for the lifetime
        // of `self` and plain integers; it does not touch our memory.
        let r = unsafe { libc::fallocate(self.raw_fd(), mode, off as i64, len as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Turns copy-on-write off for the file (btrfs's NOCOW attribute),
    /// which only works while it is empty. Elsewhere nothing happens: as
    /// QEMU's `nocow`, the option is a hint, and failures are ignored.
    pub fn set_nocow(&self) {
        if !matches!(self.backend, Backend::File(_)) {
            return;
        }
        let mut flags: libc::c_long = 0;
        // SAFETY: FS_IOC_GETFLAGS writes one c_long through the pointer,
        // which points at `flags`, alive for the call; the descriptor is
        // ours for the lifetime of `self`.
        if unsafe { libc::ioctl(self.raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) } != 0 {
            return;
        }
        flags |= FS_NOCOW_FL;
        // SAFETY: FS_IOC_SETFLAGS reads one c_long through the pointer,
        // which points at `flags`, alive for the call.
        let _ = unsafe { libc::ioctl(self.raw_fd(), libc::FS_IOC_SETFLAGS, &flags) };
    }
}

/// The NOCOW file attribute (linux/fs.h, `chattr +C`).
const FS_NOCOW_FL: libc::c_long = 0x0080_0000;

#[cfg(test)]
mod tests {
    use super::*;

    /// With a direct file set, the unaligned edges are written and the
    /// page-aligned middle zeroed in place: the range reads as zeros,
    /// every byte around it is kept. (The test's "direct" file is a plain
    /// one, as tmpfs may refuse O_DIRECT: the split is what is tested.)
    #[test]
    fn zero_data_range_splits_at_pages() {
        let p = std::env::temp_dir().join(format!("rimg-zdr-{}", std::process::id()));
        for (off, len) in [
            (512, 3 * 4096),
            (4096 + 1024, 1024),
            (8192, 4096),
            (0, 4608),
        ] {
            std::fs::write(&p, vec![0xffu8; 5 * 4096]).unwrap();
            let st = Storage::open(&p, true).unwrap();
            st.set_direct(std::fs::OpenOptions::new().write(true).open(&p).unwrap());
            st.zero_data_range(off, len).unwrap();
            let mut all = vec![0u8; 5 * 4096];
            st.read_at(&mut all, 0).unwrap();
            for (k, &x) in all.iter().enumerate() {
                let inside = (off..off + len).contains(&(k as u64));
                assert_eq!(x, if inside { 0 } else { 0xff }, "{off}+{len}: byte {k}");
            }
        }
        let _ = std::fs::remove_file(&p);
    }
}
