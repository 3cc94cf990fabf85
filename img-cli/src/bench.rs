//! `rimg bench`: qemu-img bench's options, checks and report, with the
//! requests in flight driven through io_uring on the engine's split data
//! path (map under the metadata lock, data I/O in the ring, commit on
//! completion).
//!
//! As in qemu-img: requests go to `-o`, then every `-S` bytes further,
//! wrapping modulo (image size - request size) (QEMU's fixed rule: the
//! 10.0 release wraps modulo the image size and can then run a request
//! past the end); `--flush-interval N` drains the queue and flushes each
//! time the number of requests not yet sent is a multiple of N (without
//! draining with `--no-drain`); `-t none`/`directsync` do the data I/O
//! with O_DIRECT; `-t writethrough`/`directsync` flush after every write;
//! `-t unsafe` never flushes. `-q` does not silence the report, as in
//! qemu-img.
//!
//! rimg's own option `--preallocate-ahead SIZE` (default 128 MiB, 0 for
//! off) has the engine reserve file space that much ahead of new
//! clusters (`Qcow2Options::preallocate_ahead`), as QEMU's `preallocate`
//! filter does; the unused part is cut off when the run ends.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::time::Instant;

use clap::Args;
use io_uring::{opcode, types, IoUring};
use qcow2::qcow::{Mapping, WriteIo};
use qcow2::{Image, OpenOptions, Qcow2Options};

use crate::size::{cvtint, cvtnum};
use crate::CliError;

#[derive(Args)]
pub struct BenchArgs {
    /// Number of requests
    #[arg(
        short = 'c',
        long = "count",
        allow_hyphen_values = true,
        value_name = "COUNT",
        default_value = "75000"
    )]
    count: String,
    /// Requests in flight
    #[arg(
        short = 'd',
        long = "depth",
        allow_hyphen_values = true,
        value_name = "DEPTH",
        default_value = "64"
    )]
    depth: String,
    /// Image format
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Cache mode: writeback, writethrough, none, directsync, unsafe
    #[arg(
        short = 't',
        long = "cache",
        value_name = "CACHE",
        default_value = "writeback"
    )]
    cache: String,
    /// Size of each request
    #[arg(
        short = 's',
        long = "buffer-size",
        allow_hyphen_values = true,
        value_name = "BUFFER_SIZE",
        default_value = "4096"
    )]
    size: String,
    /// Offset of the first request
    #[arg(
        short = 'o',
        long = "offset",
        allow_hyphen_values = true,
        value_name = "OFFSET",
        default_value = "0"
    )]
    offset: String,
    /// Distance between request offsets (default: the request size)
    #[arg(
        short = 'S',
        long = "step-size",
        allow_hyphen_values = true,
        value_name = "STEP_SIZE"
    )]
    step: Option<String>,
    /// AIO backend: threads, native or io_uring (rimg always uses io_uring;
    /// native needs -t none or directsync, as in qemu-img)
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    aio: Option<String>,
    /// Native AIO (needs -t none or directsync)
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// Write instead of read
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// Byte written by write tests (default 0)
    #[arg(long, value_name = "PATTERN", allow_hyphen_values = true)]
    pattern: Option<String>,
    /// Flush after this many requests (write tests)
    #[arg(
        long = "flush-interval",
        value_name = "FLUSH_INTERVAL",
        allow_hyphen_values = true
    )]
    flush_interval: Option<String>,
    /// Flush without waiting for the requests in flight
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Accepted for compatibility (qemu-img bench prints its report anyway)
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Open the image without taking locks
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// rimg only: when writes allocate clusters at the end of a qcow2
    /// file, reserve this much file space ahead of them at a time
    /// (fallocate; trimmed at the end); 0 turns it off
    #[arg(
        long = "preallocate-ahead",
        value_name = "SIZE",
        default_value = "128M"
    )]
    prealloc: String,
    filename: String,
}

/// What `-t` selects (QEMU's bdrv_parse_cache_mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cache {
    /// O_DIRECT data I/O.
    direct: bool,
    /// Flush after every write.
    writethrough: bool,
    /// Never flush to the host.
    no_flush: bool,
}

fn parse_cache(s: &str) -> Option<Cache> {
    let c = |direct, writethrough, no_flush| Cache {
        direct,
        writethrough,
        no_flush,
    };
    Some(match s {
        "none" | "off" => c(true, false, false),
        "directsync" => c(true, true, false),
        "writeback" => c(false, false, false),
        "unsafe" => c(false, false, true),
        "writethrough" => c(false, true, false),
        _ => return None,
    })
}

/// The checked parameters of a run.
struct Params {
    count: u64,
    depth: usize,
    size: usize,
    step: u64,
    offset: u64,
    pattern: u8,
    flush_interval: u64,
    cache: Cache,
    prealloc: u64,
}

fn parse(a: &BenchArgs) -> Result<Params, CliError> {
    let int_max = i32::MAX as i64;
    let e = CliError::new;
    let count = cvtint("request count", &a.count, 1, int_max).map_err(e)? as u64;
    let depth = cvtint("queue depth", &a.depth, 1, int_max).map_err(e)? as usize;
    let offset = cvtnum("offset", &a.offset, 0, i64::MAX as u64).map_err(e)?;
    let size = cvtnum("buffer size", &a.size, 1, int_max as u64).map_err(e)? as usize;
    let step = match &a.step {
        Some(s) => cvtnum("step size", s, 0, int_max as u64).map_err(e)?,
        None => 0,
    };
    let cache = parse_cache(&a.cache).ok_or_else(|| e("Invalid cache mode".into()))?;
    let pattern = match &a.pattern {
        Some(p) => cvtint("pattern byte", p, 0, 0xff).map_err(e)? as u8,
        None => 0,
    };
    let flush_interval = match &a.flush_interval {
        Some(f) => cvtint("flush interval", f, 0, int_max).map_err(e)? as u64,
        None => 0,
    };
    if let Some(aio) = &a.aio {
        if !matches!(aio.as_str(), "threads" | "native" | "io_uring") {
            return Err(e(format!("Invalid aio option: {aio}")));
        }
    }
    if !a.write && flush_interval != 0 {
        return Err(e("--flush-interval is only available in write tests".into()));
    }
    if flush_interval != 0 && flush_interval < depth as u64 {
        return Err(e("Flush interval can't be smaller than depth".into()));
    }
    if a.force_share && a.write {
        return Err(e(format!(
            "Could not open '{}': force-share=on can only be used with read-only images",
            a.filename
        )));
    }
    let native = a.native || a.aio.as_deref() == Some("native");
    if native && !cache.direct {
        return Err(e(format!(
            "Could not open '{}': aio=native was specified, but it requires cache.direct=on, which was not specified.",
            a.filename
        )));
    }
    Ok(Params {
        count,
        depth,
        size,
        step: if step == 0 { size as u64 } else { step },
        offset,
        pattern,
        flush_interval,
        cache,
        prealloc: cvtnum("preallocation size", &a.prealloc, 0, i64::MAX as u64).map_err(e)?,
    })
}

/// One request slot: where its request stands. Its buffer is
/// `size` bytes at `i * size` of the run's buffer.
#[derive(Default)]
struct Slot {
    /// Guest offset of the request and bytes already done.
    off: u64,
    done: usize,
    /// The mapped write of the segment in flight.
    wio: Option<WriteIo>,
    /// The segment in flight: length, host offset, whether O_DIRECT.
    seg_len: usize,
    seg_host: u64,
    seg_direct: bool,
}

pub fn run(a: BenchArgs) -> Result<u8, CliError> {
    let _ = a.quiet;
    let p = parse(&a)?;
    let format = crate::common::parse_format(&a.format)?;
    let img = crate::blockopts::open_image(
        &a.filename,
        a.image_opts,
        OpenOptions {
            writable: a.write,
            format,
            force_share: a.force_share,
            qcow2: Qcow2Options {
                preallocate_ahead: p.prealloc,
                ..Default::default()
            },
            ..Default::default()
        },
    )?
    .map_err(|e| match e {
        qcow2::Error::Open { source, .. } => {
            CliError::new(format!("Could not open '{}': {source}", a.filename))
        }
        e => CliError::new(format!("Could not open '{}': {e}", a.filename)),
    })?;
    img.storage().set_no_flush(p.cache.no_flush);
    // The ring does guest data I/O on the image file at mapped offsets.
    if let Some(h) = img.as_qcow2().map(|q| q.header()) {
        if h.has_data_file() || h.extended_l2() {
            return Err(CliError::new(format!(
                "'{}': bench does not support external data files or extended L2 entries",
                a.filename
            )));
        }
    }
    // Data I/O with O_DIRECT goes through a descriptor of its own; the
    // engine keeps its metadata I/O on the buffered one.
    let direct = if p.cache.direct {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(a.write)
            .custom_flags(libc::O_DIRECT)
            .open(&a.filename)
            .map_err(|e| {
                CliError::new(format!(
                    "Could not open '{0}': Could not open '{0}': {1}",
                    a.filename,
                    crate::common::strerror(&e)
                ))
            })?;
        Some(f)
    } else {
        None
    };
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        p.count,
        if a.write { "write" } else { "read" },
        p.size,
        p.depth,
        p.offset,
        p.step
    );
    if p.flush_interval != 0 {
        println!("Sending flush every {} requests", p.flush_interval);
    }
    let start = Instant::now();
    execute(img.as_ref(), &p, a.write, !a.no_drain, direct.as_ref())?;
    println!(
        "Run completed in {:.3} seconds.",
        start.elapsed().as_secs_f64()
    );
    img.flush()
        .map_err(|e| CliError::new(format!("Failed to flush the image: {e}")))?;
    Ok(0)
}

/// Runs the requests of `p` on `img` (data I/O with O_DIRECT through
/// `direct` where given); returns the number of flushes made.
fn execute(
    img: &dyn Image,
    p: &Params,
    write: bool,
    drain: bool,
    direct: Option<&File>,
) -> Result<u64, CliError> {
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
        fd: types::Fd(img.storage().file().as_raw_fd()),
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
fn next_offset(off: u64, step: u64, size: u64, image_size: u64) -> u64 {
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
    img: &'a dyn Image,
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
        self.submit_segment(i)
    }

    /// Maps and submits the next segment of slot `i`'s request.
    fn submit_segment(&mut self, i: usize) -> Result<(), CliError> {
        let (pos, rest) = {
            let s = &self.slots[i];
            (s.off + s.done as u64, self.size - s.done)
        };
        let q = self.img.as_qcow2();
        let (host, len) = if self.write {
            match q {
                // The only allocations this single thread can wait for are
                // its own requests in the ring: their completions retry it.
                Some(q) => match q.try_begin_write(pos, rest, no_wake()).map_err(failed)? {
                    Some(io) => {
                        let r = (io.host, io.len);
                        self.slots[i].wio = Some(io);
                        r
                    }
                    None => {
                        self.waiting.push(i);
                        return Ok(());
                    }
                },
                None => (pos, rest),
            }
        } else {
            match q {
                Some(q) => {
                    let (m, n) = q.map_read(pos, rest as u64).map_err(failed)?;
                    match m {
                        Mapping::Data(h) => (h, n as usize),
                        other => {
                            // Zeros, backing data, compressed: no host
                            // extent of ours to read; done synchronously.
                            let at = i * self.size + self.slots[i].done;
                            q.read_mapped(other, &mut self.buf[at..at + n as usize], pos)
                                .map_err(failed)?;
                            self.slots[i].seg_len = n as usize;
                            return self.finish_sync(i);
                        }
                    }
                }
                None => (pos, rest),
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
        if let (Some(q), Some(io)) = (self.img.as_qcow2(), s.wio.take()) {
            q.end_write(io, ok).map_err(failed)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_wrap_inside_the_image() {
        // 64 KiB image, 4 KiB requests: the last request starts below
        // 60 KiB, never at it.
        let mut off = 0;
        let mut seen = Vec::new();
        for _ in 0..16 {
            seen.push(off);
            off = next_offset(off, 4096, 4096, 65536);
        }
        assert_eq!(seen[14], 14 * 4096);
        assert_eq!(seen[15], 0);
        assert!(seen.iter().all(|&o| o + 4096 <= 65536));
        assert_eq!(next_offset(100, 7, 4096, 4096), 0);
        assert_eq!(next_offset(0, 70000, 4096, 65536), 70000 % 61440);
    }

    /// A scratch raw image of `len` bytes, removed when dropped.
    struct Scratch(std::path::PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    fn scratch(name: &str, len: u64) -> (Scratch, std::sync::Arc<dyn Image>) {
        let path =
            std::env::temp_dir().join(format!("rimg-bench-unit-{}-{name}.raw", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        let img = qcow2::open(
            &path,
            &OpenOptions {
                writable: true,
                format: Some(qcow2::Format::Raw),
                force_share: true,
                ..Default::default()
            },
        )
        .unwrap();
        (Scratch(path), img)
    }

    fn params(count: u64, depth: usize, flush_interval: u64, cache: &str) -> Params {
        Params {
            count,
            depth,
            size: 4096,
            step: 4096,
            offset: 0,
            pattern: 0x5a,
            flush_interval,
            cache: parse_cache(cache).unwrap(),
            prealloc: 0,
        }
    }

    #[test]
    fn flushes_on_qemu_img_schedule() {
        let (_f, img) = scratch("flush", 1 << 20);
        // Draining: a flush each time the requests not yet sent are a
        // multiple of 8 (96, 88, ..., 8 after the first four went out),
        // and one when all are done.
        let n = execute(
            img.as_ref(),
            &params(100, 4, 8, "writeback"),
            true,
            true,
            None,
        )
        .unwrap();
        assert_eq!(n, 13);
        // Without draining: the same points, but at the end every request
        // still in flight completes with 0 unsent and flushes.
        let n = execute(
            img.as_ref(),
            &params(100, 4, 8, "writeback"),
            true,
            false,
            None,
        )
        .unwrap();
        assert_eq!(n, 12 + 4);
        // No interval: no flushes; writethrough: one per request.
        let n = execute(
            img.as_ref(),
            &params(100, 4, 0, "writeback"),
            true,
            true,
            None,
        )
        .unwrap();
        assert_eq!(n, 0);
        let n = execute(
            img.as_ref(),
            &params(20, 4, 0, "writethrough"),
            true,
            true,
            None,
        )
        .unwrap();
        assert_eq!(n, 20);
        // The data went where the requests say: 100 requests of 4 KiB
        // from offset 0 cover the first 400 KiB with the pattern.
        let mut got = vec![0u8; 1 << 20];
        img.read_at(&mut got, 0).unwrap();
        assert!(got[..100 * 4096].iter().all(|&b| b == 0x5a));
        assert!(got[100 * 4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn cache_modes_like_qemu() {
        let none = parse_cache("none").unwrap();
        assert!(none.direct && !none.writethrough && !none.no_flush);
        assert_eq!(parse_cache("off"), Some(none));
        let ds = parse_cache("directsync").unwrap();
        assert!(ds.direct && ds.writethrough);
        let wt = parse_cache("writethrough").unwrap();
        assert!(!wt.direct && wt.writethrough);
        assert!(parse_cache("unsafe").unwrap().no_flush);
        assert!(parse_cache("writeback").is_some_and(|c| !c.direct && !c.writethrough));
        assert_eq!(parse_cache("None"), None);
    }
}
