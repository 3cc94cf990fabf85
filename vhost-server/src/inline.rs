//! Buffered writes, and reads from tmpfs ([`reads_here`]), made at once
//! by the worker thread instead of through the ring.
//!
//! io_uring hands a buffered write that cannot complete without blocking
//! to its io-wq threads. On ext4 that is every buffered write (it has no
//! nonblocking ones: RWF_NOWAIT fails with EOPNOTSUPP), on XFS every one
//! that meets another writer of the file at its inode lock (taken with a
//! trylock: EAGAIN), which two queues writing one image do all the time.
//! A 4 KiB write then costs a thread hand-off there and a completion
//! wake-up back, and the io-wq threads contend for the lock in turn:
//! about a third of the writes per second a plain `pwritev` loop makes on
//! ext4, and on XFS over 2 queues (2 cores, QD32) 318k IOPS against the
//! client's own io_uring's 794k, where writing here made 713k. So the
//! worker writes itself, blocking, as qemu-storage-daemon's thread pool
//! does. With O_DIRECT nothing changes: those writes go to the device,
//! where the ring's asynchrony pays. (rimg-nbd still gives writes over
//! 64 KiB to the ring: its connection reads the next requests meanwhile.)

use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// Writes the `n` bytes that `iov` describes at `off` of `fd`, all of
/// them (a short write is carried on).
///
/// # Safety
/// Every iovec must describe memory readable for the whole call.
pub unsafe fn write(fd: RawFd, iov: &[libc::iovec], off: u64, n: u64) -> io::Result<()> {
    // pwritev2, not pwritev: the call the daemons' seccomp lists allow.
    // SAFETY: the iovecs describe readable memory (this function's
    // contract), advanced past what was written only.
    let done = transfer(iov, off, n, |v, at| unsafe {
        libc::pwritev2(fd, v.as_ptr(), v.len() as i32, at, 0)
    })?;
    match done < n {
        true => Err(io::Error::from(io::ErrorKind::WriteZero)),
        false => Ok(()),
    }
}

/// Whether reads of `file` are made here too: a regular file on a file
/// system that keeps files in memory, where a read rarely waits (for
/// swap only), and has no nonblocking reads (tmpfs: RWF_NOWAIT fails
/// with EOPNOTSUPP), so that io_uring would hand every read to io-wq
/// (2 cores, QD32: 293k IOPS there against ext4's 1.07M from its page
/// cache). Not a device node: /dev is devtmpfs, which says tmpfs too.
pub fn reads_here(file: &std::fs::File) -> bool {
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return false;
    }
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills the statfs it is given (on success only, when
    // it is read) and keeps no pointer; the descriptor is `file`'s.
    if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstatfs succeeded: it filled `st`.
    let st = unsafe { st.assume_init() };
    st.f_type == libc::TMPFS_MAGIC
}

/// Reads at most `n` bytes at `off` of `fd` into the memory `iov`
/// describes; returns how many, fewer only at the end of the file.
///
/// # Safety
/// Every iovec must describe memory writable for the whole call.
pub unsafe fn read(fd: RawFd, iov: &[libc::iovec], off: u64, n: u64) -> io::Result<u64> {
    // preadv2: the call rimg-vhost-blk's seccomp lists allow.
    // SAFETY: the iovecs describe writable memory (this function's
    // contract), advanced past what was read only.
    transfer(iov, off, n, |v, at| unsafe {
        libc::preadv2(fd, v.as_ptr(), v.len() as i32, at, 0)
    })
}

/// Moves up to `n` bytes with `call` (on the iovecs not done yet, at
/// the file offset of the next byte) until all are moved or a call moves
/// none; returns how many were. EINTR is retried.
fn transfer(
    iov: &[libc::iovec],
    off: u64,
    n: u64,
    call: impl Fn(&[libc::iovec], i64) -> isize,
) -> io::Result<u64> {
    let mut iov = iov.to_vec();
    let mut done = 0u64;
    while done < n {
        let r = call(&iov, (off + done) as i64);
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            break;
        }
        done += r as u64;
        advance(&mut iov, r as usize);
    }
    Ok(done)
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

    #[test]
    fn advance_stops_on_a_buffer_boundary() {
        let (a, b) = ([1u8; 4], [2u8; 6]);
        let mut v = vec![iov(&a), iov(&b)];
        advance(&mut v, 4);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].iov_len, 6);
        assert_eq!(v[0].iov_base as usize, b.as_ptr() as usize);
    }

    #[test]
    fn a_failed_write_is_an_error() {
        let path = std::env::temp_dir().join(format!("rimg-inline-ro-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let a = [0u8; 512];
        // SAFETY: the iovec points into `a`, alive here.
        let r = unsafe { write(f.as_raw_fd(), &[iov(&a)], 0, 512) };
        std::fs::remove_file(&path).unwrap();
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
    }

    /// A device node on devtmpfs (which reports tmpfs's magic) is not
    /// read here: its reads may wait for a disk.
    #[test]
    fn device_nodes_are_not_read_here() {
        assert!(!reads_here(&std::fs::File::open("/dev/null").unwrap()));
    }

    #[test]
    fn reads_stop_at_the_end_of_the_file() {
        let path = std::env::temp_dir().join(format!("rimg-inline-rd-{}", std::process::id()));
        let data: Vec<u8> = (0..6000u32).map(|i| i as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let (mut a, mut b) = (vec![0u8; 3000], vec![0u8; 5192]);
        let v = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: the iovecs point into `a` and `b`, alive and not
        // otherwise used during the call.
        let got = unsafe { read(f.as_raw_fd(), &v, 0, 8192) }.unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(got, 6000);
        assert_eq!(a, data[..3000]);
        assert_eq!(b[..3000], data[3000..]);
    }

    /// A real file: every byte lands, across buffers and calls.
    #[test]
    fn writes_land() {
        let path = std::env::temp_dir().join(format!("rimg-inline-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        let (a, b) = (vec![0x11u8; 3000], vec![0x22u8; 5192]);
        for round in 0..2u64 {
            // SAFETY: the iovecs point into `a` and `b`, alive here.
            unsafe { write(f.as_raw_fd(), &[iov(&a), iov(&b)], round * 8192, 8192) }.unwrap();
        }
        let got = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(got.len(), 16384);
        for at in [0, 8192] {
            assert_eq!(&got[at..at + 3000], &a[..]);
            assert_eq!(&got[at + 3000..at + 8192], &b[..]);
        }
    }
}
