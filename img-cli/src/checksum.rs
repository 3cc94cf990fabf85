//! `rimg checksum`: prints the checksum of an image's guest-visible
//! content, as sha256sum prints a file's (`HEX  NAME`). The algorithm
//! and why it is fast: `qcow2::checksum`.

use clap::Args;
use qcow2::blockstatus::Chain;
use qcow2::checksum::{checksum, hex, ChecksumError};

use crate::common::{display_name, open_opts, os_error_text, parse_format, sentence};
use crate::progress::Progress;
use crate::CliError;

#[derive(Args)]
pub struct ChecksumArgs {
    /// Format of FILENAME (probed when absent)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// FILENAME is an option string (driver=...,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Cache mode (accepted for compatibility)
    #[arg(short = 'T', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Open the image even if another process uses it
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Threads hashing at once (default: the CPUs, at most 8)
    #[arg(long = "parallel", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    parallel: Option<u16>,
    filename: String,
}

pub fn run(a: ChecksumArgs) -> Result<u8, CliError> {
    let _ = &a.cache;
    let img = open_opts(
        &a.filename,
        a.image_opts,
        parse_format(&a.format)?,
        false,
        a.force_share,
    )?;
    let chain = Chain::new(&img)
        .map_err(|e| CliError::new(format!("Could not open '{}': {e}", a.filename)))?;
    let threads = match a.parallel {
        Some(n) => n as usize,
        None => std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
    };
    let progress = Progress::new(a.progress, "Checksumming", chain.len(), 1.0);
    let r = checksum(&chain, threads, &|n| progress.add(n));
    progress.finish();
    let d = r.map_err(|e| {
        CliError::new(match e {
            ChecksumError::Status { offset, source } => {
                format!("Block status failed at offset {offset}: {source}")
            }
            ChecksumError::Read { offset, source } => sentence(&format!(
                "error while reading offset {offset}: {}",
                os_error_text(&source)
            )),
        })
    })?;
    let hex = hex(&d);
    let name = match crate::blockopts::is_special(&a.filename) || a.image_opts {
        true => crate::blockopts::parse(&a.filename, a.image_opts)?.name,
        false => display_name(&a.filename),
    };
    println!("{hex}  {name}");
    Ok(0)
}
