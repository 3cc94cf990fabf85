//! `rimg convert`: copies guest data between images and formats.
//!
//! Worker threads (one per core, `-m` at most; one without -W or -c, as
//! qemu-img then writes in guest order) each take the next chunk of
//! the source, find out through block status what is stored there, read
//! it, detect zeros, compress (`-c`) and write it: reading, zero
//! detection, compression and writing overlap across the workers. Regions
//! that read as zeros are never read, and are written only where the
//! target would not read as zeros anyway.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clap::Args;
use qcow2::{chain_status, ChainStatus, Format, Image, OpenOptions};

use crate::create::{parse_options, Parsed};
use crate::opts::OptList;
use crate::progress::Progress;
use crate::size::parse_size;
use crate::CliError;

#[derive(Args)]
pub struct ConvertArgs {
    /// Source format (probed when absent)
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format (default raw)
    #[arg(short = 'O', value_name = "OUTPUT_FMT")]
    out_format: Option<String>,
    /// Output image options, as for create
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Compress the output (qcow2)
    #[arg(short = 'c')]
    compress: bool,
    /// Backing file of the output; only data that differs from it is written
    #[arg(short = 'B', value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// Format of the output's backing file
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_fmt: Option<String>,
    /// Do not create the output: write into the existing image
    #[arg(short = 'n')]
    no_create: bool,
    /// Runs of zeros at least this long become holes / zero clusters
    #[arg(short = 'S', value_name = "SPARSE_SIZE", default_value = "4k")]
    sparse: String,
    /// Output cache mode: unsafe (default, no flushes), writeback,
    /// writethrough, none, directsync
    #[arg(short = 't', value_name = "CACHE", default_value = "unsafe")]
    cache: String,
    /// Source cache mode (accepted for compatibility)
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    /// Allow out-of-order writes (several workers write at once)
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Parallel requests (threads, at most one per core are used)
    #[arg(short = 'm', value_name = "NUM", default_value_t = 8)]
    parallel: usize,
    /// The existing output reads as zeros: skip writing zeros (with -n)
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Show progress
    #[arg(short = 'p')]
    progress: bool,
    #[arg(short = 'q')]
    quiet: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Copy offloading (accepted for compatibility)
    #[arg(short = 'C')]
    copy_offload: bool,
    /// Copy the source's persistent bitmaps (qcow2 to qcow2)
    #[arg(long)]
    bitmaps: bool,
    /// With --bitmaps: skip inconsistent bitmaps instead of failing
    #[arg(long)]
    skip_broken_bitmaps: bool,
    /// Internal snapshot to convert from
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Source image(s), concatenated, then the output image
    #[arg(required = true, num_args = 2..)]
    files: Vec<String>,
}

/// Bytes handed to a worker at a time.
const CHUNK: u64 = 2 << 20;

fn fmt_arg(f: &Option<String>) -> Result<Option<Format>, CliError> {
    match f {
        None => Ok(None),
        Some(f) => Format::from_name(f)
            .map(Some)
            .ok_or_else(|| CliError::new(format!("Unknown file format '{f}'"))),
    }
}

pub fn run(a: ConvertArgs) -> Result<u8, CliError> {
    let _ = (
        &a.src_cache,
        a.out_of_order,
        a.force_share,
        a.copy_offload,
        a.quiet,
    );
    crate::bitmap::convert_flags(a.bitmaps, a.skip_broken_bitmaps)?;
    let (srcs, dst) = a.files.split_at(a.files.len() - 1);
    let dst = &dst[0];
    if a.snapshot.is_some() && srcs.len() > 1 {
        return Err(CliError::new(
            "No support for concatenating multiple snapshot",
        ));
    }
    if srcs.len() > 1 && a.backing.is_some() {
        return Err(CliError::new(
            "Having a backing file for the target makes no sense when concatenating multiple input images",
        ));
    }
    let src_fmt = fmt_arg(&a.format)?;
    let out_fmt = fmt_arg(&a.out_format)?.unwrap_or(Format::Raw);
    if a.compress && out_fmt != Format::Qcow2 {
        return Err(CliError::new(
            "Compression not supported for this file format",
        ));
    }
    let sparse = parse_size(&a.sparse)
        .ok_or_else(|| CliError::new("Invalid buffer size for sparse output specified"))?;
    let unsafe_cache = match a.cache.as_str() {
        "unsafe" => true,
        "writeback" | "writethrough" | "none" | "directsync" => false,
        c => return Err(CliError::new(format!("Invalid cache option: {c}"))),
    };
    let parts: Vec<Arc<dyn Image>> = srcs
        .iter()
        .map(|s| {
            if let Some(img) = crate::blockopts::open_null(s, a.image_opts)? {
                return Ok(img);
            }
            let (path, opts) = crate::blockopts::open_options(
                s,
                a.image_opts,
                OpenOptions {
                    format: src_fmt,
                    force_share: a.force_share,
                    ..Default::default()
                },
            )?;
            qcow2::open(&path, &opts)
                .map_err(|e| CliError::new(format!("Could not open '{s}': {e}")))
        })
        .collect::<Result<_, _>>()?;
    if let Some(sn) = &a.snapshot {
        load_snapshot(parts[0].as_ref(), sn)?;
    }
    let src_bitmaps = crate::bitmap::convert_check(&parts, a.bitmaps, a.skip_broken_bitmaps)?;
    let first_src = parts[0].clone();
    let sources = Sources::new(parts);
    let total = sources.size;

    let target_fresh = !a.no_create;
    let mut target_key = None;
    // Preallocated clusters of an encrypted image decrypt to noise, not
    // zeros (QEMU's has_zero_init is false for them too).
    let mut noise_init = false;
    if a.no_create {
        // -B names what the existing target is taken to be based on; rimg
        // compares with the target's own backing file (if any) instead,
        // which writes no less than is needed.
        if !a.options.is_empty() {
            return Err(CliError::new(
                "-o has no effect when skipping image creation",
            ));
        }
    } else {
        let list = OptList::parse(&a.options).map_err(CliError::new)?;
        let Parsed { mut o, encrypt, .. } = parse_options(out_fmt, &list)?;
        o.encrypt = match out_fmt {
            Format::Luks => crate::create::luks_encryption(&encrypt)
                .map_err(|m| CliError::new(format!("{dst}: error while converting luks: {m}")))?,
            _ => crate::object::encryption(&encrypt, "encrypt.")
                .map_err(|m| CliError::new(format!("{dst}: {m}")))?,
        };
        if a.compress && o.encrypt.is_some() {
            return Err(CliError::new(
                "Compression and encryption not supported at the same time",
            ));
        }
        target_key = o.encrypt.as_ref().map(|(_, k)| k.clone());
        // A luks payload never reads as zeros before it is written.
        noise_init = out_fmt == Format::Luks
            || (o.encrypt.is_some() && o.preallocation != qcow2::Preallocation::Off);
        if a.backing.is_some() {
            o.backing_file = a.backing.clone();
        }
        if a.backing_fmt.is_some() {
            o.backing_format = a.backing_fmt.clone();
        }
        if o.backing_file.is_some() && o.backing_format.is_none() {
            // qemu-img's wording (not create's: convert has its own).
            return Err(CliError::new(
                "Use of backing file requires explicit backing format",
            ));
        }
        o.size = if out_fmt == Format::Qcow2 {
            total.next_multiple_of(512)
        } else {
            total
        };
        qcow2::create(Path::new(dst), &o).map_err(|e| {
            CliError::new(format!(
                "{dst}: error while converting {}: {e}",
                out_fmt.name()
            ))
        })?;
    }
    let target = qcow2::open(
        Path::new(dst),
        &OpenOptions {
            writable: true,
            format: if a.no_create { None } else { Some(out_fmt) },
            qcow2: qcow2::Qcow2Options {
                encrypt_key: target_key,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .map_err(|e| CliError::new(format!("Could not open '{dst}': {e}")))?;
    if target.size() < total {
        return Err(CliError::new(format!(
            "Target image '{dst}' is smaller than the source ({} < {total} bytes)",
            target.size()
        )));
    }
    crate::bitmap::convert_target_check(src_bitmaps.is_some(), target.as_ref())?;
    target.storage().set_no_flush(unsafe_cache);
    if a.compress && !target.supports_compression() {
        return Err(CliError::new(
            "Compression not supported for this file format",
        ));
    }
    let job = Job {
        target: target.as_ref(),
        cluster: target.cluster_size(),
        compress: a.compress,
        sparse,
        // Zeros need not be written where the target already reads as
        // zeros: a new image without backing file, or one declared zero.
        target_zero: (target_fresh && target.backing().is_none() && !noise_init)
            || a.target_is_zero,
        overwrite_zeros: a.no_create && a.backing.is_none(),
        // As qemu-img: progress counts the data to copy (everything with
        // -S 0), not the holes.
        progress: Progress::new(
            a.progress && !a.quiet,
            "Converting",
            if sparse == 0 || !a.progress || a.quiet {
                total
            } else {
                sources.data_bytes(0, total)?
            },
            1.0,
        ),
        count_data: a.progress && !a.quiet,
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
    };
    // Without -W qemu-img writes in guest order, so a fresh target's
    // clusters lie in guest order (map shows one extent, not several).
    // Compression keeps its workers: that is where they pay off.
    let workers = if a.out_of_order || a.compress {
        a.parallel.clamp(
            1,
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        )
    } else {
        1
    };
    // The sources as one disk: a target cluster that straddles two of
    // them is still written (and compressed) whole.
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| job.worker(&sources, &next));
        }
    });
    if let Some(e) = job.error.lock().unwrap().take() {
        return Err(e);
    }
    crate::bitmap::convert_copy(&src_bitmaps, first_src.as_ref(), target.as_ref())?;
    target.flush()?;
    job.progress.complete();
    job.progress.finish();
    Ok(0)
}

/// Several source images read as one disk, one after the other.
struct Sources {
    /// (first byte in the concatenation, image)
    parts: Vec<(u64, Arc<dyn Image>)>,
    size: u64,
}

impl Sources {
    fn new(images: Vec<Arc<dyn Image>>) -> Sources {
        let mut parts = Vec::with_capacity(images.len());
        let mut size = 0;
        for img in images {
            let n = img.size();
            parts.push((size, img));
            size += n;
        }
        Sources { parts, size }
    }

    /// The part holding byte `pos`, and how far it goes from there.
    fn part(&self, pos: u64) -> (&dyn Image, u64, u64) {
        let i = self.parts.partition_point(|(start, _)| *start <= pos) - 1;
        let (start, img) = &self.parts[i];
        (img.as_ref(), pos - start, start + img.size() - pos)
    }

    /// As [`chain_status`], within one part.
    fn status(&self, pos: u64, len: u64) -> Result<(ChainStatus, u64), CliError> {
        let (img, at, left) = self.part(pos);
        Ok(chain_status(img, at, len.min(left))?)
    }

    /// Bytes of [from, to) some layer stores data for (what qemu-img's
    /// progress counts).
    fn data_bytes(&self, from: u64, to: u64) -> Result<u64, CliError> {
        let mut n = 0;
        let mut pos = from;
        while pos < to {
            let (st, len) = self.status(pos, to - pos)?;
            if st == ChainStatus::Data {
                n += len;
            }
            pos += len;
        }
        Ok(n)
    }

    fn read_at(&self, buf: &mut [u8], pos: u64) -> Result<(), CliError> {
        let mut done = 0;
        while done < buf.len() {
            let (img, at, left) = self.part(pos + done as u64);
            let n = (left as usize).min(buf.len() - done);
            img.read_at(&mut buf[done..done + n], at)?;
            done += n;
        }
        Ok(())
    }
}

struct Job<'a> {
    target: &'a dyn Image,
    /// The target's cluster size; None for a raw target.
    cluster: Option<u64>,
    compress: bool,
    /// -S: zero runs shorter than this are written as data; 0 allocates
    /// everything.
    sparse: u64,
    target_zero: bool,
    /// -n without -B: zero regions are written whatever the target holds.
    overwrite_zeros: bool,
    progress: Progress,
    /// Progress is shown: count the data of each chunk for it.
    count_data: bool,
    failed: AtomicBool,
    error: Mutex<Option<CliError>>,
}

/// Splits `b`, to be written at offset `at`, into (from, to, is_data)
/// runs by qemu-img's -S rule: zeros become a hole only in a run of at
/// least `min` bytes; runs are judged in 512-byte sectors and their ends
/// aligned to `min` rounded down to a power of two (a data run's end up,
/// a hole's end down; a short zero run ending past a boundary is data).
/// A buffer that starts with zeros starts with a hole.
fn sparse_runs(b: &[u8], at: u64, min: u64) -> Vec<(usize, usize, bool)> {
    const SECTOR: usize = 512;
    let n = b.len();
    let min = (min as usize).min(n);
    let align = 1u64 << (min.max(SECTOR) as u64).ilog2();
    let zero_at = |i: usize| is_zero(&b[i..(i + SECTOR).min(n)]);
    // The run starting at `i`: its end and whether it is data.
    let run = |i: usize| -> (usize, bool) {
        let zero = zero_at(i);
        let mut j = (i + SECTOR).min(n);
        while j < n && zero_at(j) == zero {
            j = (j + SECTOR).min(n);
        }
        if j == n {
            return (n, !zero);
        }
        let tail = ((at + j as u64) % align) as usize;
        if tail == 0 {
            return (j, !zero);
        }
        if !zero || j - i <= tail {
            ((j + align as usize - tail).min(n), true)
        } else {
            (j - tail, false)
        }
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let (j, data) = run(i);
        if !data {
            out.push((i, j, false));
            i = j;
            continue;
        }
        // Data goes on over zero runs shorter than `min`.
        let mut used = j;
        let mut k = j;
        while k < n {
            let (e, d) = run(k);
            if d {
                used = e;
            } else if e - k >= min {
                break;
            }
            k = e;
        }
        out.push((i, used, true));
        i = used;
    }
    out
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: reinterpreting initialised bytes as u128 words is valid
        // for any bit pattern; align_to only yields aligned middle words.
        unsafe { b.align_to::<u128>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

impl Job<'_> {
    fn worker(&self, src: &Sources, next: &AtomicU64) {
        let mut buf = vec![0u8; CHUNK as usize];
        let mut cmp = Vec::new();
        let size = src.size;
        loop {
            if self.failed.load(Ordering::Relaxed) {
                return;
            }
            let off = next.fetch_add(CHUNK, Ordering::Relaxed);
            if off >= size {
                return;
            }
            let len = CHUNK.min(size - off);
            match self.chunk(src, off, len, &mut buf, &mut cmp) {
                Ok(data) => self.progress.add(data),
                Err(e) => {
                    self.failed.store(true, Ordering::Relaxed);
                    self.error.lock().unwrap().get_or_insert(e);
                    return;
                }
            }
        }
    }

    /// Copies source bytes [off, off + len) to the same target offset;
    /// returns how many of them were data (read from the source), or all
    /// of them with -S 0.
    fn chunk(
        &self,
        src: &Sources,
        off: u64,
        len: u64,
        buf: &mut [u8],
        cmp: &mut Vec<u8>,
    ) -> Result<u64, CliError> {
        let end = off + len;
        if self.sparse == 0 {
            // -S 0: everything is written, zeros included.
            let b = &mut buf[..len as usize];
            src.read_at(b, off)?;
            self.write(off, b)?;
            return Ok(len);
        }
        let mut data_bytes = 0;
        let Some(g) = self.cluster else {
            // Raw target: copy data regions, leave holes.
            let mut pos = off;
            while pos < end {
                let (st, n) = src.status(pos, end - pos)?;
                match st {
                    ChainStatus::Zero => self.zeros(pos, n)?,
                    ChainStatus::Data => {
                        let b = &mut buf[(pos - off) as usize..(pos - off + n) as usize];
                        src.read_at(b, pos)?;
                        self.data(pos, b, cmp)?;
                        data_bytes += n;
                    }
                }
                pos += n;
            }
            return Ok(data_bytes);
        };
        // qcow2 target: decide per target cluster, so that a cluster whose
        // source has both data and holes is written whole (and can be
        // compressed whole).
        let mut pos = off;
        let mut run: Option<(u64, bool)> = None; // (start, is_data)
        let finish = |from: u64,
                      to: u64,
                      data: bool,
                      buf: &mut [u8],
                      cmp: &mut Vec<u8>|
         -> Result<(), CliError> {
            if data {
                let b = &mut buf[(from - off) as usize..(to - off) as usize];
                src.read_at(b, from)?;
                self.data(from, b, cmp)
            } else {
                self.zeros(from, to - from)
            }
        };
        while pos < end {
            let w_end = (pos / g + 1) * g;
            let w_end = w_end.min(end);
            let mut data = false;
            let mut p = pos;
            while p < w_end {
                let (st, n) = src.status(p, w_end - p)?;
                if st == ChainStatus::Data {
                    data = true;
                    break;
                }
                p += n;
            }
            match run {
                Some((_, d)) if d == data => {}
                Some((s, d)) => {
                    finish(s, pos, d, buf, cmp)?;
                    run = Some((pos, data));
                }
                None => run = Some((pos, data)),
            }
            pos = w_end;
        }
        if let Some((s, d)) = run {
            finish(s, end, d, buf, cmp)?;
        }
        if self.count_data {
            data_bytes = src.data_bytes(off, end)?;
        }
        Ok(data_bytes)
    }

    fn zeros(&self, at: u64, len: u64) -> Result<(), CliError> {
        if self.target_zero {
            return Ok(());
        }
        if self.overwrite_zeros {
            // -n: qemu-img assumes nothing of the target and writes zeros
            // over every zero region.
            self.target.write_zeroes(at, len, true)?;
            return Ok(());
        }
        if let Some(b) = self.target.backing() {
            // Unallocated target clusters read from the backing file:
            // only where that reads as zeros may they stay unallocated.
            if at < b.size() {
                let mut pos = at;
                let end = at + len;
                while pos < end.min(b.size()) {
                    let (st, n) = chain_status(b.as_ref(), pos, end.min(b.size()) - pos)?;
                    if st == ChainStatus::Data {
                        self.target.write_zeroes(pos, n, true)?;
                    }
                    pos += n;
                }
            }
            return Ok(());
        }
        self.target.write_zeroes(at, len, true)?;
        Ok(())
    }

    /// Writes one run of source data at target offset `at`, leaving out
    /// zeros (and, over a backing file, what the backing file already has).
    fn data(&self, at: u64, b: &[u8], cmp: &mut Vec<u8>) -> Result<(), CliError> {
        // Granularity: whole target clusters for qcow2 (a cluster with any
        // data is allocated anyway), the -S size for raw.
        let gran = self.cluster.unwrap_or(self.sparse);
        let backing = self.target.backing().cloned();
        if backing.is_none() && !self.compress {
            // -S decides which zero runs become holes (with -c only whole
            // zero clusters do, as in qemu-img).
            for (from, to, data) in sparse_runs(b, at, self.sparse) {
                if data {
                    self.write(at + from as u64, &b[from..to])?;
                } else if !self.target_zero {
                    self.target
                        .write_zeroes(at + from as u64, (to - from) as u64, true)?;
                }
            }
            return Ok(());
        }
        let mut i = 0usize;
        let mut run_start: Option<usize> = None;
        let flush_run = |from: usize, to: usize| -> Result<(), CliError> {
            if from < to {
                self.write(at + from as u64, &b[from..to])?;
            }
            Ok(())
        };
        while i < b.len() {
            // Piece up to the next granularity boundary in target space.
            let g_end = ((at + i as u64) / gran + 1) * gran;
            let j = ((g_end - at) as usize).min(b.len());
            let piece = &b[i..j];
            let skip = if let Some(bk) = &backing {
                // Same as what the backing file shows there: not needed.
                let pos = at + i as u64;
                cmp.resize(piece.len(), 0);
                if pos + piece.len() as u64 <= bk.size() {
                    bk.read_at(cmp, pos)?;
                    cmp[..] == *piece
                } else {
                    false
                }
            } else {
                is_zero(piece) && (self.target_zero || self.cluster.is_some())
            };
            if skip {
                if let Some(s) = run_start.take() {
                    flush_run(s, i)?;
                }
                if backing.is_none() && !self.target_zero {
                    // A zero piece over data the target may hold.
                    self.target
                        .write_zeroes(at + i as u64, piece.len() as u64, true)?;
                }
            } else if run_start.is_none() {
                run_start = Some(i);
            }
            i = j;
        }
        if let Some(s) = run_start {
            flush_run(s, b.len())?;
        }
        Ok(())
    }

    fn write(&self, at: u64, data: &[u8]) -> Result<(), CliError> {
        if !self.compress {
            return Ok(self.target.write_at(data, at)?);
        }
        let t = self.target;
        let cs = self.cluster.expect("compression needs clusters") as usize;
        let mut k = 0;
        while k < data.len() {
            let pos = at + k as u64;
            let n = (cs - (pos % cs as u64) as usize).min(data.len() - k);
            let whole = pos.is_multiple_of(cs as u64) && (n == cs || pos + n as u64 == t.size());
            if whole {
                t.write_compressed(pos, &data[k..k + n])?;
            } else {
                t.write_at(&data[k..k + n], pos)?;
            }
            k += n;
        }
        Ok(())
    }
}

/// Makes the source read as internal snapshot `spec`: an ID or name, or
/// `snapshot.id=ID[,snapshot.name=NAME]` / `snapshot.name=NAME`.
fn load_snapshot(img: &dyn Image, spec: &str) -> Result<(), CliError> {
    let (mut id, mut name) = (None, None);
    if spec.starts_with("snapshot.") {
        for kv in spec.split(',') {
            match kv.split_once('=') {
                Some(("snapshot.id", v)) => id = Some(v),
                Some(("snapshot.name", v)) => name = Some(v),
                _ => {
                    return Err(CliError::new(format!(
                        "Failed in parsing snapshot param '{spec}'"
                    )))
                }
            }
        }
    } else {
        name = Some(spec);
    }
    let Some(q) = img.as_qcow2() else {
        return Err(CliError::new(format!(
            "Failed to load snapshot: Block format '{}' used by device '' does not support internal snapshots",
            img.format().name()
        )));
    };
    q.snapshot_load_tmp(name.unwrap_or(""), id)
        .map_err(|e| CliError::new(format!("Failed to load snapshot: {e}")))
}
