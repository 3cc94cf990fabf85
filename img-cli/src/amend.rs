//! `rimg amend`: changes format options of an existing qcow2 image.

use std::path::Path;

use clap::Args;
use qcow2::{Amend, Format, OpenOptions};

use crate::opts::{parse_bool, OptList};
use crate::CliError;

#[derive(Args)]
pub struct AmendArgs {
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Options to change: compat, refcount_bits, lazy_refcounts,
    /// backing_file, backing_fmt
    #[arg(short = 'o', value_name = "OPTIONS", required = true)]
    options: Vec<String>,
    #[arg(short = 'p')]
    progress: bool,
    #[arg(short = 'q')]
    quiet: bool,
    #[arg(short = 't', value_name = "CACHE")]
    cache: Option<String>,
    /// Allow changes that qemu-img guards with --force (accepted)
    #[arg(long)]
    force: bool,
    filename: String,
}

pub fn run(a: AmendArgs) -> Result<u8, CliError> {
    let _ = (a.progress, a.quiet, &a.cache, a.force);
    let format = match &a.format {
        Some(f) => Some(
            Format::from_name(f)
                .ok_or_else(|| CliError::new(format!("Unknown file format '{f}'")))?,
        ),
        None => None,
    };
    let list = OptList::parse(&a.options).map_err(CliError::new)?;
    let mut am = Amend::default();
    for (k, v) in &list.items {
        match k.as_str() {
            "compat" => {
                am.version = Some(match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(CliError::new(format!("Invalid compatibility level: '{v}'"))),
                })
            }
            "refcount_bits" => {
                am.refcount_bits = Some(
                    v.parse()
                        .map_err(|_| CliError::new(format!("Invalid refcount_bits: '{v}'")))?,
                )
            }
            "lazy_refcounts" => am.lazy_refcounts = Some(parse_bool(k, v).map_err(CliError::new)?),
            "backing_file" => am.backing_file = Some((!v.is_empty()).then(|| v.clone())),
            "backing_fmt" => am.backing_format = Some((!v.is_empty()).then(|| v.clone())),
            "cluster_size" => {
                return Err(CliError::new("Changing the cluster size is not supported"))
            }
            "preallocation" => {
                return Err(CliError::new(
                    "Changing the preallocation mode is not supported",
                ))
            }
            "compression_type" => {
                return Err(CliError::new(
                    "Changing the compression type is not supported",
                ))
            }
            "size" => {
                return Err(CliError::new(
                    "Changing the size with amend is not supported; use resize",
                ))
            }
            _ => return Err(CliError::new(format!("Invalid parameter '{k}'"))),
        }
    }
    let img = qcow2::open(
        Path::new(&a.filename),
        &OpenOptions {
            writable: true,
            format,
            ..Default::default()
        },
    )
    .map_err(|e| CliError::new(format!("Could not open '{}': {e}", a.filename)))?;
    let Some(q) = img.as_qcow2() else {
        return Err(CliError::new(format!(
            "Format driver '{}' does not support option amendment",
            img.format().name()
        )));
    };
    if am.backing_changes(&q.header()) {
        return Err(CliError::new(
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
        ));
    }
    q.amend(&am).map_err(|e| {
        CliError::new(match e {
            // qemu-img prints the driver's message as it is.
            qcow2::Error::InvalidArgument(m) => m,
            e => e.to_string(),
        })
    })?;
    Ok(0)
}
