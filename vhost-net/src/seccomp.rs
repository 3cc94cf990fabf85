//! The net daemon's seccomp filters: the shared loop's syscalls
//! ([`rimg_vhost_server::seccomp::common`]) plus the two TAP ioctls a
//! connection uses (frames themselves cross the TAP through io_uring).

use rimg_vhost_server::seccomp::{Arg, Sandbox};

/// Everything `rimg-vhost-net` may call once it serves guests, and what
/// its vring workers may.
pub fn sandbox() -> Sandbox {
    use libc::*;
    let mut s = Sandbox::daemon();
    // Offloads from the guest's features; queue attach/detach when the
    // guest changes the number of active pairs. No other ioctl.
    for req in [TUNSETOFFLOAD, TUNSETQUEUE] {
        s.process.allow_if(SYS_ioctl, &[Arg::Eq32(1, req as u32)]);
    }
    // A worker attaches and detaches its own TAP queue.
    s.vring_worker
        .allow_if(SYS_ioctl, &[Arg::Eq32(1, TUNSETQUEUE as u32)]);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rimg_vhost_server::seccomp::PROCESS_ONLY;

    #[test]
    fn lists() {
        let s = sandbox();
        for nr in [libc::SYS_ioctl, libc::SYS_io_uring_enter, libc::SYS_recvmsg] {
            assert!(s.process.contains(nr), "{nr}");
        }
        for nr in [libc::SYS_openat, libc::SYS_fallocate, libc::SYS_execve] {
            assert!(!s.process.contains(nr), "{nr}");
        }
        for nr in PROCESS_ONLY {
            assert!(!s.vring_worker.contains(nr), "{nr}");
        }
        // The serving loop adds unlinkat (the socket's directory only),
        // and seccomp and prctl(PR_SET_NO_NEW_PRIVS) for the workers'
        // own filter.
        assert_eq!((s.process.len(), s.vring_worker.len()), (44, 27));
    }
}
