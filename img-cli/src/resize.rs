//! `rimg resize`: changes an image's virtual size to SIZE, or by +SIZE /
//! -SIZE, with qemu-img resize's checks, messages and exit codes (1 for
//! every error).

use std::path::{Path, PathBuf};

use clap::Args;
use qcow2::Preallocation;
use serde_json::json;

use crate::common::{open_opts, parse_format, qemu_len};
use crate::size::parse_size;
use crate::CliError;

#[derive(Args)]
pub struct ResizeArgs {
    /// Image format (probed when absent)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Allow the new size to be smaller than the current one
    #[arg(long)]
    shrink: bool,
    /// Preallocation of the new area: off, metadata (qcow2), falloc, full
    #[arg(long, value_name = "PREALLOC", default_value = "off")]
    preallocation: String,
    /// Quiet: print nothing on success
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    filename: String,
    /// New size, or +SIZE / -SIZE to grow or shrink by (k, M, G, T, P, E
    /// suffixes)
    #[arg(allow_hyphen_values = true, value_name = "[+|-]SIZE")]
    size: String,
}

pub fn run(a: ResizeArgs) -> Result<u8, CliError> {
    let prealloc = Preallocation::from_name(&a.preallocation).ok_or_else(|| {
        CliError::new(format!("Invalid preallocation mode '{}'", a.preallocation))
    })?;
    let (sign, digits) = match a.size.as_bytes().first() {
        Some(b'+') => (1i128, &a.size[1..]),
        Some(b'-') => (-1i128, &a.size[1..]),
        _ => (0, a.size.as_str()),
    };
    let n = match parse_size(digits) {
        Some(n) => n,
        None if digits.starts_with('-') => {
            return Err(CliError::new(format!(
                "Value '{digits}' is out of range for parameter 'size'"
            )))
        }
        None => {
            return Err(CliError::new(
                "Parameter 'size' expects a non-negative number below 2^64",
            ))
        }
    };
    if !a.image_opts {
        if let Some(link) = daemon_link(&a.filename) {
            return via_daemon(&a, &link, sign, n, prealloc);
        }
    }
    let img = open_opts(
        &a.filename,
        a.image_opts,
        parse_format(&a.format)?,
        true,
        false,
    )?;
    let current = qemu_len(img.as_ref());
    let total = new_size(&a, current, sign, n, prealloc)?;
    match img.as_qcow2() {
        Some(q) => {
            if !total.is_multiple_of(512) {
                return Err(CliError::new("The new size must be a multiple of 512"));
            }
            q.resize_preallocated(total, prealloc).map_err(engine_err)?;
        }
        None => {
            // Refused before any change, as qemu-img does.
            if prealloc == Preallocation::Metadata {
                return Err(CliError::new("Unsupported preallocation mode: metadata"));
            }
            let old = img.size();
            img.resize(total).map_err(engine_err)?;
            if total > old {
                let st = img.storage();
                // Where guest byte 0 is in the file: a luks payload
                // follows its header (QEMU preallocates the file's tail).
                let base = st.len().map_err(engine_err)?.saturating_sub(total);
                let at = base + old;
                match prealloc {
                    Preallocation::Off | Preallocation::Metadata => Ok(()),
                    Preallocation::Falloc => st.allocate(at, total - old),
                    // Allocated zeros, not holes.
                    Preallocation::Full => st.write_zeroes(at, total - old),
                }
                .map_err(engine_err)?;
            }
        }
    }
    img.flush().map_err(engine_err)?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}

/// The size asked for (SIZE, or +SIZE / -SIZE from `current`), with
/// qemu-img resize's checks in its order.
fn new_size(
    a: &ResizeArgs,
    current: u64,
    sign: i128,
    n: u64,
    prealloc: Preallocation,
) -> Result<u64, CliError> {
    let total = if sign == 0 {
        n as i128
    } else {
        current as i128 + sign * n as i128
    };
    if total <= 0 {
        return Err(CliError::new("New image size must be positive"));
    }
    if total > i64::MAX as i128 {
        return Err(CliError::new(
            "Parameter 'size' expects a non-negative number below 2^64",
        ));
    }
    let total = total as u64;
    if total <= current && prealloc != Preallocation::Off {
        return Err(CliError::new(
            "Preallocation can only be used for growing images",
        ));
    }
    if total < current && !a.shrink {
        return Err(CliError::new(
            "Use the --shrink option to perform a shrink operation.",
        ));
    }
    Ok(total)
}

/// Engine errors carry qemu-img's message where there is one.
fn engine_err(e: qcow2::Error) -> CliError {
    match e {
        qcow2::Error::InvalidArgument(m) => CliError::new(m),
        e => CliError::new(e.to_string()),
    }
}

/// The control socket of a running daemon serving `filename`
/// (rimg-vhost-blk started with `--control` publishes a link to it,
/// `qcow2::paths::control_link`), if one answers there.
fn daemon_link(filename: &str) -> Option<PathBuf> {
    let meta = std::fs::metadata(qcow2::paths::host_path(Path::new(filename))).ok()?;
    let link = qcow2::paths::control_link(&meta);
    if !qcow2::paths::trusted_dir(link.parent()?) {
        return None;
    }
    // A link left by a daemon that was killed leads nowhere.
    crate::ctl::request(&link, &json!({"execute": "query-status"})).ok()?;
    Some(link)
}

/// Resizes through the daemon serving the image: the guest sees the new
/// size at once. The daemon only grows a disk, with no preallocation.
fn via_daemon(
    a: &ResizeArgs,
    link: &Path,
    sign: i128,
    n: u64,
    prealloc: Preallocation,
) -> Result<u8, CliError> {
    let served =
        |m: &str| CliError::new(format!("{}: served by a running daemon: {m}", a.filename));
    let block = crate::ctl::request(link, &json!({"execute": "query-block"}))?;
    // The link may be stale and its socket taken by a daemon serving
    // another image: only the daemon of this very file is asked.
    let meta = std::fs::metadata(qcow2::paths::host_path(Path::new(&a.filename)))
        .map_err(|e| CliError::new(format!("{}: {e}", a.filename)))?;
    let same = {
        use std::os::unix::fs::MetadataExt;
        block["file-dev"].as_u64() == Some(meta.dev())
            && block["file-ino"].as_u64() == Some(meta.ino())
    };
    if !same {
        return Err(served(&format!(
            "{} answers for another image ({}): remove that stale link",
            link.display(),
            block["image"],
        )));
    }
    if let Some(f) = &a.format {
        if block["format"].as_str() != Some(f.as_str()) {
            return Err(served(&format!(
                "it serves the image as {}",
                block["format"]
            )));
        }
    }
    let current = block["virtual-size"]
        .as_u64()
        .ok_or_else(|| served("it did not say the disk's size"))?;
    let total = new_size(a, current, sign, n, prealloc)?;
    if prealloc != Preallocation::Off {
        return Err(served("online resize takes no --preallocation"));
    }
    crate::ctl::request(
        link,
        &json!({"execute": "resize", "arguments": {"size": total}}),
    )
    .map_err(|e| served(&e.msg))?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}
