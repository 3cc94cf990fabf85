//! `rimg commit`: writes what the top image (and any images between it
//! and the base) stores into the base image, then empties the top.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use qcow2::encrypt::Secret;
use qcow2::{ExtentKind, Format, Image, OpenOptions};

use crate::progress::{Progress, ProgressOpt};
use crate::CliError;

#[derive(Args)]
pub struct CommitArgs {
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Cache mode (accepted for compatibility)
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Commit into this image of the backing chain (default: the backing file)
    #[arg(short = 'b', long = "base", value_name = "BASE")]
    base: Option<String>,
    /// Keep the top image's data (do not empty it)
    #[arg(short = 'd', long = "drop")]
    keep: bool,
    #[command(flatten)]
    progress: ProgressOpt,
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Copy at most RATE bytes of data per second (suffixes as for sizes)
    #[arg(
        short = 'r',
        long = "rate",
        value_name = "RATE",
        allow_hyphen_values = true
    )]
    rate: Option<String>,
    /// The filename is an option string (driver=qcow2,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    filename: String,
}

/// Opens the layer at `depth` in the chain (0: the top). `keys` are the
/// chain's encryption keys, top first, as the top's options gave them.
fn open_layer(
    layer: &Layer,
    writable: bool,
    no_backing: bool,
    keys: &[Option<Secret>],
    depth: usize,
) -> Result<Arc<dyn Image>, CliError> {
    let opts = OpenOptions {
        writable,
        format: layer.format,
        no_backing,
        ..Default::default()
    };
    let (path, mut opts) = match layer.image_opts {
        true => crate::blockopts::open_options(&layer.name, true, opts)?,
        false => crate::blockopts::backing_options(Path::new(""), &layer.name, opts)?,
    };
    if depth > 0 {
        opts.qcow2.encrypt_key = keys.get(depth).cloned().flatten();
        opts.backing_keys = keys.iter().skip(depth + 1).cloned().collect();
    }
    let img = qcow2::open(&path, &opts)
        .map_err(|e| CliError::new(format!("Could not open '{}': {e}", path.display())))?;
    crate::blockopts::print_open_messages(img.as_ref());
    Ok(img)
}

/// A layer to open: its name (a resolved path, or a json:/blkdebug:
/// specification) and format.
struct Layer {
    name: String,
    format: Option<Format>,
    /// `name` is an option string (--image-opts).
    image_opts: bool,
}

impl Layer {
    fn path(&self) -> PathBuf {
        crate::blockopts::backing_options(Path::new(""), &self.name, Default::default())
            .map(|(p, _)| p)
            .unwrap_or_else(|_| PathBuf::from(&self.name))
    }
}

/// Backing file of a layer: its resolved name and format.
fn backing_of(img: &dyn Image) -> Option<Layer> {
    let h = img.as_qcow2()?.header();
    let name = h.backing_file?;
    let name = match crate::blockopts::is_special(&name) {
        true => name,
        false => qcow2::resolve_backing(img.path(), &name)
            .to_string_lossy()
            .into_owned(),
    };
    Some(Layer {
        name,
        format: h.backing_format.as_deref().and_then(Format::from_name),
        image_opts: false,
    })
}

/// Whether the base name given with -b names `backing`, the backing file
/// of the layer at `layer`. As QEMU resolves it (bdrv_find_backing_image):
/// a relative name is relative to that layer's directory, not the current
/// one, and the two must be the same file.
fn names(layer: &Path, given: &str, backing: &Path) -> bool {
    let want = qcow2::resolve_backing(layer, given);
    match (std::fs::canonicalize(want), std::fs::canonicalize(backing)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

pub fn run(a: CommitArgs) -> Result<u8, CliError> {
    let _ = &a.cache;
    let limit = crate::rate::Limit::parse(&a.rate)?;
    let format = match &a.format {
        Some(f) => Some(
            Format::from_name(f)
                .ok_or_else(|| CliError::new(format!("Unknown file format '{f}'")))?,
        ),
        None => None,
    };
    // Each layer is opened on its own: the keys the top's options give
    // for its backing chain go to each layer by depth.
    let keys: Vec<Option<Secret>> = match a.image_opts {
        true => {
            let (_, o) = crate::blockopts::open_options(&a.filename, true, OpenOptions::default())?;
            std::iter::once(o.qcow2.encrypt_key)
                .chain(o.backing_keys)
                .collect()
        }
        false => Vec::new(),
    };
    let top = open_layer(
        &Layer {
            name: a.filename.clone(),
            format,
            image_opts: a.image_opts,
        },
        !a.keep,
        true,
        &keys,
        0,
    )?;
    // The layers above the base, top first, each opened on its own so that
    // the base can be opened for writing.
    let mut layers = vec![top];
    let base_layer = loop {
        let cur = layers.last().unwrap();
        let Some(next) = backing_of(cur.as_ref()) else {
            return Err(CliError::new(match &a.base {
                None => "Image does not have a backing file".to_string(),
                Some(b) => format!(
                    "Did not find '{b}' in the backing chain of '{}'",
                    a.filename
                ),
            }));
        };
        if a.base
            .as_deref()
            .is_none_or(|b| names(cur.path(), b, &next.path()))
        {
            break next;
        }
        if layers.len() > qcow2::open::MAX_CHAIN_DEPTH {
            return Err(CliError::new("backing chain is too deep"));
        }
        let depth = layers.len();
        layers.push(open_layer(&next, false, true, &keys, depth)?);
    };
    let base = open_layer(&base_layer, true, false, &keys, layers.len())?;
    let size = layers[0].size();
    if base.size() < size {
        base.resize(size)?;
    }
    let progress = Progress::new(a.progress.target(a.quiet), "Committing", size, 1.0);
    // Failures while copying are the block job's, as qemu-img words them.
    copy_down(&layers, base.as_ref(), size, &progress, limit.as_ref())
        .and_then(|()| base.flush())
        .map_err(|e| {
            CliError::new(format!(
                "Block job failed: {}",
                crate::common::os_error_text(&e)
            ))
        })?;
    // As qemu-img: the top is emptied only when its own backing file is
    // the base by default; -b implies -d (with images in between, they
    // would show through; and a named base is kept apart from the top).
    if !a.keep && a.base.is_none() {
        if let Some(q) = layers[0].as_qcow2() {
            q.make_empty().map_err(|e| {
                CliError::new(format!(
                    "Failed to empty {}: {}",
                    a.filename,
                    crate::common::os_error_text(&e)
                ))
            })?;
        }
        layers[0].flush()?;
    }
    progress.complete();
    progress.finish();
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}

/// Copies every range that one of `layers` (top first) stores into `base`.
fn copy_down(
    layers: &[Arc<dyn Image>],
    base: &dyn Image,
    size: u64,
    progress: &Progress,
    limit: Option<&crate::rate::Limit>,
) -> qcow2::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let want = (size - pos).min(buf.len() as u64);
        // The topmost layer that decides this range, and for how long.
        let mut len = want;
        let mut decided = None;
        for l in layers {
            if pos >= l.size() {
                continue;
            }
            let e = l.block_status(pos, len.min(l.size() - pos))?;
            len = len.min(e.len);
            if e.kind != ExtentKind::Unallocated {
                decided = Some((l, e.kind));
                break;
            }
        }
        match decided {
            // As qemu-img: zeros may release the base's clusters.
            Some((_, ExtentKind::Zero)) => base.write_zeroes(pos, len, true)?,
            Some((l, _)) => {
                let b = &mut buf[..len as usize];
                l.read_at(b, pos)?;
                base.write_at(b, pos)?;
                if let Some(l) = limit {
                    l.take(len);
                }
            }
            None => {}
        }
        pos += len;
        progress.add(len);
    }
    Ok(())
}
