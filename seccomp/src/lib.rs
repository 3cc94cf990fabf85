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
//! a visible failure rather than a silent error path.
//! [`SeccompAction::Log`] lets such calls through and has the kernel log
//! them (audit type 1326 in the kernel log), which is how a list is
//! checked against a new workload.

use std::collections::BTreeMap;
use std::str::FromStr;

pub use seccompiler::BpfProgram;
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};

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
        };
        // An argument index above 5 is refused here.
        SeccompCondition::new(i, len, op, v).map_err(Error::Build)
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

    /// Number of argument rules for `nr` (0 when allowed with any
    /// arguments or not at all).
    pub fn rules(&self, nr: libc::c_long) -> usize {
        self.calls
            .get(&nr)
            .and_then(|r| r.as_ref())
            .map_or(0, Vec::len)
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
        let main = SeccompFilter::new(rules, mismatch, seccompiler::SeccompAction::Allow, arch)
            .map_err(Error::Build)?;
        // clone3 passes its flags in memory, where a filter cannot check
        // them: it fails with ENOSYS, so the C library falls back to
        // clone(2), whose flags a list can check. (The kernel takes the
        // strictest answer of all installed filters: a list without clone3
        // still kills on it.)
        let no_clone3 = SeccompFilter::new(
            [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
            seccompiler::SeccompAction::Allow,
            seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(Error::Build)?;
        // In installation order: the main filter last, since it may
        // forbid installing more.
        Ok(Some(vec![
            no_clone3.try_into().map_err(Error::Build)?,
            main.try_into().map_err(Error::Build)?,
        ]))
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
/// (hash map keys) and exit. Creating threads is not part of it.
pub fn runtime() -> SyscallList {
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
    ]);
    let no_exec = Arg::Masked32(2, PROT_EXEC as u32, 0);
    l.allow_if(SYS_mmap, &[no_exec]);
    l.allow_if(SYS_mprotect, &[no_exec]);
    // Debug builds check that a descriptor is open before closing it.
    l.allow_if(SYS_fcntl, &[Arg::Eq32(1, F_GETFD as u32)]);
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
    fn bad_argument_index_is_an_error() {
        let mut l = SyscallList::new();
        l.allow_if(libc::SYS_ioctl, &[Arg::Eq32(6, 0)]);
        assert!(matches!(
            l.compile(SeccompAction::Kill),
            Err(Error::Build(_))
        ));
    }
}
