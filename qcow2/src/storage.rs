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
        Ok(Storage {
            file,
            path: path.to_path_buf(),
            writable,
            no_flush: Default::default(),
        })
    }

    pub fn from_file(file: File, path: &Path, writable: bool) -> Storage {
        Storage {
            file,
            path: path.to_path_buf(),
            writable,
            no_flush: Default::default(),
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
        Ok(self
            .file
            .metadata()
            .ctx(|| format!("stat {}", self.path.display()))?
            .len())
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

    /// Reads `buf.len()` bytes at `off`; bytes past the end of the file
    /// read as zeros, as QEMU's file driver returns them.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
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
        self.file.write_all_at(buf, off).ctx(|| {
            format!(
                "write {} bytes at {off:#x} to {}",
                buf.len(),
                self.path.display()
            )
        })
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
