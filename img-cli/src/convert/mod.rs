//! `rimg convert`: copies guest data between images and formats.
//!
//! Worker threads (one per core, `-m` at most) each claim the next chunk
//! of the source (or, where it reads as zeros, a span of chunks), find
//! out through block status what is stored there, read it, detect
//! zeros, compress (`-c`) and write it: reading, zero detection,
//! compression and writing overlap across the workers. Without -W,
//! writes are mapped in guest order, claim after claim, as qemu-img
//! writes (see `copy` and `turn`); a claim with nothing to write steps
//! out of that order. Where the target cannot take the split data path
//! (foreign formats, encrypted images), workers still plan in parallel
//! and write in turn. Regions that read as zeros are never read, and are
//! written only where the target would not read as zeros anyway.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use clap::Args;
use qcow2::{Format, Image, OpenOptions};

use crate::create::{parse_options, Parsed};
use crate::opts::OptList;
use crate::progress::{Progress, ProgressOpt, Target};
use crate::size::parse_size;
use crate::CliError;

mod buffer;
mod copy;
mod offload;
mod sources;
mod sparse;
mod turn;
use copy::Job;
use sources::Sources;
use turn::Turn;

#[derive(Args)]
pub struct ConvertArgs {
    /// Source format (probed when absent)
    #[arg(short = 'f', long = "source-format", value_name = "FMT")]
    format: Option<String>,
    /// Output format (default raw)
    #[arg(short = 'O', long = "target-format", value_name = "OUTPUT_FMT")]
    out_format: Option<String>,
    /// Output image options, as for create
    #[arg(short = 'o', long = "target-options", value_name = "OPTIONS")]
    options: Vec<String>,
    /// Compress the output (qcow2)
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Backing file of the output; only data that differs from it is written
    #[arg(short = 'B', long = "backing", value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// Format of the output's backing file
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_fmt: Option<String>,
    /// Do not create the output: write into the existing image
    #[arg(short = 'n', long = "no-create")]
    no_create: bool,
    /// Runs of zeros at least this long become holes / zero clusters
    /// (default 4k)
    #[arg(short = 'S', long = "sparse-size", value_name = "SPARSE_SIZE")]
    sparse: Option<String>,
    /// Output cache mode: unsafe (default, no flushes), writeback,
    /// writethrough, none, directsync
    #[arg(
        short = 't',
        long = "target-cache",
        value_name = "CACHE",
        default_value = "unsafe"
    )]
    cache: String,
    /// Source cache mode (accepted for compatibility)
    #[arg(short = 'T', long = "source-cache", value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    /// Allow out-of-order writes (several workers write at once)
    #[arg(short = 'W', long = "oob-writes")]
    out_of_order: bool,
    /// Parallel requests, 1 to 16 (threads, at most one per core are used)
    #[arg(
        short = 'm',
        long = "parallel",
        value_name = "NUM",
        default_value = "8",
        allow_hyphen_values = true
    )]
    parallel: String,
    /// The existing output reads as zeros: skip writing zeros (with -n)
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    #[command(flatten)]
    progress: ProgressOpt,
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts", visible_alias = "source-image-opts")]
    image_opts: bool,
    /// The output name is an option string, as for --image-opts (with
    /// -n: an existing target, whose format the string gives, not -O)
    #[arg(long = "target-image-opts")]
    target_image_opts: bool,
    /// Copy at most RATE bytes of data per second (suffixes as for sizes)
    #[arg(
        short = 'r',
        long = "rate",
        value_name = "RATE",
        allow_hyphen_values = true
    )]
    rate: Option<String>,
    /// Copy offloading: data goes from file to file inside the kernel
    /// (copy_file_range; a reflink where the file system shares extents)
    #[arg(short = 'C', long = "copy-range-offloading")]
    copy_offload: bool,
    /// Carry on past read errors: what cannot be read is written as
    /// zeros, and each sector that failed is reported (unless -q)
    #[arg(long)]
    salvage: bool,
    /// Copy the source's persistent bitmaps (qcow2 to qcow2)
    #[arg(long)]
    bitmaps: bool,
    /// With --bitmaps: skip inconsistent bitmaps instead of failing
    #[arg(long)]
    skip_broken_bitmaps: bool,
    /// Internal snapshot to convert from
    #[arg(
        short = 'l',
        long = "source-snapshot",
        visible_alias = "snapshot",
        value_name = "SNAPSHOT"
    )]
    snapshot: Option<String>,
    /// Source image(s), concatenated, then the output image (options
    /// may come between them, as with qemu-img's getopt)
    #[arg(num_args = 0..)]
    files: Vec<String>,
}

/// Bytes a worker claims at a time (a run of zeros: up to 64 of them,
/// see `copy::Claims`), and the size of its read buffer.
const CHUNK: u64 = 2 << 20;

/// How far ahead of a qcow2 target's new clusters file space is reserved.
const RESERVE_AHEAD: u64 = 128 << 20;

fn fmt_arg(f: &Option<String>) -> Result<Option<Format>, CliError> {
    match f {
        None => Ok(None),
        Some(f) => Format::from_name(f)
            .map(Some)
            .ok_or_else(|| CliError::new(format!("Unknown file format '{f}'"))),
    }
}

/// `-S`'s value, with qemu-img's checks: whole sectors, at most 16 MiB.
fn sparse_size(v: &str) -> Result<u64, CliError> {
    let n = parse_size(v).ok_or_else(|| {
        CliError::new(format!(
            "Invalid buffer size for sparse output specified: '{v}'."
        ))
    })?;
    if n % 512 != 0 || n > 16 << 20 {
        return Err(CliError::new(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).",
        ));
    }
    Ok(n)
}

pub fn run(a: ConvertArgs) -> Result<u8, CliError> {
    let _ = (&a.src_cache, a.out_of_order, a.force_share);
    crate::bitmap::convert_flags(a.bitmaps, a.skip_broken_bitmaps)?;
    // Values first, as qemu-img's getopt loop checks them.
    let sparse = sparse_size(a.sparse.as_deref().unwrap_or("4k"))?;
    // qemu-img's coroutines, at most 16.
    let parallel = crate::size::cvtint("number of coroutines", &a.parallel, 1, 16)
        .map_err(CliError::new)? as usize;
    if a.copy_offload {
        // qemu-img's refusals: its offload copies whole ranges as they are.
        if a.compress {
            return Err(CliError::new(
                "Cannot enable copy offloading when -c is used",
            ));
        }
        if a.sparse.is_some() {
            return Err(CliError::new(
                "Cannot enable copy offloading when -S is used",
            ));
        }
        if a.salvage {
            return Err(CliError::new(
                "Cannot use copy offloading in salvaging mode",
            ));
        }
    }
    if a.target_image_opts && !a.no_create {
        return Err(CliError::new("--target-image-opts requires use of -n flag"));
    }
    let limit = crate::rate::Limit::parse(&a.rate)?;
    if a.files.len() < 2 {
        return Err(CliError::new("Must specify image file name"));
    }
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
    // QEMU's vmdk driver writes a compressed write into a monolithicSparse
    // extent as a plain one: -c is taken and changes nothing.
    let compress = a.compress && out_fmt != Format::Vmdk;
    // An option string's target is checked once open (below).
    if compress && out_fmt != Format::Qcow2 && !a.target_image_opts {
        return Err(CliError::new(
            "Compression not supported for this file format",
        ));
    }
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
        crate::common::load_snapshot(parts[0].as_ref(), sn)?;
    }
    let src_bitmaps = crate::bitmap::convert_check(&parts, a.bitmaps, a.skip_broken_bitmaps)?;
    let first_src = parts[0].clone();
    let mut sources = Sources::new(parts);
    if a.salvage {
        sources.salvage(a.quiet);
    }
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
        if compress && o.encrypt.is_some() {
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
    if a.target_image_opts && a.out_format.is_some() {
        return Err(CliError::new(
            "--image-opts and --format are mutually exclusive",
        ));
    }
    let (target_path, target_opts) = crate::blockopts::open_options(
        dst,
        a.target_image_opts,
        OpenOptions {
            writable: true,
            // -n opens the existing target as -O says, as qemu-img does
            // (a qcow2 -O on a raw file is refused, not written raw);
            // without -O it is probed.
            format: if a.no_create && a.out_format.is_none() {
                None
            } else {
                Some(out_fmt)
            },
            qcow2: qcow2::Qcow2Options {
                encrypt_key: target_key,
                // New clusters land in file space reserved ahead of them:
                // ext4 and XFS then skip their per-block delayed
                // allocation in every buffered write (about a tenth of
                // the copy's time), and the tail is cut off at close.
                preallocate_ahead: RESERVE_AHEAD,
                ..Default::default()
            },
            ..Default::default()
        },
    )?;
    let target = qcow2::open(&target_path, &target_opts)
        .map_err(|e| CliError::new(format!("Could not open '{dst}': {e}")))?;
    // An option string's format is known once open (-c on vmdk: above).
    let compress = match a.target_image_opts {
        true => a.compress && target.format() != Format::Vmdk,
        false => compress,
    };
    if target.size() < total {
        return Err(CliError::new(format!(
            "Target image '{dst}' is smaller than the source ({} < {total} bytes)",
            target.size()
        )));
    }
    crate::bitmap::convert_target_check(src_bitmaps.is_some(), target.as_ref())?;
    target.storage().set_no_flush(unsafe_cache);
    if compress && !target.supports_compression() {
        return Err(CliError::new(
            "Compression not supported for this file format",
        ));
    }
    // Compressed clusters live in the image file, which has no room for
    // data with an external data file: qemu-img's convert -c fails there
    // even when nothing gets compressed (without a message); so does
    // this one, before writing anything, and says why.
    if compress
        && target
            .as_qcow2()
            .is_some_and(|q| q.header().has_data_file())
    {
        return Err(CliError::new(
            "Compression is not supported with an external data file",
        ));
    }
    // Without -W qemu-img writes in guest order, so a fresh target's
    // clusters lie in guest order (map shows one extent, not several).
    // Workers still copy in parallel where the target takes the split
    // data path, mapping their writes in turn (see `copy`); elsewhere one
    // worker writes in order. Compression keeps its workers out of order:
    // that is where they pay off.
    // A stream target takes compressed whole clusters only (qemu-img's
    // compressed mode, which it enters by itself there too).
    let compress = compress || target.compressed_writes_only();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Targets without a split write path (foreign formats, encrypted
    // images) still read and plan in parallel, and write in turn.
    let in_turn = !a.out_of_order && !compress;
    let workers = if a.out_of_order || compress || in_turn {
        parallel.min(cores)
    } else {
        1
    };
    let cluster = target.cluster_size();
    let shown = a.progress.target(a.quiet);
    let job = Job {
        target: &target,
        cluster,
        compress,
        sparse,
        // Zeros need not be written where the target already reads as
        // zeros: a new image without backing file, or one declared zero.
        target_zero: (target_fresh && target.backing().is_none() && !noise_init)
            || a.target_is_zero,
        overwrite_zeros: a.no_create && a.backing.is_none(),
        // As qemu-img: progress counts the data to copy (everything with
        // -S 0), not the holes.
        progress: Progress::new(
            shown,
            "Converting",
            if sparse == 0 || shown == Target::Off {
                total
            } else {
                sources.data_bytes(0, total)?
            },
            1.0,
        ),
        count_data: shown != Target::Off || limit.is_some(),
        progress_data: shown != Target::Off,
        limit,
        turn: (in_turn && workers > 1).then(Turn::default),
        // A probed raw target's first sector is checked by the engine.
        split_writes: target.data_in_clear() && !target.guards_first_sector(),
        // Copies into a target with a backing file would not compare
        // with it (see `copy`): only onto what needs all the data, and a
        // file the kernel may copy into (not NBD, not under blkdebug).
        offload: AtomicBool::new(
            a.copy_offload
                && !compress
                && target.data_in_clear()
                && !target.guards_first_sector()
                && target.backing().is_none()
                && target.data_storage().file().is_some()
                && !target.data_storage().has_faults(),
        ),
        failed: AtomicBool::new(false),
        no_reserve: AtomicBool::new(false),
        error: Mutex::new(None),
    };
    // The sources as one disk: a target cluster that straddles two of
    // them is still written (and compressed) whole.
    let claims = copy::Claims::new(sparse != 0);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| job.worker(&sources, &claims));
        }
    });
    if let Some((_, e)) = job.error.lock().unwrap().take() {
        return Err(e);
    }
    crate::bitmap::convert_copy(&src_bitmaps, first_src.as_ref(), target.as_ref())?;
    target.flush()?;
    job.progress.complete();
    job.progress.finish();
    Ok(0)
}
