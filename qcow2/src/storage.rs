//! The host file under an image: positioned I/O that is safe to call from
//! several threads at once (pread/pwrite take `&self`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

#[derive(Debug)]
pub struct Storage {
    file: File,
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

impl Drop for Storage {
    /// Lets go of the lock bytes before the descriptor closes. Closing
    /// alone releases them only with the last reference to the open file,
    /// and a child process forked by another thread holds one until it
    /// executes its program: another program opening the image right after
    /// this one closed it (a script's next command, a test's qemu-img
    /// check) would find it still locked.
    fn drop(&mut self) {
        if self.locked.load(std::sync::atomic::Ordering::Relaxed) {
            let mut fl = Self::flock(libc::F_UNLCK, lockbytes::ARBITER);
            fl.l_len = lockbytes::SHARED_BASE + 100 - lockbytes::ARBITER;
            // SAFETY: fcntl reads the flock struct we pass; the descriptor
            // is still open (it closes after this).
            unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        }
    }
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
    static DIRECT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// QEMU's lock bytes (block/file-posix.c): a process holding permission
/// `i` keeps a shared lock on byte 100 + i; one that does not let others
/// have permission `i` keeps a shared lock on byte 200 + i. Permission bits:
/// 0 consistent read, 1 write, 2 write unchanged, 3 resize.
mod lockbytes {
    pub const PERM_BASE: i64 = 100;
    pub const SHARED_BASE: i64 = 200;
    pub const CONSISTENT_READ: i64 = 0;
    pub const WRITE: i64 = 1;
    pub const RESIZE: i64 = 3;
    /// rimg's own byte, below QEMU's ranges: held exclusively while a
    /// writer takes and checks its lock bytes, so rimg writers do that one
    /// at a time and never tie with each other.
    pub const ARBITER: i64 = 99;
    pub fn name(bit: i64) -> &'static str {
        match bit {
            0 => "consistent read",
            1 => "write",
            2 => "write unchanged",
            _ => "resize",
        }
    }
}

/// What an opener takes the image for, and what it lets others do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Write,
    Read,
    ReadSharingWrite,
}

impl Access {
    fn from_writable(writable: bool) -> Access {
        match writable {
            true => Access::Write,
            false => Access::Read,
        }
    }
}

impl Storage {
    /// Opens an image file and takes QEMU-compatible locks: writers hold
    /// read/write/resize and share neither write nor resize; readers hold
    /// consistent read and do not share write. So rimg, qemu-img,
    /// qemu-storage-daemon and QEMU exclude each other as they exclude
    /// themselves. `force_share` (qemu-img's -U) takes no locks.
    pub fn open_locked(path: &Path, writable: bool, force_share: bool) -> Result<Storage> {
        let st = Storage::open(path, writable)?;
        if !force_share {
            st.lock(Access::from_writable(writable))?;
            st.locked.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(st)
    }

    /// Opens `path` to make a new image in, created if need be, and takes
    /// the write lock before emptying it (as QEMU's file layer does): an
    /// image another process uses, or the source of the same command, is
    /// refused, never truncated.
    pub fn create_locked(path: &Path) -> Result<Storage> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let st = Storage::from_file(file, path, true);
        st.lock(Access::Write)?;
        st.locked.store(true, std::sync::atomic::Ordering::Relaxed);
        // A device keeps its size (QEMU's host_device is not truncated).
        let regular = st.file.metadata().is_ok_and(|m| m.is_file());
        if regular {
            st.set_len(0)?;
        }
        Ok(st)
    }

    /// Takes the lock bytes, then looks for conflicting ones, as QEMU
    /// does (raw_apply_lock_bytes, then raw_check_lock_bytes). Looking
    /// first would let two openers racing each other both pass before
    /// either had taken its bytes; this way at most one of them does.
    /// Two openers that take their bytes at the same instant both see a
    /// conflict and let go, and QEMU then fails both. rimg writers take
    /// and check one at a time (the ARBITER byte, an exclusive lock, which
    /// needs a writable descriptor), so they never tie with each other;
    /// against any other opener that tied with us (QEMU gives up at once)
    /// we try again a few times after random pauses growing from about 1
    /// to 32 ms. So of racing writers with rimg among them, exactly one
    /// wins. An image really in use still fails, some 50 ms later.
    fn lock(&self, access: Access) -> Result<()> {
        const TRIES: u32 = 8;
        let mut k = 0;
        loop {
            let arbiter = access == Access::Write && self.ofd_lock_briefly(lockbytes::ARBITER);
            let r = self.try_lock(access);
            if arbiter {
                self.ofd_lock(lockbytes::ARBITER, libc::F_UNLCK);
            }
            match r {
                Err(Error::Locked(_)) if k + 1 < TRIES => {
                    use std::hash::{BuildHasher, Hasher};
                    let jitter = std::collections::hash_map::RandomState::new()
                        .build_hasher()
                        .finish();
                    // Random exponential back-off: racers that keep
                    // colliding (a loaded machine preempts one inside its
                    // check) spread out further each time.
                    let span = 1000u64 << k.min(5);
                    std::thread::sleep(std::time::Duration::from_micros(200 + jitter % span));
                    k += 1;
                }
                r => return r,
            }
        }
    }

    fn try_lock(&self, access: Access) -> Result<()> {
        use lockbytes::*;
        let (held, unshared): (&[i64], &[i64]) = match access {
            Access::Write => (&[CONSISTENT_READ, WRITE, RESIZE], &[WRITE, RESIZE]),
            Access::Read => (&[CONSISTENT_READ], &[WRITE]),
            Access::ReadSharingWrite => (&[CONSISTENT_READ], &[]),
        };
        let ours = || {
            let held = held.iter().map(|&b| PERM_BASE + b);
            held.chain(unshared.iter().map(|&b| SHARED_BASE + b))
        };
        for byte in ours() {
            self.ofd_lock(byte, libc::F_RDLCK);
        }
        // Nobody may forbid what we take, nor hold what we forbid.
        let conflict = held
            .iter()
            .find(|&&b| self.lock_held_by_other(SHARED_BASE + b))
            .map(|&b| self.lock_error(b, false))
            .or_else(|| {
                unshared
                    .iter()
                    .find(|&&b| self.lock_held_by_other(PERM_BASE + b))
                    .map(|&b| self.lock_error(b, true))
            });
        if let Some(e) = conflict {
            // Let go at once: the other opener may be checking too.
            for byte in ours() {
                self.ofd_lock(byte, libc::F_UNLCK);
            }
            return Err(e);
        }
        Ok(())
    }

    fn lock_error(&self, bit: i64, shared: bool) -> Error {
        Error::Locked(format!(
            "Failed to get {}\"{}\" lock\nIs another process using the image [{}]?",
            if shared { "shared " } else { "" },
            lockbytes::name(bit),
            self.path.display()
        ))
    }

    fn flock(kind: i32, byte: i64) -> libc::flock {
        // SAFETY: flock is a plain C struct; all-zero is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = byte;
        fl.l_len = 1;
        fl
    }

    /// Takes a shared OFD lock on one byte (`kind` F_RDLCK) or releases
    /// ours (F_UNLCK). Shared locks never conflict with each other, and
    /// failures (filesystems without locks) are ignored, as QEMU's
    /// locking=auto does.
    fn ofd_lock(&self, byte: i64, kind: i32) {
        let fl = Self::flock(kind, byte);
        // SAFETY: fcntl reads the flock struct we pass and owns no memory;
        // the descriptor is ours for the lifetime of `self`.
        unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    }

    /// Takes an exclusive OFD lock on one byte, waiting up to about 200 ms
    /// for a holder to let go (an opener stopped inside its check must not
    /// hold everyone else up). False when it was not taken: busy for that
    /// long, or no locks on this file system.
    fn ofd_lock_briefly(&self, byte: i64) -> bool {
        let fl = Self::flock(libc::F_WRLCK, byte);
        for _ in 0..200 {
            // SAFETY: as in `ofd_lock`.
            let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
            if r == 0 {
                return true;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EACCES) | Some(libc::EINTR) => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                _ => return false,
            }
        }
        false
    }

    /// Whether another open file description holds a lock on `byte`.
    fn lock_held_by_other(&self, byte: i64) -> bool {
        let mut fl = Self::flock(libc::F_WRLCK, byte);
        // SAFETY: as above; F_OFD_GETLK writes into `fl`, which we own.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        r == 0 && fl.l_type != libc::F_UNLCK as i16
    }

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
        Ok(Storage {
            file,
            path: path.to_path_buf(),
            writable,
            no_flush: Default::default(),
            direct: Default::default(),
            faults: Default::default(),
            locked: Default::default(),
        })
    }

    /// A file opened read-only by the caller, locked as a reader as
    /// [`open_locked`](Self::open_locked) locks it; with `share_write`,
    /// others may write it meanwhile (QEMU's data-only children, such as
    /// a VMDK flat extent).
    pub fn from_file_locked(
        file: File,
        path: &Path,
        force_share: bool,
        share_write: bool,
    ) -> Result<Storage> {
        let st = Storage::from_file(file, path, false);
        if !force_share {
            st.lock(match share_write {
                true => Access::ReadSharingWrite,
                false => Access::Read,
            })?;
            st.locked.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(st)
    }

    pub fn from_file(file: File, path: &Path, writable: bool) -> Storage {
        Storage {
            file,
            path: path.to_path_buf(),
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
    pub fn file(&self) -> &File {
        &self.file
    }
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Length of the file in bytes.
    #[allow(clippy::len_without_is_empty)] // a file's emptiness is not a question we ask
    pub fn len(&self) -> Result<u64> {
        use std::os::unix::fs::FileTypeExt;
        let md = self
            .file
            .metadata()
            .ctx(|| format!("stat {}", self.path.display()))?;
        if !md.file_type().is_block_device() {
            return Ok(md.len());
        }
        // stat gives a block device no size: its end does.
        // SAFETY: lseek on a descriptor this Storage owns; it moves only
        // the file position, which nothing here relies on (all I/O is
        // positioned).
        let end = unsafe { libc::lseek(self.file.as_raw_fd(), 0, libc::SEEK_END) };
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
        Ok(self
            .file
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
        let len = len.max(1);
        let end = off.saturating_add(len);
        let seek = |whence| {
            let off = i64::try_from(off).ok()?;
            // SAFETY: lseek on a descriptor this Storage owns; it moves
            // only the file position, which nothing here relies on (all
            // I/O is positioned).
            let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
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
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], off + done as u64) {
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
        self.file.write_all_at(buf, off).ctx(|| {
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
            let need = buf.len() + 4096;
            if b.len() < need {
                b.resize(need, 0);
            }
            let at = b.as_ptr().align_offset(4096);
            b[at..at + buf.len()].copy_from_slice(buf);
            direct.write_all_at(&b[at..at + buf.len()], off).ctx(|| {
                format!(
                    "write {} bytes at {off:#x} to {} (O_DIRECT)",
                    buf.len(),
                    self.path.display()
                )
            })
        })
    }

    /// Zeroes guest data at `off`: as `write_zeroes`, but with a direct
    /// file set and aligned ranges, by writing zeros through it (a file
    /// system zeroes the partial blocks of a zero-range request through
    /// the page cache).
    pub fn write_data_zeroes(&self, off: u64, len: u64) -> Result<()> {
        if self.direct.get().is_none() || !(off | len).is_multiple_of(DIRECT_ALIGN) {
            return self.write_zeroes(off, len);
        }
        let zeros = crate::zero_buf();
        let mut k = 0;
        while k < len {
            let n = (len - k).min(zeros.len() as u64);
            self.write_data_at(&zeros[..n as usize], off + k)?;
            k += n;
        }
        Ok(())
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
        self.file
            .sync_data()
            .ctx(|| format!("fdatasync {}", self.path.display()))
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .ctx(|| format!("truncate {} to {len}", self.path.display()))
    }

    /// Deallocates a range, keeping the file size; reads then return zeros.
    /// Falls back to writing zeros where the filesystem cannot punch holes.
    pub fn punch_hole(&self, off: u64, len: u64) -> Result<()> {
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
        if self.fallocate(libc::FALLOC_FL_ZERO_RANGE, off, len).is_ok() {
            return Ok(());
        }
        let zeros = crate::zero_buf();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], off + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: i32, off: u64, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        // SAFETY: fallocate takes a file descriptor we own for the lifetime
        // of `self` and plain integers; it does not touch our memory.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off as i64, len as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

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
