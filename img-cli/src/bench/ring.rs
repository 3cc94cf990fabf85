//! The run itself: requests in flight through io_uring on the engine's
//! split data path.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use qcow2::{Image, IoEpoch, Mapping, PendingWrite};

use super::options::Params;
use crate::CliError;

/// One request slot: where its request stands. Its buffer is
/// `size` bytes at `i * size` of the run's buffer.
#[derive(Default)]
struct Slot {
    /// Guest offset of the request and bytes already done.
    off: u64,
    done: usize,
    /// Held from the request's first mapping until it is done: its I/O
    /// runs outside the engine's lock.
    epoch: Option<IoEpoch>,
    /// The mapped write of the segment in flight.
    wio: Option<PendingWrite>,
    /// The segment in flight: length, host offset, whether O_DIRECT.
    seg_len: usize,
    seg_host: u64,
    seg_direct: bool,
}

/// Runs the requests of `p` on `img` (data I/O with O_DIRECT through
/// `direct` where given); returns the number of flushes made.
pub(super) fn execute(
    img: &Arc<dyn Image>,
    p: &Params,
    write: bool,
    drain: bool,
    direct: Option<&File>,
) -> Result<u64, CliError> {
    let Some(file) = img.data_storage().file() else {
        return Err(CliError::new(
            "bench runs its own io_uring on the image's file: not on an NBD export",
        ));
    };
    // No more slots than requests (qemu-img would try to allocate a
    // buffer for every one of a huge depth).
    let depth = p.depth.min(p.count as usize);
    // One buffer for all requests, aligned for O_DIRECT (as
    // blk_blockalign), filled with the pattern.
    let total = depth * p.size;
    let mut buf = Vec::new();
    buf.try_reserve_exact(total + ALIGN)
        .map_err(|_| CliError::new("Cannot allocate the request buffers"))?;
    buf.resize(total + ALIGN, p.pattern);
    let base = buf.as_ptr().align_offset(ALIGN);
    let ring_size = (depth.min(4096) as u32).next_power_of_two();
    let mut b = Bench {
        img,
        write,
        ring: IoUring::new(ring_size).map_err(ring_err)?,
        buf: &mut buf[base..base + total],
        slots: (0..depth).map(|_| Slot::default()).collect(),
        next_off: p.offset,
        step: p.step,
        size: p.size,
        image_size: img.size(),
        unsent: p.count,
        in_flight: 0,
        in_ring: 0,
        free: (0..depth).rev().collect(),
        fd: types::Fd(file.as_raw_fd()),
        direct_fd: direct.map(|f| types::Fd(f.as_raw_fd())),
        waiting: Vec::new(),
        finished: Vec::new(),
        flush_interval: p.flush_interval,
        drain,
        writethrough: p.cache.writethrough,
        draining: false,
        flushes: 0,
    };
    b.run()?;
    Ok(b.flushes)
}

/// The offset of the request after one at `off`: `step` further, wrapped
/// so that a request of `size` bytes stays inside the image (QEMU's
/// bench_cb since the fix for requests past the end; 10.0 wraps modulo
/// the image size).
pub(super) fn next_offset(off: u64, step: u64, size: u64, image_size: u64) -> u64 {
    if image_size <= size {
        0
    } else {
        (off + step) % (image_size - size)
    }
}

/// The waker for `try_begin_write` of a single-threaded caller, which
/// retries waiting requests after its own completions.
fn no_wake() -> &'static std::sync::Arc<dyn qcow2::AllocWaker> {
    struct NoWake;
    impl qcow2::AllocWaker for NoWake {
        fn wake(&self) {}
    }
    static W: std::sync::LazyLock<std::sync::Arc<dyn qcow2::AllocWaker>> =
        std::sync::LazyLock::new(|| std::sync::Arc::new(NoWake));
    &W
}

/// Buffer alignment for O_DIRECT.
const ALIGN: usize = 4096;

struct Bench<'a> {
    img: &'a Arc<dyn Image>,
    write: bool,
    ring: IoUring,
    buf: &'a mut [u8],
    slots: Vec<Slot>,
    next_off: u64,
    step: u64,
    size: usize,
    image_size: u64,
    /// Requests not sent yet.
    unsent: u64,
    /// Requests sent and not completed (in the ring or waiting for a
    /// cluster).
    in_flight: usize,
    /// Entries submitted to the ring and not reaped.
    in_ring: usize,
    /// Slots without a request.
    free: Vec<usize>,
    fd: types::Fd,
    direct_fd: Option<types::Fd>,
    /// Slots whose next segment could not be mapped yet (its cluster is
    /// being allocated by a request in flight).
    waiting: Vec<usize>,
    /// Requests completed without I/O, not yet counted as done.
    finished: Vec<usize>,
    flush_interval: u64,
    drain: bool,
    writethrough: bool,
    /// Sending stopped until the queue is empty, then a flush.
    draining: bool,
    flushes: u64,
}

fn failed(e: impl std::fmt::Display) -> CliError {
    CliError::new(format!("Failed request: {e}"))
}

fn ring_err(e: std::io::Error) -> CliError {
    CliError::new(format!("io_uring: {e}"))
}

impl Bench<'_> {
    /// Runs every request; on failure, waits for what is still in the
    /// ring (it writes into our buffers) before returning the error.
    fn run(&mut self) -> Result<(), CliError> {
        let r = self.run_requests();
        if r.is_err() {
            while self.in_ring > 0 && self.ring.submit_and_wait(1).is_ok() {
                self.in_ring -= self.ring.completion().count();
            }
            if self.in_ring > 0 {
                // Writes whose outcome is unknown keep their clusters out
                // of use rather than roll back under a late write.
                for s in &mut self.slots {
                    if let Some(w) = s.wio.take() {
                        w.abandon();
                    }
                }
            }
        }
        r
    }

    fn run_requests(&mut self) -> Result<(), CliError> {
        self.fill()?;
        let mut done: Vec<(usize, Option<i32>)> = Vec::with_capacity(self.slots.len());
        while self.in_flight > 0 || !self.finished.is_empty() {
            if self.in_ring > 0 {
                // Requests waiting for a cluster wait on the ring too.
                let want = usize::from(self.finished.is_empty());
                self.ring.submit_and_wait(want).map_err(ring_err)?;
            } else if self.finished.is_empty() {
                // Everything left waits for an allocation that nothing in
                // the ring is making: a bug, not a reason to spin.
                return Err(CliError::new("internal error: requests wait on nothing"));
            }
            done.clear();
            done.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data() as usize, Some(c.result()))),
            );
            self.in_ring -= done.len();
            done.extend(self.finished.drain(..).map(|i| (i, None)));
            for &(i, res) in &done {
                let complete = match res {
                    Some(res) => self.complete_segment(i, res)?,
                    None => true,
                };
                if complete {
                    // As qemu-img: the next request goes out before the
                    // next completion is looked at.
                    self.request_done()?;
                    self.fill()?;
                }
            }
            let waiting = std::mem::take(&mut self.waiting);
            for i in waiting {
                self.submit_segment(i)?;
            }
            self.fill()?;
        }
        Ok(())
    }

    /// Sends requests while there are free slots and requests left.
    fn fill(&mut self) -> Result<(), CliError> {
        while !self.draining && self.unsent > 0 {
            let Some(i) = self.free.pop() else {
                break;
            };
            self.start_request(i)?;
        }
        Ok(())
    }

    /// A request completed: flush when its turn comes (qemu-img's rule:
    /// whenever the number of requests not yet sent is a multiple of the
    /// interval).
    fn request_done(&mut self) -> Result<(), CliError> {
        if self.writethrough && self.write {
            self.flush()?;
        }
        if self.flush_interval != 0 && self.unsent.is_multiple_of(self.flush_interval) {
            if self.drain {
                self.draining = true;
                if self.in_flight == 0 {
                    self.flush()?;
                    self.draining = false;
                }
            } else {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), CliError> {
        self.flushes += 1;
        self.img
            .flush()
            .map_err(|e| CliError::new(format!("Failed flush request: {e}")))
    }

    fn start_request(&mut self, i: usize) -> Result<(), CliError> {
        let off = self.next_off;
        self.next_off = next_offset(off, self.step, self.size as u64, self.image_size);
        self.unsent -= 1;
        self.in_flight += 1;
        if off
            .checked_add(self.size as u64)
            .is_none_or(|end| end > self.image_size)
        {
            return Err(failed(crate::common::strerror(
                &std::io::Error::from_raw_os_error(libc::EIO),
            )));
        }
        let s = &mut self.slots[i];
        s.off = off;
        s.done = 0;
        s.epoch = Some(self.img.io_epoch());
        self.submit_segment(i)
    }

    /// Maps and submits the next segment of slot `i`'s request.
    fn submit_segment(&mut self, i: usize) -> Result<(), CliError> {
        let (pos, rest) = {
            let s = &self.slots[i];
            (s.off + s.done as u64, self.size - s.done)
        };
        // The first sector of a probed raw image is written by the
        // engine, which checks it (its split path refuses it).
        if self.write && pos < 512 && self.img.guards_first_sector() {
            let at = i * self.size + self.slots[i].done;
            self.img
                .write_at(&self.buf[at..at + rest], pos)
                .map_err(failed)?;
            self.slots[i].seg_len = rest;
            return self.finish_sync(i);
        }
        let (host, len) = if self.write {
            // The only allocations this single thread can wait for are its
            // own requests in the ring: their completions retry it.
            match self
                .img
                .clone()
                .try_begin_write(pos, rest, no_wake())
                .map_err(failed)?
            {
                Some(io) => {
                    let r = (io.host().0, io.len());
                    self.slots[i].wio = Some(io);
                    r
                }
                None => {
                    self.waiting.push(i);
                    return Ok(());
                }
            }
        } else {
            let (m, n) = self.img.map_read(pos, rest as u64).map_err(failed)?;
            match m {
                Mapping::Data(h) => (h.0, n as usize),
                other => {
                    // Zeros, backing data, compressed: no host extent of
                    // ours to read; done synchronously.
                    let at = i * self.size + self.slots[i].done;
                    self.img
                        .read_mapped(other, &mut self.buf[at..at + n as usize], pos)
                        .map_err(failed)?;
                    self.slots[i].seg_len = n as usize;
                    return self.finish_sync(i);
                }
            }
        };
        let s = &mut self.slots[i];
        s.seg_len = len;
        s.seg_host = host;
        let at = i * self.size + s.done;
        s.seg_direct = self.direct_fd.is_some()
            && (host | len as u64 | self.buf[at..].as_ptr() as u64).is_multiple_of(512);
        self.push(i, at)
    }

    /// Queues the data I/O of slot `i`'s segment (buffer at `at`).
    fn push(&mut self, i: usize, at: usize) -> Result<(), CliError> {
        let s = &self.slots[i];
        let fd = match (s.seg_direct, self.direct_fd) {
            (true, Some(fd)) => fd,
            _ => self.fd,
        };
        let ptr = self.buf[at..at + s.seg_len].as_mut_ptr();
        let e = if self.write {
            opcode::Write::new(fd, ptr, s.seg_len as u32)
                .offset(s.seg_host)
                .build()
        } else {
            opcode::Read::new(fd, ptr, s.seg_len as u32)
                .offset(s.seg_host)
                .build()
        }
        .user_data(i as u64);
        // SAFETY: the buffer is slot `i`'s part of `self.buf`, which
        // outlives the ring's use of it (the run ends only when nothing is
        // in flight) and is not touched again until this entry's
        // completion has been reaped.
        unsafe {
            while self.ring.submission().push(&e).is_err() {
                self.ring.submit().map_err(ring_err)?;
            }
        }
        self.in_ring += 1;
        Ok(())
    }

    /// A segment served without I/O: continue the request.
    fn finish_sync(&mut self, i: usize) -> Result<(), CliError> {
        let s = &mut self.slots[i];
        s.done += s.seg_len;
        if s.done < self.size {
            return self.submit_segment(i);
        }
        self.end_request(i);
        self.finished.push(i);
        Ok(())
    }

    fn end_request(&mut self, i: usize) {
        self.slots[i].epoch = None;
        self.in_flight -= 1;
        self.free.push(i);
    }

    /// Handles a completion; returns true when slot `i`'s whole request
    /// is done.
    fn complete_segment(&mut self, i: usize, res: i32) -> Result<bool, CliError> {
        let at = i * self.size + self.slots[i].done;
        let s = &mut self.slots[i];
        if res == -libc::EINVAL && s.seg_direct {
            // Not aligned as the device wants for O_DIRECT: go buffered.
            s.seg_direct = false;
            self.push(i, at)?;
            return Ok(false);
        }
        let mut ok = res >= 0 && res as usize == s.seg_len;
        if !ok && !self.write && res >= 0 {
            // A read that stopped at the end of the file (clusters
            // allocated but not written up to their end): the rest reads
            // as zeros, as in the engine.
            self.buf[at + res as usize..at + s.seg_len].fill(0);
            ok = true;
        }
        // Committed once its data is written; dropped (rolled back) when not.
        if let Some(io) = s.wio.take().filter(|_| ok) {
            io.commit().map_err(failed)?;
        }
        if !ok {
            let err = if res < 0 {
                crate::common::strerror(&std::io::Error::from_raw_os_error(-res))
            } else {
                format!("short transfer ({res} bytes)")
            };
            return Err(failed(err));
        }
        s.done += s.seg_len;
        if s.done < self.size {
            self.submit_segment(i)?;
            return Ok(false);
        }
        self.end_request(i);
        Ok(true)
    }
}
