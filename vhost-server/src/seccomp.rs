//! Least privilege for the daemons: a seccomp-bpf filter (built with
//! `seccompiler`) that allows only the system calls a daemon makes once it
//! serves guests. The daemons open their image or TAP, bind their socket
//! and start their signal thread first; [`serve`](crate::serve) then
//! installs the filter on every thread of the process (TSYNC), and threads
//! created later (one per queue, the request handler, the relay) inherit
//! it.
//!
//! The lists, their compilation and installation, and the runtime's part
//! of every list ([`runtime`]) live in the `rimg-seccomp` crate, shared
//! with the VMM; this module holds what is particular to the daemons.
//!
//! What the filter cannot see: the operations a daemon hands to io_uring
//! run in the kernel on the daemon's behalf without a syscall of their
//! own. Each worker ring is therefore restricted to its own opcodes when
//! it is created ([`crate::uring`]); the list bounds which files the
//! daemon can have (no open, no socket other than AF_UNIX).
//!
//! The daemons' shared part ([`common`]) covers the runtime, threads, the
//! vhost-user protocol (frontend messages with SCM_RIGHTS descriptors,
//! guest memory mappings, epoll and eventfds) and this crate's connection
//! loop and relay; each daemon adds what its data path needs.

pub use rimg_seccomp::{
    install_on_current_thread, runtime, Arg, BpfProgram, Error, RunAs, SeccompAction, SyscallList,
    THREAD_CLONE_FLAGS,
};

/// A daemon's two filters: one for the whole process, installed by
/// [`Sandbox::install`], and a narrower one that each vring worker thread
/// (the threads that read guest rings and guest memory, the most exposed
/// code) adds for itself through [`enter_vring_worker`] before it first
/// touches a ring. The kernel applies both to such a thread: no sockets,
/// no new threads, no new io_uring, no descriptors received there.
#[derive(Debug, Clone, Default)]
pub struct Sandbox {
    pub process: SyscallList,
    pub vring_worker: SyscallList,
    /// The user to become before the filters go in (`--user`).
    pub run_as: Option<rimg_seccomp::RunAs>,
}

/// The vring workers' filter, armed by [`Sandbox::install`].
static VRING_WORKER: std::sync::OnceLock<BpfProgram> = std::sync::OnceLock::new();

/// What only the process filter allows, never a vring worker's: a
/// worker receives no descriptors, creates no sockets, threads or rings.
pub const PROCESS_ONLY: [libc::c_long; 4] = [
    libc::SYS_recvmsg,
    libc::SYS_socket,
    libc::SYS_clone,
    libc::SYS_io_uring_setup,
];

impl Sandbox {
    /// The daemons' shared lists ([`common`] for the process,
    /// [`vring_worker_common`] for the workers), for a daemon to extend
    /// with what its data path needs.
    pub fn daemon() -> Sandbox {
        Sandbox {
            process: common(),
            vring_worker: vring_worker_common(),
            run_as: None,
        }
    }

    /// Installs the process filter for `action` on every thread and arms
    /// the vring workers' filter. `extra` is added to the process list
    /// (the serving loop's own rules).
    pub fn install(&self, action: SeccompAction, extra: &SyscallList) -> Result<(), Error> {
        let mut process = self.process.clone();
        process.extend(extra);
        if let Some(mut w) = self.vring_worker.compile(action)? {
            // The main program only: the errno answers are the process's
            // programs', which must then cover the workers' own.
            if !process.denies_all_of(&self.vring_worker) {
                return Err(Error::WorkerDenials);
            }
            let main = w.pop().expect("compile returns the main program last");
            let _ = VRING_WORKER.set(main);
            // What a worker needs to install its filter: seccomp(2) in
            // filter mode (which can only narrow what a thread may do) and
            // the no_new_privs flag it requires.
            process.allow_if(
                libc::SYS_seccomp,
                &[Arg::Eq32(0, libc::SECCOMP_SET_MODE_FILTER), Arg::Eq32(1, 0)],
            );
            process.allow_if(
                libc::SYS_prctl,
                &[Arg::Eq32(0, libc::PR_SET_NO_NEW_PRIVS as u32)],
            );
        }
        process.install(action)
    }
}

/// Called by a vring worker thread before it handles an event: installs
/// the vring workers' filter on this thread, once (no-op without a
/// filter).
pub fn enter_vring_worker() {
    thread_local!(static ENTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    let Some(p) = VRING_WORKER.get() else {
        return;
    };
    ENTERED.with(|e| {
        if !e.replace(true) {
            if let Err(err) = install_on_current_thread(p) {
                log::error!("vring worker seccomp filter: {err}");
            }
        }
    });
}

/// What a vring worker does once it serves a ring: wait for kicks and
/// completions (epoll, eventfds), submit to its io_uring, copy between
/// guest memory and its buffers, allocate, log, take signals, exit.
pub fn vring_worker_common() -> SyscallList {
    use libc::*;
    let mut l = runtime();
    l.allow(&[
        SYS_epoll_wait,
        SYS_epoll_ctl,
        // signal-hook's handler, if a signal lands on this thread.
        SYS_sendto,
        SYS_io_uring_enter,
    ]);
    l.allow_if(SYS_fcntl, &[Arg::Eq32(1, F_OFD_SETLK as u32)]);
    l
}

/// What both daemons need once serving: the Rust runtime and its threads,
/// logging to stderr, signals, the vhost-user connection (messages with
/// descriptors, guest memory mappings, epoll, eventfds, io_uring set-up
/// for each connection's workers) and the connection loop's relay.
///
/// Measured: the daemons' whole test suite (libblkio, DPDK testpmd and
/// Linux guests as frontends, hostile rings, reconnects, SIGTERM) under
/// `strace -f` attached once a daemon printed its "serving" line, then
/// again with [`SeccompAction::Log`] and the kernel's audit records (no
/// ptrace timing). Only `mremap` (the allocator growing a large block in
/// place) is here without having been seen.
pub fn common() -> SyscallList {
    use libc::*;
    // The runtime: memory, futexes, descriptors, signals, exit.
    let mut l = runtime();
    l.allow(&[
        // Threads (clone3 is answered ENOSYS below). signal-hook's
        // handler registry yields (sched_yield) while it waits for a
        // signal delivery in progress; a new thread's start-up asks for
        // its CPU affinity (sched_getaffinity, in the runtime's part).
        SYS_set_robust_list,
        SYS_rseq,
        // Descriptors: eventfds, frontend messages, epoll.
        SYS_eventfd2,
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_recvfrom,
        SYS_sendto,
        SYS_accept4,
        SYS_connect,
        SYS_shutdown,
        // The control socket's idle clients are found with poll.
        SYS_poll,
        // Each connection's workers get their own io_uring.
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
    ]);
    // clone3 passes its flags in memory, where a filter cannot check
    // them: it fails with ENOSYS, so the C library falls back to
    // clone(2), allowed for threads only.
    l.deny_with(&[SYS_clone3], ENOSYS);
    l.allow_if(SYS_clone, &[Arg::Eq64(0, THREAD_CLONE_FLAGS)]);
    // The relay's connection to the handler: UNIX sockets only.
    l.allow_if(SYS_socket, &[Arg::Eq32(0, AF_UNIX as u32)]);
    // Naming new threads.
    l.allow_if(SYS_prctl, &[Arg::Eq32(0, PR_SET_NAME as u32)]);
    // The vhost crate checks that SET_BACKEND_REQ_FD's descriptor is a
    // UNIX stream socket (SO_DOMAIN, SO_TYPE).
    l.allow_if(SYS_getsockopt, &[Arg::Eq32(1, SOL_SOCKET as u32)]);
    // Duplicates (the relay's stream clones); `runtime` has F_GETFD.
    l.allow_if(SYS_fcntl, &[Arg::Eq32(1, F_DUPFD_CLOEXEC as u32)]);
    // An image closed on any thread (the last reference to it may be a
    // worker's) lets go of its lock bytes (qcow2's `Storage`).
    l.allow_if(SYS_fcntl, &[Arg::Eq32(1, F_OFD_SETLK as u32)]);
    l
}

/// What the relay needs to serve inflight regions
/// ([`crate::inflight`]), for a daemon that offers them: a sealed memfd
/// for GET_INFLIGHT_FD (sized with ftruncate), and for SET_INFLIGHT_FD
/// the seals and the length of the frontend's file (statx on the
/// descriptor, as `File::metadata` asks). Mapping it is the runtime's
/// `mmap`.
pub fn inflight_region() -> SyscallList {
    use libc::*;
    let mut l = SyscallList::new();
    l.allow_if(
        SYS_memfd_create,
        &[Arg::Eq32(1, MFD_CLOEXEC | MFD_ALLOW_SEALING)],
    );
    l.allow(&[SYS_ftruncate]);
    l.allow_if(SYS_fcntl, &[Arg::Eq32(1, F_ADD_SEALS as u32)]);
    l.allow_if(SYS_fcntl, &[Arg::Eq32(1, F_GET_SEALS as u32)]);
    l.allow_if(SYS_statx, &[Arg::Eq32(2, AT_EMPTY_PATH as u32)]);
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_lists_build_on_the_runtime() {
        let (c, w, r) = (common(), vring_worker_common(), runtime());
        assert_eq!((c.len(), w.len(), r.len()), (43, 26, 22));
        // openat, open and getcwd (EACCES) everywhere, clone3 (ENOSYS) where
        // threads are created.
        assert_eq!((c.denied_len(), w.denied_len(), r.denied_len()), (4, 3, 3));
        assert_eq!(c.denied(libc::SYS_clone3), Some(libc::ENOSYS));
        assert!(!c.contains(libc::SYS_clone3) && !c.contains(libc::SYS_openat));
        assert!(c.denies_all_of(&w));
        for nr in [libc::SYS_futex, libc::SYS_mmap, libc::SYS_fcntl] {
            assert!(c.contains(nr) && w.contains(nr), "{nr}");
        }
        // fcntl: F_GETFD from the runtime, F_DUPFD_CLOEXEC for the relay,
        // F_OFD_SETLK for closing an image (its lock bytes).
        assert_eq!((c.rules(libc::SYS_fcntl), w.rules(libc::SYS_fcntl)), (3, 2));
        for nr in PROCESS_ONLY {
            assert!(c.contains(nr) && !w.contains(nr), "{nr}");
        }
        let i = inflight_region();
        assert_eq!((i.len(), i.rules(libc::SYS_fcntl)), (4, 2));
        assert!(!i.contains(libc::SYS_openat));
        // ENOSYS, EACCES, the list.
        let p = common().compile(SeccompAction::Kill).unwrap().unwrap();
        assert_eq!(p.len(), 3);
    }
}
