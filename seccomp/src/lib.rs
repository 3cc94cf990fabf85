//! Least privilege for rimg's long-running processes (the vhost-user
//! daemons and the VMM): seccomp-bpf filters, built with `seccompiler`,
//! that allow only the system calls a process makes once its setup is
//! done. Each program lists its own calls on top of [`runtime`], what any
//! of its threads does while it runs; this crate compiles and installs
//! the lists.
//!
//! A syscall outside the list kills the whole process
//! (SECCOMP_RET_KILL_PROCESS, seen by the parent as death by SIGSYS), so a
//! compromised process cannot go on, and a syscall missing from a list is
//! a visible failure rather than a silent error path. A few syscalls the
//! C library makes on its own, at moments nobody chooses, and copes with
//! failing (`openat` of a /proc file when malloc first trims a thread
//! arena, `clone3`), are instead answered with an errno without running
//! ([`SyscallList::deny_with`]).
//! [`SeccompAction::Log`] lets such calls through and has the kernel log
//! them (audit type 1326 in the kernel log), which is how a list is
//! checked against a new workload.
//!
//! Before its filter, a daemon can also give up root for a given user
//! ([`user`], the `--user` option).

pub mod user;

use std::collections::BTreeMap;
use std::str::FromStr;

pub use seccompiler::BpfProgram;
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};
pub use user::RunAs;

/// What happens on a syscall outside the list (the `--seccomp` option of
/// the daemons and the VMM).
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
    #[error(
        "seccomp filter: a thread's list answers a syscall with an errno the process's does not"
    )]
    WorkerDenials,
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
    /// The argument's low 32 bits, unsigned, are below the value.
    Lt32(u8, u32),
}

impl Arg {
    fn condition(self) -> Result<SeccompCondition, Error> {
        let (i, len, op, v) = match self {
            Arg::Eq32(i, v) => (i, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, u64::from(v)),
            Arg::Eq64(i, v) => (i, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, v),
            Arg::Masked32(i, m, v) => (
                i,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(u64::from(m)),
                u64::from(v),
            ),
            Arg::Lt32(i, v) => (i, SeccompCmpArgLen::Dword, SeccompCmpOp::Lt, u64::from(v)),
        };
        // An argument index above 5 is refused here.
        SeccompCondition::new(i, len, op, v).map_err(Error::Build)
    }
}

/// The syscalls a filter allows: each either with any arguments or only
/// when one of its rules (all of a rule's conditions) holds; and those it
/// answers with an errno instead of running them, whatever their
/// arguments.
#[derive(Debug, Clone, Default)]
pub struct SyscallList {
    /// None: any arguments.
    calls: BTreeMap<i64, Option<Vec<Vec<Arg>>>>,
    /// Syscall → errno. Wins over `calls`.
    denied: BTreeMap<i64, i32>,
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

    /// Answers each of `nrs` with `errno` (positive, e.g. EACCES) instead
    /// of running it or killing the process: for calls the C library
    /// makes on its own and handles failing. This wins over any `allow`
    /// of the same syscall, in this list or one merged into it.
    pub fn deny_with(&mut self, nrs: &[libc::c_long], errno: i32) -> &mut Self {
        assert!(errno > 0 && errno < 4096, "errno {errno} out of range");
        for &nr in nrs {
            self.denied.insert(nr, errno);
        }
        self
    }

    /// The errno `nr` is answered with, if it is denied.
    pub fn denied(&self, nr: libc::c_long) -> Option<i32> {
        self.denied.get(&nr).copied()
    }

    /// Number of syscalls answered with an errno.
    pub fn denied_len(&self) -> usize {
        self.denied.len()
    }

    /// Whether every syscall `other` answers with an errno is answered
    /// with the same errno here.
    pub fn denies_all_of(&self, other: &SyscallList) -> bool {
        other
            .denied
            .iter()
            .all(|(nr, e)| self.denied.get(nr) == Some(e))
    }

    /// Adds everything `other` allows and denies.
    pub fn extend(&mut self, other: &SyscallList) -> &mut Self {
        for (&nr, &e) in &other.denied {
            self.deny_with(&[nr], e);
        }
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
    /// rules; denied ones not counted).
    pub fn len(&self) -> usize {
        self.calls
            .keys()
            .filter(|nr| !self.denied.contains_key(nr))
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `nr` is allowed (not denied) at least for some arguments.
    pub fn contains(&self, nr: libc::c_long) -> bool {
        self.calls.contains_key(&nr) && !self.denied.contains_key(&nr)
    }

    /// Number of argument rules for `nr` (0 when allowed with any
    /// arguments or not at all).
    pub fn rules(&self, nr: libc::c_long) -> usize {
        self.calls
            .get(&nr)
            .and_then(|r| r.as_ref())
            .map_or(0, Vec::len)
    }

    /// The filter programs for `action`, in the order they must be
    /// installed, the main one (the list) last; None for
    /// [`SeccompAction::Off`].
    ///
    /// With several filters the kernel takes the strictest answer of all
    /// (kill, then errno, then allow), so an errno answer cannot come from
    /// a filter of its own alone: the main program allows the denied
    /// syscalls, whatever their arguments, and one program per errno value
    /// (seccompiler gives a filter a single match action) answers them with
    /// it and allows everything else.
    pub fn compile(&self, action: SeccompAction) -> Result<Option<Vec<BpfProgram>>, Error> {
        let mismatch = match action {
            SeccompAction::Off => return Ok(None),
            SeccompAction::Kill => seccompiler::SeccompAction::KillProcess,
            SeccompAction::Log => seccompiler::SeccompAction::Log,
        };
        let arch = std::env::consts::ARCH.try_into().map_err(Error::Build)?;
        let mut rules = BTreeMap::new();
        for (&nr, rs) in &self.calls {
            if self.denied.contains_key(&nr) {
                continue;
            }
            let v = match rs {
                None => Vec::new(),
                Some(rs) => rs
                    .iter()
                    .map(|r| {
                        let conds = r
                            .iter()
                            .map(|a| a.condition())
                            .collect::<Result<Vec<_>, _>>()?;
                        SeccompRule::new(conds).map_err(Error::Build)
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            rules.insert(nr, v);
        }
        let mut by_errno: BTreeMap<i32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
        for (&nr, &e) in &self.denied {
            rules.insert(nr, Vec::new());
            by_errno.entry(e).or_default().insert(nr, Vec::new());
        }
        let mut progs = Vec::new();
        for (e, denied) in by_errno {
            let f = SeccompFilter::new(
                denied,
                seccompiler::SeccompAction::Allow,
                seccompiler::SeccompAction::Errno(e as u32),
                arch,
            )
            .map_err(Error::Build)?;
            progs.push(f.try_into().map_err(Error::Build)?);
        }
        let main = SeccompFilter::new(rules, mismatch, seccompiler::SeccompAction::Allow, arch)
            .map_err(Error::Build)?;
        // Last: it may forbid installing more.
        progs.push(main.try_into().map_err(Error::Build)?);
        Ok(Some(progs))
    }

    /// Installs the filter for `action` on every thread of the process
    /// (TSYNC); threads created afterwards inherit it. It cannot be
    /// removed.
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

/// Installs one compiled program (from [`SyscallList::compile`]) on the
/// calling thread only: a thread's own, narrower filter on top of the
/// process's.
pub fn install_on_current_thread(prog: &BpfProgram) -> Result<(), Error> {
    seccompiler::apply_filter(prog).map_err(Error::Apply)
}

/// Makes the system calls `nrs` fail with `errno` on the calling thread
/// (and the threads it starts afterwards) only, everything else
/// unchanged: for a thread that gives them up for good (rimg-nbd's
/// connections), and for tests that need a system call to fail for real
/// (an io_uring that cannot be entered any more). It cannot be removed:
/// in a test, run it on a thread of its own.
pub fn fail_on_current_thread(nrs: &[libc::c_long], errno: i32) -> Result<(), Error> {
    let arch = std::env::consts::ARCH.try_into().map_err(Error::Build)?;
    let rules = nrs.iter().map(|&nr| (nr, Vec::new())).collect();
    let f = SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(errno as u32),
        arch,
    )
    .map_err(Error::Build)?;
    let prog: BpfProgram = f.try_into().map_err(Error::Build)?;
    install_on_current_thread(&prog)
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

/// What any thread of a Rust program does while it runs, whatever its
/// job: allocate and free memory (the allocator, stacks and their guard
/// pages; never an executable mapping), wait on and wake futexes (locks,
/// channels, joins), yield, read and write the descriptors it holds and
/// close them, block signals and return from a handler (std's stack
/// overflow handler runs on an alternate stack), draw random numbers
/// (hash map keys), read clocks and exit. Creating threads is not part of
/// it.
///
/// Also what the C library and std do on their own, at any moment of a
/// long run, which a list measured on a test suite may never have seen:
/// - malloc trimming a thread arena for the first time reads
///   /proc/sys/vm/overcommit_memory: `openat` (and `open`) are answered
///   EACCES, and glibc then assumes the default mode (and gives the
///   memory back with `madvise(MADV_DONTNEED)`). No file is ever opened.
/// - malloc creating its ninth arena (a thread's first allocation, or a
///   retry after an arena is exhausted) counts CPUs: `sched_getaffinity`.
/// - a thread ending gives back its stack (`madvise`, `munmap`) and its
///   signal stack (`sigaltstack`, `munmap`).
/// - clocks are read through the vDSO, but with a clock source it cannot
///   read (hpet, acpi_pm: some VMs) it falls back to `clock_gettime`.
/// - `madvise` with any advice but the privileged ones that poison or
///   take offline physical pages (MADV_HWPOISON and up).
/// - a blocking call interrupted by SIGSTOP (a debugger, job control,
///   a container freezer) resumes through `restart_syscall`.
/// - a panic's backtrace (RUST_BACKTRACE) asks for the working directory:
///   `getcwd` is answered EACCES, and the backtrace goes on without it.
pub fn runtime() -> SyscallList {
    use libc::*;
    let mut l = SyscallList::new();
    l.allow(&[
        SYS_brk,
        SYS_munmap,
        SYS_mremap,
        SYS_futex,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_gettid,
        SYS_clock_gettime,
        SYS_exit,
        SYS_exit_group,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
        SYS_getrandom,
        SYS_restart_syscall,
        SYS_read,
        SYS_write,
        SYS_close,
    ]);
    let no_exec = Arg::Masked32(2, PROT_EXEC as u32, 0);
    l.allow_if(SYS_mmap, &[no_exec]);
    l.allow_if(SYS_mprotect, &[no_exec]);
    l.allow_if(SYS_madvise, &[Arg::Lt32(2, MADV_HWPOISON as u32)]);
    // Debug builds check that a descriptor is open before closing it.
    l.allow_if(SYS_fcntl, &[Arg::Eq32(1, F_GETFD as u32)]);
    l.deny_with(&[SYS_openat, SYS_open, SYS_getcwd], EACCES);
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
        for a in [SeccompAction::Kill, SeccompAction::Log, SeccompAction::Off] {
            assert_eq!(a.to_string().parse::<SeccompAction>(), Ok(a));
        }
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
        assert_eq!(a.rules(libc::SYS_ioctl), 0);
        a.allow_if(libc::SYS_write, &[Arg::Eq32(0, 2)]);
        assert_eq!(a.rules(libc::SYS_write), 1);
        assert_eq!(a.len(), 3);
        assert!(a.compile(SeccompAction::Off).unwrap().is_none());
        let p = runtime().compile(SeccompAction::Kill).unwrap().unwrap();
        assert_eq!(p.len(), 2);
        assert!(p[1].len() > p[0].len());
    }

    #[test]
    fn denials_win_and_get_a_program_per_errno() {
        let mut a = SyscallList::new();
        a.allow(&[libc::SYS_read, libc::SYS_openat]);
        a.deny_with(&[libc::SYS_openat], libc::EACCES);
        assert!(!a.contains(libc::SYS_openat) && a.contains(libc::SYS_read));
        assert_eq!((a.len(), a.denied_len()), (1, 1));
        let mut b = SyscallList::new();
        b.allow(&[libc::SYS_clone3]);
        b.deny_with(&[libc::SYS_clone3], libc::ENOSYS);
        b.deny_with(&[libc::SYS_open], libc::EACCES);
        assert!(!a.denies_all_of(&b) && b.denies_all_of(&SyscallList::new()));
        a.extend(&b);
        assert!(a.denies_all_of(&b));
        assert_eq!(a.denied(libc::SYS_clone3), Some(libc::ENOSYS));
        assert_eq!((a.len(), a.denied_len()), (1, 3));
        // EACCES, ENOSYS, then the list.
        let p = a.compile(SeccompAction::Kill).unwrap().unwrap();
        assert_eq!(p.len(), 3);
        let r = runtime();
        assert_eq!(r.denied(libc::SYS_openat), Some(libc::EACCES));
        assert!(r.contains(libc::SYS_madvise) && r.contains(libc::SYS_sched_getaffinity));
    }

    #[test]
    fn bad_argument_index_is_an_error() {
        let mut l = SyscallList::new();
        l.allow_if(libc::SYS_ioctl, &[Arg::Eq32(6, 0)]);
        assert!(matches!(
            l.compile(SeccompAction::Kill),
            Err(Error::Build(_))
        ));
    }
}
