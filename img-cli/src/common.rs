//! Opening images and reading them the way qemu-img's block layer sees
//! them, shared by map, compare, resize and dd.

use std::sync::Arc;

use qcow2::{Format, Image, OpenOptions};

use crate::CliError;

/// The format named by `-f`/`-F`/`-O`, if any.
pub fn parse_format(f: &Option<String>) -> Result<Option<Format>, CliError> {
    match f {
        None => Ok(None),
        Some(f) => Format::from_name(f)
            .map(Some)
            .ok_or_else(|| CliError::new(format!("Unknown file format '{f}'"))),
    }
}

/// Opens `name` (and its backing chain) as qemu-img's commands do;
/// `name` an option string when `image_opts` (qemu-img's
/// --image-opts); `json:` and `blkdebug:` names go through
/// [`crate::blockopts`] too.
pub fn open_opts(
    name: &str,
    image_opts: bool,
    format: Option<Format>,
    writable: bool,
    force_share: bool,
) -> Result<Arc<dyn Image>, CliError> {
    if let Some(img) = crate::blockopts::open_null(name, image_opts)? {
        return Ok(img);
    }
    let opts = OpenOptions {
        writable,
        format,
        force_share,
        ..Default::default()
    };
    let (path, opts) = crate::blockopts::open_options(name, image_opts, opts)?;
    let img = qcow2::open(&path, &opts)
        .map_err(|e| CliError::new(format!("Could not open '{name}': {e}")))?;
    crate::blockopts::print_open_messages(img.as_ref());
    Ok(img)
}

pub use qcow2::blockstatus::{qemu_len, read_padded};

pub use qcow2::zeros::{is_zero, zero_prefix};

/// An I/O error as C's strerror prints it ("Input/output error"), without
/// Rust's " (os error N)" suffix.
pub fn strerror(e: &std::io::Error) -> String {
    qcow2::error::strerror(e)
}

/// `msg` with its first letter capitalised, as qemu-img starts messages.
pub fn sentence(msg: &str) -> String {
    let mut c = msg.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// An error as qemu-img words an OS error: the system's text alone
/// ("No such file or directory"), without Rust's " (os error N)".
pub fn os_error_text(e: &qcow2::Error) -> String {
    let inner = match e {
        qcow2::Error::Open { source, .. } | qcow2::Error::Io { source, .. } => source.to_string(),
        e => e.to_string(),
    };
    qcow2::error::without_os_code(inner)
}

/// A filename as QEMU shows it: without a `file:` prefix, and a relative
/// name with a colon (which would read as a protocol prefix) as `./name`.
pub fn display_name(given: &str) -> String {
    if qcow2::nbd::is_nbd(given) {
        return qcow2::nbd::display_name(given);
    }
    match given.strip_prefix("file:") {
        Some(rest) if !rest.starts_with('/') && rest.contains(':') => format!("./{rest}"),
        Some(rest) => rest.to_string(),
        None => given.to_string(),
    }
}

/// An engine error's text without Rust's " (os error N)" suffix, as
/// qemu-img prints an errno.
pub fn error_text(e: &qcow2::Error) -> String {
    qcow2::error::without_os_code(e.to_string())
}

/// Makes `img` read as internal snapshot `spec` (convert's and
/// measure's -l): an ID or name, or
/// `snapshot.id=ID[,snapshot.name=NAME]` / `snapshot.name=NAME`.
pub fn load_snapshot(img: &dyn Image, spec: &str) -> Result<(), CliError> {
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
            "Failed to load snapshot: Block format '{}' used by device '' does not support temporarily loading internal snapshots",
            img.format().name()
        )));
    };
    q.snapshot_load_tmp(name.unwrap_or(""), id)
        .map_err(|e| CliError::new(format!("Failed to load snapshot: {e}")))
}
