//! Least privilege for the daemons: a seccomp-bpf filter (built with
//! `seccompiler`) that allows only the system calls a daemon makes once it
//! serves guests. The daemons open their image or TAP, bind their socket
//! and start their signal thread first; [`serve`](crate::serve) then
//! installs the filter on every thread of the process (TSYNC), and threads
//! created later (one per queue, the request handler, the relay) inherit
//! it.
//!
//! A syscall outside the list kills the whole process
//! (SECCOMP_RET_KILL_PROCESS, seen by the parent as death by SIGSYS), so a
//! compromised daemon cannot go on, and a syscall missing from a list is a
//! visible failure rather than a silent error path. [`SeccompAction::Log`]
//! lets such calls through and has the kernel log them (audit type 1326 in
//! the kernel log), which is how a list is checked against a new workload.
//!
//! What the filter cannot see: the reads and writes a daemon hands to
//! io_uring run in the kernel on the daemon's behalf without a syscall of
//! their own; the list bounds which files the daemon can have (no open,
//! no socket other than AF_UNIX) rather than what io_uring does with them.
//!
//! The shared part ([`common`]) covers the Rust runtime, threads, the
//! vhost-user protocol (frontend messages with SCM_RIGHTS descriptors,
//! guest memory mappings, epoll and eventfds) and this crate's connection
//! loop and relay; each daemon adds what its data path needs.

use std::collections::BTreeMap;
use std::str::FromStr;

pub use seccompiler::BpfProgram;
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};

/// What happens on a syscall outside the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompAction {
    /// Kill the process (SECCOMP_RET_KILL_PROCESS).
    #[default]
    Kill,
    /// Allow the call and have the kernel log it (SECCOMP_RET_LOG).
    Log,
    /// No filter at all.
    Off,
}

impl FromStr for SeccompAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" | "on" | "true" => Ok(SeccompAction::Kill),
            "log" => Ok(SeccompAction::Log),
            "off" | "false" => Ok(SeccompAction::Off),
            _ => Err(format!("'{s}': expected kill, log or off")),
        }
    }
}

impl std::fmt::Display for SeccompAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SeccompAction::Kill => "kill",
            SeccompAction::Log => "log",
            SeccompAction::Off => "off",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("seccomp filter: {0}")]
    Build(seccompiler::BackendError),
    #[error("cannot install the seccomp filter: {0}")]
    Apply(seccompiler::Error),
}

/// A condition on argument `arg` of a syscall.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// The argument's low 32 bits equal the value (ints, fds, ioctl
    /// requests).
    Eq32(u8, u32),
    /// The full 64-bit argument equals the value (flag words).
    Eq64(u8, u64),
    /// The argument's low 32 bits, masked, equal the value.
    Masked32(u8, u32, u32),
}

impl Arg {
    fn condition(self) -> SeccompCondition {
        let (i, len, op, v) = match self {
            Arg::Eq32(i, v) => (i, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, u64::from(v)),
            Arg::Eq64(i, v) => (i, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, v),
            Arg::Masked32(i, m, v) => (
                i,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(u64::from(m)),
                u64::from(v),
            ),
        };
        SeccompCondition::new(i, len, op, v).expect("syscall argument index is at most 5")
    }
}

/// The syscalls a filter allows: each either with any arguments or only
/// when one of its rules (all of a rule's conditions) holds.
#[derive(Debug, Clone, Default)]
pub struct SyscallList {
    /// None: any arguments.
    calls: BTreeMap<i64, Option<Vec<Vec<Arg>>>>,
}

impl SyscallList {
    pub fn new() -> SyscallList {
        SyscallList::default()
    }

    /// Allows each of `nrs` whatever its arguments.
    pub fn allow(&mut self, nrs: &[libc::c_long]) -> &mut Self {
        for &nr in nrs {
            self.calls.insert(nr, None);
        }
        self
    }

    /// Allows `nr` when all of `conds` hold (several calls for the same
    /// syscall allow it when any of their rules holds).
    pub fn allow_if(&mut self, nr: libc::c_long, conds: &[Arg]) -> &mut Self {
        assert!(!conds.is_empty(), "an argument rule needs a condition");
        match self.calls.entry(nr).or_insert_with(|| Some(Vec::new())) {
            // Already allowed with any arguments.
            None => {}
            Some(rules) => rules.push(conds.to_vec()),
        }
        self
    }

    /// Adds everything `other` allows.
    pub fn extend(&mut self, other: &SyscallList) -> &mut Self {
        for (&nr, rules) in &other.calls {
            match rules {
                None => {
                    self.allow(&[nr]);
                }
                Some(rs) => {
                    for r in rs {
                        self.allow_if(nr, r);
                    }
                }
            }
        }
        self
    }

    /// Number of distinct syscalls allowed (with or without argument
    /// rules).
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Whether `nr` is allowed at least for some arguments.
    pub fn contains(&self, nr: libc::c_long) -> bool {
        self.calls.contains_key(&nr)
    }

    /// The filter programs for `action`, in the order they must be
    /// installed; None for [`SeccompAction::Off`].
    pub fn compile(&self, action: SeccompAction) -> Result<Option<Vec<BpfProgram>>, Error> {
        let mismatch = match action {
            SeccompAction::Off => return Ok(None),
            SeccompAction::Kill => seccompiler::SeccompAction::KillProcess,
            SeccompAction::Log => seccompiler::SeccompAction::Log,
        };
        let arch = std::env::consts::ARCH.try_into().map_err(Error::Build)?;
        let mut rules = BTreeMap::new();
        for (&nr, rs) in &self.calls {
            let v = match rs {
                None => Vec::new(),
                Some(rs) => rs
                    .iter()
                    .map(|r| {
                        SeccompRule::new(r.iter().map(|a| a.condition()).collect())
                            .map_err(Error::Build)
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            rules.insert(nr, v);
        }
        let main = SeccompFilter::new(rules, mismatch, seccompiler::SeccompAction::Allow, arch)
            .map_err(Error::Build)?;
        // clone3 passes its flags in memory, where a filter cannot check
        // them: it fails with ENOSYS, so the C library falls back to
        // clone(2), whose flags the list checks. (The kernel takes the
        // strictest answer of all installed filters.)
        let no_clone3 = SeccompFilter::new(
            [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
            seccompiler::SeccompAction::Allow,
            seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(Error::Build)?;
        // In installation order: the main filter last, since it forbids
        // installing more (but for a thread's own, see `Sandbox`).
        Ok(Some(vec![
            no_clone3.try_into().map_err(Error::Build)?,
            main.try_into().map_err(Error::Build)?,
        ]))
    }

    /// Installs the filter for `action` on every thread of the process;
    /// threads created afterwards inherit it. It cannot be removed.
    pub fn install(&self, action: SeccompAction) -> Result<(), Error> {
        let Some(progs) = self.compile(action)? else {
            return Ok(());
        };
        for p in &progs {
            seccompiler::apply_filter_all_threads(p).map_err(Error::Apply)?;
        }
        Ok(())
    }
}

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
}

/// The vring workers' filter, armed by [`Sandbox::install`].
static VRING_WORKER: std::sync::OnceLock<BpfProgram> = std::sync::OnceLock::new();

impl Sandbox {
    /// Installs the process filter for `action` on every thread and arms
    /// the vring workers' filter. `extra` is added to the process list
    /// (the serving loop's own rules).
    pub fn install(&self, action: SeccompAction, extra: &SyscallList) -> Result<(), Error> {
        let mut process = self.process.clone();
        process.extend(extra);
        if let Some(mut w) = self.vring_worker.compile(action)? {
            // The main program only: the clone3 one is process-wide.
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
            if let Err(err) = seccompiler::apply_filter(p) {
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
    let mut l = SyscallList::new();
    l.allow(&[
        SYS_brk,
        SYS_munmap,
        SYS_mremap,
        SYS_madvise,
        SYS_futex,
        SYS_sched_yield,
        SYS_gettid,
        SYS_exit,
        SYS_exit_group,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
        SYS_getrandom,
        SYS_read,
        SYS_write,
        SYS_close,
        SYS_epoll_wait,
        SYS_epoll_ctl,
        // signal-hook's handler, if a signal lands on this thread.
        SYS_sendto,
        SYS_io_uring_enter,
    ]);
    let no_exec = Arg::Masked32(2, PROT_EXEC as u32, 0);
    l.allow_if(SYS_mmap, &[no_exec]);
    l.allow_if(SYS_mprotect, &[no_exec]);
    // Debug builds check that a descriptor is open before closing it.
    l.allow_if(SYS_fcntl, &[Arg::Eq32(1, F_GETFD as u32)]);
    l
}

/// The clone(2) flags glibc's pthread_create uses: threads only, never a
/// new process.
pub const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

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
    let mut l = SyscallList::new();
    l.allow(&[
        // Memory: the allocator, thread stacks and their guard pages.
        SYS_brk,
        SYS_munmap,
        SYS_mremap,
        SYS_madvise,
        // Threads and their exit. (clone3 is in the list but answered
        // ENOSYS by a second filter, see `compile`; glibc then uses
        // clone, allowed below for threads only.)
        SYS_clone3,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_sigaltstack,
        SYS_sched_getaffinity,
        SYS_futex,
        // signal-hook's handler registry yields while it waits for a
        // signal delivery in progress.
        SYS_sched_yield,
        SYS_gettid,
        SYS_exit,
        SYS_exit_group,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_getrandom,
        // Descriptors: eventfds, logs, frontend messages, epoll.
        SYS_read,
        SYS_write,
        SYS_close,
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
        // Each connection's workers get their own io_uring.
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
    ]);
    // Never an executable mapping: guest memory (shared, from the
    // frontend's descriptors), allocations and stacks are data only.
    let no_exec = Arg::Masked32(2, PROT_EXEC as u32, 0);
    l.allow_if(SYS_mmap, &[no_exec]);
    l.allow_if(SYS_mprotect, &[no_exec]);
    l.allow_if(SYS_clone, &[Arg::Eq64(0, THREAD_CLONE_FLAGS)]);
    // The relay's connection to the handler, and the signal thread's
    // wake-up of a pending accept: UNIX sockets only.
    l.allow_if(SYS_socket, &[Arg::Eq32(0, AF_UNIX as u32)]);
    // Naming new threads.
    l.allow_if(SYS_prctl, &[Arg::Eq32(0, PR_SET_NAME as u32)]);
    // Descriptor checks (debug builds check that a descriptor is open
    // before closing it) and duplicates (the relay's stream clones).
    for cmd in [F_GETFD, F_DUPFD_CLOEXEC] {
        l.allow_if(SYS_fcntl, &[Arg::Eq32(1, cmd as u32)]);
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_actions() {
        assert_eq!("kill".parse::<SeccompAction>(), Ok(SeccompAction::Kill));
        assert_eq!("log".parse::<SeccompAction>(), Ok(SeccompAction::Log));
        assert_eq!("off".parse::<SeccompAction>(), Ok(SeccompAction::Off));
        assert_eq!("false".parse::<SeccompAction>(), Ok(SeccompAction::Off));
        assert!("maybe".parse::<SeccompAction>().is_err());
    }

    #[test]
    fn lists_merge_and_compile() {
        let mut a = SyscallList::new();
        a.allow_if(libc::SYS_ioctl, &[Arg::Eq32(1, 1)]);
        let mut b = SyscallList::new();
        b.allow(&[libc::SYS_ioctl, libc::SYS_read]);
        a.extend(&b);
        // An unconditional allow wins over argument rules.
        assert!(a.calls[&libc::SYS_ioctl].is_none());
        a.allow_if(libc::SYS_ioctl, &[Arg::Eq32(1, 2)]);
        assert!(a.calls[&libc::SYS_ioctl].is_none());
        a.allow_if(libc::SYS_write, &[Arg::Eq32(0, 2)]);
        assert_eq!(a.calls[&libc::SYS_write].as_ref().map(Vec::len), Some(1));
        assert_eq!(a.len(), 3);
        assert!(a.compile(SeccompAction::Off).unwrap().is_none());
        let p = common().compile(SeccompAction::Kill).unwrap().unwrap();
        assert_eq!(p.len(), 2);
        assert!(p[1].len() > p[0].len());
    }
}
