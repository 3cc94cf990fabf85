//! The block daemon's seccomp filters: the shared loop's syscalls
//! ([`rimg_vhost_server::seccomp::common`]) plus the image engine's
//! (positioned I/O for metadata and bounce buffers, flushes, discards and
//! zeroing through fallocate), which the vring workers need too.

use rimg_vhost_server::seccomp::{self, Arg, Sandbox};

/// What the image engine calls from any thread (guest data itself goes
/// through io_uring, except buffered writes and reads from tmpfs, which
/// the workers make themselves, and an encrypted image's, which the
/// engine reads and writes with the same positioned I/O).
const IMAGE_IO: [libc::c_long; 6] = [
    // Metadata, bounce-buffer and encrypted-data I/O.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    // Buffered guest writes made by the worker itself, and reads from
    // tmpfs (rimg_vhost_server::inline).
    libc::SYS_pwritev2,
    libc::SYS_preadv2,
    // FLUSH.
    libc::SYS_fdatasync,
    // DISCARD and WRITE_ZEROES (punch hole, zero range).
    libc::SYS_fallocate,
];

/// Everything `rimg-vhost-blk` may call once it serves guests, and what
/// its vring workers may. With `nbd`, an image of the chain is on an NBD
/// server (a backing file named by an NBD URL): the workers read it (and
/// copy-on-write fills from it) on the connection opened at start-up, so
/// they may receive and send on sockets they already have.
pub fn sandbox(nbd: bool) -> Sandbox {
    let mut s = Sandbox::daemon();
    s.process.allow(&IMAGE_IO);
    s.vring_worker.allow(&IMAGE_IO);
    if nbd {
        s.vring_worker
            .allow(&[libc::SYS_recvfrom, libc::SYS_sendto]);
    }
    // The control socket's `resize` (a raw or LUKS file, or a data
    // file, grows by truncation; a data file's length is read with
    // statx on its descriptor: AT_EMPTY_PATH, the flags std passes);
    // never from a vring worker.
    s.process.allow(&[libc::SYS_ftruncate]);
    // The control thread's `checksum` asks block status (SEEK_DATA,
    // SEEK_HOLE) to skip holes; the queues never do.
    s.process.allow(&[libc::SYS_lseek]);
    s.process
        .allow_if(libc::SYS_statx, &[Arg::Eq32(2, libc::AT_EMPTY_PATH as u32)]);
    // The relay's GET/SET_INFLIGHT_FD (inflight tracking).
    s.process.extend(&seccomp::inflight_region());
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rimg_vhost_server::seccomp::PROCESS_ONLY;

    #[test]
    fn lists() {
        let s = sandbox(false);
        assert!(!s.vring_worker.contains(libc::SYS_recvfrom));
        assert!(sandbox(true).vring_worker.contains(libc::SYS_sendto));
        for nr in [
            libc::SYS_fallocate,
            libc::SYS_fdatasync,
            libc::SYS_io_uring_enter,
        ] {
            assert!(s.process.contains(nr), "{nr}");
            assert!(s.vring_worker.contains(nr), "{nr}");
        }
        for nr in [
            libc::SYS_openat,
            libc::SYS_ioctl,
            libc::SYS_execve,
            libc::SYS_ptrace,
        ] {
            assert!(!s.process.contains(nr), "{nr}");
        }
        for nr in PROCESS_ONLY {
            assert!(s.process.contains(nr), "{nr}");
            assert!(!s.vring_worker.contains(nr), "{nr}");
        }
        // The serving loop adds unlinkat (the socket's directory only),
        // and seccomp and prctl(PR_SET_NO_NEW_PRIVS) for the workers'
        // own filter.
        assert!(s.process.contains(libc::SYS_ftruncate));
        assert!(s.process.contains(libc::SYS_statx));
        assert!(!s.vring_worker.contains(libc::SYS_ftruncate));
        // memfd_create for inflight regions (exact flags), never from a
        // vring worker.
        assert!(s.process.contains(libc::SYS_memfd_create));
        assert!(!s.vring_worker.contains(libc::SYS_memfd_create));
        assert!(s.process.contains(libc::SYS_lseek));
        assert!(!s.vring_worker.contains(libc::SYS_lseek));
        // Buffered writes and tmpfs reads, made by the workers.
        assert!(s.vring_worker.contains(libc::SYS_pwritev2));
        assert!(s.vring_worker.contains(libc::SYS_preadv2));
        assert_eq!((s.process.len(), s.vring_worker.len()), (53, 32));
    }
}
