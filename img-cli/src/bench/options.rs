//! `rimg bench`'s options and the checked parameters of a run.

use clap::Args;

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
    pub(super) count: String,
    /// Requests in flight
    #[arg(
        short = 'd',
        long = "depth",
        allow_hyphen_values = true,
        value_name = "DEPTH",
        default_value = "64"
    )]
    pub(super) depth: String,
    /// Image format
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub(super) format: Option<String>,
    /// Cache mode: writeback, writethrough, none, directsync, unsafe
    #[arg(
        short = 't',
        long = "cache",
        value_name = "CACHE",
        default_value = "writeback"
    )]
    pub(super) cache: String,
    /// Size of each request
    #[arg(
        short = 's',
        long = "buffer-size",
        allow_hyphen_values = true,
        value_name = "BUFFER_SIZE",
        default_value = "4096"
    )]
    pub(super) size: String,
    /// Offset of the first request
    #[arg(
        short = 'o',
        long = "offset",
        allow_hyphen_values = true,
        value_name = "OFFSET",
        default_value = "0"
    )]
    pub(super) offset: String,
    /// Distance between request offsets (default: the request size)
    #[arg(
        short = 'S',
        long = "step-size",
        allow_hyphen_values = true,
        value_name = "STEP_SIZE"
    )]
    pub(super) step: Option<String>,
    /// AIO backend: threads, native or io_uring (rimg always uses io_uring;
    /// native needs -t none or directsync, as in qemu-img)
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    pub(super) aio: Option<String>,
    /// Native AIO (needs -t none or directsync)
    #[arg(short = 'n', long = "native")]
    pub(super) native: bool,
    /// Write instead of read
    #[arg(short = 'w', long = "write")]
    pub(super) write: bool,
    /// Byte written by write tests (default 0)
    #[arg(long, value_name = "PATTERN", allow_hyphen_values = true)]
    pub(super) pattern: Option<String>,
    /// Flush after this many requests (write tests)
    #[arg(
        long = "flush-interval",
        value_name = "FLUSH_INTERVAL",
        allow_hyphen_values = true
    )]
    pub(super) flush_interval: Option<String>,
    /// Flush without waiting for the requests in flight
    #[arg(long = "no-drain")]
    pub(super) no_drain: bool,
    /// Accepted for compatibility (qemu-img bench prints its report anyway)
    #[arg(short = 'q', long = "quiet")]
    pub(super) quiet: bool,
    /// Open the image without taking locks
    #[arg(short = 'U', long = "force-share")]
    pub(super) force_share: bool,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    pub(super) image_opts: bool,
    /// rimg only: when writes allocate clusters at the end of a qcow2
    /// file, reserve this much file space ahead of them at a time
    /// (fallocate; trimmed at the end); 0 turns it off
    #[arg(
        long = "preallocate-ahead",
        value_name = "SIZE",
        default_value = "128M"
    )]
    pub(super) prealloc: String,
    pub(super) filename: String,
}

/// What `-t` selects (QEMU's bdrv_parse_cache_mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cache {
    /// O_DIRECT data I/O.
    pub(super) direct: bool,
    /// Flush after every write.
    pub(super) writethrough: bool,
    /// Never flush to the host.
    pub(super) no_flush: bool,
}

pub(super) fn parse_cache(s: &str) -> Option<Cache> {
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
pub(super) struct Params {
    pub(super) count: u64,
    pub(super) depth: usize,
    pub(super) size: usize,
    pub(super) step: u64,
    pub(super) offset: u64,
    pub(super) pattern: u8,
    pub(super) flush_interval: u64,
    pub(super) cache: Cache,
    pub(super) prealloc: u64,
}

pub(super) fn parse(a: &BenchArgs) -> Result<Params, CliError> {
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
