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
//!
//! # Submission and teardown ([`WorkerRing`])
//! Every worker ring is driven the same way: an entry is pushed, and
//! while the submission queue is full what it holds is handed to the
//! kernel; when the kernel refuses more (its completion queue is full)
//! the worker reaps and pushes again ([`RingOwner::push_entry`]).
//!
//! The one teardown policy: an operation's buffers (worker slots, iovec
//! arrays, the guest memory map they point into) live until its
//! completion is reaped, and nothing the kernel may still read or write
//! is ever freed. A worker drains its ring ([`RingOwner::drain_ring`],
//! after cancelling what would never complete on its own) before it and
//! its buffers go away. If the ring cannot be waited on (an
//! `io_uring_enter` error other than EINTR, EAGAIN or EBUSY) it is
//! wedged for good: its operations may still run, so the ring itself is
//! never closed or unmapped ([`WorkerRing`]'s `Drop` leaks it while
//! anything is in flight) and the worker leaks what they use
//! ([`WorkerRing::retire`]). A leak, never damage. A wedged ring yields
//! no completion any more (a late one would name buffers the worker has
//! given up on) and queues nothing (a new entry counts as in flight for
//! good), so its worker serves nothing more and never spins on it.

use std::mem::ManuallyDrop;
use std::os::fd::RawFd;

use io_uring::register::Restriction;
use io_uring::{cqueue, squeue, IoUring};
use log::error;

/// Creates an io_uring of `entries` entries that accepts only the
/// submission opcodes `ops` and has `eventfd` (if any) registered as its
/// completion eventfd. With `files`, they are its fixed files (index =
/// position) and IOSQE_FIXED_FILE is the one flag allowed; without, no
/// flag is.
pub fn restricted_ring(
    entries: u32,
    ops: &[u8],
    eventfd: Option<RawFd>,
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
            if let Some(fd) = eventfd {
                ring.submitter().register_eventfd(fd)?;
            }
            if !files.is_empty() {
                ring.submitter().register_files(files)?;
            }
            return Ok(ring);
        }
        Err(e) => return Err(e),
    };
    let s = ring.submitter();
    if let Some(fd) = eventfd {
        s.register_eventfd(fd)?;
    }
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

/// Whether this kernel can restrict a ring's operations (5.10 and
/// later); where it cannot, [`restricted_ring`] makes unrestricted rings.
/// Probed once.
pub fn can_restrict() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAN.get_or_init(|| {
        IoUring::<squeue::Entry>::builder()
            .setup_r_disabled()
            .build(1)
            .is_ok()
    })
}

/// The kernel takes no more submissions until completions are reaped
/// (its completion queue is full).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompletionsFull;

/// A worker's io_uring, counting what is in flight in it, with the
/// daemons' teardown policy (see the module docs).
pub struct WorkerRing {
    /// Dropped only when nothing is in flight in it (see `Drop`).
    ring: ManuallyDrop<IoUring>,
    /// Entries pushed whose completion was not reaped yet.
    inflight: usize,
    wedged: bool,
}

impl WorkerRing {
    pub fn new(ring: IoUring) -> WorkerRing {
        WorkerRing {
            ring: ManuallyDrop::new(ring),
            inflight: 0,
            wedged: false,
        }
    }

    /// A [`restricted_ring`] (see there for the arguments).
    pub fn restricted(
        entries: u32,
        ops: &[u8],
        eventfd: Option<RawFd>,
        files: &[RawFd],
    ) -> std::io::Result<WorkerRing> {
        restricted_ring(entries, ops, eventfd, files).map(WorkerRing::new)
    }

    /// Queues `sqe`, handing queued entries to the kernel while the
    /// submission queue is full. Every entry gets exactly one completion
    /// (no entry flag that skips it is ever allowed on a worker ring). On
    /// a wedged ring the entry is not queued but counts as in flight for
    /// good, like those before it: its owner leaks what it points at.
    ///
    /// # Safety
    /// Everything `sqe` points at (buffers, iovec arrays, the memory they
    /// point into) must stay valid until its completion is reaped through
    /// [`Self::completions`], or forever if it never is (the ring is then
    /// wedged and the owner leaks them: [`Self::retire`]).
    pub unsafe fn push(&mut self, sqe: &squeue::Entry) -> Result<(), CompletionsFull> {
        loop {
            if self.wedged {
                self.inflight += 1;
                return Ok(());
            }
            // SAFETY: the caller keeps what the entry points at valid
            // until its completion (this function's contract).
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                self.inflight += 1;
                return Ok(());
            }
            if let Err(e) = self.ring.submit() {
                match e.raw_os_error() {
                    Some(libc::EBUSY) | Some(libc::EAGAIN) => return Err(CompletionsFull),
                    Some(libc::EINTR) => {}
                    _ => self.wedge("submit", &e),
                }
            }
        }
    }

    /// Hands the queued entries to the kernel. EINTR, EAGAIN and EBUSY
    /// leave them queued for the next submission; any other error wedges
    /// the ring. Nothing queued and no completion held back by the
    /// kernel (an overflowed completion queue, which an enter flushes):
    /// no system call (the worker submits after every kick and every
    /// completion, most of which queue nothing).
    pub fn submit(&mut self) {
        if self.wedged {
            return;
        }
        let idle = {
            let sq = self.ring.submission();
            sq.is_empty() && !sq.cq_overflow()
        };
        if idle {
            return;
        }
        if let Err(e) = self.ring.submit() {
            if !matches!(
                e.raw_os_error(),
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
            ) {
                self.wedge("submit", &e);
            }
        }
    }

    /// The ring cannot be entered: what is in flight stays in flight for
    /// good (see the module docs).
    fn wedge(&mut self, what: &str, e: &std::io::Error) {
        error!(
            "io_uring {what}: {e}: the ring is wedged, {} operations stay in flight",
            self.inflight
        );
        self.wedged = true;
    }

    /// Whether a completion is waiting (never on a wedged ring).
    pub fn has_completions(&mut self) -> bool {
        !self.wedged && !self.ring.completion().is_empty()
    }

    /// The completions available now; each one taken is no longer in
    /// flight. None on a wedged ring, even those the kernel still posts:
    /// its owner gave up on what was in flight (and may have handed the
    /// buffers a late completion names to something else).
    pub fn completions(&mut self) -> Completions<'_> {
        Completions {
            cq: (!self.wedged).then(|| self.ring.completion()),
            inflight: &mut self.inflight,
        }
    }

    /// Entries pushed whose completions were not reaped yet.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Submits what is queued and waits for at least one completion.
    /// EINTR, EAGAIN and EBUSY (completions to reap first) are not
    /// errors. Any other error wedges the ring for good: it is returned
    /// once, and every later wait fails at once.
    pub fn wait(&mut self) -> std::io::Result<()> {
        if self.wedged {
            return Err(std::io::Error::other("the ring is wedged"));
        }
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => {
                self.wedge("wait", &e);
                Err(e)
            }
        }
    }

    /// The ring could not be waited on: what is in flight stays in flight.
    pub fn is_wedged(&self) -> bool {
        self.wedged
    }

    /// Ends the life of `what`, something in-flight operations may read
    /// or write (a buffer pool, a guest memory map): dropped when nothing
    /// is in flight, leaked otherwise (a wedged ring's operations may
    /// still run).
    pub fn retire<T>(&self, what: T) {
        if self.inflight > 0 {
            std::mem::forget(what);
        }
    }
}

impl Drop for WorkerRing {
    fn drop(&mut self) {
        if self.inflight > 0 {
            // The kernel may still complete into the ring: leave it
            // mapped and open.
            error!(
                "io_uring dropped with {} operations in flight: leaked",
                self.inflight
            );
            return;
        }
        // SAFETY: nothing is in flight, and `self.ring` is not used again
        // (this is the end of `drop`).
        unsafe { ManuallyDrop::drop(&mut self.ring) };
    }
}

/// The completions of a [`WorkerRing`] available when it was made.
pub struct Completions<'a> {
    cq: Option<io_uring::CompletionQueue<'a>>,
    inflight: &'a mut usize,
}

impl Iterator for Completions<'_> {
    type Item = cqueue::Entry;

    fn next(&mut self) -> Option<cqueue::Entry> {
        let cqe = self.cq.as_mut()?.next()?;
        *self.inflight -= 1;
        Some(cqe)
    }
}

/// A worker that owns a [`WorkerRing`] and reaps its completions: the
/// push-or-reap and drain loops every worker runs.
pub trait RingOwner {
    fn worker_ring(&mut self) -> &mut WorkerRing;

    /// Processes every available completion (through
    /// [`WorkerRing::completions`]).
    fn reap_completions(&mut self);

    /// Queues `sqe`; when the kernel's completion queue is full, reaps
    /// and tries again.
    ///
    /// # Safety
    /// As for [`WorkerRing::push`].
    unsafe fn push_entry(&mut self, sqe: &squeue::Entry) {
        // SAFETY: this function's contract is `push`'s.
        while unsafe { self.worker_ring().push(sqe) }.is_err() {
            self.reap_completions();
        }
    }

    /// Waits for and reaps completions until nothing is in flight. An
    /// error means the ring is wedged (see [`WorkerRing::wait`]): what is
    /// in flight then stays there, and its buffers must be leaked.
    fn drain_ring(&mut self) -> std::io::Result<()> {
        while self.worker_ring().inflight() > 0 {
            self.worker_ring().wait()?;
            self.reap_completions();
        }
        Ok(())
    }
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
        let mut ring =
            restricted_ring(4, &[opcode::Write::CODE], Some(note.as_raw_fd()), &[]).unwrap();
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

    /// A worker writing to an eventfd through a small ring.
    struct Writer {
        ring: WorkerRing,
        reaped: Vec<i32>,
    }

    impl RingOwner for Writer {
        fn worker_ring(&mut self) -> &mut WorkerRing {
            &mut self.ring
        }
        fn reap_completions(&mut self) {
            for cqe in self.ring.completions() {
                self.reaped.push(cqe.result());
            }
        }
    }

    #[test]
    fn pushes_past_a_full_queue_and_drains() {
        let note = EventFd::new(0).unwrap();
        let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ring =
            WorkerRing::restricted(2, &[opcode::Write::CODE], Some(note.as_raw_fd()), &[]).unwrap();
        let mut w = Writer {
            ring,
            reaped: Vec::new(),
        };
        let b = 1u64.to_ne_bytes();
        // More entries than the submission queue holds: it is submitted
        // when full; each entry counts as in flight until reaped.
        for _ in 0..5 {
            let sqe = opcode::Write::new(types::Fd(efd.as_raw_fd()), b.as_ptr(), 8).build();
            // SAFETY: `b` outlives the ring's operations (drained below).
            unsafe { w.push_entry(&sqe) };
        }
        assert_eq!(w.ring.inflight() + w.reaped.len(), 5);
        w.drain_ring().unwrap();
        assert_eq!(w.ring.inflight(), 0);
        assert_eq!(w.reaped, vec![8; 5]);
        assert_eq!(efd.read().unwrap(), 5);
        assert!(!w.ring.is_wedged());
    }

    #[test]
    fn retire_leaks_only_while_in_flight() {
        use std::rc::Rc;
        let note = EventFd::new(0).unwrap();
        let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ring =
            WorkerRing::restricted(4, &[opcode::Write::CODE], Some(note.as_raw_fd()), &[]).unwrap();
        let kept = Rc::new(());
        ring.retire(kept.clone());
        assert_eq!(Rc::strong_count(&kept), 1, "dropped: nothing in flight");
        // An entry counts as in flight until its completion is reaped.
        let b = 1u64.to_ne_bytes();
        let sqe = opcode::Write::new(types::Fd(efd.as_raw_fd()), b.as_ptr(), 8).build();
        // SAFETY: `b` outlives the write (waited for below).
        unsafe { ring.push(&sqe) }.unwrap();
        ring.retire(kept.clone());
        assert_eq!(Rc::strong_count(&kept), 2, "leaked: a write in flight");
        ring.wait().unwrap();
        let r: Vec<i32> = ring.completions().map(|c| c.result()).collect();
        assert_eq!(r, vec![8]);
        assert_eq!(ring.inflight(), 0);
    }

    /// A ring whose io_uring_enter fails (a per-thread seccomp filter
    /// makes it fail for real) is wedged: a read still posted completes
    /// in the kernel afterwards, but its completion is never handed out
    /// (its buffer may have been given to something else), and new
    /// entries count as in flight without being queued or spun on.
    #[test]
    fn a_wedged_ring_hands_out_nothing() {
        std::thread::spawn(|| {
            let note = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let mut fds = [0; 2];
            // SAFETY: pipe2 fills the two descriptors it is given.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            let codes = [opcode::Read::CODE, opcode::Write::CODE];
            let mut ring = WorkerRing::restricted(4, &codes, Some(note.as_raw_fd()), &[]).unwrap();
            // Leaked: the read may write into it whenever it completes.
            let buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
            let rd = opcode::Read::new(types::Fd(fds[0]), buf.as_mut_ptr(), 8).build();
            // SAFETY: the buffer is leaked, valid for good.
            unsafe { ring.push(&rd) }.unwrap();
            ring.submit();
            assert_eq!(ring.inflight(), 1);

            rimg_seccomp::fail_on_current_thread(&[libc::SYS_io_uring_enter], libc::EIO).unwrap();
            let e = ring.wait().unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            assert!(ring.is_wedged());

            // The read completes now; its completion event wakes `note`.
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to the pipe.
            assert_eq!(unsafe { libc::write(fds[1], one.as_ptr().cast(), 8) }, 8);
            let mut pfd = libc::pollfd {
                fd: note.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
            assert_eq!(ready, 1, "the read never completed in the kernel");
            assert_eq!(ring.ring.completion().len(), 1, "the kernel posted it");
            assert_eq!(ring.completions().count(), 0, "but it is not handed out");
            assert_eq!(ring.inflight(), 1);

            // A new entry counts as in flight for good; nothing is queued.
            let b: &'static [u8; 8] = Box::leak(Box::new(one));
            let w = opcode::Write::new(types::Fd(efd.as_raw_fd()), b.as_ptr(), 8).build();
            // SAFETY: the buffer is leaked, valid for good.
            unsafe { ring.push(&w) }.unwrap();
            ring.submit();
            assert_eq!(ring.inflight(), 2);
            assert_eq!(ring.ring.submission().len(), 0);
            assert!(efd.read().is_err(), "the write never ran");
            // Dropped with operations in flight: the ring is leaked.
        })
        .join()
        .expect("test thread");
    }

    /// A submission the kernel refuses for good (not EINTR, EAGAIN or
    /// EBUSY) while the submission queue is full wedges the ring: `push`
    /// returns instead of retrying for ever, the entry counted in flight.
    #[test]
    fn a_refused_submission_wedges_the_ring() {
        std::thread::spawn(|| {
            let note = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let mut ring =
                WorkerRing::restricted(2, &[opcode::Write::CODE], Some(note.as_raw_fd()), &[])
                    .unwrap();
            let b: &'static [u8; 8] = Box::leak(Box::new(1u64.to_ne_bytes()));
            let w = opcode::Write::new(types::Fd(efd.as_raw_fd()), b.as_ptr(), 8).build();
            rimg_seccomp::fail_on_current_thread(&[libc::SYS_io_uring_enter], libc::ENXIO).unwrap();
            for _ in 0..3 {
                // SAFETY: the buffer is leaked, valid for good.
                unsafe { ring.push(&w) }.unwrap();
            }
            assert!(ring.is_wedged());
            assert_eq!(ring.inflight(), 3);
            assert!(efd.read().is_err(), "nothing ran");
        })
        .join()
        .expect("test thread");
    }
}
