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
        // installing more.
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
    // Descriptor checks and duplicates (vhost-user's received fds, the
    // relay's stream clones).
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
