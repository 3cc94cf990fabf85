//! QEMU's image locks on a host file: the lock bytes QEMU's file driver
//! takes (block/file-posix.c), so that rimg, qemu-img, qemu-storage-daemon
//! and QEMU exclude each other as they exclude themselves.

use std::fs::File;
use std::path::Path;

use super::Storage;

use crate::error::{Error, Result};

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
        let regular = st
            .file()
            .is_some_and(|f| f.metadata().is_ok_and(|m| m.is_file()));
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
        unsafe { libc::fcntl(self.raw_fd(), libc::F_OFD_SETLK, &fl) };
    }

    /// Takes an exclusive OFD lock on one byte, waiting up to about 200 ms
    /// for a holder to let go (an opener stopped inside its check must not
    /// hold everyone else up). False when it was not taken: busy for that
    /// long, or no locks on this file system.
    fn ofd_lock_briefly(&self, byte: i64) -> bool {
        let fl = Self::flock(libc::F_WRLCK, byte);
        for _ in 0..200 {
            // SAFETY: as in `ofd_lock`.
            let r = unsafe { libc::fcntl(self.raw_fd(), libc::F_OFD_SETLK, &fl) };
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
        let r = unsafe { libc::fcntl(self.raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        r == 0 && fl.l_type != libc::F_UNLCK as i16
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
            unsafe { libc::fcntl(self.raw_fd(), libc::F_OFD_SETLK, &fl) };
        }
    }
}
