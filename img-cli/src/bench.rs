//! `rimg bench`: qemu-img bench's options and output, with the requests
//! in flight driven through io_uring on the engine's split data path
//! (map under the metadata lock, data I/O in the ring, commit on
//! completion).

use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Instant;

use clap::Args;
use io_uring::{opcode, types, IoUring};
use qcow2::qcow::{Mapping, WriteIo};
use qcow2::{Format, Image, OpenOptions};

use crate::size::parse_size;
use crate::CliError;

#[derive(Args)]
pub struct BenchArgs {
    /// Number of requests
    #[arg(short = 'c', default_value_t = 75000)]
    count: u64,
    /// Requests in flight
    #[arg(short = 'd', default_value_t = 64)]
    depth: usize,
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// AIO mode (accepted for compatibility: rimg always uses io_uring)
    #[arg(short = 'i', value_name = "AIO")]
    aio: Option<String>,
    /// Native AIO (accepted for compatibility)
    #[arg(short = 'n')]
    native: bool,
    /// First offset
    #[arg(short = 'o', default_value = "0")]
    offset: String,
    /// Request size
    #[arg(short = 's', default_value = "4096")]
    size: String,
    /// Distance between request offsets (default: the request size)
    #[arg(short = 'S')]
    step: Option<String>,
    /// Cache mode: writeback (default) or none/directsync (not yet: O_DIRECT)
    #[arg(short = 't', default_value = "writeback")]
    cache: String,
    /// Write instead of read
    #[arg(short = 'w')]
    write: bool,
    /// Byte pattern for writes
    #[arg(long, default_value_t = 0)]
    pattern: u8,
    /// Flush after this many requests
    #[arg(long = "flush-interval")]
    flush_interval: Option<u64>,
    /// Do not wait for in-flight requests before a flush
    #[arg(long = "no-drain")]
    no_drain: bool,
    #[arg(short = 'q')]
    quiet: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    filename: String,
}

/// One request slot: a buffer and where its request stands.
struct Slot {
    buf: Vec<u8>,
    /// Guest offset of the request and bytes already done.
    off: u64,
    done: usize,
    /// The mapped write of the segment in flight.
    wio: Option<WriteIo>,
    seg_len: usize,
}

pub fn run(a: BenchArgs) -> Result<u8, CliError> {
    let _ = (a.aio.as_deref(), a.native, a.no_drain);
    if a.cache != "writeback" && a.cache != "unsafe" && a.cache != "writethrough" {
        return Err(CliError::new(format!(
            "cache mode '{}' is not supported yet",
            a.cache
        )));
    }
    let size = parse_size(&a.size)
        .filter(|&s| s > 0)
        .ok_or_else(|| CliError::new("Invalid buffer size specified"))? as usize;
    let step = match &a.step {
        Some(s) => parse_size(s).ok_or_else(|| CliError::new("Invalid step size specified"))?,
        None => size as u64,
    };
    let offset = parse_size(&a.offset).ok_or_else(|| CliError::new("Invalid offset specified"))?;
    if a.depth == 0 || a.depth > 4096 {
        return Err(CliError::new("Invalid queue depth specified"));
    }
    let format = match &a.format {
        Some(f) => Some(
            Format::from_name(f)
                .ok_or_else(|| CliError::new(format!("Unknown file format '{f}'")))?,
        ),
        None => None,
    };
    let img = qcow2::open(
        Path::new(&a.filename),
        &OpenOptions {
            writable: a.write,
            format,
            force_share: a.force_share,
            ..Default::default()
        },
    )
    .map_err(|e| CliError::new(format!("Could not open '{}': {e}", a.filename)))?;
    let image_size = img.size();
    if image_size < size as u64 {
        return Err(CliError::new("image is smaller than one request"));
    }
    if !a.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            a.count,
            if a.write { "write" } else { "read" },
            size,
            a.depth,
            offset,
            step
        );
    }
    let start = Instant::now();
    let mut b = Bench {
        img: img.as_ref(),
        write: a.write,
        ring: IoUring::new(a.depth.next_power_of_two() as u32)
            .map_err(|e| CliError::new(format!("io_uring: {e}")))?,
        slots: (0..a.depth)
            .map(|_| Slot {
                buf: vec![a.pattern; size],
                off: 0,
                done: 0,
                wio: None,
                seg_len: 0,
            })
            .collect(),
        next_off: offset % image_size,
        step,
        size,
        image_size,
        issued: 0,
        count: a.count,
        in_flight: 0,
        // Guest offset = host offset for raw images; qcow2 requests are
        // mapped first.
        fd: types::Fd(img.storage().file().as_raw_fd()),
        waiting: Vec::new(),
        finished: Vec::new(),
    };
    b.run(a.flush_interval)?;
    if !a.quiet {
        println!(
            "Run completed in {:.3} seconds.",
            start.elapsed().as_secs_f64()
        );
    }
    img.flush()?;
    Ok(0)
}

struct Bench<'a> {
    img: &'a dyn Image,
    write: bool,
    ring: IoUring,
    slots: Vec<Slot>,
    next_off: u64,
    step: u64,
    size: usize,
    image_size: u64,
    issued: u64,
    count: u64,
    in_flight: usize,
    fd: types::Fd,
    /// Slots whose next segment could not be mapped yet (its cluster is
    /// being allocated by a request in flight).
    waiting: Vec<usize>,
    /// Slots whose request completed without I/O.
    finished: Vec<usize>,
}

impl Bench<'_> {
    fn run(&mut self, flush_interval: Option<u64>) -> Result<(), CliError> {
        let mut since_flush = 0u64;
        for i in 0..self.slots.len() {
            if self.issued < self.count {
                self.start_request(i)?;
            }
        }
        let mut done: Vec<(usize, Option<i32>)> = Vec::with_capacity(self.slots.len());
        while self.in_flight > 0 || !self.waiting.is_empty() || !self.finished.is_empty() {
            if self.in_flight > 0 {
                let want = if self.finished.is_empty() { 1 } else { 0 };
                self.ring
                    .submit_and_wait(want)
                    .map_err(|e| CliError::new(format!("io_uring: {e}")))?;
            }
            done.clear();
            done.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data() as usize, Some(c.result()))),
            );
            done.extend(self.finished.drain(..).map(|i| (i, None)));
            for &(i, res) in &done {
                let complete = match res {
                    Some(res) => {
                        self.in_flight -= 1;
                        self.complete_segment(i, res)?
                    }
                    None => true,
                };
                if complete {
                    since_flush += 1;
                    if let Some(n) = flush_interval {
                        if since_flush >= n {
                            self.img.flush()?;
                            since_flush = 0;
                        }
                    }
                    if self.issued < self.count {
                        self.start_request(i)?;
                    }
                }
            }
            let waiting = std::mem::take(&mut self.waiting);
            for i in waiting {
                self.submit_segment(i)?;
            }
        }
        Ok(())
    }

    fn start_request(&mut self, i: usize) -> Result<(), CliError> {
        let off = self.next_off;
        self.next_off += self.step;
        if self.next_off + self.size as u64 > self.image_size {
            self.next_off = 0;
        }
        self.issued += 1;
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
                Some(q) => match q.try_begin_write(pos, rest)? {
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
                    let (m, n) = q.map_read(pos, rest as u64)?;
                    match m {
                        Mapping::Data(h) => (h, n as usize),
                        other => {
                            // Zeros, backing data, compressed: no host
                            // extent of ours to read; done synchronously.
                            let s = &mut self.slots[i];
                            q.read_mapped(other, &mut s.buf[s.done..s.done + n as usize], pos)?;
                            s.seg_len = n as usize;
                            return self.finish_sync(i);
                        }
                    }
                }
                None => (pos, rest),
            }
        };
        let s = &mut self.slots[i];
        s.seg_len = len;
        let ptr = s.buf[s.done..].as_mut_ptr();
        let e = if self.write {
            opcode::Write::new(self.fd, ptr, len as u32)
                .offset(host)
                .build()
        } else {
            opcode::Read::new(self.fd, ptr, len as u32)
                .offset(host)
                .build()
        }
        .user_data(i as u64);
        // SAFETY: the buffer belongs to slot `i`, lives in `self.slots`
        // (never resized while the bench runs) and is not touched again
        // until this entry's completion has been reaped.
        unsafe {
            while self.ring.submission().push(&e).is_err() {
                self.ring
                    .submit()
                    .map_err(|e| CliError::new(format!("io_uring: {e}")))?;
            }
        }
        self.in_flight += 1;
        Ok(())
    }

    /// A segment served without I/O: continue the request.
    fn finish_sync(&mut self, i: usize) -> Result<(), CliError> {
        let s = &mut self.slots[i];
        s.done += s.seg_len;
        if s.done < self.size {
            return self.submit_segment(i);
        }
        self.finished.push(i);
        Ok(())
    }

    /// Handles a completion; returns true when slot `i`'s whole request
    /// is done.
    fn complete_segment(&mut self, i: usize, res: i32) -> Result<bool, CliError> {
        let ok = res >= 0 && res as usize == self.slots[i].seg_len;
        if let (Some(q), Some(io)) = (self.img.as_qcow2(), self.slots[i].wio.take()) {
            q.end_write(io, ok)?;
        }
        if !ok {
            let err = if res < 0 {
                std::io::Error::from_raw_os_error(-res).to_string()
            } else {
                format!("short transfer ({res} bytes)")
            };
            return Err(CliError::new(format!(
                "request at offset {} failed: {err}",
                self.slots[i].off
            )));
        }
        let s = &mut self.slots[i];
        s.done += s.seg_len;
        if s.done < self.size {
            self.submit_segment(i)?;
            return Ok(false);
        }
        Ok(true)
    }
}
