//! The net daemon's seccomp filter: the shared loop's syscalls
//! ([`rimg_vhost_server::seccomp::common`]) plus the two TAP ioctls a
//! connection uses (frames themselves cross the TAP through io_uring).

use rimg_vhost_server::seccomp::{self, Arg, SyscallList};

/// Everything `rimg-vhost-net` may call once it serves guests.
pub fn syscalls() -> SyscallList {
    use libc::*;
    let mut l = seccomp::common();
    // Offloads from the guest's features; queue attach/detach when the
    // guest changes the number of active pairs. No other ioctl.
    for req in [TUNSETOFFLOAD, TUNSETQUEUE] {
        l.allow_if(SYS_ioctl, &[Arg::Eq32(1, req as u32)]);
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list() {
        let l = syscalls();
        for nr in [libc::SYS_ioctl, libc::SYS_io_uring_enter, libc::SYS_recvmsg] {
            assert!(l.contains(nr), "{nr}");
        }
        for nr in [libc::SYS_openat, libc::SYS_fallocate, libc::SYS_execve] {
            assert!(!l.contains(nr), "{nr}");
        }
        // The serving loop adds unlinkat (the socket's directory only).
        assert_eq!(l.len(), 41);
    }
}
