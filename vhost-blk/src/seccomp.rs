//! The block daemon's seccomp filter: the shared loop's syscalls
//! ([`rimg_vhost_server::seccomp::common`]) plus the image engine's
//! (positioned I/O for metadata and bounce buffers, flushes, discards and
//! zeroing through fallocate).

use rimg_vhost_server::seccomp::{self, SyscallList};

/// Everything `rimg-vhost-blk` may call once it serves guests.
pub fn syscalls() -> SyscallList {
    use libc::*;
    let mut l = seccomp::common();
    l.allow(&[
        // Metadata and bounce-buffer I/O (guest data goes through
        // io_uring).
        SYS_pread64,
        SYS_pwrite64,
        // FLUSH.
        SYS_fdatasync,
        // DISCARD and WRITE_ZEROES (punch hole, zero range).
        SYS_fallocate,
    ]);
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list() {
        let l = syscalls();
        for nr in [
            libc::SYS_fallocate,
            libc::SYS_fdatasync,
            libc::SYS_io_uring_enter,
        ] {
            assert!(l.contains(nr), "{nr}");
        }
        for nr in [
            libc::SYS_openat,
            libc::SYS_ioctl,
            libc::SYS_execve,
            libc::SYS_ptrace,
        ] {
            assert!(!l.contains(nr), "{nr}");
        }
        // The serving loop adds unlinkat (the socket's directory only).
        assert_eq!(l.len(), 44);
    }
}
