//! Buffered writes made at once from the worker thread instead of through
//! the ring.
//!
//! On a file system without nonblocking buffered writes (ext4: a write
//! with RWF_NOWAIT fails with EOPNOTSUPP) io_uring hands every buffered
//! write to its io-wq threads, one at a time per file, and a 4 KiB write
//! then costs a thread hand-off there and a completion wake-up back: about
//! a third of the writes per second a plain `pwritev` loop makes on the
//! same file. There the worker writes itself (`Mode::Blocking`), as
//! qemu-storage-daemon's thread pool does. Where the file system can
//! write without blocking (XFS), an RWF_NOWAIT attempt completes the write
//! here or, when it would block (EAGAIN), leaves it to the ring
//! (`Mode::NoWait`). The mode is learnt from the first buffered write.
//! With O_DIRECT nothing changes: those writes go to the device, where
//! the ring's asynchrony pays.

use std::io;
use std::os::fd::RawFd;

/// How this worker's buffered writes go (see the module docs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No buffered write made yet.
    #[default]
    Unknown,
    /// The file system writes without blocking when it can.
    NoWait,
    /// It cannot (EOPNOTSUPP): write, blocking.
    Blocking,
}

/// What became of an inline write.
pub enum Inline {
    /// All of it written.
    Done,
    /// Nothing written: it would block; the ring takes it.
    Punt,
    Failed(io::Error),
}

/// Writes the `n` bytes that `iov` describes at `off` of `fd`, as `mode`
/// says, learning the mode on the first call.
///
/// # Safety
/// Every iovec must describe memory readable for the whole call.
pub unsafe fn write(mode: &mut Mode, fd: RawFd, iov: &[libc::iovec], off: u64, n: u64) -> Inline {
    let mut iov = iov.to_vec();
    let mut done = 0u64;
    // The nonblocking attempt failed otherwise than by EAGAIN: this write
    // is made blocking, as the ring would make it.
    let mut retry_blocking = false;
    while done < n {
        let nowait = *mode != Mode::Blocking && done == 0 && !retry_blocking;
        let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
        // SAFETY: the iovecs describe readable memory (this function's
        // contract), advanced past what was written only.
        let r = unsafe {
            libc::pwritev2(
                fd,
                iov.as_ptr(),
                iov.len() as i32,
                (off + done) as i64,
                flags,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) if nowait => {
                    *mode = Mode::Blocking;
                    continue;
                }
                Some(libc::EAGAIN) if nowait => {
                    *mode = Mode::NoWait;
                    return Inline::Punt;
                }
                // A file system may refuse RWF_NOWAIT otherwise (EINVAL
                // where it has FMODE_NOWAIT but no nonblocking buffered
                // writes); the error that counts is the blocking one's.
                _ if nowait => retry_blocking = true,
                _ => return Inline::Failed(e),
            }
        }
        if *mode == Mode::Unknown {
            *mode = Mode::NoWait;
        }
        if r == 0 {
            return Inline::Failed(io::Error::from(io::ErrorKind::WriteZero));
        }
        // A short write: the rest blocking (it is in the page cache's
        // hands already; the ring would serialize it behind others).
        done += r as u64;
        advance(&mut iov, r as usize);
    }
    Inline::Done
}

/// Drops the first `k` bytes from `iov`.
fn advance(iov: &mut Vec<libc::iovec>, mut k: usize) {
    let mut skip = 0;
    for v in iov.iter_mut() {
        if k < v.iov_len {
            // SAFETY: stays within the same buffer (k < its length).
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(k) }.cast();
            v.iov_len -= k;
            break;
        }
        k -= v.iov_len;
        skip += 1;
    }
    iov.drain(..skip);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn iov(b: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }
    }

    #[test]
    fn advance_skips_whole_and_partial_buffers() {
        let (a, b) = ([1u8; 4], [2u8; 6]);
        let mut v = vec![iov(&a), iov(&b)];
        advance(&mut v, 6);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].iov_len, 4);
        assert_eq!(v[0].iov_base as usize, b.as_ptr() as usize + 2);
    }

    /// A real file: the mode is learnt (whatever the file system under
    /// the test directory supports) and every byte lands.
    #[test]
    fn writes_land_whatever_the_mode() {
        let path = std::env::temp_dir().join(format!("rimg-inline-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        let (a, b) = (vec![0x11u8; 3000], vec![0x22u8; 5192]);
        let mut mode = Mode::Unknown;
        let mut written = 0;
        for round in 0..2u64 {
            // SAFETY: the iovecs point into `a` and `b`, alive here.
            let r = unsafe {
                write(
                    &mut mode,
                    f.as_raw_fd(),
                    &[iov(&a), iov(&b)],
                    round * 8192,
                    8192,
                )
            };
            match r {
                Inline::Done => written += 1,
                // Only a file system that writes without blocking may
                // leave a write to the ring.
                Inline::Punt => assert_eq!(mode, Mode::NoWait),
                Inline::Failed(e) => panic!("{e}"),
            }
            assert_ne!(mode, Mode::Unknown);
        }
        let got = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        if mode == Mode::Blocking {
            assert_eq!(written, 2);
        }
        if written == 2 {
            for at in [0, 8192] {
                assert_eq!(&got[at..at + 3000], &a[..]);
                assert_eq!(&got[at + 3000..at + 8192], &b[..]);
            }
        }
    }
}
