//! `rimg checksum`: prints the checksum of an image's guest-visible
//! content, as sha256sum prints a file's (`HEX  NAME`, a name with a
//! backslash or a line break escaped as coreutils does). The algorithm
//! and why it is fast: `qcow2::checksum`.

use clap::Args;
use qcow2::blockstatus::Chain;
use qcow2::checksum::{checksum, hex, ChecksumError};

use crate::common::{display_name, open_opts, os_error_text, parse_format, sentence};
use crate::progress::{Progress, ProgressOpt};
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
    #[command(flatten)]
    progress: ProgressOpt,
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
    let progress = Progress::new(a.progress.target(false), "Checksumming", chain.len(), 1.0);
    let never = std::sync::atomic::AtomicBool::new(false);
    let r = checksum(&chain, threads, &|n| progress.add(n), &never);
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
            e => sentence(&e.to_string()),
        })
    })?;
    let hex = hex(&d);
    let name = match crate::blockopts::is_special(&a.filename) || a.image_opts {
        true => crate::blockopts::parse(&a.filename, a.image_opts)?.name,
        false => display_name(&a.filename),
    };
    println!("{}", line(&hex, &name));
    Ok(0)
}

/// sha256sum's line: a name holding a backslash or a line break is
/// escaped, and the line then starts with a backslash, so that each
/// line stays one entry for `sha256sum -c`-style readers.
fn line(hex: &str, name: &str) -> String {
    if !name.contains(['\\', '\n', '\r']) {
        return format!("{hex}  {name}");
    }
    let escaped = name
        .replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\r', "\\r");
    format!("\\{hex}  {escaped}")
}

#[cfg(test)]
mod tests {
    use super::line;

    #[test]
    fn names_escaped_as_sha256sum_escapes_them() {
        assert_eq!(line("ab", "disk.qcow2"), "ab  disk.qcow2");
        assert_eq!(line("ab", "we\\ird\nname"), "\\ab  we\\\\ird\\nname");
    }
}
