//! The NBD server's seccomp filter, installed once the images are open
//! and the listener bound (every thread, including those created later
//! for connections): the runtime's list, threads, the sockets it already
//! has, and the engine's file I/O. No open, no socket creation, no exec.

use rimg_seccomp::{runtime, Arg, SyscallList, THREAD_CLONE_FLAGS};

/// Everything `rimg-nbd` calls while it serves.
pub fn sandbox() -> SyscallList {
    use libc::*;
    let mut l = runtime();
    l.allow(&[
        // Threads: one per connection, and the signal thread.
        SYS_set_robust_list,
        SYS_rseq,
        // The accept loop and clients' sockets (std reads and writes TCP
        // with recvfrom and sendto, UNIX sockets with read and write).
        SYS_poll,
        SYS_accept4,
        SYS_recvfrom,
        SYS_sendto,
        SYS_shutdown,
        // The engine: positioned I/O, flushes, zeroing and discards,
        // block status (SEEK_DATA, SEEK_HOLE), growing files.
        SYS_pread64,
        SYS_pwrite64,
        // (And the connections' buffered writes, rimg_vhost_server::inline.)
        SYS_pwritev2,
        SYS_fdatasync,
        SYS_fallocate,
        SYS_lseek,
        SYS_ftruncate,
        // Each connection's io_uring (made after the filter, as its
        // thread starts: see `enter_connection`), and the eventfd that
        // wakes its loop.
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
        SYS_eventfd2,
        // OpenSSL's random generator checks for a fork before it draws
        // (TLS-PSK sessions).
        SYS_getpid,
    ]);
    // What a connection thread needs to narrow its own filter: seccomp(2)
    // in filter mode (which can only take away) and no_new_privs.
    l.allow_if(
        SYS_seccomp,
        &[Arg::Eq32(0, SECCOMP_SET_MODE_FILTER), Arg::Eq32(1, 0)],
    );
    l.allow_if(SYS_prctl, &[Arg::Eq32(0, PR_SET_NO_NEW_PRIVS as u32)]);
    // clone3 passes its flags in memory, where a filter cannot check
    // them: it fails with ENOSYS, and the C library falls back to
    // clone(2), allowed for threads only.
    l.deny_with(&[SYS_clone3], ENOSYS);
    l.allow_if(SYS_clone, &[Arg::Eq64(0, THREAD_CLONE_FLAGS)]);
    l.allow_if(SYS_prctl, &[Arg::Eq32(0, PR_SET_NAME as u32)]);
    // TCP_NODELAY on each client, and the handshake's receive timeout.
    l.allow_if(SYS_setsockopt, &[Arg::Eq32(1, IPPROTO_TCP as u32)]);
    l.allow_if(SYS_setsockopt, &[Arg::Eq32(1, SOL_SOCKET as u32)]);
    // Each connection's clone, kept to shut it down at the end.
    l.allow_if(SYS_fcntl, &[Arg::Eq32(1, F_DUPFD_CLOEXEC as u32)]);
    // An image file's length (statx on its descriptor).
    l.allow_if(SYS_statx, &[Arg::Eq32(2, AT_EMPTY_PATH as u32)]);
    // Images closed at the end let go of their lock bytes.
    l.allow_if(SYS_fcntl, &[Arg::Eq32(1, F_OFD_SETLK as u32)]);
    // The UNIX socket's file is removed at the end, relative to its
    // directory: the server adds that rule with the descriptor.
    l
}

/// The process filter is installed (not `--seccomp off`): connection
/// threads narrow it ([`enter_connection`]).
static CONFINED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records that the process filter is in place (the server, once
/// installed with an action other than `Off`).
pub fn confined() {
    CONFINED.store(true, std::sync::atomic::Ordering::Release);
}

/// What a connection thread gives up before it reads from its client:
/// making io_uring instances and changing them. Operations submitted to a
/// ring are never seen by seccomp, so a thread that could make an
/// unrestricted ring could open files or sockets through it; the
/// connection's own ring is made before this and restricted to its
/// operations (`rimg_vhost_server::uring`). Threads it starts (`--aio
/// threads` workers) inherit this. Nothing without a process filter; an
/// error means the connection must not be served.
pub fn enter_connection() -> Result<(), rimg_seccomp::Error> {
    if !CONFINED.load(std::sync::atomic::Ordering::Acquire) {
        return Ok(());
    }
    let nrs = [libc::SYS_io_uring_setup, libc::SYS_io_uring_register];
    rimg_seccomp::fail_on_current_thread(&nrs, libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_open_no_new_sockets_no_exec() {
        let l = sandbox();
        for nr in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_ioctl,
        ] {
            assert!(!l.contains(nr), "{nr}");
        }
        assert!(l.contains(libc::SYS_accept4) && l.contains(libc::SYS_pwrite64));
        assert!(l.compile(rimg_seccomp::SeccompAction::Kill).is_ok());
        // The README's table counts them.
        assert_eq!((l.len(), l.denied_len()), (46, 4));
    }

    #[test]
    fn a_connection_thread_makes_no_rings_once_entered() {
        std::thread::spawn(|| {
            let before = crate::uring::Ring::new().expect("a ring before");
            enter_connection().unwrap();
            assert!(crate::uring::Ring::new().is_ok(), "not confined: no filter");
            confined();
            enter_connection().unwrap();
            let e = crate::uring::Ring::new().err().expect("no ring after");
            assert_eq!(e.raw_os_error(), Some(libc::EPERM));
            drop(before);
        })
        .join()
        .expect("test thread");
    }
}
