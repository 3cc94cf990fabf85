//! The vring workers' io_uring instances, restricted to the operations
//! each worker submits.
//!
//! Operations submitted to io_uring run in the kernel without a system
//! call of their own, so the seccomp filters never see them: a worker
//! that could be made to submit an `openat`, a `connect` or a `socket`
//! through its ring would get around them. Each ring is therefore
//! created disabled (IORING_SETUP_R_DISABLED), its completion eventfd
//! registered, then restricted (IORING_REGISTER_RESTRICTIONS) to the
//! worker's own opcodes, without any submission flag and without any
//! further `io_uring_register` operation, and only then enabled. A
//! submission outside the list completes with EACCES.
//!
//! A worker that always uses the same files may have them registered
//! (IORING_REGISTER_FILES) before the restrictions: the ring then also
//! accepts IOSQE_FIXED_FILE, which saves a file-table lookup and a
//! reference count per operation. The table cannot change afterwards.
//!
//! Kernels before 5.10 know neither: there the ring is created without
//! restrictions, with a warning.

use std::os::fd::RawFd;

use io_uring::register::Restriction;
use io_uring::IoUring;

/// Creates an io_uring of `entries` entries that accepts only the
/// submission opcodes `ops` and has `eventfd` registered as its
/// completion eventfd. With `files`, they are its fixed files (index =
/// position) and IOSQE_FIXED_FILE is the one flag allowed; without, no
/// flag is.
pub fn restricted_ring(
    entries: u32,
    ops: &[u8],
    eventfd: RawFd,
    files: &[RawFd],
) -> std::io::Result<IoUring> {
    let ring = match IoUring::builder().setup_r_disabled().build(entries) {
        Ok(r) => r,
        // Before 5.10 the flag is unknown.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                log::warn!(
                    "this kernel cannot restrict io_uring operations \
                     (IORING_SETUP_R_DISABLED: {e}): the worker rings are unrestricted"
                )
            });
            let ring = IoUring::new(entries)?;
            ring.submitter().register_eventfd(eventfd)?;
            if !files.is_empty() {
                ring.submitter().register_files(files)?;
            }
            return Ok(ring);
        }
        Err(e) => return Err(e),
    };
    let s = ring.submitter();
    s.register_eventfd(eventfd)?;
    let mut allowed: Vec<Restriction> = ops.iter().map(|&op| Restriction::sqe_op(op)).collect();
    if !files.is_empty() {
        s.register_files(files)
            .map_err(|e| std::io::Error::new(e.kind(), format!("io_uring files: {e}")))?;
        allowed.push(Restriction::sqe_flags_allowed(
            io_uring::squeue::Flags::FIXED_FILE.bits(),
        ));
    }
    s.register_restrictions(&mut allowed)
        .map_err(|e| std::io::Error::new(e.kind(), format!("io_uring restrictions: {e}")))?;
    s.register_enable_rings()
        .map_err(|e| std::io::Error::new(e.kind(), format!("io_uring enable: {e}")))?;
    Ok(ring)
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::{opcode, types};
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::EventFd;

    /// Submits `sqe` and returns its completion's result.
    fn run(ring: &mut IoUring, sqe: io_uring::squeue::Entry) -> i32 {
        // SAFETY: the entries used here point at buffers and strings
        // that outlive the call, which waits for the completion.
        unsafe { ring.submission().push(&sqe) }.expect("queue has room");
        ring.submit_and_wait(1).expect("submit");
        ring.completion().next().expect("a completion").result()
    }

    #[test]
    fn only_listed_opcodes_run() {
        let note = EventFd::new(0).unwrap();
        let efd = EventFd::new(0).unwrap();
        let mut ring = restricted_ring(4, &[opcode::Write::CODE], note.as_raw_fd(), &[]).unwrap();
        let b = 1u64.to_ne_bytes();
        let w = opcode::Write::new(types::Fd(efd.as_raw_fd()), b.as_ptr(), 8).build();
        assert_eq!(run(&mut ring, w), 8);
        assert_eq!(efd.read().unwrap(), 1);
        // The completion was signalled on the registered eventfd.
        assert!(note.read().unwrap() >= 1);
        let mut r = [0u8; 8];
        let rd = opcode::Read::new(types::Fd(efd.as_raw_fd()), r.as_mut_ptr(), 8).build();
        assert_eq!(run(&mut ring, rd), -libc::EACCES);
        // Flags are refused too, even on a listed opcode.
        let w = opcode::Write::new(types::Fd(efd.as_raw_fd()), b.as_ptr(), 8)
            .build()
            .flags(io_uring::squeue::Flags::ASYNC);
        assert_eq!(run(&mut ring, w), -libc::EACCES);
        // No register operation once enabled.
        let e = ring.submitter().unregister_eventfd().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    }
}
