//! `rimg snapshot`: list, create, apply and delete internal snapshots.

use clap::Args;
use qcow2::OpenOptions;

use crate::CliError;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("op").args(["list", "apply", "create", "delete"])))]
pub struct SnapshotArgs {
    /// List snapshots (the default)
    #[arg(short = 'l', long = "list")]
    list: bool,
    /// Revert the disk to a snapshot
    #[arg(short = 'a', long = "apply", value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Create a snapshot
    #[arg(short = 'c', long = "create", value_name = "SNAPSHOT")]
    create: Option<String>,
    /// Delete a snapshot
    #[arg(short = 'd', long = "delete", value_name = "SNAPSHOT")]
    delete: Option<String>,
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    filename: String,
}

pub fn run(a: SnapshotArgs) -> Result<u8, CliError> {
    let _ = a.quiet;
    let format = crate::common::parse_format(&a.format)?;
    let writable = a.apply.is_some() || a.create.is_some() || a.delete.is_some();
    if writable && a.force_share {
        // QEMU's block layer: sharing is for readers only.
        return Err(CliError::new(format!(
            "Could not open '{}': force-share=on can only be used with read-only images",
            a.filename
        )));
    }
    let img = crate::blockopts::open_image(
        &a.filename,
        a.image_opts,
        OpenOptions {
            writable,
            format,
            no_backing: true,
            force_share: a.force_share,
            ..Default::default()
        },
    )?
    .map_err(|e| CliError::new(format!("Could not open '{}': {e}", a.filename)))?;
    let Some(q) = img.as_qcow2() else {
        // qemu-img's words for a driver without internal snapshots.
        return match (&a.create, &a.apply, &a.delete) {
            (Some(n), ..) => Err(CliError::new(format!(
                "Could not create snapshot '{n}': Operation not supported"
            ))),
            (_, Some(n), _) => Err(CliError::new(format!(
                "Could not apply snapshot '{n}': Block driver does not support snapshots"
            ))),
            (.., Some(n)) => Err(CliError::new(format!(
                "Could not delete snapshot '{n}': snapshot not found"
            ))),
            _ => Ok(0),
        };
    };
    if let Some(name) = &a.create {
        q.snapshot_create(name).map_err(|e| {
            CliError::new(format!(
                "Could not create snapshot '{name}': {}",
                create_error(&e)
            ))
        })?;
    } else if let Some(name) = &a.apply {
        q.snapshot_goto(name).map_err(|e| match e {
            // qemu-img reports the table's problem, then the apply's
            // failure by errno.
            qcow2::Error::SnapshotL1(p) => CliError::new(format!(
                "{p}\n{}: Could not apply snapshot '{name}': Failed to load snapshot: {}",
                crate::prog_name(),
                p.errno_text()
            )),
            e => CliError::new(format!("Could not apply snapshot '{name}': {e}")),
        })?;
    } else if let Some(name) = &a.delete {
        q.snapshot_delete(name).map_err(|e| {
            CliError::new(format!(
                "Could not delete snapshot '{name}': {}",
                crate::common::error_text(&e)
            ))
        })?;
    } else {
        print!("{}", crate::info::snapshot_list(&q.snapshots()));
    }
    Ok(0)
}

/// qemu-img reports why a snapshot could not be created by errno: a
/// refcount that would overflow is EINVAL, a full snapshot table EFBIG.
fn create_error(e: &qcow2::Error) -> String {
    match e {
        qcow2::Error::RefcountOverflow(_) => "Invalid argument".into(),
        qcow2::Error::TooLarge(_) => "File too large".into(),
        // An errno alone, as qemu-img prints it (EAGAIN where a refcount
        // block for a cluster past the end of the file would be needed).
        qcow2::Error::Io { source, .. } if source.raw_os_error() == Some(libc::EAGAIN) => {
            "Resource temporarily unavailable".into()
        }
        e => e.to_string(),
    }
}
